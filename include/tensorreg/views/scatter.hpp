// tensorreg/views/scatter.hpp — moving bytes between a view and its canonical buffer on the CPU.
//
// Provides `scatter` (linearized view bytes → their canonical offsets: SERVER placement's
// ingest, registration.md §7), `gather` (canonical → view bytes: reading a view back), a
// `compare` that finds the first view byte whose canonical byte differs (piece assembly), and
// `gathered_view`, a byte_source of the view bytes read from a canonical buffer.
//
// A range may start and end anywhere, mid-element included: a 4 MiB chunk of a transposed
// tensor is scattered as it comes. Runs that are contiguous in both buffers are one memcpy;
// transposed dims are copied in tiles that fit in L1, so neither buffer is walked with a large
// stride across cache lines.
//
// Thread-safety: the functions are reentrant; concurrent scatters into disjoint canonical bytes
// are safe (overlapping ones race on those bytes, last writer wins). Ownership: nothing is kept
// after a call returns; gathered_view keeps its plan and the canonical buffer's owner alive.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>

#include "tensorreg/common/error.hpp"
#include "tensorreg/common/function_ref.hpp"
#include "tensorreg/memory/byte_source.hpp"
#include "tensorreg/views/view_plan.hpp"

namespace tensorreg::views {

/// Writes view bytes [view_offset, view_offset + bytes.size()) to `canonical`. Bytes that fall
/// in the PAD between view tensors are dropped.
/// Errors: OUT_OF_RANGE when the range does not lie inside [0, plan.view_size()) or `canonical`
/// is shorter than plan.canonical_size().
[[nodiscard]] status scatter(const view_plan& plan, std::uint64_t view_offset, std::span<const std::byte> bytes,
                             std::span<std::byte> canonical);

/// scatter() of only the canonical bytes that lie in `only` (merged ranges; the rest of the
/// view bytes are dropped), calling `written(canonical_offset, length)` for each run it wrote,
/// once the run is in `canonical`. A piece of an assembly writes what it alone owns this way.
/// Errors: OUT_OF_RANGE as scatter().
[[nodiscard]] status scatter_within(const view_plan& plan, std::uint64_t view_offset, std::span<const std::byte> bytes,
                                    std::span<std::byte> canonical, std::span<const byte_range> only,
                                    function_ref<void(std::uint64_t, std::uint64_t)> written);

/// Reads view bytes [view_offset, view_offset + out.size()) from `canonical` into `out`; PAD
/// between view tensors reads as zero. Errors: OUT_OF_RANGE as scatter().
[[nodiscard]] status gather(const view_plan& plan, std::span<const std::byte> canonical, std::uint64_t view_offset,
                            std::span<std::byte> out);

/// A view byte and the canonical byte it maps to.
struct byte_pair {
  std::uint64_t view_offset = 0;
  std::uint64_t canonical_offset = 0;
  friend bool operator==(const byte_pair&, const byte_pair&) = default;
};

/// The first view byte of [view_offset, view_offset + bytes.size()) that differs from its
/// canonical byte, among those whose canonical byte lies in `only` (merged ranges); nullopt
/// when none differs. PAD is not compared. Errors: OUT_OF_RANGE as scatter().
[[nodiscard]] result<std::optional<byte_pair>> compare(const view_plan& plan, std::uint64_t view_offset,
                                                       std::span<const std::byte> bytes,
                                                       std::span<const std::byte> canonical,
                                                       std::span<const byte_range> only);

/// The view bytes of a canonical buffer, gathered as they are visited.
class gathered_view final : public memory::byte_source {
 public:
  /// `canonical` must stay readable while `keep_alive` lives.
  /// REQUIRES: canonical.size() >= plan->canonical_size().
  gathered_view(std::shared_ptr<const view_plan> plan, std::span<const std::byte> canonical,
                std::shared_ptr<const void> keep_alive) noexcept
      : plan_(std::move(plan)), canonical_(canonical), keep_alive_(std::move(keep_alive)) {}

  [[nodiscard]] std::uint64_t size() const noexcept override { return plan_->view_size(); }
  [[nodiscard]] status visit(std::uint64_t offset, std::uint64_t length, memory::piece_sink sink) const override;

 private:
  std::shared_ptr<const view_plan> plan_;
  std::span<const std::byte> canonical_;
  std::shared_ptr<const void> keep_alive_;
};

}  // namespace tensorreg::views
