#include "registration/stable_upload.hpp"

#include <cstring>

namespace tensorreg::registration::detail {
namespace {

std::string_view mode_name(stable_upload::mode m) {
  switch (m) {
    case stable_upload::mode::chunks: return "streamed chunks";
    case stable_upload::mode::memfd_ranges: return "memfd written ranges";
    case stable_upload::mode::none: break;
  }
  return "none";
}

}  // namespace

status stable_upload::reserve(std::uint64_t offset, std::uint64_t length, mode wanted) {
  const std::uint64_t total = staging_->size();
  const std::string what = "cannot accept stable bytes [" + std::to_string(offset) + ", +" + std::to_string(length) + ")";
  if (offset > total || length > total - offset) {
    return fail(errc::out_of_range, what + ": past total_size " + std::to_string(total));
  }
  std::lock_guard lock(mutex_);
  if (complete_) {
    return fail(errc::failed_precondition, what + ": the client already reported the upload complete");
  }
  if (mode_ != mode::none && mode_ != wanted) {
    return fail(errc::failed_precondition, what + ": the upload already uses " + std::string(mode_name(mode_)) +
                                               ", which cannot be mixed with " + std::string(mode_name(wanted)));
  }
  if (length == 0) return {};
  auto next = written_.lower_bound(offset);
  if (next != written_.end() && next->first < offset + length) {
    return fail(errc::failed_precondition, what + ": overlaps bytes [" + std::to_string(next->first) + ", +" +
                                               std::to_string(next->second) + ") already written");
  }
  if (next != written_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second > offset) {
      return fail(errc::failed_precondition, what + ": overlaps bytes [" + std::to_string(prev->first) + ", +" +
                                                 std::to_string(prev->second) + ") already written");
    }
  }
  mode_ = wanted;
  written_.emplace(offset, length);
  bytes_written_ += length;
  return {};
}

status stable_upload::write_chunk(std::uint64_t canonical_offset, std::string_view data) {
  TENSORREG_TRY(reserve(canonical_offset, data.size(), mode::chunks));
  // The range is ours alone now: copy without the lock, so chunks land in parallel.
  std::memcpy(staging_->mutable_bytes().data() + canonical_offset, data.data(), data.size());
  return {};
}

status stable_upload::record_written(std::uint64_t canonical_offset, std::uint64_t length) {
  return reserve(canonical_offset, length, mode::memfd_ranges);
}

void stable_upload::mark_complete() noexcept {
  std::lock_guard lock(mutex_);
  complete_ = true;
}

std::uint64_t stable_upload::bytes_written() const {
  std::lock_guard lock(mutex_);
  return bytes_written_;
}

status stable_upload::check_covers(const index::byte_range_map& map) const {
  std::lock_guard lock(mutex_);
  for (const auto& r : map.ranges()) {
    if (r.kind != index::range_kind::data) continue;
    // Walk the written ranges that touch [r.offset, r.offset + r.length) and find the first hole.
    std::uint64_t cursor = r.offset;
    const std::uint64_t end = r.offset + r.length;
    auto it = written_.upper_bound(cursor);
    if (it != written_.begin()) --it;
    for (; it != written_.end() && cursor < end; ++it) {
      if (it->first > cursor) break;
      cursor = std::max(cursor, it->first + it->second);
    }
    if (cursor < end) {
      auto hole_end = end;
      if (it != written_.end() && it->first < end) hole_end = it->first;
      return fail(errc::failed_precondition, "cannot commit stable upload: canonical bytes [" + std::to_string(cursor) +
                                                 ", " + std::to_string(hole_end) + ") were not written");
    }
  }
  return {};
}

}  // namespace tensorreg::registration::detail
