// src/registration/lip.hpp — the lease-in-place tables of one pending registration and the
// commit-time rules that turn them into a canonical index and a readable canonical buffer
// (registration.md §2.3, §4.5, §5.1; DECISIONS §5.2–§5.6, §5.14).
//
// Private to the engine. Not thread-safe: the engine holds the registration's lock.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

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

/// Everything a committed lease holds: the canonical buffer as a readable source, and the
/// sources it reads from (kept alive by their shared_ptrs).
struct lip_view {
  std::shared_ptr<const memory::segmented_view> bytes;
  std::vector<std::shared_ptr<const memory::byte_source>> keep_alive;
  /// The device mappings among keep_alive, by source, as a reader in another process would
  /// open the same memory (OpenArtifactDevice).
  std::map<const memory::byte_source*, device_allocation> device_allocations;
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

  /// Commit steps 3–6 of §4.5: payload presence, the index rebuild and the segment rules.
  /// Errors: FAILED_PRECONDITION (nothing fed), INVALID_ARGUMENT, OUT_OF_RANGE.
  [[nodiscard]] result<index::canonical_index> rebuild_index(std::uint64_t total_size) const;

  /// Commit step 7: per-segment rules, then the readable canonical buffer, opening device
  /// mappings through `devices` (null: no GPU).
  /// Errors: INVALID_ARGUMENT; FAILED_PRECONDITION (device memory without a GPU); whatever
  /// opening a mapping returns.
  [[nodiscard]] result<lip_view> open_view(std::uint64_t total_size, std::int32_t owner_pid,
                                           device_memory* devices) const;

  /// Region ids of every reference taken (one per distinct region).
  [[nodiscard]] std::vector<std::string> region_ids() const;

  [[nodiscard]] std::size_t storage_count() const noexcept { return storages_.size(); }

 private:
  std::vector<lip_storage> storages_;
  std::map<std::string, regions::region_info, std::less<>> regions_;  // referenced, by id
  std::unordered_map<std::string, std::size_t> storage_by_id_;
  std::vector<tensor_alias> aliases_;
  std::vector<leased_segment> segments_;
};

}  // namespace tensorreg::registration::detail
