#include "tensorreg/index/canonical_index.hpp"

#include <algorithm>
#include <charconv>
#include <limits>
#include <unordered_map>

#include "index/json_reader.hpp"
#include "index/text.hpp"
#include "tensorreg/index/byte_range_map.hpp"

namespace tensorreg::index {

namespace {

tl::unexpected<error> fail_build(std::string reason) {
  return fail(errc::invalid_argument, "cannot build canonical index: " + std::move(reason));
}

template <typename Int>
void append_int(std::string& out, Int v) {
  char buf[24];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  out.append(buf, r.ptr);
}

void append_int_array(std::string& out, const std::vector<std::int64_t>& values) {
  out += '[';
  for (std::size_t k = 0; k < values.size(); ++k) {
    if (k != 0) out += ',';
    append_int(out, values[k]);
  }
  out += ']';
}

void append_u16_escape(std::string& out, std::uint32_t unit) {
  static constexpr char hex[] = "0123456789abcdef";
  out += "\\u";
  out += hex[(unit >> 12) & 0xF];
  out += hex[(unit >> 8) & 0xF];
  out += hex[(unit >> 4) & 0xF];
  out += hex[unit & 0xF];
}

// ---- parse -------------------------------------------------------------------------------

constexpr const char* field_names[6] = {"offset", "size", "shape", "stride", "dtype", "storage_offset"};

class entry_reader {
 public:
  entry_reader(const std::string& name, const nlohmann::json& fields) : name_(name), fields_(fields) {}

  tl::unexpected<error> fail_field(std::size_t field, const std::string& reason) const {
    return fail(errc::invalid_argument, "cannot parse index entry " + detail::quote_name(name_) + ": field " +
                                            std::to_string(field) + " (" + field_names[field] + ") " + reason);
  }

  result<std::uint64_t> unsigned_field(std::size_t field) const {
    const nlohmann::json& v = fields_[field];
    // nlohmann stores a non-negative literal as unsigned and "-0" as a signed zero; both are
    // integers Python would read as 0 or more.
    if (v.is_number_unsigned()) return v.get<std::uint64_t>();
    if (v.is_number_integer() && v.get<std::int64_t>() == 0) return 0;
    return fail_field(field, "must be a non-negative integer");
  }

  result<std::vector<std::int64_t>> int_array_field(std::size_t field) const {
    const nlohmann::json& v = fields_[field];
    if (!v.is_array()) return fail_field(field, "must be an array of integers");
    std::vector<std::int64_t> out;
    out.reserve(v.size());
    for (std::size_t k = 0; k < v.size(); ++k) {
      const nlohmann::json& x = v[k];
      if (x.is_number_unsigned()) {
        const auto u = x.get<std::uint64_t>();
        if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
          return fail_field(field,
                            "element " + std::to_string(k) + " (" + std::to_string(u) + ") does not fit in int64");
        }
        out.push_back(static_cast<std::int64_t>(u));
      } else if (x.is_number_integer()) {
        out.push_back(x.get<std::int64_t>());
      } else {
        return fail_field(field, "must be an array of integers");
      }
    }
    return out;
  }

  result<entry> read() const {
    if (!fields_.is_array()) {
      return fail(errc::invalid_argument,
                  "cannot parse index entry " + detail::quote_name(name_) + ": must be an array of 6 fields");
    }
    if (fields_.size() != 6) {
      return fail(errc::invalid_argument, "cannot parse index entry " + detail::quote_name(name_) + ": has " +
                                              std::to_string(fields_.size()) + " fields, expected 6");
    }
    entry e;
    e.name = name_;
    TENSORREG_TRY_ASSIGN(e.offset, unsigned_field(0));
    TENSORREG_TRY_ASSIGN(e.size, unsigned_field(1));
    TENSORREG_TRY_ASSIGN(e.shape, int_array_field(2));
    TENSORREG_TRY_ASSIGN(e.stride, int_array_field(3));
    if (!fields_[4].is_string()) return fail_field(4, "must be a string");
    e.dtype = fields_[4].get<std::string>();
    TENSORREG_TRY_ASSIGN(const std::uint64_t storage_offset, unsigned_field(5));
    if (storage_offset > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      return fail_field(5, "(" + std::to_string(storage_offset) + ") does not fit in int64");
    }
    e.storage_offset = static_cast<std::int64_t>(storage_offset);
    return e;
  }

 private:
  const std::string& name_;
  const nlohmann::json& fields_;
};

}  // namespace

// ---- emitter -------------------------------------------------------------------------------

bool is_valid_utf8(std::string_view text) noexcept {
  std::size_t i = 0;
  while (i < text.size()) {
    if (!detail::decode_utf8(text, i)) return false;
  }
  return true;
}

void append_json_string(std::string& out, std::string_view text) {
  out += '"';
  std::size_t i = 0;
  while (i < text.size()) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c >= 0x20 && c < 0x7F) {
      if (c == '"' || c == '\\') out += '\\';
      out += static_cast<char>(c);
      ++i;
      continue;
    }
    const auto cp = detail::decode_utf8(text, i);
    TENSORREG_ASSERT(cp.has_value());
    switch (*cp) {
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (*cp > 0xFFFF) {
          const std::uint32_t v = *cp - 0x10000;
          append_u16_escape(out, 0xD800 + (v >> 10));
          append_u16_escape(out, 0xDC00 + (v & 0x3FF));
        } else {
          append_u16_escape(out, *cp);
        }
    }
  }
  out += '"';
}

