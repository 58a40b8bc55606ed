#include "tensorreg/client/weight_sync.hpp"

#include <algorithm>
#include <thread>

#include "tensorreg/identity/artifact_id.hpp"

namespace tensorreg::client {
namespace {

constexpr std::string_view kPrefix = "cgid:weight-sync~";

// The hash answer as the caller's result: the mi2 id, or why there is none.
result<std::string> verified_of(const std::string& cgid, const hash_status& st) {
  switch (st.state) {
    case hash_state::done: return st.mi2_id;
    case hash_state::failed: return fail(errc::aborted, "cannot verify " + cgid + ": " + st.message);
    case hash_state::pending:
      return fail(errc::deadline_exceeded, "cannot verify " + cgid + ": its hash is still running");
    case hash_state::none: break;
  }
  return fail(errc::failed_precondition, "cannot verify " + cgid + ": it was committed without a background hash");
}

}  // namespace

result<std::string> weight_version_id(std::string_view name, std::uint64_t k) {
  const bool ok = !name.empty() && std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
           c == '_';
  });
  if (!ok) {
    return fail(errc::invalid_argument,
                "cannot name weight-sync stream '" + std::string(name) + "': use one or more of [A-Za-z0-9-._]");
  }
  std::string id = std::string(kPrefix) + std::string(name) + "~" + std::to_string(k);
  TENSORREG_TRY(identity::validate_cgid(id));
  return id;
}

// ---- producer ----------------------------------------------------------------------------------

weight_sync_producer::weight_sync_producer(connection conn, std::string name, weight_sync_options options)
    : conn_(std::move(conn)), name_(std::move(name)), options_(options) {}

result<weight_sync_producer> weight_sync_producer::create(connection conn, std::string name,
                                                          weight_sync_options options) {
  TENSORREG_TRY(weight_version_id(name, 1));
  if (options.keep_versions == 0) {
    return fail(errc::invalid_argument, "cannot create weight-sync producer '" + name + "': keep_versions is 0");
  }
  return weight_sync_producer(std::move(conn), std::move(name), options);
}

result<weight_version> weight_sync_producer::keep(result<lease> leased, std::uint64_t k) {
  if (!leased) return tl::unexpected(std::move(leased).error());
  leases_.push_back(std::move(*leased));
  weight_version v{leases_.back().info().descriptor.artifact_id, k};
  next_k_ = k + 1;
  last_ = v;
  while (leases_.size() > options_.keep_versions) {
    (void)leases_.front().release();  // a version readers may no longer open; errors change nothing
    leases_.pop_front();
  }
  return v;
}

result<weight_version> weight_sync_producer::publish(std::span<const cuda_tensor> tensors) {
  const auto k = next_k_;
  cuda_register_options o;
  o.ttl_ms = options_.ttl_ms;
  o.device = options_.device;
  TENSORREG_TRY_ASSIGN(o.client_artifact_id, weight_version_id(name_, k));
  o.hash_in_background = true;
  return keep(conn_.register_cuda(tensors, o), k);
}

result<weight_version> weight_sync_producer::publish(const index::safetensors_bundle& bundle) {
  const auto k = next_k_;
  lease_register_options o;
  o.ttl_ms = options_.ttl_ms;
  TENSORREG_TRY_ASSIGN(o.client_artifact_id, weight_version_id(name_, k));
  o.hash_in_background = true;
  return keep(conn_.register_lease(bundle, o), k);
}

result<weight_version> weight_sync_producer::publish_again() {
  if (leases_.empty()) {
    return fail(errc::failed_precondition,
                "cannot publish '" + name_ + "' again: nothing published yet (publish the tensors first)");
  }
  const auto k = next_k_;
  republish_options o;
  o.ttl_ms = options_.ttl_ms;
  TENSORREG_TRY_ASSIGN(o.client_artifact_id, weight_version_id(name_, k));
  o.hash_in_background = true;
  // One version kept: the daemon ends the one before in the same call, and keep() finds it
  // released already. More: keep() revokes the oldest as after publish().
  o.revoke_previous = options_.keep_versions == 1;
  return keep(conn_.republish(leases_.back(), o), k);
}

result<std::string> weight_sync_producer::wait_hashed() {
  if (!last_) return fail(errc::failed_precondition, "cannot wait for the hash of '" + name_ + "': nothing published");
  TENSORREG_TRY_ASSIGN(auto st, conn_.wait_artifact_hash(last_->cgid));
  return verified_of(last_->cgid, st);
}

// ---- consumer ----------------------------------------------------------------------------------

result<weight_sync_consumer> weight_sync_consumer::create(connection conn, std::string name) {
  TENSORREG_TRY(weight_version_id(name, 1));
  return weight_sync_consumer(std::move(conn), std::move(name));
}

result<std::optional<weight_version>> weight_sync_consumer::latest() {
  TENSORREG_TRY_ASSIGN(auto all, conn_.list());
  const std::string prefix = std::string(kPrefix) + name_ + "~";
  std::optional<weight_version> newest;
  for (const auto& a : all) {
    const auto& id = a.descriptor.artifact_id;
    if (id.size() <= prefix.size() || id.compare(0, prefix.size(), prefix) != 0) continue;
    const auto digits = std::string_view(id).substr(prefix.size());
    if (!std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }) || digits.size() > 19) {
      continue;
    }
    const std::uint64_t k = std::stoull(std::string(digits));
    if (!newest || k > newest->k) newest = weight_version{id, k};
  }
  return newest;
}

result<weight_version> weight_sync_consumer::wait_for(std::uint64_t k, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  // Polls ListArtifacts: the daemon has no notification of new artifacts, and a list is a
  // control-lane call of a few microseconds. The pause grows to 5 ms.
  auto pause = std::chrono::microseconds(100);
  for (;;) {
    TENSORREG_TRY_ASSIGN(auto newest, latest());
    if (newest && newest->k >= k) return *newest;
    if (timeout.count() > 0 && std::chrono::steady_clock::now() >= deadline) {
      return fail(errc::deadline_exceeded, "cannot wait for version " + std::to_string(k) + " of '" + name_ +
                                               "': not published after " + std::to_string(timeout.count()) + " ms");
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(5000));
  }
}

result<std::string> weight_sync_consumer::wait_verified(const weight_version& v, std::chrono::milliseconds timeout) {
  TENSORREG_TRY_ASSIGN(auto st, conn_.wait_artifact_hash(v.cgid, timeout));
  return verified_of(v.cgid, st);
}

}  // namespace tensorreg::client
