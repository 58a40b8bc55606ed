#include "tensorreg/index/safetensors_export.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string_view>
#include <utility>
#include <vector>

#include "memory/system_calls.hpp"
#include "tensorreg/common/random.hpp"
#include "tensorreg/common/unique_fd.hpp"
#include "tensorreg/index/dtype.hpp"

namespace tensorreg::index {
namespace {

// The torch dtype strings of dtype.cpp back to safetensors names (torch.uint8 is U8: BOOL
// files become torch.uint8 on the way in, DECISIONS §5.18, and both export as U8).
std::string_view safetensors_name(std::string_view torch) {
  static constexpr std::pair<std::string_view, std::string_view> names[] = {
      {"torch.float16", "F16"},
      {"torch.bfloat16", "BF16"},
      {"torch.float32", "F32"},
      {"torch.float", "F32"},
      {"torch.float64", "F64"},
      {"torch.double", "F64"},
      {"torch.int8", "I8"},
      {"torch.int16", "I16"},
      {"torch.int32", "I32"},
      {"torch.int64", "I64"},
      {"torch.uint8", "U8"},
      {"torch.bool", "BOOL"},
      {"torch.float8_e4m3fn", "F8_E4M3"},
      {"torch.float8_e5m2", "F8_E5M2"},
      {"torch.uint16", "U16"},
      {"torch.uint32", "U32"},
      {"torch.uint64", "U64"},
  };
  for (const auto& [t, s] : names) {
    if (t == torch) return s;
  }
  return {};
}

// Where one entry's bytes lie in the canonical buffer.
struct span_of {
  std::uint64_t begin = 0;
  std::uint64_t length = 0;
};

result<span_of> tensor_bytes(const entry& e) {
  const auto refuse = [&](const std::string& why) {
    return fail(errc::failed_precondition, "cannot export tensor '" + e.name + "' as safetensors: " + why);
  };
  const auto size = element_size(e.dtype);
  if (!size || safetensors_name(e.dtype).empty()) return refuse("safetensors has no name for dtype '" + e.dtype + "'");
  if (e.stride.size() != e.shape.size()) return refuse("its shape and stride differ in length");
  std::uint64_t numel = 1;
  std::int64_t expected = 1;
  for (std::size_t k = e.shape.size(); k-- > 0;) {
    if (e.shape[k] < 0) return refuse("a dimension is negative");
    if (e.shape[k] != 1 && e.stride[k] != expected) return refuse("it is not row-major contiguous");
    if (__builtin_mul_overflow(numel, static_cast<std::uint64_t>(e.shape[k]), &numel)) return refuse("it is too large");
    expected *= std::max<std::int64_t>(e.shape[k], 1);
  }
  std::uint64_t length = 0, first = 0, begin = 0, end = 0;
  if (__builtin_mul_overflow(numel, std::uint64_t{*size}, &length) ||
      __builtin_mul_overflow(static_cast<std::uint64_t>(e.storage_offset), std::uint64_t{*size}, &first) ||
      __builtin_add_overflow(e.offset, first, &begin) || __builtin_add_overflow(begin, length, &end) ||
      end > e.offset + e.size) {
    return refuse("its elements run past its storage");
  }
  return span_of{begin, length};
}

}  // namespace

result<std::string> safetensors_export_header(const canonical_index& index) {
  nlohmann::json header = nlohmann::json::object();  // keys sorted by bytes, as the entries
  std::uint64_t cursor = 0;
  for (const auto& e : index.entries()) {
    TENSORREG_TRY_ASSIGN(auto bytes, tensor_bytes(e));
    header[e.name] = {
        {"dtype", safetensors_name(e.dtype)}, {"shape", e.shape}, {"data_offsets", {cursor, cursor + bytes.length}}};
    cursor += bytes.length;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data section starts 8-aligned
  std::string out(8, '\0');
  std::uint64_t n = text.size();
  for (int k = 0; k < 8; ++k) out[static_cast<std::size_t>(k)] = static_cast<char>((n >> (8 * k)) & 0xff);
  return out + text;
}

status export_safetensors(const canonical_index& index, const memory::byte_source& bytes, const std::string& path,
                          const std::function<void(std::uint64_t, std::uint64_t)>& progress) {
  const std::string what = "cannot export to '" + path + "'";
  if (bytes.size() != index.total_size()) {
    return fail(errc::invalid_argument, what + ": " + std::to_string(bytes.size()) + " bytes for an index of " +
                                            std::to_string(index.total_size()));
  }
  auto header = safetensors_export_header(index);
  if (!header) return tl::unexpected(with_context(std::move(header).error(), what));
  // A path that exists and is no regular file (/dev/null, a FIFO, a terminal) is written into
  // as it is: a rename would replace the device node or the FIFO with a file.
  struct stat existing {};
  const bool in_place = ::stat(path.c_str(), &existing) == 0 && !S_ISREG(existing.st_mode);
  if (in_place && S_ISDIR(existing.st_mode)) return fail(errc::invalid_argument, what + ": it is a directory");
  const std::string tmp = in_place ? path : path + ".tmp-" + random_hex(6);
  auto body = [&]() -> status {
    unique_fd fd(memory::sys::open(tmp.c_str(),
                                   in_place ? O_WRONLY | O_CLOEXEC : O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
    if (!fd) return tl::unexpected(memory::sys::file_error("open", tmp, errno));
    TENSORREG_TRY(memory::sys::write_all(fd.get(), std::as_bytes(std::span(header->data(), header->size())), tmp));
    std::uint64_t file_size = header->size();
    for (const auto& e : index.entries()) {
      TENSORREG_TRY_ASSIGN(auto at, tensor_bytes(e));
      file_size += at.length;
    }
    std::uint64_t written = header->size();
    for (const auto& e : index.entries()) {
      TENSORREG_TRY_ASSIGN(auto at, tensor_bytes(e));
      TENSORREG_TRY(bytes.visit(at.begin, at.length, [&](std::span<const std::byte> piece) -> status {
        TENSORREG_TRY(memory::sys::write_all(fd.get(), piece, tmp));
        written += piece.size();
        if (progress) progress(written, file_size);
        return {};
      }));
    }
    if (in_place) return {};
    if (memory::sys::fsync(fd.get()) != 0) return tl::unexpected(memory::sys::file_error("fsync", tmp, errno));
    if (memory::sys::rename(tmp.c_str(), path.c_str()) != 0)
      return tl::unexpected(memory::sys::file_error("rename", tmp, errno));
    return {};
  };
  if (auto done = body(); !done) {
    if (!in_place) ::unlink(tmp.c_str());
    return tl::unexpected(with_context(std::move(done).error(), what));
  }
  return {};
}

}  // namespace tensorreg::index
