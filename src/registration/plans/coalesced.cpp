#include "registration/plans/coalesced.hpp"

#include <utility>

#include "memory/system_calls.hpp"

namespace tensorreg::registration::detail {

result<std::unique_ptr<coalesced>> coalesced::begin(const begin_request& r, const coalesced_options& /*options*/,
                                                    const begin_context& ctx, begin_response& response) {
  TENSORREG_TRY_ASSIGN(auto idx, begin_indexed(r, ctx));
  if (ctx.devices == nullptr) {
    return fail(errc::failed_precondition, "cannot begin coalesced registration: the coalesced plan needs GPU " +
                                               std::to_string(r.device_id) + " and this engine has no GPU");
  }
  TENSORREG_TRY(memory::sys::check_allocation("device memory on device " + std::to_string(r.device_id), r.total_size));
  TENSORREG_TRY_ASSIGN(auto buffer, ctx.devices->allocate(r.device_id, r.total_size));
  response.handshake = coalesced_handshake{buffer.ipc_handle};
  return std::unique_ptr<coalesced>(new coalesced(std::move(idx), std::move(buffer)));
}

result<feed_work> coalesced::feed(feed_request& r, const registration_facts& /*facts*/,
                                  regions::region_registry& /*regions*/, const std::string& what) {
  TENSORREG_TRY(check_feed_shape(r, what, name(), false, false));
  return feed_work{};
}

result<commit_response> coalesced::commit(commit_context& ctx) {
  const auto& p = ctx.facts;
  // Hash, and keep as the replica, the normalized buffer rather than the raw device buffer:
  // PAD the client left dirty must reach neither the id (DECISIONS §5.1) nor readers, and the
  // local stable tier re-hashes what it copies from the replica against the id.
  TENSORREG_TRY_ASSIGN(auto normalized, normalized_source::create(buffer_->bytes, *index_));
  std::optional<hash::digest> data;
  if (p.cgid.empty()) {
    TENSORREG_TRY_ASSIGN(data, hash_canonical(normalized->view(), ctx.pool, ctx.devices, ctx.cancelled));
  }
  auto descriptor = describe(p, *index_, data);
  auto buffer = std::exchange(buffer_, std::nullopt);
  return publish_gpu_replica(ctx, descriptor, index_, p.device_id,
                             device_buffer{std::move(normalized), std::move(buffer->ipc_handle), buffer->device_id});
}

result<commit_response> publish_gpu_replica(commit_context& ctx, const artifact_descriptor& descriptor,
                                            std::shared_ptr<const index::canonical_index> idx, std::int32_t device_id,
                                            device_buffer replica) {
  const auto& p = ctx.facts;
  commit_response response;
  response.descriptor = descriptor;
  TENSORREG_TRY(ctx.with_catalogue([&](catalogue& cat) -> status {
    if (auto* existing = cat.find(descriptor.artifact_id); existing != nullptr && existing->quiesced) {
      return fail(errc::failed_precondition,
                  "cannot commit " + descriptor.artifact_id + ": the artifact is being deregistered");
    }
    auto& a = cat.add(descriptor, idx);
    if (a.gpu_replicas.contains(device_id)) {
      response.existed = true;  // `replica` is dropped: the one there serves
      cat.add_join(a, join{p.id, p.owner_pid, ttl_deadline(ctx.time, ctx.ttl_ms())});
    } else {
      a.gpu_replicas.emplace(device_id, std::move(replica));
      if (p.owner_uid) a.gpu_replica_uids[device_id] = *p.owner_uid;  // DECISIONS §8
    }
    return {};
  }));
  status must_failure;
  response.local_stable_tier = apply_local_stable_tier(ctx, descriptor.artifact_id, &must_failure);
  if (!must_failure) {
    // §6.2: a "must" tier that cannot be satisfied fails the commit and cleans up, so undo what
    // this commit added (its replica or its join), as the lease plan revokes its lease.
    ctx.with_catalogue([&](catalogue& cat) {
      if (auto* a = cat.find(descriptor.artifact_id); a != nullptr) {
        if (response.existed) {
          (void)cat.revoke(p.id);
        } else {
          a->gpu_replicas.erase(device_id);
          a->gpu_replica_uids.erase(device_id);
        }
        cat.erase_if_empty(descriptor.artifact_id);
      }
    });
    return tl::unexpected(must_failure.error());
  }
  return response;
}

void coalesced::release(regions::region_registry& /*regions*/) noexcept { buffer_.reset(); }

}  // namespace tensorreg::registration::detail
