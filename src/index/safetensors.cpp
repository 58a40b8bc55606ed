#include "tensorreg/index/safetensors.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <optional>

#include "index/json_reader.hpp"
#include "index/text.hpp"
#include "memory/system_calls.hpp"
#include "tensorreg/index/dtype.hpp"

namespace tensorreg::index {

namespace {

constexpr std::uint64_t length_field_bytes = 8;
constexpr std::uint64_t int64_max = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());

class header_context {
 public:
  explicit header_context(std::string_view label)
      : document_("safetensors header of " + detail::quote_name(label)), prefix_("cannot parse " + document_ + ": ") {}

  [[nodiscard]] tl::unexpected<error> fail(const std::string& reason) const {
    return tensorreg::fail(errc::invalid_argument, prefix_ + reason);
  }
  [[nodiscard]] tl::unexpected<error> fail_tensor(const std::string& name, const std::string& reason) const {
    return fail("tensor " + detail::quote_name(name) + " " + reason);
  }
  /// "safetensors header of 'x'", for messages made elsewhere.
  [[nodiscard]] const std::string& document() const noexcept { return document_; }

 private:
  std::string document_;
  std::string prefix_;
};

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string out = "[";
  for (std::size_t k = 0; k < shape.size(); ++k) {
    if (k != 0) out += ", ";
    out += std::to_string(shape[k]);
  }
  return out + "]";
}

std::uint64_t read_le64(std::span<const std::byte> bytes) {
  std::uint64_t v = 0;
  for (std::size_t k = 0; k < length_field_bytes; ++k) {
    v |= static_cast<std::uint64_t>(bytes[k]) << (8 * k);
  }
  return v;
}

// Checked before anything the length would size is allocated.
status check_header_length(std::uint64_t n, std::uint64_t file_size, const header_context& ctx) {
  if (file_size < length_field_bytes) {
    return ctx.fail("file of " + std::to_string(file_size) + " bytes is too short for the 8-byte header length");
  }
  if (n > safetensors_max_header_bytes) {
    return ctx.fail("header length " + std::to_string(n) + " exceeds the limit of " +
                    std::to_string(safetensors_max_header_bytes) + " bytes");
  }
  if (n > file_size - length_field_bytes) {
    return ctx.fail("header length " + std::to_string(n) + " exceeds the " +
                    std::to_string(file_size - length_field_bytes) + " bytes that follow the length field");
  }
  return {};
}

// nlohmann keeps "-0" as a signed zero; it is still a non-negative integer.
std::optional<std::uint64_t> unsigned_value(const nlohmann::json& v) {
  if (v.is_number_unsigned()) return v.get<std::uint64_t>();
  if (v.is_number_integer() && v.get<std::int64_t>() == 0) return 0;
  return std::nullopt;
}

