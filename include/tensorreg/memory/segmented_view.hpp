// tensorreg/memory/segmented_view.hpp — one canonical buffer assembled from other sources.
//
// A `segmented_view` is a byte_source of `total_size` bytes whose segments are read from
// other byte_sources and whose gaps read as zero. It is how a canonical buffer is seen
// without building it: safetensors tensors in their files, LIP segments in client memory,
// DATA ranges of a byte-range map with PAD as zero (DECISIONS §5.1).
//
// Thread-safety: immutable after create(); concurrent visits are safe when the underlying
// sources allow them. Ownership: the view does not own the sources; they must outlive it.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "tensorreg/common/function_ref.hpp"
#include "tensorreg/memory/byte_source.hpp"

namespace tensorreg::memory {

/// `length` bytes at `offset` in the view come from `source` at `source_offset`.
struct segment {
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
  const byte_source* source = nullptr;
  std::uint64_t source_offset = 0;
};

class segmented_view final : public byte_source {
 public:
  /// Builds the view. Segments may come in any order; empty segments are dropped.
  /// Errors: INVALID_ARGUMENT when a segment has no source, overlaps another segment or
  /// ends past total_size; OUT_OF_RANGE when it reads past the end of its source.
  [[nodiscard]] static result<segmented_view> create(std::uint64_t total_size, std::vector<segment> segments);

  [[nodiscard]] std::uint64_t size() const noexcept override { return total_size_; }
  [[nodiscard]] status visit(std::uint64_t offset, std::uint64_t length, piece_sink sink) const override;

  /// The segments in offset order.
  [[nodiscard]] std::span<const segment> segments() const noexcept { return segments_; }

 private:
  segmented_view(std::uint64_t total_size, std::vector<segment> segments) noexcept
      : total_size_(total_size), segments_(std::move(segments)) {}

  std::uint64_t total_size_;
  std::vector<segment> segments_;
};

/// A piece of a source that is not a segmented view: `length` bytes of `source` from
/// `source_offset`, which land at `at` in the outermost view.
using leaf_visitor =
    function_ref<bool(const byte_source& source, std::uint64_t source_offset, std::uint64_t length, std::uint64_t at)>;

/// Resolves [offset, offset + length) of `source`, placed at `at`, into its leaves: descends
/// through nested segmented views (their gaps are skipped: they read as zero) and calls `leaf`
/// for each piece of any other source, in offset order. Stops and returns false as soon as
/// `leaf` does. Readers that use the underlying memory in place (device pointers, mappings to
/// hand to another process) find it this way.
bool for_each_leaf(const byte_source& source, std::uint64_t offset, std::uint64_t length, std::uint64_t at,
                   leaf_visitor leaf);

}  // namespace tensorreg::memory
