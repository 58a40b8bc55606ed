#include "views/assembly.hpp"

#include <algorithm>

#include "tensorreg/views/scatter.hpp"

namespace tensorreg::views {

assembly::assembly(std::string cgid, std::shared_ptr<const index::canonical_index> idx,
                   std::vector<byte_range> required, std::shared_ptr<memory::shared_memory> buffer) noexcept
    : cgid_(std::move(cgid)), index_(std::move(idx)), required_(std::move(required)), buffer_(std::move(buffer)) {
  for (const auto& r : required_) required_bytes_ += r.length;
}

result<std::shared_ptr<assembly>> assembly::create(std::string cgid, std::shared_ptr<const index::canonical_index> idx,
                                                   std::vector<byte_range> required) {
  // Pages of a memfd cost memory only once written: a piece of 1/8 of the model holds 1/8.
  auto memory = memory::shared_memory::create(idx->total_size(), "tensorreg-assembly");
  if (!memory) {
    return tl::unexpected(with_context(std::move(memory).error(), "cannot assemble " + cgid));
  }
  auto buffer = std::make_shared<memory::shared_memory>(std::move(*memory));
  return std::shared_ptr<assembly>(
      new assembly(std::move(cgid), std::move(idx), std::move(required), std::move(buffer)));
}

result<assembly_snapshot> assembly::add_piece(const std::string& piece_id, const view_plan& plan,
                                              std::span<const std::byte> view_bytes,
                                              const index::canonical_index& idx) {
  const std::string what = "cannot add piece '" + piece_id + "' to assembly " + cgid_;
  if (!(idx == *index_)) {
    return fail(errc::invalid_argument, what + ": its canonical index (" + std::to_string(idx.total_size()) +
                                            " bytes) is not the one the assembly's first piece named (" +
                                            std::to_string(index_->total_size()) + " bytes)");
  }
  std::lock_guard lock(mutex_);
  if (state_ != state::open) {
    return fail(errc::failed_precondition,
                what + ": assembly is already sealed" +
                    (artifact_id_.empty() ? std::string(" (being sealed)") : " as artifact " + artifact_id_));
  }
  const auto canonical = buffer_->mutable_bytes();
  const auto overlap = intersect_ranges(plan.canonical_ranges(), covered_);
  if (!overlap.empty()) {
    TENSORREG_TRY_ASSIGN(const auto differs, compare(plan, 0, view_bytes, canonical, overlap));
    if (differs) {
      std::string other = "an earlier piece";
      for (const auto& [id, ranges] : pieces_) {
        const auto c = differs->canonical_offset;
        if (std::any_of(ranges.begin(), ranges.end(),
                        [c](const byte_range& r) { return r.offset <= c && c < r.end(); })) {
          other = "piece '" + id + "'";
          break;
        }
      }
      return fail(errc::aborted, what + ": its byte at canonical offset " + std::to_string(differs->canonical_offset) +
                                     " (view offset " + std::to_string(differs->view_offset) + ") differs from " +
                                     other + ", which wrote it first");
    }
  }
  TENSORREG_TRY(scatter(plan, 0, view_bytes, canonical));
  std::vector<byte_range> all = covered_;
  all.insert(all.end(), plan.canonical_ranges().begin(), plan.canonical_ranges().end());
  covered_ = merge_ranges(std::move(all));
  pieces_.emplace_back(piece_id, plan.canonical_ranges());
  if (!first_gap(required_, covered_).has_value()) state_ = state::sealing;
  return snapshot_locked();
}

result<std::shared_ptr<memory::shared_memory>> assembly::seal_buffer() {
  std::shared_ptr<memory::shared_memory> buffer;
  {
    std::lock_guard lock(mutex_);
    if (state_ != state::sealing || !buffer_) {
      return fail(errc::failed_precondition, "cannot seal assembly " + cgid_ + ": it is not complete");
    }
    buffer = buffer_;
  }
  // Only this assembly ever mapped the memfd writable, and no piece writes any more.
  TENSORREG_TRY(buffer->seal_read_only());
  return buffer;
}

void assembly::mark_sealed(std::string artifact_id) {
  std::lock_guard lock(mutex_);
  state_ = state::sealed;
  artifact_id_ = std::move(artifact_id);
  buffer_.reset();  // the stable cache holds it now
}

assembly_snapshot assembly::snapshot() const {
  std::lock_guard lock(mutex_);
  return snapshot_locked();
}

assembly_snapshot assembly::snapshot_locked() const {
  assembly_snapshot s;
  s.cgid = cgid_;
  s.canonical_size = index_->total_size();
  for (const auto& r : intersect_ranges(required_, covered_)) s.covered_bytes += r.length;
  s.pieces = static_cast<std::uint32_t>(pieces_.size());
  s.complete = state_ != state::open;
  s.sealed = state_ == state::sealed;
  s.artifact_id = artifact_id_;
  s.deadline = deadline_;
  return s;
}

bool assembly::sealed() const {
  std::lock_guard lock(mutex_);
  return state_ != state::open;
}

void assembly::touch(std::optional<clock::time_point> deadline) {
  std::lock_guard lock(mutex_);
  deadline_ = deadline;
}

bool assembly::expired(clock::time_point now) const {
  std::lock_guard lock(mutex_);
  // One that is being sealed belongs to the commit that seals it until it is done.
  return state_ != state::sealing && deadline_ && *deadline_ <= now;
}

}  // namespace tensorreg::views
