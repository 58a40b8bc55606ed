#include "registration/plans/stable_dram.hpp"

#include "memory/buffered_reads.hpp"
#include "memory/system_calls.hpp"
#include "tensorreg/common/random.hpp"
#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/metrics/registry.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <mutex>

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

// The catalogue's key of an index (catalogue::find_index()).
std::string index_key(const index::canonical_index& idx) { return hash::to_hex(hash::sha256(idx.json())); }

// A put's files as the canonical buffer they make: pieces read with pread() into the
// thread's buffers (memory::visit_through_buffer), PAD between segments zeroed.
class files_source final : public memory::byte_source {
 public:
  files_source(const source_files& files, std::uint64_t size) noexcept : files_(files), size_(size) {}
  [[nodiscard]] std::uint64_t size() const noexcept override { return size_; }
  [[nodiscard]] status visit(std::uint64_t offset, std::uint64_t length, memory::piece_sink sink) const override {
    TENSORREG_TRY(check_range(offset, length));
    return memory::visit_through_buffer(
        offset, length, [&](std::uint64_t at, std::span<std::byte> piece) { return files_.read(at, piece, true); },
        sink);
  }

 private:
  const source_files& files_;
  std::uint64_t size_;
};

// Writes `bytes` at `offset` of the staging memfd of a put from files, through short writes.
// Errors: RESOURCE_EXHAUSTED when the kernel has no memory for the pages (ENOSPC, ENOMEM: the
// memory limit of the daemon's cgroup), INTERNAL otherwise.
status write_staging(const memory::shared_memory& staging, std::span<const std::byte> bytes, std::uint64_t offset) {
  while (!bytes.empty()) {
    const ssize_t n = memory::sys::pwrite(staging.fd(), bytes.data(), bytes.size(), offset);
    if (n > 0) {
      bytes = bytes.subspan(static_cast<std::size_t>(n));
      offset += static_cast<std::uint64_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    const int e = n < 0 ? errno : ENOSPC;
    const auto code = (e == ENOSPC || e == ENOMEM || e == EDQUOT) ? errc::resource_exhausted : errc::internal;
    return fail(code, "cannot copy the put's bytes into the daemon's memory at offset " + std::to_string(offset) +
                          ": " + std::strerror(e));
  }
  return {};
}

// Whether every PAD byte of `map` in `bytes` is zero (DECISIONS §5.1: PAD is kept as zero).
result<bool> pad_is_zero(const memory::byte_source& bytes, const index::byte_range_map& map) {
  bool zero = true;
  for (const auto& r : map.ranges()) {
    if (r.kind != index::range_kind::pad) continue;
    TENSORREG_TRY(bytes.visit(r.offset, r.length, [&](std::span<const std::byte> piece) -> status {
      zero = zero && std::all_of(piece.begin(), piece.end(), [](std::byte b) { return b == std::byte{0}; });
      return {};
    }));
    if (!zero) break;
  }
  return zero;
}

// Keeps the client-written staging memfd as the replica when its bytes can no longer change:
// sealing it against writes fails (EBUSY) while any writable shared mapping exists, in the
// client or elsewhere, so once sealed the hash taken here describes the kept bytes for good.
// Empty when it cannot be kept as it is (still mapped writable, or PAD not zero): the caller
// then copies it.
// `verified`: leaf digests the caller checked these bytes against (commit_options): sealed, they
// describe the kept bytes for good, so they stand in for hashing them again.
result<std::optional<materialized>> adopt_staging(const std::shared_ptr<memory::shared_memory>& staging,
                                                  const index::byte_range_map& map, bool want_digest, thread_pool& pool,
                                                  cancel_flag cancel, const std::vector<hash::digest>* verified) {
  if (!staging->seal_read_only(memory::shared_memory::when_busy::fail)) return std::nullopt;
  TENSORREG_TRY_ASSIGN(const bool clean, pad_is_zero(*staging, map));
  if (!clean) return std::nullopt;
  materialized out;
  if (want_digest && verified != nullptr && verified->size() == hash::leaf_count(staging->size())) {
    out.data_digest = hash::tree_root(*verified);
  } else if (want_digest) {
    // Read, not mapped: the client wrote these pages, and the daemon's mapping has never
    // touched them (memory/buffered_reads.hpp).
    const memory::memfd_reads reads(staging->fd(), staging->size(), "the put's memfd");
    const cancellable_source source(reads, cancel);
    TENSORREG_TRY_ASSIGN(out.data_digest, hash::tree_hash(source, &pool));
    metrics::process_counters().bytes_hashed.add(staging->size());
  }
  // Its fd went to the client at Begin: never recycle it for other bytes.
  staging->mark_exported();
  out.replica = staging;
  return out;
}

}  // namespace