result<safetensors_tensor> read_tensor(const std::string& name, const nlohmann::json& info, std::uint64_t data_size,
                                       const header_context& ctx) {
  if (name.empty()) return ctx.fail("tensor name is empty");
  if (name.find_first_of("/\\") != std::string::npos) {
    return ctx.fail("tensor name " + detail::quote_name(name) + " contains a path separator");
  }
  if (name.front() == '.') return ctx.fail("tensor name " + detail::quote_name(name) + " starts with '.'");
  if (!info.is_object()) return ctx.fail_tensor(name, "must be a json object");

  safetensors_tensor t;
  t.name = name;
  const auto dtype = info.find("dtype");
  if (dtype == info.end() || !dtype->is_string()) {
    return ctx.fail_tensor(name, "field 'dtype' must be a string");
  }
  t.dtype = dtype->get<std::string>();
  const auto mapped = map_safetensors_dtype(name, t.dtype);
  if (!mapped) return ctx.fail_tensor(name, "has unsupported dtype " + detail::quote_name(t.dtype));
  t.torch_dtype = mapped->torch_name;
  t.element_size = mapped->element_size;

  const auto shape = info.find("shape");
  if (shape == info.end() || !shape->is_array()) {
    return ctx.fail_tensor(name, "field 'shape' must be an array of non-negative integers");
  }
  for (const nlohmann::json& dim : *shape) {
    const auto d = unsigned_value(dim);
    if (!d) return ctx.fail_tensor(name, "field 'shape' must be an array of non-negative integers");
    if (*d > int64_max) {
      return ctx.fail_tensor(name, "field 'shape' dimension " + std::to_string(*d) + " does not fit in int64");
    }
    t.shape.push_back(static_cast<std::int64_t>(*d));
  }

  const auto offsets = info.find("data_offsets");
  const bool pair = offsets != info.end() && offsets->is_array() && offsets->size() == 2;
  const auto begin = pair ? unsigned_value((*offsets)[0]) : std::nullopt;
  const auto end = pair ? unsigned_value((*offsets)[1]) : std::nullopt;
  if (!pair || !begin || !end) {
    return ctx.fail_tensor(name, "field 'data_offsets' must be an array of two non-negative integers");
  }
  t.data_begin = *begin;
  t.data_end = *end;
  const std::string offsets_text =
      "data_offsets [" + std::to_string(t.data_begin) + ", " + std::to_string(t.data_end) + "]";
  if (t.data_begin > t.data_end) return ctx.fail_tensor(name, offsets_text + " are inverted");
  if (t.data_end > data_size) {
    return ctx.fail_tensor(name,
                           offsets_text + " end past the data section of " + std::to_string(data_size) + " bytes");
  }

  // A zero dimension empties the tensor whatever the others say; otherwise the running product
  // must stay within 64 bits.
  const bool empty = std::find(t.shape.begin(), t.shape.end(), 0) != t.shape.end();
  std::optional<std::uint64_t> nbytes = empty ? 0 : t.element_size;
  for (std::size_t k = 0; !empty && nbytes && k < t.shape.size(); ++k) {
    nbytes = detail::checked_mul(*nbytes, static_cast<std::uint64_t>(t.shape[k]));
  }
  if (!nbytes) {
    return ctx.fail_tensor(name, "shape " + shape_text(t.shape) + " of " + t.dtype + " holds more than 2^64 bytes");
  }
  if (*nbytes != t.data_end - t.data_begin) {
    return ctx.fail_tensor(name, offsets_text + " span " + std::to_string(t.data_end - t.data_begin) +
                                     " bytes but shape " + shape_text(t.shape) + " of " + t.dtype + " needs " +
                                     std::to_string(*nbytes));
  }
  return t;
}

result<safetensors_header> parse_header_json(std::string_view json, std::uint64_t n, std::uint64_t file_size,
                                             const header_context& ctx) {
  safetensors_header header;
  header.header_bytes = n;
  header.data_offset = length_field_bytes + n;
  header.data_size = file_size - header.data_offset;

  TENSORREG_TRY_ASSIGN(const nlohmann::json doc, detail::parse_json_strict(json, ctx.document()));
  if (!doc.is_object()) return ctx.fail("top level must be a json object");

  for (const auto& [key, value] : doc.items()) {
    if (key == "__metadata__") {
      if (!value.is_object()) return ctx.fail("__metadata__ must be an object of strings");
      for (const auto& [mkey, mvalue] : value.items()) {
        if (!mvalue.is_string()) {
          return ctx.fail("__metadata__ value of " + detail::quote_name(mkey) + " must be a string");
        }
        header.metadata.emplace_back(mkey, mvalue.get<std::string>());
      }
      continue;
    }
    TENSORREG_TRY_ASSIGN(auto tensor, read_tensor(key, value, header.data_size, ctx));
    header.tensors.push_back(std::move(tensor));
  }

  // nlohmann's object is a std::map, so tensors arrive sorted by name bytes already; the
  // overlap check needs them by position instead.
  std::vector<const safetensors_tensor*> by_offset;
  for (const auto& t : header.tensors) {
    if (t.data_end > t.data_begin) by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(), [](const auto* a, const auto* b) {
    return a->data_begin != b->data_begin ? a->data_begin < b->data_begin : a->data_end < b->data_end;
  });
  for (std::size_t k = 1; k < by_offset.size(); ++k) {
    const auto& a = *by_offset[k - 1];
    const auto& b = *by_offset[k];
    // Identical ranges are two names for one tensor's bytes (a tied weight): an alias, as the
    // canonical index allows (DECISIONS §5.15). Anything else that overlaps is refused.
    const bool alias = b.data_begin == a.data_begin && b.data_end == a.data_end;
    if (b.data_begin < a.data_end && !alias) {
      return ctx.fail("tensors " + detail::quote_name(a.name) + " [" + std::to_string(a.data_begin) + ", " +
                      std::to_string(a.data_end) + ") and " + detail::quote_name(b.name) + " [" +
                      std::to_string(b.data_begin) + ", " + std::to_string(b.data_end) +
                      ") overlap in the data section");
    }
  }
  return header;
}

