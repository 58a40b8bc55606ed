#include "support/raw_store.hpp"

#include "client/access.hpp"
#include "client/wire_convert.hpp"

namespace tensorreg::testing {

namespace {

registered to_wire(const client::registered& r) {
  return {client::wire_convert::to_wire(r.descriptor), r.existed, r.registration_id, r.begin_to_commit_seconds};
}

}  // namespace

store::store(std::shared_ptr<client::raw::connection> c)
    : raw_(c), client_(client::connection_access::wrap(std::move(c))) {}

result<registered> store::put(const index::safetensors_bundle& bundle, const std::string& profile,
                              const std::function<void(std::uint64_t, std::uint64_t)>& progress) {
  TENSORREG_TRY_ASSIGN(auto r, client_.put(bundle, {profile, progress}));
  return to_wire(r);
}

result<std::unique_ptr<lease>> store::register_lease(const index::safetensors_bundle& bundle, std::uint32_t ttl_ms) {
  TENSORREG_TRY_ASSIGN(auto held, client_.register_lease(bundle, ttl_ms));
  auto info = to_wire(held.info());
  return std::make_unique<lease>(std::move(held), std::move(info));
}

}  // namespace tensorreg::testing
