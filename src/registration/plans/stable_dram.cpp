#include "registration/plans/stable_dram.hpp"

#include "memory/system_calls.hpp"
#include "tensorreg/common/random.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/metrics/registry.hpp"

#include <algorithm>
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
  if (!staging->seal_read_only()) return std::nullopt;
  TENSORREG_TRY_ASSIGN(const bool clean, pad_is_zero(*staging, map));
  if (!clean) return std::nullopt;
  materialized out;
  if (want_digest && verified != nullptr && verified->size() == hash::leaf_count(staging->size())) {
    out.data_digest = hash::tree_root(*verified);
  } else if (want_digest) {
    const cancellable_source source(*staging, cancel);
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
  std::unique_ptr<stable_dram> p(new stable_dram(std::move(idx)));
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
    TENSORREG_TRY_ASSIGN(auto staging, memory::shared_memory::create(r.total_size, "tensorreg-publish"));
    auto shared = std::make_shared<memory::shared_memory>(std::move(staging));
    p->upload_ = std::make_shared<stable_upload>(shared);
    hs.publish = publish_memfd{shared, r.total_size, 0};
    hs.publish_lease_token = "publish:" + random_hex(16);
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
  auto& copy = *adopted;
  auto descriptor = describe(p, *index_, copy.data_digest);

  commit_response response;
  response.descriptor = descriptor;
  const auto admit = admit_policy_of(p.policy);
  return ctx.with_catalogue([&](catalogue& cat) -> result<commit_response> {
    auto* existing = cat.find(descriptor.artifact_id);
    if (existing != nullptr && existing->quiesced) {
      return fail(errc::failed_precondition,
                  "cannot commit " + descriptor.artifact_id + ": the artifact is being deregistered");
    }
    auto& cache = cat.cache();
    const bool had_replica = cache.contains(descriptor.artifact_id);
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
    return response;
  });
}

void stable_dram::release(regions::region_registry& /*regions*/) noexcept {
  upload_.reset();
  device_staging_.reset();
  reservation_ = stable::budget_reservation{};
}

}  // namespace tensorreg::registration::detail