std::string errno_text(int err) { return std::strerror(err); }

// Closes the descriptor on every path out of read_safetensors_header().
class fd_guard {
 public:
  explicit fd_guard(int fd) noexcept : fd_(fd) {}
  fd_guard(const fd_guard&) = delete;
  fd_guard& operator=(const fd_guard&) = delete;
  ~fd_guard() { ::close(fd_); }
  [[nodiscard]] int get() const noexcept { return fd_; }

 private:
  int fd_;
};

status pread_exact(int fd, std::span<std::byte> out, std::uint64_t offset, const std::string& path) {
  std::size_t done = 0;
  while (done < out.size()) {
    const ssize_t got = memory::sys::pread(fd, out.data() + done, out.size() - done, offset + done);
    if (got < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      return fail(errc_of_errno(err, errc::unavailable),
                  "cannot read safetensors file " + detail::quote_name(path) + ": " + errno_text(err));
    }
    if (got == 0) {
      return fail(errc::data_loss, "cannot read safetensors file " + detail::quote_name(path) +
                                       ": file ended at byte " + std::to_string(offset + done) +
                                       " while reading its header");
    }
    done += static_cast<std::size_t>(got);
  }
  return {};
}

}  // namespace

result<safetensors_header> parse_safetensors_header(std::span<const std::byte> prefix, std::uint64_t file_size,
                                                    std::string_view label) {
  const header_context ctx(label);
  if (prefix.size() < length_field_bytes || file_size < length_field_bytes) {
    return ctx.fail("file of " + std::to_string(std::min<std::uint64_t>(prefix.size(), file_size)) +
                    " bytes is too short for the 8-byte header length");
  }
  const std::uint64_t n = read_le64(prefix);
  TENSORREG_TRY(check_header_length(n, file_size, ctx));
  if (prefix.size() - length_field_bytes < n) {
    return ctx.fail("buffer of " + std::to_string(prefix.size()) + " bytes ends before the " + std::to_string(n) +
                    "-byte header");
  }
  const std::string_view json(reinterpret_cast<const char*>(prefix.data()) + length_field_bytes,
                              static_cast<std::size_t>(n));
  return parse_header_json(json, n, file_size, ctx);
}

result<safetensors_header> parse_safetensors_header(std::span<const std::byte> file, std::string_view label) {
  return parse_safetensors_header(file, file.size(), label);
}

result<safetensors_file> read_safetensors_header(const std::string& path) {
  const std::string what = "cannot open safetensors file " + detail::quote_name(path) + ": ";
  const int fd = memory::sys::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    const errc code = (err == ENOENT || err == ENOTDIR) ? errc::not_found
                      : (err == EACCES || err == EPERM) ? errc::permission_denied
                                                        : errc_of_errno(err, errc::unavailable);
    return fail(code, what + errno_text(err));
  }
  const fd_guard guard(fd);
  struct stat st {};
  if (::fstat(fd, &st) != 0) return fail(errc::unavailable, what + errno_text(errno));
  if (!S_ISREG(st.st_mode)) return fail(errc::invalid_argument, what + "not a regular file");
  const auto file_size = static_cast<std::uint64_t>(st.st_size);

  const header_context ctx(path);
  std::array<std::byte, length_field_bytes> length_bytes{};
  if (file_size < length_field_bytes) {
    return ctx.fail("file of " + std::to_string(file_size) + " bytes is too short for the 8-byte header length");
  }
  TENSORREG_TRY(pread_exact(fd, length_bytes, 0, path));
  const std::uint64_t n = read_le64(length_bytes);
  TENSORREG_TRY(check_header_length(n, file_size, ctx));
  std::string json(static_cast<std::size_t>(n), '\0');
  TENSORREG_TRY(pread_exact(fd, std::as_writable_bytes(std::span<char>(json)), length_field_bytes, path));
  TENSORREG_TRY_ASSIGN(auto header, parse_header_json(json, n, file_size, ctx));
  return safetensors_file{path, std::move(header)};
}

