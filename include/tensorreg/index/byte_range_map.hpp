// tensorreg/index/byte_range_map.hpp — which bytes of a canonical buffer hold data.
//
// Provides `byte_range_map`: an ordered list of DATA and PAD ranges that together cover
// [0, total_size) exactly (registration.md §2.5). DATA ranges say where their bytes come from
// (a source id and an offset in that source); PAD ranges read as zeros whatever was uploaded
// (DECISIONS §5.1). Two builders:
//   - from canonical index entries: each entry's (offset, size) is a DATA range of source 0 at
//     source offset = canonical offset; entries with identical (offset, size) are aliases and
//     merge; any other overlap is refused (DECISIONS §5.15);
//   - from generic source ranges (the LIP commit's segments): ranges overlap only when they
//     map the overlap to the same bytes of the same source (same source id and same
//     dst − src delta), and then merge; any other overlap is refused (DECISIONS §5.14).
// DATA ranges that merely touch are kept apart; zero-length input ranges cover nothing.
//
// Thread-safety: a byte_range_map is immutable after creation; const access from any number of
// threads is safe.
// Ownership: a byte_range_map owns its ranges; spans it returns live as long as it does.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "tensorreg/common/error.hpp"
#include "tensorreg/common/function_ref.hpp"
#include "tensorreg/index/canonical_index.hpp"

namespace tensorreg::index {

enum class range_kind : std::uint8_t { data, pad };

/// One range of the map. For PAD, source_id and src_offset are 0 and mean nothing.
struct byte_range {
  std::uint64_t offset = 0;  ///< in the canonical buffer
  std::uint64_t length = 0;  ///< > 0
  range_kind kind = range_kind::pad;
  std::uint32_t source_id = 0;
  std::uint64_t src_offset = 0;  ///< where `offset` lies in the source

  friend bool operator==(const byte_range&, const byte_range&) = default;
};

/// An input of the generic builder: `length` bytes of source `source_id` starting at
/// `src_offset` land at `dst_offset` of the canonical buffer.
struct source_range {
  std::uint64_t dst_offset = 0;
  std::uint64_t length = 0;
  std::uint32_t source_id = 0;
  std::uint64_t src_offset = 0;
};

/// Names input range `i` in error messages (e.g. "segment 3 of storage 'w0'").
using range_namer = function_ref<std::string(std::size_t)>;

class byte_range_map {
 public:
  /// The map of a canonical index's entries over [0, total_size).
  /// Errors: INVALID_ARGUMENT for total_size 0, an entry whose offset + size overflows or ends
  /// past total_size (naming the tensor), or two entries that overlap without identical
  /// (offset, size) (naming both tensors).
  [[nodiscard]] static result<byte_range_map> from_entries(std::span<const entry> entries, std::uint64_t total_size);

  /// The map of a validated index. Cannot fail: canonical_index guarantees what from_entries
  /// checks. Errors: none.
  [[nodiscard]] static byte_range_map from_index(const canonical_index& index);

  /// The map of generic source ranges over [0, total_size). Ranges are named "range <i>"
  /// (their position in `ranges`) in messages unless `namer` is given.
  /// Errors: INVALID_ARGUMENT for total_size 0, a range whose dst or src end overflows 64 bits
  /// or whose dst end lies past total_size, or two ranges that overlap with a different source
  /// id or a different dst − src delta (naming both).
  [[nodiscard]] static result<byte_range_map> from_sources(std::span<const source_range> ranges,
                                                           std::uint64_t total_size);
  [[nodiscard]] static result<byte_range_map> from_sources(std::span<const source_range> ranges,
                                                           std::uint64_t total_size, range_namer namer);

  /// DATA and PAD ranges in offset order, covering [0, total_size()) without gaps.
  [[nodiscard]] std::span<const byte_range> ranges() const noexcept { return ranges_; }
  [[nodiscard]] std::uint64_t total_size() const noexcept { return total_size_; }
  /// Sum of the DATA ranges' lengths.
  [[nodiscard]] std::uint64_t data_bytes() const noexcept { return data_bytes_; }

  /// Position in ranges() of the range holding byte `offset`.
  /// REQUIRES: offset < total_size(). Errors: none.
  [[nodiscard]] std::size_t find(std::uint64_t offset) const noexcept;

 private:
  byte_range_map(std::vector<byte_range> ranges, std::uint64_t total_size, std::uint64_t data_bytes)
      : ranges_(std::move(ranges)), total_size_(total_size), data_bytes_(data_bytes) {}

  std::vector<byte_range> ranges_;
  std::uint64_t total_size_ = 0;
  std::uint64_t data_bytes_ = 0;
};

}  // namespace tensorreg::index
