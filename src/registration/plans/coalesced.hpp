// src/registration/plans/coalesced.hpp — the coalesced plan: the client writes its tensors into
// one daemon-owned device buffer, which becomes the artifact's GPU replica (registration.md
// §4.2, §4.5). Needs a GPU.
//
// Private to the engine. Not thread-safe: see plan.hpp for when a plan is called.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "registration/plans/plan.hpp"

namespace tensorreg::registration::detail {

/// Commit steps 9–10 of a plan that ends with a daemon-owned device buffer: files `descriptor`
/// with `idx` and keeps `replica` (the normalized canonical bytes, on `device_id`) as the
/// artifact's GPU replica on that device, or joins the replica already there (then `replica`
/// is dropped); then applies the local stable tier (§6.2).
/// Errors: FAILED_PRECONDITION (the artifact is being deregistered), a "must" stable tier's
/// failure (what the commit added is taken back).
[[nodiscard]] result<commit_response> publish_gpu_replica(commit_context& ctx, const artifact_descriptor& descriptor,
                                                          std::shared_ptr<const index::canonical_index> idx,
                                                          std::int32_t device_id, device_buffer replica);

class coalesced final : public plan {
 public:
  /// Errors: INVALID_ARGUMENT, NOT_FOUND (the index, as engine::begin), FAILED_PRECONDITION (no
  /// GPU), whatever allocating the buffer returns.
  [[nodiscard]] static result<std::unique_ptr<coalesced>> begin(const begin_request& request,
                                                                const coalesced_options& options,
                                                                const begin_context& ctx, begin_response& response);

  [[nodiscard]] std::string_view name() const noexcept override { return "coalesced"; }
  /// Every Feed payload belongs to another plan: FAILED_PRECONDITION.
  [[nodiscard]] result<feed_work> feed(feed_request& request, const registration_facts& facts,
                                       regions::region_registry& regions, const std::string& what) override;
  /// Hashes the normalized buffer and publishes it as the device's GPU replica, or joins the
  /// replica already there. Errors: FAILED_PRECONDITION (being deregistered), the hash's, the
  /// "must" local stable tier's.
  [[nodiscard]] result<commit_response> commit(commit_context& ctx) override;
  void release(regions::region_registry& regions) noexcept override;

 private:
  coalesced(std::shared_ptr<const index::canonical_index> idx, device_buffer buffer) noexcept
      : index_(std::move(idx)), buffer_(std::move(buffer)) {}

  std::shared_ptr<const index::canonical_index> index_;
  std::optional<device_buffer> buffer_;  // moved into the catalogue by a commit that publishes it
};

}  // namespace tensorreg::registration::detail
