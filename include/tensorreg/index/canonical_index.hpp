// tensorreg/index/canonical_index.hpp — the canonical index of an artifact (schema "v3").
//
// Provides `entry` (one tensor of the index), `tensor_desc` (one tensor as a client describes
// it), and `canonical_index`, an immutable, validated value: its entries sorted by the bytes of
// their UTF-8 names, its total_size, and its canonical JSON bytes, all computed once at
// creation. Three ways to create one: lay tensors out as the SDK does (`build`,
// registration.md §2.2), take entries already placed (`from_entries`, the LIP rebuild §2.3),
// or parse client-supplied JSON (`parse`, §2.4). Every path yields the same bytes for the same
// entries: exactly Python's
// `json.dumps(index, separators=(",", ":"), sort_keys=True, ensure_ascii=True)` (DECISIONS §5.13).
//
// Invariants of every canonical_index: at least one entry; names valid UTF-8 and unique;
// storage_offset >= 0; offset + size never overflows and ends at or before total_size;
// total_size > 0 (DECISIONS §5.10); entries are aliases (identical offset and size) or do not
// overlap at all (DECISIONS §5.15). A dtype outside the known table is kept as an opaque
// string (DECISIONS §5.12).
//
// Thread-safety: a canonical_index is immutable after creation; const access from any number
// of threads is safe. The static functions share no state.
// Ownership: a canonical_index owns its entries and bytes; returned references and spans live
// as long as the index they came from.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tensorreg/common/error.hpp"

namespace tensorreg::index {

/// One tensor of the index: `[offset, size, shape, stride, dtype, storage_offset]`.
struct entry {
  std::string name;                  ///< UTF-8
  std::uint64_t offset = 0;          ///< byte offset of the backing storage in the canonical buffer
  std::uint64_t size = 0;            ///< byte size of the whole backing storage
  std::vector<std::int64_t> shape;   ///< signed, as the SDK writes it (DECISIONS §5.3)
  std::vector<std::int64_t> stride;  ///< signed; a negative stride round-trips
  std::string dtype;                 ///< torch dtype string; opaque if unknown
  std::int64_t storage_offset = 0;   ///< offset of the tensor in its storage, in elements, >= 0

  friend bool operator==(const entry&, const entry&) = default;
};

/// One tensor as a client describes it, before layout. Tensors with equal `storage_key` share
/// one backing storage (aliases) and so one offset in the canonical buffer.
struct tensor_desc {
  std::string name;
  std::string dtype;
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> stride;
  std::string storage_key;           ///< opaque storage identity (e.g. "0:<base_ptr>:<nbytes>")
  std::uint64_t storage_nbytes = 0;  ///< byte size of the whole storage
  std::int64_t storage_offset = 0;   ///< elements, >= 0
};

/// The canonical layout's alignment of each storage (registration.md §2.2, DEFAULT_ALIGN).
inline constexpr std::uint64_t canonical_alignment = 8;

class canonical_index {
 public:
  /// Lays out tensors as the SDK does (registration.md §2.2): names in byte order; the first
  /// time a storage_key is seen, its storage gets the cursor rounded up to 8 and the cursor
  /// advances by its nbytes; later tensors of that storage reuse its offset; total_size is the
  /// largest end.
  /// Errors: INVALID_ARGUMENT for an empty list ("empty tensor dict"), a duplicate name, a name
  /// that is not valid UTF-8, a negative storage_offset, one storage_key with two different
  /// nbytes, a layout that overflows 64 bits, or a total_size of 0 (every storage empty).
  [[nodiscard]] static result<canonical_index> build(std::span<const tensor_desc> tensors);

  /// Takes entries already placed (in any order) and validates them against `total_size`.
  /// Errors: INVALID_ARGUMENT for no entries ("empty tensor dict"), a duplicate name, a name
  /// that is not valid UTF-8, a negative storage_offset, offset + size overflowing 64 bits or
  /// ending past total_size, total_size 0, or two entries that overlap without being aliases
  /// (DECISIONS §5.15; the message names both tensors).
  [[nodiscard]] static result<canonical_index> from_entries(std::vector<entry> entries, std::uint64_t total_size);

  /// Parses client-supplied index JSON and re-emits it canonically (rebuild_stable,
  /// registration.md §2.4). The top level must be a non-empty object; each value an array of
  /// exactly 6 fields (DECISIONS §5.17): offset (unsigned integer), size (unsigned integer),
  /// shape (array of integers), stride (array of integers), dtype (string, any value),
  /// storage_offset (unsigned integer). Integers must fit their field (64 bits; signed for
  /// shape and stride). With `total_size` unset, the largest entry end is used.
  /// Errors: INVALID_ARGUMENT for text that is not JSON (including ill-formed UTF-8 and lone
  /// surrogate escapes), a duplicate key, a top level that is not an object, `{}` ("empty
  /// tensor dict"), an entry of the wrong shape or a field of the wrong type or sign (the
  /// message names the entry and the field), and every rule of from_entries().
  [[nodiscard]] static result<canonical_index> parse(std::string_view json, std::optional<std::uint64_t> total_size);

  /// Entries sorted by the bytes of their names.
  [[nodiscard]] const std::vector<entry>& entries() const noexcept { return entries_; }
  [[nodiscard]] std::uint64_t total_size() const noexcept { return total_size_; }
  /// The canonical JSON bytes: what the index multihash is computed over.
  [[nodiscard]] const std::string& json() const noexcept { return json_; }

  /// The entry named `name`, or nullptr. Errors: none.
  [[nodiscard]] const entry* find(std::string_view name) const noexcept;

  friend bool operator==(const canonical_index& a, const canonical_index& b) noexcept {
    return a.total_size_ == b.total_size_ && a.json_ == b.json_;
  }

 private:
  canonical_index(std::vector<entry> entries, std::uint64_t total_size, std::string json)
      : entries_(std::move(entries)), total_size_(total_size), json_(std::move(json)) {}

  std::vector<entry> entries_;
  std::uint64_t total_size_ = 0;
  std::string json_;
};

/// True when `text` is well-formed UTF-8 (RFC 3629: no overlongs, surrogates or values past
/// U+10FFFF). Errors: none.
[[nodiscard]] bool is_valid_utf8(std::string_view text) noexcept;

/// Appends `text` as a JSON string literal, quotes included, escaped exactly as Python's
/// json.dumps with ensure_ascii=True: `\"`, `\\`, `\b \f \n \r \t`, other code points below
/// 0x20 and every code point from 0x7F as `\uXXXX` (lowercase hex), code points above U+FFFF as
/// a surrogate pair. Used for every string of canonical JSON, here and in other areas.
/// REQUIRES: is_valid_utf8(text).
void append_json_string(std::string& out, std::string_view text);

/// The canonical JSON of `entries`, which must already satisfy the canonical_index
/// invariants on names (sorted by bytes, unique, valid UTF-8). Exposed for callers that emit
/// an index without constructing one; canonical_index::json() is this function's output.
/// REQUIRES: entries sorted by name bytes, names unique and valid UTF-8.
[[nodiscard]] std::string emit_canonical_json(std::span<const entry> entries);

}  // namespace tensorreg::index