status stable_upload::reserve(std::uint64_t offset, std::uint64_t length, mode wanted) {
  const std::uint64_t total = staging_->size();
  const std::string what =
      "cannot accept stable bytes [" + std::to_string(offset) + ", +" + std::to_string(length) + ")";
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

stable_upload::mode stable_upload::filled_by() const {
  std::lock_guard lock(mutex_);
  return mode_;
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

// ---- the plan ---------------------------------------------------------------------------------

result<std::unique_ptr<stable_dram>> stable_dram::begin(const begin_request& r, const stable_dram_options& opts,
                                                        const begin_context& ctx, begin_response& response) {
  TENSORREG_TRY_ASSIGN(auto idx, begin_indexed(r, ctx));
  if (opts.stage_on_gpu && ctx.devices == nullptr) {
    return fail(errc::failed_precondition, "cannot begin stable_dram registration: stage_on_gpu needs GPU " +
                                               std::to_string(r.device_id) + " and this engine has no GPU");
  }
  if (ctx.stable_budget != 0 && r.total_size > ctx.stable_budget) {
    return fail(errc::resource_exhausted, "cannot begin stable_dram registration: total_size " +
                                              std::to_string(r.total_size) + " exceeds the stable budget of " +
                                              std::to_string(ctx.stable_budget) + " bytes");
  }
  const bool from_files = !opts.file_segments.empty() || !opts.files.empty();
  if (from_files && opts.stage_on_gpu) {
    return fail(errc::invalid_argument,
                "cannot begin stable_dram registration: stage_on_gpu cannot be combined with file segments");
  }
  std::optional<source_files> files;
  if (from_files) {
    TENSORREG_TRY_ASSIGN(files,
                         source_files::check(opts.files, opts.file_segments, index::byte_range_map::from_index(*idx)));
  }
  std::unique_ptr<stable_dram> p(new stable_dram(std::move(idx)));
  p->files_ = std::move(files);
  if (ctx.stable_cache != nullptr) {
    auto reserved = ctx.stable_cache->reserve(r.total_size);
    if (!reserved) {
      return tl::unexpected(with_context(std::move(reserved).error(), "cannot begin stable_dram registration"));
    }
    p->reservation_ = std::move(*reserved);
  }
  stable_dram_handshake hs;
  if (opts.stage_on_gpu) {
    // The client writes its GPU tensors into a daemon-owned device buffer (by its IPC
    // handle); Commit copies it to host memory while hashing.
    TENSORREG_TRY(
        memory::sys::check_allocation("device memory on device " + std::to_string(r.device_id), r.total_size));
    TENSORREG_TRY_ASSIGN(auto buffer, ctx.devices->allocate(r.device_id, r.total_size));
    hs.staging_cuda_ipc_handle = buffer.ipc_handle;
    p->device_staging_ = std::move(buffer);
  } else {
    std::optional<memory::shared_memory> staging;
    // A put from files whose index is known likely joins (commit_from_files hashes first and
    // copies nothing then): the spare stays for a put that writes.
    const auto likely_held = [&] {
      return p->files_ && ctx.find_index && ctx.find_index(index_key(*p->index_)) != nullptr;
    };
    if (ctx.publish_reserve != nullptr && !likely_held()) staging = ctx.publish_reserve->take(r.total_size);
    if (!staging) {
      TENSORREG_TRY_ASSIGN(staging, memory::shared_memory::create(r.total_size, publish_memfd_name));
    }
    auto shared = std::make_shared<memory::shared_memory>(std::move(*staging));
    p->upload_ = std::make_shared<stable_upload>(shared);
    if (p->files_) {
      // Nothing for the client to write: Feed is refused and Commit reads the files.
      p->upload_->mark_complete();
    } else {
      hs.publish = publish_memfd{shared, r.total_size, 0};
      hs.publish_lease_token = "publish:" + random_hex(16);
    }
  }
  response.handshake = std::move(hs);
  return p;
}

result<feed_work> stable_dram::feed(feed_request& r, const registration_facts& /*facts*/,
                                    regions::region_registry& /*regions*/, const std::string& what) {
  TENSORREG_TRY(check_feed_shape(r, what, name(), false, upload_ != nullptr));
  if (auto* progress = std::get_if<stable_write_progress>(&r.payload)) {
    for (const auto& range : progress->ranges) {
      TENSORREG_TRY(upload_->record_written(range.canonical_offset, range.length));
    }
    if (progress->upload_complete) upload_->mark_complete();
    return feed_work{};
  }
  // Only a chunk is left (check_feed_shape and the engine's payload check saw to that). Copy
  // it outside the registration's lock so concurrent chunks land in parallel.
  auto* chunk = std::get_if<view_chunk>(&r.payload);
  TENSORREG_ASSERT(chunk != nullptr);
  return feed_work([upload = upload_, offset = chunk->canonical_offset, data = std::move(chunk->data)] {
    return upload->write_chunk(offset, data);
  });
}

result<commit_response> stable_dram::commit(commit_context& ctx) {
  if (files_) return commit_from_files(ctx);
  const auto& p = ctx.facts;
  // The normalized canonical buffer: DATA as uploaded, PAD as zero (DECISIONS §5.1).
  std::shared_ptr<const memory::byte_source> normalized;
  std::optional<materialized> adopted;
  if (upload_) {
    const auto map = index::byte_range_map::from_index(*index_);
    if (auto covered = upload_->check_covers(map); !covered) {
      ctx.retryable = true;  // the client can still send the missing bytes
      return tl::unexpected(std::move(covered).error());
    }
    if (upload_->filled_by() == stable_upload::mode::memfd_ranges) {
      TENSORREG_TRY_ASSIGN(adopted, adopt_staging(upload_->staging(), map, p.cgid.empty(), ctx.pool, ctx.cancelled,
                                                  ctx.verified_leaf_digests));
    }
    if (!adopted) {
      TENSORREG_TRY_ASSIGN(normalized, normalized_source::create(upload_->staging(), *index_));
    }
  } else {
    // stage_on_gpu: the client wrote the device staging buffer through its own mapping.
    TENSORREG_TRY_ASSIGN(normalized, normalized_source::create(device_staging_->bytes, *index_));
  }
  // Otherwise keep a private host copy, hashed as it is made: the client still maps the
  // staging memory and could change it.
  if (!adopted) {
    TENSORREG_TRY_ASSIGN(adopted, materialize(*normalized, p.cgid.empty(), ctx.pool, ctx.devices, ctx.cancelled));
  }
  TENSORREG_TRY_ASSIGN(auto published, publish(ctx, *adopted, false));
  TENSORREG_ASSERT(published.has_value());
  return std::move(*published);
}

result<std::optional<commit_response>> stable_dram::publish(commit_context& ctx, const materialized& copy,
                                                            bool nothing_copied) {
  const auto& p = ctx.facts;
  auto descriptor = describe(p, *index_, copy.data_digest);

  commit_response response;
  response.descriptor = descriptor;
  const auto admit = admit_policy_of(p.policy);
  return ctx.with_catalogue([&](catalogue& cat) -> result<std::optional<commit_response>> {
    auto* existing = cat.find(descriptor.artifact_id);
    if (existing != nullptr && existing->quiesced) {
      return fail(errc::failed_precondition,
                  "cannot commit " + descriptor.artifact_id + ": the artifact is being deregistered");
    }
    auto& cache = cat.cache();
    const bool had_replica = cache.contains(descriptor.artifact_id);
    // The replica of a join is dropped; an unwritten one must never be admitted.
    if (nothing_copied && !had_replica) return std::nullopt;
    if (!had_replica) TENSORREG_TRY(cat.check_stable_share(p.owner_uid, "cannot commit " + descriptor.artifact_id));
    auto admitted = cache.admit(descriptor.artifact_id, p.total_size, copy.replica, admit, &reservation_);
    if (!admitted) {
      return tl::unexpected(with_context(std::move(admitted).error(), "cannot commit " + descriptor.artifact_id));
    }
    if (!admitted->admitted) {
      return fail(errc::resource_exhausted, "cannot commit " + descriptor.artifact_id +
                                                ": the stable cache did not keep it: " + admitted->skip_reason);
    }
    if (!had_replica) cat.note_stable_entry(descriptor.artifact_id, p.owner_uid);
    response.evicted = admitted->evicted;  // the client hears what made room for it
    auto& a = cat.add(descriptor, index_);
    if (had_replica) {
      // Idempotent join (§4.5): the new copy is dropped; the join is remembered so that Revoke
      // or the TTL sweep can drop it.
      response.existed = true;
      cat.add_join(a, join{p.id, p.owner_pid, ttl_deadline(ctx.time, ctx.ttl_ms())});
    }
    const bool asked = p.policy.local_stable >= policy::requirement::should;
    response.local_stable_tier = asked ? local_stable_tier_result{local_stable_status::ready, ""}
                                       : local_stable_tier_result{local_stable_status::skipped,
                                                                  "the policy does not ask for the local stable tier"};
    return std::optional<commit_response>(std::move(response));
  });
}

result<commit_response> stable_dram::commit_from_files(commit_context& ctx) {
  const auto& p = ctx.facts;
  const bool want_digest = p.cgid.empty();
  const auto& staging = upload_->staging();
  const std::uint64_t total = p.total_size;
  const std::uint64_t leaves = hash::leaf_count(total);
  std::vector<hash::digest> digests(want_digest ? leaves : 0);
  // Likely held: some artifact in the catalogue has this very index. Then hash first, from a
  // small buffer per thread, and copy nothing when the id is known.
  bool hash_first = false;
  if (want_digest) {
    const auto key = index_key(*index_);
    hash_first = ctx.with_catalogue([&](catalogue& cat) { return cat.find_index(key) != nullptr; });
  }
  // Reads one leaf from the files a piece at a time into this worker's buffer (small enough to
  // stay in a core's cache), hashes the piece there and, with `into`, pwrite()s the same piece
  // into that memfd: the id describes exactly the bytes kept, and the kernel fills the memfd's
  // pages without a page fault in the daemon. The memfd's inode lock admits one writer at a
  // time and its waiters spin, so the workers take turns on `writer`, where a waiter sleeps.
  // Whole leaves two at a time where SHA-NI hashes them together (hash::plan_leaf_jobs).
  const std::size_t threads = ctx.pool.concurrency();
  const auto jobs = want_digest ? hash::plan_leaf_jobs(total, threads) : hash::leaf_jobs{0, leaves};
  const files_source files(*files_, total);
  std::mutex writer;
  const auto hash_job = [&](std::size_t j, const memory::shared_memory* into) -> status {
    TENSORREG_TRY(check_cancel(ctx.cancelled));
    const std::size_t leaf = jobs.first_leaf(j);
    const auto keep = [&](std::uint64_t at, std::span<const std::byte> piece) -> status {
      if (into == nullptr) return {};
      const std::lock_guard turn(writer);
      return write_staging(*into, piece, at);
    };
    const hash::piece_seen seen = keep;
    if (j < jobs.pairs) {
      TENSORREG_TRY_ASSIGN(const auto two, hash::hash_leaf_pair(files, leaf, &seen));
      digests[leaf] = two[0];
      digests[leaf + 1] = two[1];
      return {};
    }
    const std::uint64_t begin = leaf * hash::leaf_bytes;
    hash::sha256_hasher hasher;
    std::uint64_t at = begin;
    TENSORREG_TRY(
        files.visit(begin, std::min(hash::leaf_bytes, total - begin), [&](std::span<const std::byte> piece) -> status {
          if (want_digest) hasher.update(piece);
          TENSORREG_TRY(keep(at, piece));
          at += piece.size();
          return {};
        }));
    if (want_digest) digests[leaf] = hasher.finish();
    return {};
  };
  if (hash_first) {
    TENSORREG_TRY(ctx.pool.parallel_for(jobs.count, [&](std::size_t j) { return hash_job(j, nullptr); }));
    TENSORREG_TRY(files_->check_unchanged());
    metrics::process_counters().bytes_hashed.add(total);
    const materialized hashed{staging, hash::tree_root(digests)};
    TENSORREG_TRY_ASSIGN(auto joined, publish(ctx, hashed, true));
    if (joined) return std::move(*joined);
    // New content after all (another version of a known layout): copy it and hash it again
    // from the copy, since the file may have changed in place since it was hashed.
  }
  // The other way to fill the memfd: pread() a job's leaves straight into its mapping, then
  // hash them there while they are hot.
  const auto map_job = [&](std::size_t j) -> status {
    TENSORREG_TRY(check_cancel(ctx.cancelled));
    const std::size_t leaf = jobs.first_leaf(j);
    const bool pair = j < jobs.pairs;
    const std::uint64_t begin = leaf * hash::leaf_bytes;
    const auto bytes =
        staging->mutable_bytes().subspan(begin, std::min((pair ? 2 : 1) * hash::leaf_bytes, total - begin));
    // Fresh memfd pages read as zero, so only the segments are written, the PAD left as it is.
    TENSORREG_TRY(files_->read(begin, bytes, false));
    if (!want_digest) return {};
    if (pair) {
      const auto two = hash::sha256_two(bytes.first(hash::leaf_bytes), bytes.subspan(hash::leaf_bytes));
      digests[leaf] = two[0];
      digests[leaf + 1] = two[1];
    } else {
      digests[leaf] = hash::sha256(std::span<const std::byte>(bytes));
    }
    return {};
  };
  // Few workers write, many map (memory::max_pwrite_fill_threads says why).
  if (threads <= memory::max_pwrite_fill_threads) {
    TENSORREG_TRY(ctx.pool.parallel_for(jobs.count, [&](std::size_t j) { return hash_job(j, staging.get()); }));
  } else {
    TENSORREG_TRY(ctx.pool.parallel_for(jobs.count, map_job));
  }
  if (want_digest) metrics::process_counters().bytes_hashed.add(total);
  TENSORREG_TRY(files_->check_unchanged());
  metrics::process_counters().bytes_copied.add(files_->data_bytes());
  // The bytes are final: no fd of the memfd left the daemon, so sealing cannot fail for a
  // mapping elsewhere, and no fd handed out later (GetArtifactMemfd) can change them.
  TENSORREG_TRY(staging->seal_read_only());
  materialized copy;
  copy.replica = staging;
  if (want_digest) copy.data_digest = hash::tree_root(digests);
  TENSORREG_TRY_ASSIGN(auto published, publish(ctx, copy, false));
  TENSORREG_ASSERT(published.has_value());
  return std::move(*published);
}

void stable_dram::release(regions::region_registry& /*regions*/) noexcept {
  upload_.reset();
  device_staging_.reset();
  reservation_ = stable::budget_reservation{};
}

}  // namespace tensorreg::registration::detail
