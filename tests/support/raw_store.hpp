// tests/support/raw_store.hpp — the end-to-end tests' registration helper over a raw connection.
//
// `store` runs tensorreg::client's put and register_lease over a client::raw::connection the
// test also uses for hand-made requests (they share the socket), and answers with the wire's
// ArtifactDescriptor, as the daemon's GetArtifactIndexById returns it after the commit, so that
// the tests compare it with what raw answers carry.
//
// Thread-safety: as client::connection. Ownership: a store shares its raw connection; a lease
// owns the client lease (revoked when destroyed).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "client/raw_connection.hpp"
#include "tensorreg/client/connection.hpp"

namespace tensorreg::testing {

struct registered {
  tensorcast::common::v1::ArtifactDescriptor descriptor;
  bool existed = false;
  std::string registration_id;
  double begin_to_commit_seconds = 0;
};

class lease {
 public:
  lease(client::lease held, registered info) : held_(std::move(held)), info_(std::move(info)) {}
  [[nodiscard]] const registered& info() const noexcept { return info_; }
  [[nodiscard]] std::uint64_t keepalives_sent() const noexcept { return held_.keepalives_sent(); }

 private:
  client::lease held_;
  registered info_;
};

class store {
 public:
  explicit store(std::shared_ptr<client::raw::connection> c);

  [[nodiscard]] result<registered> put(const index::safetensors_bundle& bundle, const std::string& profile,
                                       const std::function<void(std::uint64_t, std::uint64_t)>& progress = {});
  [[nodiscard]] result<std::unique_ptr<lease>> register_lease(const index::safetensors_bundle& bundle,
                                                              std::uint32_t ttl_ms = client::default_ttl_ms);
  [[nodiscard]] client::raw::connection& connection() noexcept { return *raw_; }

 private:
  std::shared_ptr<client::raw::connection> raw_;
  client::connection client_;
};

}  // namespace tensorreg::testing
