// src/registration/plans/lease_repeat.hpp — a lease over the memory and layout of a committed
// lease (engine::republish, docs/wire-format.md §20): the weight-sync loop's next version.
//
// A trainer's weights stay in the same allocations step after step, so its next version is the
// last one's tables again. This plan takes no Feed: its Commit takes the previous lease's
// canonical view (mappings included), index and layout token, and its own reference on each
// of the previous lease's regions, instead of receiving, checking and rebuilding the tables.
//
// Private to the engine. Not thread-safe: see plan.hpp for when a plan is called.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "registration/plans/plan.hpp"

namespace tensorreg::registration::detail {

/// The committed lease `registration_id` and its artifact, when `owner_pid` may republish it:
/// engine::republish() asks before it begins, the plan again at Commit (the lease may have gone
/// in between). Call under the engine mutex.
/// Errors: NOT_FOUND, PERMISSION_DENIED, FAILED_PRECONDITION (a snapshot lease; its artifact
/// being deregistered).
[[nodiscard]] result<std::pair<const lease*, const artifact*>> republishable(catalogue& cat,
                                                                             const std::string& registration_id,
                                                                             std::int32_t owner_pid);

class lease_repeat final : public plan {
 public:
  /// Errors: none (the previous lease is looked up at Commit).
  [[nodiscard]] static result<std::unique_ptr<lease_repeat>> begin(const lease_options& options,
                                                                   begin_response& response);

  [[nodiscard]] std::string_view name() const noexcept override { return "lease-in-place, republished"; }
  /// Errors: FAILED_PRECONDITION: a republished lease takes no Feed.
  [[nodiscard]] result<feed_work> feed(feed_request& request, const registration_facts& facts,
                                       regions::region_registry& regions, const std::string& what) override;
  /// Errors: NOT_FOUND (the previous lease ended), PERMISSION_DENIED (another owner's),
  /// FAILED_PRECONDITION (a snapshot lease, being deregistered, a region poisoned or retiring),
  /// as publish_lease().
  [[nodiscard]] result<commit_response> commit(commit_context& ctx) override;
  void release(regions::region_registry& regions) noexcept override;

 private:
  explicit lease_repeat(std::string previous) noexcept : previous_(std::move(previous)) {}
  std::string previous_;             // the lease whose memory and layout are taken
  std::vector<std::string> held_{};  // region references taken and not yet handed to the lease
};

}  // namespace tensorreg::registration::detail
