#include "tensorreg/memory/segmented_view.hpp"

#include <algorithm>
#include <string>

namespace tensorreg::memory {
namespace {

std::string describe(const segment& s) {
  return "segment [" + std::to_string(s.offset) + ", +" + std::to_string(s.length) + ")";
}

}  // namespace

result<segmented_view> segmented_view::create(std::uint64_t total_size, std::vector<segment> segments) {
  std::erase_if(segments, [](const segment& s) { return s.length == 0; });
  std::sort(segments.begin(), segments.end(), [](const segment& a, const segment& b) { return a.offset < b.offset; });
  std::uint64_t previous_end = 0;
  for (const auto& s : segments) {
    if (s.source == nullptr) {
      return fail(errc::invalid_argument, "cannot assemble " + describe(s) + ": it has no source");
    }
    if (s.offset > total_size || s.length > total_size - s.offset) {
      return fail(errc::invalid_argument,
                  "cannot assemble " + describe(s) + ": it ends past total_size " + std::to_string(total_size));
    }
    if (s.offset < previous_end) {
      return fail(errc::invalid_argument, "cannot assemble " + describe(s) +
                                              ": it overlaps the previous segment, which ends at " +
                                              std::to_string(previous_end));
    }
    const auto source_size = s.source->size();
    if (s.source_offset > source_size || s.length > source_size - s.source_offset) {
      return fail(errc::out_of_range, "cannot assemble " + describe(s) + ": it reads [" +
                                          std::to_string(s.source_offset) + ", +" + std::to_string(s.length) +
                                          ") of a source of " + std::to_string(source_size) + " bytes");
    }
    previous_end = s.offset + s.length;
  }
  return segmented_view(total_size, std::move(segments));
}

status segmented_view::visit(std::uint64_t offset, std::uint64_t length, piece_sink sink) const {
  TENSORREG_TRY(check_range(offset, length));
  const std::uint64_t end = offset + length;
  // First segment that ends after `offset`.
  auto it = std::upper_bound(segments_.begin(), segments_.end(), offset,
                             [](std::uint64_t o, const segment& s) { return o < s.offset + s.length; });
  std::uint64_t cursor = offset;
  for (; cursor < end && it != segments_.end() && it->offset < end; ++it) {
    if (it->offset > cursor) {
      TENSORREG_TRY(visit_zeros(it->offset - cursor, sink));
      cursor = it->offset;
    }
    const std::uint64_t take = std::min(end, it->offset + it->length) - cursor;
    TENSORREG_TRY(it->source->visit(it->source_offset + (cursor - it->offset), take, sink));
    cursor += take;
  }
  if (cursor < end) TENSORREG_TRY(visit_zeros(end - cursor, sink));
  return {};
}

bool for_each_leaf(const byte_source& source, std::uint64_t offset, std::uint64_t length, std::uint64_t at,
                   leaf_visitor leaf) {
  const auto* view = dynamic_cast<const segmented_view*>(&source);
  if (view == nullptr) return leaf(source, offset, length, at);
  const std::uint64_t end = offset + length;
  for (const auto& seg : view->segments()) {
    const std::uint64_t lo = std::max(offset, seg.offset);
    const std::uint64_t hi = std::min(end, seg.offset + seg.length);
    if (lo >= hi) continue;
    if (!for_each_leaf(*seg.source, seg.source_offset + (lo - seg.offset), hi - lo, at + (lo - offset), leaf)) {
      return false;
    }
  }
  return true;
}

}  // namespace tensorreg::memory
