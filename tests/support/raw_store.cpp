#include "support/raw_store.hpp"

#include "client/access.hpp"

namespace tensorreg::testing {

namespace {

// The committed artifact's descriptor in wire form, asked of the daemon.
result<registered> to_wire(client::raw::connection& raw, const client::registered& r) {
  tensorreg::wire::v1::Request request;
  request.mutable_get_artifact_index_by_id()->set_artifact_id(r.descriptor.artifact_id);
  TENSORREG_TRY_ASSIGN(auto answer, raw.call(std::move(request)));
  return registered{answer.response.get_artifact_index_by_id().artifact_descriptor(), r.existed, r.registration_id,
                    r.begin_to_commit_seconds};
}

}  // namespace

store::store(std::shared_ptr<client::raw::connection> c)
    : raw_(c), client_(client::connection_access::wrap(std::move(c))) {}

result<registered> store::put(const index::safetensors_bundle& bundle, const std::string& profile,
                              const std::function<void(std::uint64_t, std::uint64_t)>& progress) {
  TENSORREG_TRY_ASSIGN(auto r, client_.put(bundle, {profile, progress}));
  return to_wire(*raw_, r);
}

result<std::unique_ptr<lease>> store::register_lease(const index::safetensors_bundle& bundle, std::uint32_t ttl_ms) {
  TENSORREG_TRY_ASSIGN(auto held, client_.register_lease(bundle, ttl_ms));
  TENSORREG_TRY_ASSIGN(auto info, to_wire(*raw_, held.info()));
  return std::make_unique<lease>(std::move(held), std::move(info));
}

}  // namespace tensorreg::testing
