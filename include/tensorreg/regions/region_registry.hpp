// tensorreg/regions/region_registry.hpp — long-lived memory regions that registrations borrow.
//
// A region is a block of client memory registered once (a VRAM allocation by its CUDA IPC
// handle, or HOST_SHARED memory: a memfd) from which any number of storages are then taken
// by offset (registration.md §5.3). The registry holds regions by id, counts references
// taken by registrations and leases, expires unreferenced regions after their TTL, and drops
// every region of an owner process that exits.
//
// Thread-safety: every member function may be called concurrently (one internal mutex; no
// callback runs under it). Ownership: the registry owns its regions; the memory of a
// HOST_SHARED region is a shared_ptr, so a holder that took it keeps it mapped even after the
// region is removed (force, owner exit). A VRAM region by IPC handle keeps its handle bytes and
// a kept_mapping: the daemon's mapping of it, opened by the first lease that reads the region and
// held (strongly) until the region goes, so that a client re-leasing the regions it keeps makes
// no new driver opens (registration.md §5.3). VRAM regions of CUDA VMM allocations
// arrive already imported and mapped (the engine does it through device_memory, since the fds
// must be imported while the request is handled) and hold that mapping, plus the fds, which
// OpenArtifactDevice hands on to readers.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "tensorreg/common/clock.hpp"
#include "tensorreg/common/error.hpp"
#include "tensorreg/common/function_ref.hpp"
#include "tensorreg/common/priority_inheriting_mutex.hpp"
#include "tensorreg/common/unique_fd.hpp"
#include "tensorreg/memory/byte_source.hpp"
#include "tensorreg/memory/shared_memory.hpp"
#include "tensorreg/memory/unlocked_release.hpp"

namespace tensorreg::regions {

/// RegionMemoryKind, numbered as on the wire.
enum class memory_kind : std::int32_t { unspecified = 0, vram = 1, host_shared = 2 };
/// HostSharedRegionClass, numbered as on the wire.
enum class host_shared_class : std::int32_t { unspecified = 0, scratch = 1, allocator = 2 };

struct host_shared_spec {
  std::string attach_token;  ///< required unless daemon_managed
  bool daemon_managed = false;
  host_shared_class region_class = host_shared_class::unspecified;
};

/// CUDA VMM allocations of a VRAM region (docs/wire-format.md §12): the fds as received, in
/// mapping order, and each allocation's size.
struct vmm_chunks {
  std::vector<unique_fd> fds;
  std::vector<std::uint64_t> chunk_bytes;
};

/// RegisterRegionRequest, plus the memfd that travels beside it for a client-provided
/// HOST_SHARED region, or the VMM allocations of a VRAM region and their mapping.
struct register_request {
  memory_kind kind = memory_kind::unspecified;
  std::int32_t owner_pid = 0;
  std::uint64_t size_bytes = 0;
  std::uint32_t ttl_ms = 0;
  std::string name;
  std::int32_t device_id = -1;  ///< VRAM only
  std::string cuda_ipc_handle;  ///< VRAM only
  std::optional<host_shared_spec> host_shared;
  unique_fd memfd;  ///< HOST_SHARED, not daemon-managed; sealed with F_SEAL_SHRINK
  /// VRAM from CUDA VMM allocations instead of an IPC handle: the chunks and the device mapping
  /// the engine made of them (both set, or neither).
  std::shared_ptr<const vmm_chunks> vmm;
  std::shared_ptr<const memory::byte_source> device_mapping;
  /// The uid of the process that asks (the daemon sets its peer's), for the per-uid share of
  /// the registry; unset = not counted against any uid.
  std::optional<std::uint32_t> owner_uid;
};

/// The daemon's mapping of one VRAM region by CUDA IPC handle, kept from the first lease that
/// opens it until the region goes: unregistered, expired, its owner exited, or retired and its
/// last reference dropped (the registry then calls drop()). Every copy of the region's
/// region_info shares it. A lease that uses the mapping holds its own shared_ptr, so dropping
/// it never unmaps memory a live lease reads.
/// Why a kept mapping cannot serve other memory: it belongs to one region, which names one
/// handle of one owner pid; a block its owner frees and allocates again exports a new handle
/// (the driver's handle names the allocation, not the address), so it arrives as a new region
/// and is opened afresh; and every region of an owner is dropped when the owner exits, before a
/// new process could reuse its pid. Bounded: one mapping per region, and regions are bounded per
/// uid (registry_options::capacity_per_uid) and in all (capacity).
/// Thread-safety: every member may be called concurrently; one open at a time.
class kept_mapping {
 public:
  using opener = function_ref<result<std::shared_ptr<const memory::byte_source>>()>;

  /// The kept mapping, opened with `open` when there is none yet (or the last open failed).
  /// After drop(), `open`'s mapping is returned without being kept.
  /// Errors: what `open` returns.
  [[nodiscard]] result<std::shared_ptr<const memory::byte_source>> get_or_open(opener open);

  /// Lets go of the mapping for good and hands it to the caller, who releases it outside its
  /// own locks (closing a CUDA IPC mapping takes the driver's time).
  [[nodiscard]] std::shared_ptr<const memory::byte_source> drop() noexcept;

  /// Whether a mapping is kept now.
  [[nodiscard]] bool is_open() const;