std::string emit_canonical_json(std::span<const entry> entries) {
  std::string out;
  out.reserve(2 + entries.size() * 80);  // a typical entry; growth is rare after this
  out += '{';
  for (std::size_t k = 0; k < entries.size(); ++k) {
    const entry& e = entries[k];
    if (k != 0) out += ',';
    append_json_string(out, e.name);
    out += ":[";
    append_int(out, e.offset);
    out += ',';
    append_int(out, e.size);
    out += ',';
    append_int_array(out, e.shape);
    out += ',';
    append_int_array(out, e.stride);
    out += ',';
    append_json_string(out, e.dtype);
    out += ',';
    append_int(out, e.storage_offset);
    out += ']';
  }
  out += '}';
  return out;
}

// ---- canonical_index -------------------------------------------------------------------------

result<canonical_index> canonical_index::from_entries(std::vector<entry> entries, std::uint64_t total_size) {
  if (entries.empty()) return fail_build("empty tensor dict");
  for (const entry& e : entries) {
    if (!is_valid_utf8(e.name)) {
      return fail_build("tensor name " + detail::quote_name(e.name) + " is not valid utf-8");
    }
    if (!is_valid_utf8(e.dtype)) {
      return fail_build("dtype " + detail::quote_name(e.dtype) + " of tensor " + detail::quote_name(e.name) +
                        " is not valid utf-8");
    }
    if (e.storage_offset < 0) {
      return fail_build("storage_offset " + std::to_string(e.storage_offset) + " of tensor " +
                        detail::quote_name(e.name) + " is negative");
    }
  }
  // std::string orders by unsigned bytes (char_traits<char>), which for UTF-8 is code point
  // order: the order of Python's sort_keys.
  std::sort(entries.begin(), entries.end(), [](const entry& a, const entry& b) { return a.name < b.name; });
  const auto dup = std::adjacent_find(entries.begin(), entries.end(),
                                      [](const entry& a, const entry& b) { return a.name == b.name; });
  if (dup != entries.end()) return fail_build("duplicate tensor name " + detail::quote_name(dup->name));
  if (total_size == 0) return fail_build("total_size must be > 0");
  TENSORREG_TRY(byte_range_map::from_entries(entries, total_size));
  std::string json = emit_canonical_json(entries);
  return canonical_index(std::move(entries), total_size, std::move(json));
}

result<canonical_index> canonical_index::build(std::span<const tensor_desc> tensors) {
  if (tensors.empty()) return fail_build("empty tensor dict");
  std::vector<const tensor_desc*> order;
  order.reserve(tensors.size());
  for (const tensor_desc& t : tensors) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](const tensor_desc* a, const tensor_desc* b) { return a->name < b->name; });

  struct placed {
    std::uint64_t offset;
    std::uint64_t nbytes;
    const tensor_desc* first;
  };
  std::unordered_map<std::string_view, placed> storages;
  std::vector<entry> entries;
  entries.reserve(order.size());
  std::uint64_t cursor = 0;
  std::uint64_t total_size = 0;
  for (std::size_t k = 0; k < order.size(); ++k) {
    const tensor_desc& t = *order[k];
    if (k != 0 && order[k - 1]->name == t.name) {
      return fail_build("duplicate tensor name " + detail::quote_name(t.name));
    }
    auto it = storages.find(t.storage_key);
    if (it == storages.end()) {
      const auto offset = detail::align_up(cursor, canonical_alignment);
      const auto end = offset ? detail::checked_add(*offset, t.storage_nbytes) : std::nullopt;
      if (!end) {
        return fail_build("storage of tensor " + detail::quote_name(t.name) + " (" + std::to_string(t.storage_nbytes) +
                          " bytes after offset " + std::to_string(cursor) + ") ends past 2^64");
      }
      it = storages.emplace(t.storage_key, placed{*offset, t.storage_nbytes, &t}).first;
      cursor = *end;
      total_size = std::max(total_size, *end);
    } else if (it->second.nbytes != t.storage_nbytes) {
      return fail_build("storage " + detail::quote_name(t.storage_key) + " has " + std::to_string(t.storage_nbytes) +
                        " bytes for tensor " + detail::quote_name(t.name) + " but " +
                        std::to_string(it->second.nbytes) + " bytes for tensor " +
                        detail::quote_name(it->second.first->name));
    }
    entries.push_back(
        entry{t.name, it->second.offset, it->second.nbytes, t.shape, t.stride, t.dtype, t.storage_offset});
  }
  return from_entries(std::move(entries), total_size);
}

result<canonical_index> canonical_index::parse(std::string_view json, std::optional<std::uint64_t> total_size) {
  TENSORREG_TRY_ASSIGN(const nlohmann::json doc, detail::parse_json_strict(json, "index"));
  if (!doc.is_object()) {
    return fail(errc::invalid_argument, "cannot parse index: top level must be a json object");
  }
  if (doc.empty()) return fail(errc::invalid_argument, "cannot parse index: empty tensor dict");
  std::vector<entry> entries;
  entries.reserve(doc.size());
  std::uint64_t largest_end = 0;
  for (const auto& [name, fields] : doc.items()) {
    TENSORREG_TRY_ASSIGN(entry e, entry_reader(name, fields).read());
    // An overflowing entry pushes the derived total_size to the top, so that from_entries
    // reports the entry itself.
    largest_end = std::max(largest_end,
                           detail::checked_add(e.offset, e.size).value_or(std::numeric_limits<std::uint64_t>::max()));
    entries.push_back(std::move(e));
  }
  return from_entries(std::move(entries), total_size.value_or(largest_end));
}

const entry* canonical_index::find(std::string_view name) const noexcept {
  const auto it = std::lower_bound(entries_.begin(), entries_.end(), name,
                                   [](const entry& e, std::string_view n) { return e.name < n; });
  if (it == entries_.end() || it->name != name) return nullptr;
  return &*it;
}

}  // namespace tensorreg::index