result<coalesced_safetensors> coalesce(std::span<const safetensors_file> files) {
  const auto fail_coalesce = [](const std::string& reason) {
    return fail(errc::invalid_argument, "cannot coalesce safetensors files: " + reason);
  };
  std::vector<std::size_t> order(files.size());
  for (std::size_t k = 0; k < order.size(); ++k) order[k] = k;
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    const std::string fa = std::filesystem::path(files[a].path).filename().string();
    const std::string fb = std::filesystem::path(files[b].path).filename().string();
    if (fa != fb) return fa < fb;
    if (files[a].path != files[b].path) return files[a].path < files[b].path;
    return a < b;
  });

  struct source {
    std::size_t file_index;
    const safetensors_tensor* tensor;
  };
  std::map<std::string_view, source> sources;
  std::vector<tensor_desc> descs;
  for (const std::size_t f : order) {
    for (const safetensors_tensor& t : files[f].header.tensors) {
      const auto [it, inserted] = sources.emplace(t.name, source{f, &t});
      if (!inserted) {
        return fail_coalesce("tensor " + detail::quote_name(t.name) + " appears in both " +
                             detail::quote_name(files[it->second.file_index].path) + " and " +
                             detail::quote_name(files[f].path));
      }
      // torch's contiguous strides: a zero-sized dimension counts as 1, so that strides stay
      // meaningful for empty tensors.
      std::vector<std::int64_t> stride(t.shape.size());
      std::uint64_t step = 1;
      for (std::size_t d = t.shape.size(); d-- > 0;) {
        stride[d] = static_cast<std::int64_t>(step);
        const auto next = detail::checked_mul(step, static_cast<std::uint64_t>(std::max<std::int64_t>(t.shape[d], 1)));
        if (d > 0 && (!next || *next > int64_max)) {
          return fail_coalesce("tensor " + detail::quote_name(t.name) + " of shape " + shape_text(t.shape) +
                               " has a row-major stride past int64");
        }
        step = next.value_or(0);
      }
      // Tensors of one file with identical data ranges share one storage (an alias); every
      // other tensor is its own storage.
      std::string storage_key =
          std::to_string(f) + ":" + std::to_string(t.data_begin) + ":" + std::to_string(t.data_end);
      if (t.data_end == t.data_begin) storage_key += ":" + t.name;  // empty tensors never alias
      descs.push_back(tensor_desc{t.name, std::string(t.torch_dtype), t.shape, std::move(stride),
                                  std::move(storage_key), t.data_end - t.data_begin, 0});
    }
  }
  if (descs.empty()) return fail_coalesce("empty tensor dict");
  if (std::all_of(descs.begin(), descs.end(), [](const tensor_desc& d) { return d.storage_nbytes == 0; })) {
    return fail_coalesce("every tensor is empty, so total_size would be 0");
  }
  TENSORREG_TRY_ASSIGN(auto index, canonical_index::build(descs));

  std::vector<tensor_placement> placements;
  placements.reserve(index.entries().size());
  for (const entry& e : index.entries()) {
    const source& s = sources.find(e.name)->second;
    placements.push_back(tensor_placement{s.file_index, files[s.file_index].header.data_offset + s.tensor->data_begin,
                                          e.size, e.offset});
  }
  return coalesced_safetensors{std::move(index), std::move(placements)};
}

}  // namespace tensorreg::index
