#include "registration/plans/lease_repeat.hpp"

#include <optional>
#include <utility>

#include "registration/plans/lease_in_place.hpp"

namespace tensorreg::registration::detail {

result<std::pair<const lease*, const artifact*>> republishable(catalogue& cat, const std::string& registration_id,
                                                               std::int32_t owner_pid) {
  const std::string what = "cannot republish lease '" + registration_id + "'";
  const lease* l = cat.find_lease(registration_id);
  const artifact* a = cat.artifact_of(registration_id);
  if (l == nullptr || a == nullptr) {
    return fail(errc::not_found, what + ": no such lease (never committed, revoked, expired, or its owner exited)");
  }
  if (l->owner_pid != owner_pid) {
    return fail(errc::permission_denied, what + ": owner_pid " + std::to_string(owner_pid) +
                                             " is not the lease's owner " + std::to_string(l->owner_pid));
  }
  if (l->snapshot) {
    return fail(errc::failed_precondition,
                what + ": it is a snapshot lease, whose bytes are a copy made at its commit: register again");
  }
  if (a->quiesced) return fail(errc::failed_precondition, what + ": its artifact is being deregistered");
  return std::pair{l, a};
}

result<std::unique_ptr<lease_repeat>> lease_repeat::begin(const lease_options& options, begin_response& response) {
  response.handshake = lease_handshake{};
  return std::unique_ptr<lease_repeat>(new lease_repeat(options.repeat_of));
}

result<feed_work> lease_repeat::feed(feed_request& /*request*/, const registration_facts& /*facts*/,
                                     regions::region_registry& /*regions*/, const std::string& what) {
  return fail(errc::failed_precondition,
              what + ": a republished lease takes no Feed: its tables are those of lease '" + previous_ + "'");
}

result<commit_response> lease_repeat::commit(commit_context& ctx) {
  const auto& p = ctx.facts;
  const std::string what = "cannot republish lease '" + previous_ + "'";
  if (ctx.regions == nullptr) return fail(errc::internal, what + ": no region registry");
  lip_view view;
  std::vector<std::string> region_ids;
  std::shared_ptr<const index::canonical_index> idx;
  std::string index_multihash;
  std::uint64_t token = 0;
  TENSORREG_TRY(ctx.with_catalogue([&](catalogue& cat) -> status {
    TENSORREG_TRY_ASSIGN(auto found, republishable(cat, previous_, p.owner_pid));
    const auto [l, a] = found;
    if (l->device_id != p.device_id || a->descriptor.total_size != p.total_size) {
      return fail(errc::failed_precondition, what + ": it changed since this registration began");
    }
    view = l->view;
    region_ids = l->region_ids;
    idx = a->index;
    index_multihash = a->descriptor.index_multihash;
    token = l->layout_token;
    return {};
  }));
  // The new lease's own references, checked as a Feed checks them: a region poisoned, retiring
  // (force-unregistered) or gone since refuses, and the client registers from scratch.
  if (auto taken = ctx.regions->acquire_all(region_ids, p.owner_pid); !taken) {
    return tl::unexpected(with_context(std::move(taken).error(), what));
  }
  held_ = region_ids;
  std::optional<hash::digest> data;
  if (p.cgid.empty()) {
    TENSORREG_TRY_ASSIGN(data, hash_canonical(*view.bytes, ctx.pool, ctx.devices, ctx.cancelled));
  }
  auto descriptor = describe(p, *idx, data, &index_multihash);
  return publish_lease(ctx, descriptor, std::move(idx), std::move(view), std::move(region_ids), false, token,
                       [&] { held_.clear(); });
}

void lease_repeat::release(regions::region_registry& regions) noexcept {
  (void)regions.release_all(held_);
  held_.clear();
}

}  // namespace tensorreg::registration::detail
