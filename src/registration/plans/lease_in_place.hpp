// src/registration/plans/lease_in_place.hpp — the lease-in-place plan (LIP): the bytes stay in
// the client's memory and the engine holds a lease on them (registration.md §2.3, §4.5, §5.1;
// DECISIONS §5.2–§5.6, §5.14).
//
// Provides `lip_tables` (the storage, alias and segment tables fed to one pending registration
// and the commit-time rules that turn them into a canonical index and a readable canonical
// buffer) and `lease_in_place`, the plan over them.
//
// Private to the engine. Not thread-safe: see plan.hpp for when a plan is called.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "registration/catalogue.hpp"
#include "registration/plans/plan.hpp"
#include "tensorreg/common/function_ref.hpp"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/memory/segmented_view.hpp"
#include "tensorreg/registration/device_memory.hpp"
#include "tensorreg/registration/types.hpp"

namespace tensorreg::registration::detail {

/// A storage entry as fed, plus what the engine resolved for it at Feed time.
struct lip_storage {
  storage_entry entry;
  /// Region-backed entries: the region, in lip_tables' regions (one reference per region).
  const regions::region_info* region = nullptr;
};

class lip_tables {
 public:
  lip_tables() = default;
  // Storages point into regions_: moving keeps the map's nodes, copying would not.
  lip_tables(lip_tables&&) noexcept = default;
  lip_tables& operator=(lip_tables&&) noexcept = default;
  lip_tables(const lip_tables&) = delete;
  lip_tables& operator=(const lip_tables&) = delete;

  /// Records storage entries (§4.3.7–8). The registration takes one reference, for
  /// `owner_pid`, on each distinct region its entries use (a 10 000-storage state dict in one
  /// region costs one acquire); every entry is still checked against its region.
  /// All or nothing: on error no reference taken by this call stays taken.
  /// Errors: INVALID_ARGUMENT (no source, empty or duplicate storage_id), NOT_FOUND (unknown
  /// region), FAILED_PRECONDITION (region kind/device mismatch, bounds, poisoned, retiring),
  /// PERMISSION_DENIED (region owner).
  [[nodiscard]] status add_storages(std::vector<storage_entry> entries, regions::region_registry& registry,
                                    std::int32_t owner_pid);

  /// Records aliases; duplicates are found at commit (§2.3).
  void add_aliases(std::vector<tensor_alias> aliases);

  /// Records segments. Errors: INVALID_ARGUMENT for an empty storage_id.
  [[nodiscard]] status add_segments(std::vector<leased_segment> segments);

  /// What add_segments() checks, without recording anything. Errors: as add_segments().
  [[nodiscard]] static status check_segments(const std::vector<leased_segment>& segments);

  /// Commit step 3 of §4.5: segments, storages and aliases were fed.
  /// Errors: FAILED_PRECONDITION naming what is missing.
  [[nodiscard]] status check_payloads() const;

  /// The tables that steps 4–6 read (total_size, each storage's id and length, each segment,
  /// each alias), as bytes in the order fed: equal signatures give equal rebuild_index()
  /// outcomes (layout_cache.hpp). Regions and mapping offsets are not in it.
  [[nodiscard]] std::string layout_signature(std::uint64_t total_size) const;

  /// Commit steps 3–6 of §4.5: payload presence, the index rebuild and the segment rules.
  /// Errors: FAILED_PRECONDITION (nothing fed), INVALID_ARGUMENT, OUT_OF_RANGE.
  [[nodiscard]] result<index::canonical_index> rebuild_index(std::uint64_t total_size) const;

  /// Commit step 7: per-segment rules, then the readable canonical buffer, opening device
  /// mappings through `devices` (null: no GPU).
  /// Errors: INVALID_ARGUMENT; FAILED_PRECONDITION (device memory without a GPU); whatever
  /// opening a mapping returns.
  [[nodiscard]] result<lip_view> open_view(std::uint64_t total_size, std::int32_t owner_pid,
                                           device_memory* devices) const;

  /// Region ids of every reference taken (one per distinct region), in the order first taken.
  [[nodiscard]] std::vector<std::string> region_ids() const;

  [[nodiscard]] std::size_t storage_count() const noexcept { return storages_.size(); }

 private:
  std::vector<lip_storage> storages_;
  // Referenced regions by id; storages point at the values (stable: node-based map).
  std::unordered_map<std::string, regions::region_info> regions_;
  std::vector<std::string> region_order_;  // their ids, in the order first referenced
  std::unordered_map<std::string, std::size_t> storage_by_id_;
  std::vector<tensor_alias> aliases_;
  std::vector<leased_segment> segments_;
};

/// Commit steps 9–10 of a lease, shared by the lease plans: files `descriptor` with `idx`, adds
/// a lease over `view` for ctx.facts' registration that holds the references of `region_ids`
/// (`handed_over` runs under the engine mutex once the lease owns them), with `layout_token`
/// (0: a new one), then applies the local stable tier (§6.2).
/// Errors: FAILED_PRECONDITION (the artifact is being deregistered), ALREADY_EXISTS (a lease of
/// it on the same device), a "must" stable tier's failure (the lease is revoked again).
[[nodiscard]] result<commit_response> publish_lease(commit_context& ctx, const artifact_descriptor& descriptor,
                                                    std::shared_ptr<const index::canonical_index> idx, lip_view view,
                                                    std::vector<std::string> region_ids, bool snapshot,
                                                    std::uint64_t layout_token, function_ref<void()> handed_over);

/// The lease-in-place plan. Begin checks neither index nor device (§4.2.7): the index is
/// rebuilt from the fed tables at Commit, and Commit publishes a lease that takes over the
/// registration's region references and mappings. A snapshot lease (in_place = false,
/// registration.md §5.4) is fed and checked the same way, but its Commit copies the leased bytes
/// into the daemon's own memory (plans/snapshot.hpp), gives the client's memory back (mappings
/// and region references) and publishes a lease over the copy, hashed from the copy. With
/// publish_copy (§5.5) the copy, which must be a device buffer, is published as the artifact's
/// GPU replica instead, as a coalesced put's buffer is, and no lease is left.
class lease_in_place final : public plan {
 public:
  /// Errors: INVALID_ARGUMENT (publish_copy of a lease in place).
  [[nodiscard]] static result<std::unique_ptr<lease_in_place>> begin(const begin_request& request,
                                                                     const lease_options& options,
                                                                     begin_response& response);

  [[nodiscard]] std::string_view name() const noexcept override { return "lease-in-place"; }
  [[nodiscard]] result<feed_work> feed(feed_request& request, const registration_facts& facts,
                                       regions::region_registry& regions, const std::string& what) override;
  /// Errors: as §4.5; FAILED_PRECONDITION for payloads not fed yet is retryable.
  [[nodiscard]] result<commit_response> commit(commit_context& ctx) override;
  void release(regions::region_registry& regions) noexcept override;

  [[nodiscard]] const lip_tables& tables() const noexcept { return tables_; }

 private:
  lease_in_place(bool snapshot, bool publish_copy) noexcept : snapshot_(snapshot), publish_copy_(publish_copy) {}
  // §5.5: the copy of the leased bytes, published as a GPU replica.
  [[nodiscard]] result<commit_response> commit_copy(commit_context& ctx, const lease_layout& layout, lip_view leased);

  lip_tables tables_;
  bool snapshot_ = false;      // in_place = false
  bool publish_copy_ = false;  // and the copy becomes a GPU replica
};

}  // namespace tensorreg::registration::detail
