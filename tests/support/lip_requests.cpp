#include "support/lip_requests.hpp"

#include <unistd.h>

#include <cstring>

namespace tensorreg::testing::lip {

wire::Request managed_region(pid_t owner, std::uint64_t size) {
  wire::Request r;
  auto* g = r.mutable_register_region();
  g->set_memory_kind(v2::REGION_MEMORY_KIND_HOST_SHARED);
  g->set_owner_pid(owner);
  g->set_size_bytes(size);
  g->mutable_host_shared()->set_daemon_managed(true);
  return r;
}

wire::Request client_region(pid_t owner, std::uint64_t size, const std::string& token) {
  wire::Request r;
  auto* g = r.mutable_register_region();
  g->set_memory_kind(v2::REGION_MEMORY_KIND_HOST_SHARED);
  g->set_owner_pid(owner);
  g->set_size_bytes(size);
  g->mutable_host_shared()->set_attach_token(token);
  return r;
}

wire::Request unregister_region(pid_t owner, const std::string& region_id) {
  wire::Request r;
  r.mutable_unregister_region()->set_region_id(region_id);
  r.mutable_unregister_region()->set_owner_pid(owner);
  r.mutable_unregister_region()->set_force(true);
  return r;
}

wire::Request begin(pid_t owner, std::uint64_t total_size, std::uint32_t ttl_ms,
                    tensorcast::common::v1::PolicyProfile profile) {
  wire::Request r;
  auto* b = r.mutable_begin_register_artifact();
  b->set_total_size(total_size);
  b->set_owner_pid(owner);
  b->set_ttl_ms(ttl_ms);
  b->mutable_lease()->set_in_place(true);
  if (profile != tensorcast::common::v1::POLICY_PROFILE_UNSPECIFIED) b->mutable_policy()->set_profile(profile);
  return r;
}

v2::FeedRegisterArtifactStreamRequest one_storage(const std::string& registration_id, const std::string& region_id,
                                                  std::uint64_t length) {
  v2::FeedRegisterArtifactStreamRequest feed;
  feed.set_registration_id(registration_id);
  auto* se = feed.add_storage_entries();
  se->set_storage_id("s0");
  se->set_device_id(-1);
  se->set_storage_length(length);
  se->mutable_region_ref()->set_region_id(region_id);
  se->mutable_region_ref()->set_memory_kind(v2::REGION_MEMORY_KIND_HOST_SHARED);
  auto* seg = feed.mutable_lease_segments()->add_segments();
  seg->set_storage_id("s0");
  seg->set_length(length);
  auto* a = feed.add_tensor_aliases();
  a->set_name("weights");
  a->set_storage_id("s0");
  a->set_logical_length(length);
  a->add_shape(static_cast<std::int64_t>(length));
  a->add_stride(1);
  a->set_dtype("torch.uint8");
  return feed;
}

wire::Request commit(const std::string& registration_id) {
  wire::Request r;
  r.mutable_commit_registered_artifact()->set_registration_id(registration_id);
  return r;
}

wire::Request abort(const std::string& registration_id) {
  wire::Request r;
  r.mutable_abort_registered_artifact()->set_registration_id(registration_id);
  return r;
}

wire::Request revoke(const std::string& registration_id) {
  wire::Request r;
  r.mutable_revoke_registered_artifact()->set_registration_id(registration_id);
  return r;
}

wire::Request keep_alive(pid_t owner, const std::string& registration_id, std::uint32_t ttl_ms) {
  wire::Request r;
  auto* k = r.mutable_keep_alive_register_artifact();
  k->set_registration_id(registration_id);
  k->set_owner_pid(owner);
  k->set_ttl_ms(ttl_ms);
  return r;
}

wire::Request deregister(const std::string& artifact_id) {
  wire::Request r;
  r.mutable_deregister_artifact()->set_artifact_id(artifact_id);
  return r;
}

wire::Request get_memfd(const std::string& artifact_id) {
  wire::Request r;
  r.mutable_get_artifact_memfd()->set_artifact_id(artifact_id);
  return r;
}

std::vector<std::byte> pattern(std::uint64_t n, std::uint32_t seed) {
  std::vector<std::byte> out(n);
  std::uint32_t x = seed * 2654435761u + 1;
  for (auto& b : out) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    b = static_cast<std::byte>(x);
  }
  return out;
}

result<leased_bytes> lease_bytes(client::raw::connection& c, std::span<const std::byte> bytes, std::uint32_t ttl_ms,
                                 tensorcast::common::v1::PolicyProfile profile) {
  const pid_t self = ::getpid();
  TENSORREG_TRY_ASSIGN(auto region, c.call(managed_region(self, bytes.size())));
  leased_bytes out{region.response.register_region().region().region_id(), {}, {}, {}};
  // A failure after the region exists revokes what was begun and unregisters the region.
  auto undo = [&](error e) -> tl::unexpected<error> {
    if (!out.registration_id.empty()) (void)c.call(revoke(out.registration_id));
    (void)c.call(unregister_region(self, out.region_id));
    return tl::unexpected(std::move(e));
  };
  if (region.fds.size() != 1)
    return undo(error{errc::data_loss, "cannot lease bytes: the region came without its memfd"});
  auto slab = memory::shared_memory::adopt(std::move(region.fds[0]), bytes.size(), true);
  if (!slab) return undo(slab.error());
  std::memcpy(slab->mutable_bytes().data(), bytes.data(), bytes.size());
  out.slab.emplace(std::move(*slab));
  auto begun = c.call(begin(self, bytes.size(), ttl_ms, profile));
  if (!begun) return undo(begun.error());
  out.registration_id = begun->response.begin_register_artifact().registration_id();
  if (auto fed = c.feed({one_storage(out.registration_id, out.region_id, bytes.size())}); !fed) {
    return undo(fed.error());
  }
  auto committed = c.call(commit(out.registration_id));
  if (!committed) return undo(committed.error());
  out.artifact_id = committed->response.commit_registered_artifact().artifact_descriptor().artifact_id();
  return out;
}

}  // namespace tensorreg::testing::lip
