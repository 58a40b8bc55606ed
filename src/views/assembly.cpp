#include "views/assembly.hpp"

#include <algorithm>
#include <limits>

#include "memory/page_populator.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/views/scatter.hpp"

namespace tensorreg::views {

namespace {

constexpr std::uint64_t page_bytes = 4096;
// The unit of the parallel scatter and of faulting pages in.
constexpr std::uint64_t slice_bytes = std::uint64_t{4} << 20;
// A piece's canonical ranges shorter than this are not faulted in by its own scatter: a narrow
// along the last dim writes a few KiB of every row, and a populate call per row costs more
// than the faults it saves.
constexpr std::uint64_t min_populated_range = std::uint64_t{64} << 10;

// The ranges of `a` that `b` does not cover (both merged).
std::vector<byte_range> subtract_ranges(std::span<const byte_range> a, std::span<const byte_range> b) {
  std::vector<byte_range> out;
  std::size_t j = 0;
  for (const auto& r : a) {
    std::uint64_t at = r.offset;
    while (j < b.size() && b[j].end() <= at) ++j;
    for (std::size_t k = j; k < b.size() && b[k].offset < r.end(); ++k) {
      if (b[k].offset > at) out.push_back({at, b[k].offset - at});
      at = std::max(at, b[k].end());
    }
    if (at < r.end()) out.push_back({at, r.end() - at});
  }
  return out;
}

// Calls fn(leaf, bytes) for the part of each range that lies in each leaf.
template <typename F>
void for_each_leaf_part(std::span<const byte_range> ranges, F&& fn) {
  for (const auto& r : ranges) {
    for (std::uint64_t at = r.offset; at < r.end();) {
      const std::uint64_t leaf = at / hash::leaf_bytes;
      const std::uint64_t end = std::min(r.end(), (leaf + 1) * hash::leaf_bytes);
      fn(leaf, end - at);
      at = end;
    }
  }
}

// fn(0) … fn(count - 1) on `pool`, or on the calling thread in order when it is null; the first
// error, as thread_pool::parallel_for answers it.
status for_each_index(thread_pool* pool, std::size_t count, function_ref<status(std::size_t)> fn) {
  if (pool != nullptr) return pool->parallel_for(count, fn);
  for (std::size_t i = 0; i < count; ++i) TENSORREG_TRY(fn(i));
  return {};
}

status check_cancelled(const std::atomic<bool>* cancelled) {
  if (cancelled != nullptr && cancelled->load(std::memory_order_relaxed)) {
    return fail(errc::cancelled, "the commit was cancelled");
  }
  return {};
}

// Faults in, for writing, the 4 MiB slices `slices` of `canonical`, one pool index each: a
// fresh memfd page costs a fault on its first write, and one populate call per slice costs far
// less than a fault per page from the scatter. Populating never changes a byte, so it may run
// beside writes and reads of the same pages.
void populate(std::span<std::byte> canonical, std::span<const std::uint64_t> slices, thread_pool* pool) {
  const auto one = [&](std::size_t i) -> status {
    const std::uint64_t at = slices[i] * slice_bytes;
    // A page that cannot be had now is left to the scatter's own fault (and its error).
    static_cast<void>(memory::populate_for_write(canonical.data() + at, std::min(slice_bytes, canonical.size() - at)));
    return {};
  };
  static_cast<void>(for_each_index(pool, slices.size(), one));
}

}  // namespace

assembly::assembly(std::string cgid, std::shared_ptr<const index::canonical_index> idx,
                   std::vector<byte_range> required, std::shared_ptr<memory::shared_memory> buffer) noexcept
    : cgid_(std::move(cgid)), index_(std::move(idx)), required_(std::move(required)), buffer_(std::move(buffer)) {
  for (const auto& r : required_) required_bytes_ += r.length;
  const auto leaves = hash::leaf_count(index_->total_size());
  missing_.assign(leaves, 0);
  digests_.resize(leaves);
  hashed_.assign(leaves, 0);
  faulted_.assign((index_->total_size() + slice_bytes - 1) / slice_bytes, 0);
  for_each_leaf_part(required_, [&](std::uint64_t leaf, std::uint64_t n) { missing_[leaf] += n; });
  // A leaf of PAD alone is complete from the start (it reads as zeros).
  for (std::uint64_t leaf = 0; leaf < leaves; ++leaf) {
    if (missing_[leaf] == 0) complete_.push_back(leaf);
  }
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
                                              std::span<const std::byte> view_bytes, const index::canonical_index& idx,
                                              thread_pool* pool, assembly_stream* stream, bool* retry_later) {
  const std::string what = "cannot add piece '" + piece_id + "' to assembly " + cgid_;
  if (!(idx == *index_)) {
    return fail(errc::invalid_argument, what + ": its canonical index (" + std::to_string(idx.total_size()) +
                                            " bytes) is not the one the assembly's first piece named (" +
                                            std::to_string(index_->total_size()) + " bytes)");
  }
  if (stream != nullptr) stream->wait_for_hashes();  // they take the mutex
  std::lock_guard lock(mutex_);
  if (state_ != state::open) {
    return fail(errc::failed_precondition,
                what + ": assembly is already sealed" +
                    (artifact_id_.empty() ? std::string(" (being sealed)") : " as artifact " + artifact_id_));
  }
  // The bytes the piece's stream wrote at Feed (only into this assembly's buffer: one made
  // again after an expiry has none of them) need no compare and no copy.
  const bool streamed = stream != nullptr && stream->of(*this) && !stream->claimed().empty();
  // A model's split columns are millions of ranges a piece: for a stream that claimed all of
  // its bytes (the usual case) the rest is empty, and every pass over it below costs nothing.
  std::vector<byte_range> rest_of_stream;
  if (streamed && !stream->claims_all()) rest_of_stream = subtract_ranges(plan.canonical_ranges(), stream->claimed());
  const std::span<const byte_range> rest =
      !streamed ? std::span<const byte_range>(plan.canonical_ranges()) : std::span<const byte_range>(rest_of_stream);
  for (const auto& [id, ranges] : claims_) {
    if (id == piece_id) continue;
    if (const auto shared = intersect_ranges(rest, ranges); !shared.empty()) {
      if (retry_later != nullptr) *retry_later = true;
      return fail(errc::failed_precondition, what + ": its canonical bytes [" + std::to_string(shared.front().offset) +
                                                 ", " + std::to_string(shared.front().end()) +
                                                 ") are being written by piece '" + id +
                                                 "', which has not committed yet: commit again once it has");
    }
  }
  const auto canonical = buffer_->mutable_bytes();
  const auto overlap = intersect_ranges(rest, covered_);
  if (!overlap.empty()) {
    TENSORREG_TRY_ASSIGN(const auto differs, compare(plan, 0, view_bytes, canonical, overlap));
    if (differs) {
      std::string other = "an earlier piece";
      for (const auto& [id, ranges] : pieces_) {
        const auto c = differs->canonical_offset;
        if (std::any_of(ranges->begin(), ranges->end(),
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
  // What the piece writes now: all its bytes (those shared with earlier pieces are equal), or,
  // for a stream, those of the rest that nobody covers (claimed by a piece that ended since).
  std::span<const byte_range> to_write = plan.canonical_ranges();
  std::vector<byte_range> left;
  if (streamed) {
    left = subtract_ranges(rest, covered_);
    to_write = left;
  }
  if (!to_write.empty()) {
    populate(canonical, claim_slices_locked(to_write, min_populated_range, std::numeric_limits<std::uint64_t>::max()),
             pool);
    const std::uint64_t slices = (view_bytes.size() + slice_bytes - 1) / slice_bytes;
    const auto scatter_slice = [&](std::size_t i) -> status {
      const std::uint64_t at = i * slice_bytes;
      const auto chunk = view_bytes.subspan(at, std::min(slice_bytes, view_bytes.size() - at));
      return streamed ? scatter_within(plan, at, chunk, canonical, to_write, [](std::uint64_t, std::uint64_t) {})
                      : scatter(plan, at, chunk, canonical);
    };
    TENSORREG_TRY(for_each_index(pool, slices, scatter_slice));
  }
  if (streamed && !stream->spoiled_) {
    // Leaves the stream's writes completed: hashed then, over bytes that no longer change.
    for (std::size_t leaf = 0; leaf < stream->hashed_.size(); ++leaf) {
      if (stream->hashed_[leaf] == 0) continue;
      digests_[leaf] = stream->digests_[leaf];
      hashed_[leaf] = 1;
    }
  }
  // The required bytes covered for the first time. A stream's claim is among them whole: while
  // it is open, no other piece covers a byte of it (such a piece is told to commit again), and
  // the stream counted its bytes per leaf as it wrote them.
  const auto fresh = subtract_ranges(intersect_ranges(rest, required_), covered_);
  cover_leaves_locked(fresh);
  if (streamed) cover_leaf_counts_locked(stream->need_);
  covered_ = union_ranges(covered_, plan.canonical_ranges());
  // The piece's ranges name it in a later conflict: shared with its plan where the stream
  // holds that, not copied.
  std::shared_ptr<const std::vector<byte_range>> ranges;
  if (streamed && stream->plan_.get() == &plan) {
    ranges = std::shared_ptr<const std::vector<byte_range>>(stream->plan_, &plan.canonical_ranges());
  } else {
    ranges = std::make_shared<const std::vector<byte_range>>(plan.canonical_ranges());
  }
  pieces_.emplace_back(piece_id, std::move(ranges));
  if (streamed) {
    std::erase_if(claims_, [&](const auto& c) { return c.first == piece_id; });
  }
  if (covered_required_ == required_bytes_) state_ = state::sealing;
  return snapshot_locked();
}

std::shared_ptr<assembly_stream> assembly::claim(const std::string& piece_id, std::shared_ptr<const view_plan> plan,
                                                 const index::canonical_index& idx, thread_pool* pool) {
  std::vector<byte_range> claimed;
  std::vector<std::uint64_t> slices;
  std::shared_ptr<memory::shared_memory> buffer;
  {
    std::lock_guard lock(mutex_);
    if (state_ == state::open && idx == *index_) {
      std::vector<byte_range> taken = covered_;
      for (const auto& [id, ranges] : claims_) taken = union_ranges(taken, ranges);
      claimed = subtract_ranges(intersect_ranges(plan->canonical_ranges(), required_), taken);
      if (!claimed.empty()) {
        claims_.emplace_back(piece_id, claimed);
        slices = claim_written_slices_locked(claimed);
      }
    }
    buffer = buffer_;
  }
  return std::make_shared<assembly_stream>(shared_from_this(), std::move(buffer), piece_id, std::move(plan),
                                           std::move(claimed), std::move(slices), pool);
}

void assembly::release_claim(const std::string& piece_id) {
  std::lock_guard lock(mutex_);
  std::erase_if(claims_, [&](const auto& c) { return c.first == piece_id; });
}

bool assembly::complete_but(std::uint64_t leaf, std::uint64_t pending) const {
  std::lock_guard lock(mutex_);
  return state_ == state::open && missing_[leaf] == pending;
}

std::vector<std::uint64_t> assembly::claim_slices_locked(std::span<const byte_range> ranges, std::uint64_t min_length,
                                                         std::uint64_t budget) {
  std::vector<std::uint64_t> out;
  for (const auto& r : ranges) {
    if (r.length < min_length) continue;
    for (std::uint64_t slice = r.offset / slice_bytes; slice * slice_bytes < r.end(); ++slice) {
      if (faulted_[slice] != 0) continue;
      if (budget < slice_bytes) return out;
      budget -= slice_bytes;
      faulted_[slice] = 1;
      out.push_back(slice);
    }
  }
  return out;
}

std::vector<std::uint64_t> assembly::claim_written_slices_locked(std::span<const byte_range> ranges) {
  // Pages of each slice that `ranges` touch. Short ranges close together (half of every row)
  // touch every page: the slice is then faulted in whole, one call, rather than page by page
  // by the writes. Sparse ones (a few KiB of long rows) are left to the writes' own faults.
  std::vector<std::uint64_t> touched(faulted_.size(), 0);
  std::uint64_t last_page = std::numeric_limits<std::uint64_t>::max();
  for (const auto& r : ranges) {
    for (std::uint64_t page = r.offset / page_bytes; page * page_bytes < r.end(); ++page) {
      if (page == last_page) continue;
      last_page = page;
      ++touched[page * page_bytes / slice_bytes];
    }
  }
  std::vector<std::uint64_t> out;
  const std::uint64_t size = index_->total_size();
  for (std::uint64_t slice = 0; slice < touched.size(); ++slice) {
    const std::uint64_t pages = (std::min(slice_bytes, size - slice * slice_bytes) + page_bytes - 1) / page_bytes;
    if (faulted_[slice] != 0 || touched[slice] * 4 < pages * 3) continue;
    faulted_[slice] = 1;
    out.push_back(slice);
  }
  return out;
}

void assembly::prefault_uncovered(thread_pool& pool) {
  std::vector<std::uint64_t> slices;
  std::shared_ptr<memory::shared_memory> buffer;
  {
    std::lock_guard lock(mutex_);
    if (state_ != state::open) return;
    slices = claim_slices_locked(subtract_ranges(required_, covered_), 0, prefault_allowance_);
    prefault_allowance_ -= std::min(prefault_allowance_, slices.size() * slice_bytes);
    buffer = buffer_;
  }
  if (slices.empty()) return;
  pool.submit(
      [buffer = std::move(buffer), slices = std::move(slices)] { populate(buffer->mutable_bytes(), slices, nullptr); });
}

void assembly::cover_leaves_locked(std::span<const byte_range> ranges) {
  for_each_leaf_part(ranges, [&](std::uint64_t leaf, std::uint64_t n) { cover_leaf_locked(leaf, n); });
}

void assembly::cover_leaf_counts_locked(std::span<const std::uint64_t> per_leaf) {
  for (std::uint64_t leaf = 0; leaf < per_leaf.size(); ++leaf) {
    if (per_leaf[leaf] != 0) cover_leaf_locked(leaf, per_leaf[leaf]);
  }
}

void assembly::cover_leaf_locked(std::uint64_t leaf, std::uint64_t bytes) {
  missing_[leaf] -= bytes;
  covered_required_ += bytes;
  prefault_allowance_ += bytes;
  if (missing_[leaf] == 0 && hashed_[leaf] == 0) complete_.push_back(leaf);
}

result<std::uint64_t> assembly::hash_leaves(const memory::shared_memory& buffer, std::span<const std::uint64_t> leaves,
                                            thread_pool* pool, const std::atomic<bool>* cancelled) {
  std::vector<hash::digest> out(leaves.size());
  std::vector<char> done(leaves.size(), 0);
  const auto one = [&](std::size_t i) -> status {
    TENSORREG_TRY(check_cancelled(cancelled));
    TENSORREG_TRY_ASSIGN(out[i], hash::hash_leaf(buffer, leaves[i]));
    done[i] = 1;
    return {};
  };
  const status result = for_each_index(pool, leaves.size(), one);
  // What was hashed is kept even after an error: the bytes of a complete leaf never change.
  std::uint64_t bytes = 0;
  std::lock_guard lock(mutex_);
  for (std::size_t i = 0; i < leaves.size(); ++i) {
    if (done[i] != 0) {
      digests_[leaves[i]] = out[i];
      hashed_[leaves[i]] = 1;
      bytes += std::min(hash::leaf_bytes, buffer.size() - leaves[i] * hash::leaf_bytes);
    }
  }
  if (!result) return tl::unexpected(result.error());
  return bytes;
}

result<std::uint64_t> assembly::hash_complete_leaves(thread_pool* pool, const std::atomic<bool>* cancelled) {
  std::vector<std::uint64_t> leaves;
  std::shared_ptr<memory::shared_memory> buffer;
  {
    std::lock_guard lock(mutex_);
    // Complete: the sealing commit hashes what is left.
    if (state_ != state::open) return std::uint64_t{0};
    leaves.swap(complete_);
    buffer = buffer_;
  }
  return hash_leaves(*buffer, leaves, pool, cancelled);
}

result<assembly_leaves> assembly::leaf_digests(thread_pool* pool, const std::atomic<bool>* cancelled) {
  std::vector<std::uint64_t> left;
  std::shared_ptr<memory::shared_memory> buffer;
  {
    std::lock_guard lock(mutex_);
    if (state_ != state::sealing || !buffer_) {
      return fail(errc::failed_precondition, "cannot hash assembly " + cgid_ + ": it is not complete");
    }
    buffer = buffer_;
    for (std::uint64_t leaf = 0; leaf < hashed_.size(); ++leaf) {
      if (hashed_[leaf] == 0) left.push_back(leaf);
    }
  }
  // A leaf another piece's commit is hashing right now is hashed here too: the same bytes give
  // the same digest, and waiting for that commit could wait on a client.
  TENSORREG_TRY_ASSIGN(const auto bytes, hash_leaves(*buffer, left, pool, cancelled));
  std::lock_guard lock(mutex_);
  return assembly_leaves{digests_, bytes};
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
  // No fd of it can change it from now on. Only this assembly maps it writable, and no piece
  // writes any more; its mapping stays (seal_read_only() would map it anew, under other
  // commits still hashing, and unmapping a whole model's pages costs a tenth of a second).
  TENSORREG_TRY(buffer->seal_against_writes());
  return buffer;
}

void assembly::mark_sealed(std::string artifact_id) {
  std::lock_guard lock(mutex_);
  state_ = state::sealed;
  artifact_id_ = std::move(artifact_id);
  buffer_.reset();  // the stable cache holds it now
  complete_.clear();
}

assembly_snapshot assembly::snapshot() const {
  std::lock_guard lock(mutex_);
  return snapshot_locked();
}

assembly_snapshot assembly::snapshot_locked() const {
  assembly_snapshot s;
  s.cgid = cgid_;
  s.canonical_size = index_->total_size();
  s.covered_bytes = covered_required_;
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
  return state_ != state::sealing && claims_.empty() && deadline_ && *deadline_ <= now;
}

// ---- assembly_stream ---------------------------------------------------------------------------

assembly_stream::assembly_stream(std::shared_ptr<assembly> whole, std::shared_ptr<memory::shared_memory> buffer,
                                 std::string piece_id, std::shared_ptr<const view_plan> plan,
                                 std::vector<byte_range> claimed, std::vector<std::uint64_t> slices, thread_pool* pool)
    : whole_(std::move(whole)),
      buffer_(std::move(buffer)),
      piece_id_(std::move(piece_id)),
      plan_(std::move(plan)),
      claimed_(std::move(claimed)),
      slices_(std::move(slices)),
      pool_(pool) {
  if (claimed_.empty()) return;
  const auto leaves = hash::leaf_count(whole_->index_->total_size());
  need_.assign(leaves, 0);
  for_each_leaf_part(claimed_, [&](std::uint64_t leaf, std::uint64_t n) { need_[leaf] += n; });
  written_ = std::make_unique<std::atomic<std::uint64_t>[]>(leaves);
  digests_.resize(leaves);
  hashed_.assign(leaves, 0);
}

assembly_stream::~assembly_stream() {
  if (!claimed_.empty()) whole_->release_claim(piece_id_);  // none left once the piece is added
}

status assembly_stream::write(std::uint64_t view_offset, std::span<const std::byte> bytes) {
  if (claimed_.empty()) return {};
  const auto canonical = buffer_->mutable_bytes();
  // Four times the chunk's size, as the canonical upload's populator: what one client's bytes
  // make resident stays in proportion to them.
  for (std::uint64_t done = 0; done < 4 * bytes.size();) {
    const auto k = next_slice_.fetch_add(1, std::memory_order_relaxed);
    if (k >= slices_.size()) break;
    const std::uint64_t at = slices_[k] * slice_bytes;
    const std::uint64_t n = std::min(slice_bytes, canonical.size() - at);
    static_cast<void>(memory::populate_for_write(canonical.data() + at, n));
    done += n;
  }
  std::vector<std::uint64_t> ready;
  std::uint64_t leaf = 0;
  std::uint64_t run = 0;  // bytes of `leaf` written by this call, not yet counted
  TENSORREG_TRY(
      scatter_within(*plan_, view_offset, bytes, canonical, claimed_, [&](std::uint64_t offset, std::uint64_t length) {
        const byte_range r{offset, length};
        for_each_leaf_part(std::span(&r, 1), [&](std::uint64_t l, std::uint64_t n) {
          if (l != leaf && run != 0) {
            leaf_written(leaf, run, ready);
            run = 0;
          }
          leaf = l;
          run += n;
        });
      }));
  if (run != 0) leaf_written(leaf, run, ready);
  if (ready.empty()) return {};
  if (pool_ == nullptr) {
    for (const auto l : ready) hash_if_complete(l);
    return {};
  }
  // On the pool: the Feed goes on copying while its completed leaves are hashed (a Feed
  // stream's chunks are applied one at a time).
  {
    std::lock_guard lock(hashing_mutex_);
    queued_.insert(queued_.end(), ready.begin(), ready.end());
    hashing_ += ready.size();
  }
  for (std::size_t i = 0; i < ready.size(); ++i) {
    pool_->submit([self = shared_from_this()] { static_cast<void>(self->hash_one_queued(0)); });
  }
  // A feed that outruns the hashing threads hashes its own backlog down to a bound: what its
  // Commit waits for stays short, and one client's leaves cannot fill the shared pool's queue.
  const std::size_t keep = 2 * std::max<std::size_t>(pool_->size(), 1);
  while (hash_one_queued(keep)) {
  }
  return {};
}

bool assembly_stream::hash_one_queued(std::size_t keep) {
  std::uint64_t leaf = 0;
  {
    std::lock_guard lock(hashing_mutex_);
    if (queued_.size() <= keep) return false;
    leaf = queued_.front();
    queued_.pop_front();
  }
  hash_if_complete(leaf);
  std::lock_guard lock(hashing_mutex_);
  if (--hashing_ == 0) hashing_done_.notify_all();
  return true;
}

status assembly_stream::read_view(std::uint64_t view_offset, std::span<std::byte> out) const {
  return gather(*plan_, buffer_->bytes(), view_offset, out);
}

void assembly_stream::hash_if_complete(std::uint64_t leaf) {
  if (spoiled_) return;
  if (!whole_->complete_but(leaf, need_[leaf])) return;  // bytes of other pieces still to come
  auto digest = hash::hash_leaf(*buffer_, leaf);
  if (!digest) return;  // the commit hashes it
  digests_[leaf] = *digest;
  hashed_[leaf] = 1;
}

std::size_t assembly_stream::leaves_queued() const {
  std::lock_guard lock(hashing_mutex_);
  return queued_.size();
}

void assembly_stream::wait_for_hashes() {
  while (hash_one_queued(0)) {  // the waiting thread helps
  }
  std::unique_lock lock(hashing_mutex_);
  hashing_done_.wait(lock, [&] { return hashing_ == 0; });
}

void assembly_stream::leaf_written(std::uint64_t leaf, std::uint64_t bytes, std::vector<std::uint64_t>& ready) {
  // acq_rel: the write that completes the leaf sees every other writer's bytes of it.
  const auto before = written_[leaf].fetch_add(bytes, std::memory_order_acq_rel);
  if (before < need_[leaf] && before + bytes >= need_[leaf]) ready.push_back(leaf);
}

}  // namespace tensorreg::views