 private:
  mutable std::mutex mutex_;
  std::shared_ptr<const memory::byte_source> mapping_;
  bool dropped_ = false;
};

/// What a registration sees of a region.
struct region_info {
  std::string id;
  memory_kind kind = memory_kind::unspecified;
  std::int32_t device_id = -1;
  std::uint64_t size_bytes = 0;
  std::int32_t owner_pid = 0;
  std::uint32_t ttl_ms = 0;  ///< after clamping; 0 = no expiry
  std::optional<clock::time_point> expires_at;
  std::string attach_token;
  std::string cuda_ipc_handle;
  /// VRAM by cuda_ipc_handle: the daemon's mapping of it, kept while the region lives.
  std::shared_ptr<kept_mapping> ipc_mapping;
  /// HOST_SHARED memory (null for VRAM).
  std::shared_ptr<const memory::shared_memory> memory;
  /// VRAM of CUDA VMM allocations: the mapping of all of them (size_bytes long) and the chunks.
  std::shared_ptr<const memory::byte_source> device_mapping;
  std::shared_ptr<const vmm_chunks> vmm;
  std::uint32_t refs = 0;
};

struct registry_options {
  std::size_t capacity = 4096;
  /// Most regions of one owner_uid, so that one user cannot take the whole registry; 0 = only
  /// capacity.
  std::size_t capacity_per_uid = 0;
  std::chrono::milliseconds max_ttl = std::chrono::minutes(10);
};

class region_registry {
 public:
  explicit region_registry(const clock& clock, registry_options options = {});

  /// Registers a region and returns it (id `region:` + 32 hex digits).
  /// Errors: INVALID_ARGUMENT (kind unspecified, owner_pid ≤ 0, size 0, VRAM without device ≥ 0
  /// or without exactly one of handle and VMM mapping, a VMM mapping of another size, HOST_SHARED without spec, daemon-managed with an attach token, client memory
  /// without token or memfd); RESOURCE_EXHAUSTED (capacity reached, or owner_uid's share of it;
  /// memfd refused); whatever adopting the client's memfd returns (FAILED_PRECONDITION without
  /// F_SEAL_SHRINK).
  [[nodiscard]] result<region_info> register_region(register_request request);

  /// Takes a reference on a region for `owner_pid` (0 = no owner check) and refreshes its
  /// expiry. Errors: NOT_FOUND, FAILED_PRECONDITION (poisoned; "region is retiring"),
  /// PERMISSION_DENIED (another owner).
  [[nodiscard]] result<region_info> acquire(const std::string& region_id, std::int32_t owner_pid);

  /// find(), then `check` on what it found (its error first), then acquire(), under one lock
  /// and one lookup: what a registration does for each region its storages name. `check` runs
  /// under the registry's lock and must not call the registry.
  /// Errors: NOT_FOUND, `check`'s, then as acquire().
  [[nodiscard]] result<region_info> acquire_checked(const std::string& region_id, std::int32_t owner_pid,
                                                    function_ref<status(const region_info&)> check);

  /// acquire() of each of `region_ids` under one lock, all or nothing, without copying what it
  /// finds: a lease republished over its predecessor's regions takes them in one step.
  /// Errors: as acquire(), for the first that fails; then no reference is taken.
  [[nodiscard]] status acquire_all(std::span<const std::string> region_ids, std::int32_t owner_pid);

  /// Drops one reference. A retiring region goes away with its last reference.
  /// Errors: NOT_FOUND, FAILED_PRECONDITION (no reference held).
  [[nodiscard]] status release(const std::string& region_id);

  /// release() of each of `region_ids` under one lock (a lease of many regions ends in one
  /// step). Returns how many could not be released (unknown, or no reference held).
  std::size_t release_all(std::span<const std::string> region_ids);

  /// Unregisters a region; returns whether it is gone now. With references held it fails
  /// unless `force`, which retires it: no new references, gone with the last one.
  /// Errors: NOT_FOUND, PERMISSION_DENIED (another owner), FAILED_PRECONDITION (referenced).
  [[nodiscard]] result<bool> unregister(const std::string& region_id, std::int32_t owner_pid, bool force);

  /// Marks a region unusable (its memory failed); later acquires fail. Errors: NOT_FOUND.
  [[nodiscard]] status poison(const std::string& region_id, const std::string& reason);

  /// Looks a region up without taking a reference. Errors: NOT_FOUND.
  [[nodiscard]] result<region_info> find(const std::string& region_id) const;

  /// Expires unreferenced regions past their deadline and renews referenced ones.
  /// Returns the ids removed.
  std::vector<std::string> sweep();

  /// Removes every region of an exited owner process. Returns the ids removed.
  std::vector<std::string> release_owner(std::int32_t owner_pid);

  /// Regions registered now; takes no lock (GetStats reads it on the I/O thread).
  [[nodiscard]] std::size_t size() const;

 private:
  struct entry {
    region_info info;
    bool poisoned = false;
    std::string poison_reason;
    bool retiring = false;
    std::optional<std::uint32_t> owner_uid;
  };

  [[nodiscard]] std::optional<clock::time_point> deadline_for(std::uint32_t ttl_ms) const;
  [[nodiscard]] static status check_acquire_locked(const entry& e, const std::string& region_id,
                                                   std::int32_t owner_pid);
  [[nodiscard]] result<region_info> acquire_locked(entry& e, const std::string& region_id, std::int32_t owner_pid);
  // Drops one reference of `it`; a retiring region's mappings go to `gone`, to close unlocked.
  [[nodiscard]] status release_locked(std::unordered_map<std::string, entry>::iterator it,
                                      memory::deferred_release& gone);

  const clock& clock_;
  registry_options options_;
  mutable priority_inheriting_mutex mutex_;  // the FIFO I/O thread takes it (GetStats)
  std::unordered_map<std::string, entry> regions_;
  std::atomic<std::size_t> count_{0};  // regions_.size(), stored under mutex_ at each change
};

}  // namespace tensorreg::regions
