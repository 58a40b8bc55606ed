// tensorreg/registration/engine.hpp — the registration engine: the heart of tensorreg.
//
// Turns Begin → Feed → Commit conversations into content-addressed artifacts, for the three
// plans of registration.md §4: lease-in-place (LIP: the bytes stay in client memory and the
// engine holds a lease on them), stable_dram (the bytes are copied into daemon-owned host
// memory kept by the stable DRAM cache) and coalesced (a daemon-owned device buffer; needs
// a GPU). It also holds the catalogue of committed artifacts, the region registry and the
// index store, and releases everything of an owner process when that process exits.
//
// An inference server or test harness links this directly; `tensorregd` only wraps it.
//
// Logging: every rejected call (with its status code), revoke, expiry, owner death, deregister
// and stable-cache eviction is one line at info on `engine_options::log`, naming the
// registration or artifact id and the owner pid; Begin and Commit successes at debug.
//
// Thread-safety: every member function may be called from any number of threads at once.
// The engine's own lock guards only its tables; hashing and copying run outside it, on the
// engine's thread pool, so a long commit never blocks other registrations, and one
// registration's failure never disturbs another's.
// With a persist directory (engine_options::durable), writes, background verification and the
// tasks' bookkeeping run on persistence threads of the engine's own (docs/architecture.md §14).
//
// Ownership: the engine owns pending registrations, leases, replicas and regions. Memory a
// client hands over (memfds, host_storage_source) is shared: the engine keeps its
// shared_ptr for as long as a registration or lease needs it.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tensorreg/common/clock.hpp"
#include "tensorreg/common/error.hpp"
#include "tensorreg/common/logger.hpp"
#include "tensorreg/common/unique_fd.hpp"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/persistence/durable_store.hpp"
#include "tensorreg/persistence/resident_state.hpp"
#include "tensorreg/persistence/task_table.hpp"
#include "tensorreg/registration/device_memory.hpp"
#include "tensorreg/registration/types.hpp"

namespace tensorreg::registration {

struct engine_options {
  /// Time source for every TTL; must outlive the engine.
  const clock* time = &system_clock();
  /// Where the engine writes its events; must outlive the engine; null = none.
  logger* log = &null_logger();
  /// Stable DRAM cache budget in bytes; 0 = unlimited.
  std::uint64_t stable_bytes = 0;
  /// Hashing threads; 0 = one per hardware thread.
  unsigned hash_threads = 0;
  /// Added to the hashing threads' nice value, so that bulk hashing and copying yield the cores
  /// to the threads that answer requests (docs/architecture.md §9.1); 0 = same priority.
  int hash_nice = 10;
  /// GPU access; null = no GPU (CUDA-only requests fail FAILED_PRECONDITION).
  std::shared_ptr<device_memory> devices;
  /// DeregisterArtifact's drain timeout when the request says 0 (DECISIONS §5.16).
  std::chrono::milliseconds default_drain_timeout{30'000};
  /// Background sweep period (TTL expiry of leases, joins, regions); 0 = no background thread
  /// (tests call sweep() themselves).
  std::chrono::milliseconds sweep_interval{500};
  /// Watch owner processes with pidfds and release what they held when they exit.
  bool watch_owners = true;
  /// Region registry capacity.
  std::size_t region_capacity = 4096;
  /// Most regions of one uid (register_request::owner_uid, which the daemon sets); 0 = only
  /// region_capacity.
  std::size_t region_capacity_per_uid = 1024;
  /// Most pending registrations (Begin without Commit or Abort yet) of one owner_pid; 0 = no
  /// limit. Each may hold staging memory and fds until its TTL.
  std::size_t max_pending_per_owner = 1024;
  /// Most stable DRAM cache entries that the commits of one uid (begin_request::owner_uid)
  /// created, each a memfd the daemon keeps open; 0 = no limit.
  std::size_t max_stable_entries_per_uid = 4096;
  /// Largest total_size a Begin accepts; 0 = no limit. Every commit holds per-leaf state in
  /// proportion to its size, so a size no memory could back is refused before anything is
  /// allocated for it.
  std::uint64_t max_total_size = std::uint64_t{1} << 40;
  /// The persist directory (--persist-dir); null = none: StartPersistence answers
  /// FAILED_PRECONDITION and policies asking for the shared disk start no task (DECISIONS §5.11).
  std::shared_ptr<persistence::durable_store> durable;
  /// Persistence writes and verifications run at once, on the engine's own persistence threads.
  unsigned persist_threads = 2;
  /// Check every leaf of every persisted artifact in the background after create().
  bool verify_persisted_at_start = true;
  /// Bytes of shared memory kept faulted in ahead of the next host put of about that size
  /// (src/memory/populated_reserve.hpp), held outside the stable budget; 0 = none.
  std::uint64_t populated_reserve_bytes = 0;
};

class engine {
 public:
  /// Errors: INTERNAL when a background thread cannot start.
  [[nodiscard]] static result<std::unique_ptr<engine>> create(engine_options options);

  engine(const engine&) = delete;
  engine& operator=(const engine&) = delete;
  ~engine();

  // ---- the registration conversation (registration.md §4) ----

  /// Opens a pending registration and picks its plan (§4.2).
  /// Errors: INVALID_ARGUMENT (owner_pid ≤ 0, total_size 0, device_id < 0, bad policy, bad
  /// cgid, bad schema/encoding, no index, bad index), NOT_FOUND ("unknown tensor_index_key"),
  /// UNIMPLEMENTED (a PIECE with placement CLIENT, a view over lease-in-place),
  /// FAILED_PRECONDITION (coalesced or stage_on_gpu without a GPU; a piece of a sealed assembly), RESOURCE_EXHAUSTED (total_size above max_total_size, the
  /// owner's max_pending_per_owner reached, stable budget).
  [[nodiscard]] result<begin_response> begin(begin_request request);

  /// Applies one Feed message (§4.3). Every message extends the pending TTL.
  /// Errors: NOT_FOUND (unknown id), DEADLINE_EXCEEDED (expired: released), INVALID_ARGUMENT,
  /// FAILED_PRECONDITION, OUT_OF_RANGE, PERMISSION_DENIED (region owner), as §4.3 and §5.1.
  [[nodiscard]] status feed(feed_request request);

  /// Extends a pending registration or a committed lease (§4.4).
  /// Errors: NOT_FOUND, PERMISSION_DENIED (owner_pid differs from Begin's).
  [[nodiscard]] status keep_alive(const keep_alive_request& request);

  /// Finishes a registration: validates, hashes, publishes (§4.5).
  /// Errors: as §4.5 and §5.1; RESOURCE_EXHAUSTED (out of memory) and INTERNAL (any other
  /// exception from the commit's work). The registration is gone afterwards unless the error
  /// is one a client can fix by feeding more (FAILED_PRECONDITION for missing payloads).
  [[nodiscard]] result<commit_response> commit(const std::string& registration_id);
  /// commit() with options. `hash_in_background` (registration.md §4.8): the answer comes once
  /// the artifact is committed and usable, with hash = pending, and its data hash is computed
  /// afterwards on the hash pool (wait_artifact_hash answers it). The owner must not write the
  /// leased bytes until the hash is done.
  /// Errors: as commit(); INVALID_ARGUMENT (hash_in_background for a registration without a
  /// cgid; the registration stays open).
  [[nodiscard]] result<commit_response> commit(const std::string& registration_id, const commit_options& options);

  /// A new lease over the memory and layout of `previous_registration_id`, a committed
  /// lease-in-place registration of the same owner: Begin, Commit with the previous lease's
  /// tables (their index, segments and mappings reused, not rebuilt), and with
  /// `revoke_previous` the previous lease's end, in one step. The new lease takes its own
  /// reference on each of the previous lease's regions and keeps its layout_token.
  /// Errors: NOT_FOUND (no such lease), PERMISSION_DENIED (another owner's lease),
  /// FAILED_PRECONDITION (a snapshot lease; a region poisoned or retiring since), as begin() and
  /// commit(); nothing is left pending on error.
  [[nodiscard]] result<republish_response> republish(const republish_request& request);

  /// Waits up to `timeout` (0 = no limit) for the background hash of a cgid artifact, named by
  /// its cgid or by the mi2 id the hash found (registration.md §4.8). A timeout answers pending;
  /// a hash cancelled (lease revoked or expired, owner exited, deregistered, engine stopping)
  /// answers failed with the reason, also for a while after the artifact is gone. An artifact
  /// without a background hash answers none (cgid) or done with its own id (mi2).
  /// Errors: NOT_FOUND (unknown artifact).
  [[nodiscard]] result<hash_status> wait_artifact_hash(const std::string& artifact_id,
                                                       std::chrono::milliseconds timeout) const;

  /// Cancels a pending registration and releases what it held (§4.6; DECISIONS §5.6).
  /// Errors: NOT_FOUND.
  [[nodiscard]] status abort(const std::string& registration_id);

  /// Drops a registration, lease or idempotent join by registration id. Always succeeds;
  /// returns whether the id named one (false for an unknown or already revoked id).
  bool revoke(const std::string& registration_id, const std::string& reason);

  // ---- regions (§5.3) ----

  /// Registers a region of client (or daemon-managed) memory that Feed's storage entries may
  /// name (§5.3), and watches its owner process. A VRAM region of CUDA VMM allocations is
  /// imported and mapped here first (docs/wire-format.md §12).
  /// Errors: INVALID_ARGUMENT (kind unspecified, owner_pid ≤ 0, size 0, VRAM without device ≥ 0
  /// or without exactly one of handle and VMM chunks, VMM chunks that do not add up to
  /// size_bytes or do not import, HOST_SHARED without its spec, client memory without token or
  /// memfd, an owner process that does not exist), FAILED_PRECONDITION (VMM memory without a
  /// GPU, or on another device), RESOURCE_EXHAUSTED (capacity reached, or the
  /// owner_uid's share of it; memfd refused, address space, out of fds), INTERNAL (the owner
  /// cannot be watched otherwise).
  /// The region_info handed back shares a VMM region's mapping, as every copy does: a caller
  /// that keeps it keeps the import mapped after the region goes (let it go once read).
  [[nodiscard]] result<regions::region_info> register_region(regions::register_request request);
  /// Unregisters a region; returns whether it is gone now. With references held (pending
  /// registrations or leases using it) it fails unless `force`, which retires it: no new
  /// references, gone with the last one.
  /// Errors: NOT_FOUND, PERMISSION_DENIED (owner_pid is not the region's owner),
  /// FAILED_PRECONDITION (referenced, without force; the message ends with the reference count).
  [[nodiscard]] result<bool> unregister_region(const std::string& region_id, std::int32_t owner_pid, bool force);

  // ---- catalogue ----

  /// Errors: NOT_FOUND.
  [[nodiscard]] result<artifact_summary> get(const std::string& artifact_id) const;
  [[nodiscard]] std::vector<artifact_summary> list() const;
  /// The canonical index of an artifact. Errors: NOT_FOUND.
  [[nodiscard]] result<std::shared_ptr<const index::canonical_index>> index_of(const std::string& artifact_id) const;
  /// The artifact's canonical bytes, from its stable replica or a live lease; holding the
  /// returned source keeps the artifact from draining. Errors: NOT_FOUND, FAILED_PRECONDITION
  /// (quiesced, or no host-readable copy).
  [[nodiscard]] result<std::shared_ptr<const memory::byte_source>> open_bytes(const std::string& artifact_id);
  /// The artifact's index and a read-only fd of the memfd holding its stable DRAM replica, for
  /// zero-copy readers in other processes. The replica stays valid for as long as the fd or a
  /// mapping of it lives, even after eviction (the engine does not track those readers).
  /// Errors: NOT_FOUND (unknown artifact), FAILED_PRECONDITION (quiesced, or no stable DRAM
  /// replica held in shared memory), RESOURCE_EXHAUSTED (out of fds), INTERNAL (the fd
  /// cannot be reopened read-only otherwise).
  [[nodiscard]] result<std::pair<std::shared_ptr<const index::canonical_index>, unique_fd>> stable_replica_fd(
      const std::string& artifact_id);
  /// Where the artifact's bytes lie in GPU memory, for a reader in another process to map them
  /// (docs/wire-format.md §13): a live lease whose storages are all device memory, else a
  /// daemon-owned GPU copy (coalesced). Errors: NOT_FOUND, FAILED_PRECONDITION (quiesced, or
  /// no GPU copy).
  /// `known_layout`: the layout_token of an answer the caller holds; when the lease's layout is
  /// that one, the answer has `unchanged` set and no allocations or segments.
  [[nodiscard]] result<device_layout> device_layout_of(const std::string& artifact_id,
                                                       std::uint64_t known_layout = 0) const;
  /// Makes a daemon-owned GPU copy of the artifact on `device_id` from its stable DRAM replica
  /// (loaded back from a persisted copy when only there), as a coalesced put leaves one, so
  /// that device_layout_of() answers with it: an artifact pulled from the cluster or put from
  /// files becomes mappable by GPU readers. It lives as long as the artifact (until it is
  /// removed), like a coalesced put's, but is nobody's put: whoever may remove the artifact
  /// removes it with it (no uid is recorded for it: DECISIONS §8).
  /// Returns whether a copy was made (false: one was there already).
  /// Errors: NOT_FOUND, FAILED_PRECONDITION (no GPU; quiesced; no stable DRAM replica to copy
  /// from), RESOURCE_EXHAUSTED (device memory), the copy's errors.
  [[nodiscard]] result<bool> place_on_device(const std::string& artifact_id, std::int32_t device_id);

  // ---- devices ----

  /// This engine's ordinal of a client's device: `device_uuid` when set (the client's
  /// CUDA_VISIBLE_DEVICES may differ from ours), else `device_id` as is.
  /// Errors: INVALID_ARGUMENT (malformed UUID), FAILED_PRECONDITION (no such GPU here).
  [[nodiscard]] result<std::int32_t> resolve_device(std::int32_t device_id, std::string_view device_uuid) const;
  /// "GPU-..." of one of this engine's devices; empty without a GPU.
  [[nodiscard]] std::string device_uuid(std::int32_t device_id) const;

  /// Quiesce, drain (timeout → DEADLINE_EXCEEDED, the artifact stays quiesced), revoke leases,
  /// drop replicas. With `request.owner_pid` > 0 the call acts for that process, which must hold
  /// every lease and join of the artifact (DECISIONS §8); 0 acts for the engine's embedder.
  /// Errors: NOT_FOUND, PERMISSION_DENIED (another process holds a lease or join; the message
  /// names the caller and the other holders), DEADLINE_EXCEEDED.
  [[nodiscard]] result<deregister_response> deregister(const deregister_request& request);

  // ---- views (registration.md §7) ----

  /// A view registered on an artifact. Errors: NOT_FOUND (no such artifact or view).
  [[nodiscard]] result<view_record> view_of(const std::string& artifact_id, const std::string& view_id) const;
  /// The bytes of a view, gathered from the artifact's host copy as they are read (the view
  /// layout of view_record::index_json, PAD as zero). The source keeps that copy alive.
  /// Errors: NOT_FOUND, FAILED_PRECONDITION (quiesced, no host-readable copy).
  [[nodiscard]] result<std::shared_ptr<const memory::byte_source>> open_view(const std::string& artifact_id,
                                                                             const std::string& view_id);
  /// Where the assembly of the pieces of `cgid` stands; kept until it expires with the TTL of
  /// its last piece. Errors: NOT_FOUND.
  [[nodiscard]] result<assembly_status> assembly_of(const std::string& cgid) const;
  /// Every assembly held here, open or sealed, by cgid (ListArtifacts answers them).
  [[nodiscard]] std::vector<assembly_status> assemblies() const;

  /// Counts of the engine's tables and components. The tables guarded by the engine mutex
  /// (artifacts, leases, joins, pending registrations) are read as of this call, or, when a
  /// worker holds them for more than 0.2 ms, as the last call read them: a monitor is never
  /// held up by a commit.
  [[nodiscard]] engine_stats stats() const;
  /// The stable DRAM budget's room for a new entry now: what is free (budget minus held and
  /// reserved bytes) plus what an eviction could free; nullopt without a budget. Walks the
  /// cache's entries under the engine's mutex (a cluster member says it every few seconds).
  [[nodiscard]] std::optional<std::uint64_t> stable_room() const;

  // ---- persistence (registration.md §1.6, docs/architecture.md §14) ----

  /// Starts writing the artifact to the persist directory on the persistence threads, or
  /// answers the task already doing it, or a task that is SUCCESS at once when the directory
  /// holds it already. `cache` is the stable-cache policy a restored copy gets (default: the
  /// cache entry's, else best_effort/evict).
  /// Errors: FAILED_PRECONDITION (no persist directory; quiesced), NOT_FOUND (unknown artifact).
  [[nodiscard]] result<persistence::task_status> start_persistence(
      const std::string& artifact_id, std::optional<policy::cache_policy> cache = std::nullopt);
  /// A task by id, else the newest task of `artifact_id`. Errors: NOT_FOUND, INVALID_ARGUMENT
  /// (neither given).
  [[nodiscard]] result<persistence::task_status> persistence_status(const std::string& task_id,
                                                                    const std::string& artifact_id) const;
  /// Waits for a task to end, up to `timeout` (0 = until it ends). Errors: NOT_FOUND.
  [[nodiscard]] result<persistence::task_status> wait_persistence(const std::string& task_id,
                                                                  std::chrono::milliseconds timeout) const;

  /// The persisted copy of an artifact, opened for a reader that loads it itself.
  struct persisted_copy {
    artifact_descriptor descriptor;
    /// The data file's read-only fd, and the index and leaf checks as the store found them.
    persistence::durable_store::opened_data opened;
  };
  /// Opens the persisted copy of an artifact held on the shared disk, for a reader in another
  /// process that reads and checks it itself (docs/architecture.md §14): nothing is loaded into
  /// memory. With `unless_in_memory`, an artifact that has a stable DRAM replica too is refused
  /// (that copy is cheaper to read). Errors: NOT_FOUND (unknown artifact), FAILED_PRECONDITION
  /// (no persist directory, no copy on the disk, a stable DRAM replica with `unless_in_memory`,
  /// being deregistered), DATA_LOSS (quarantined, or its data file no longer whole),
  /// UNAVAILABLE (cannot open the file).
  [[nodiscard]] result<persisted_copy> open_persisted(const std::string& artifact_id, bool unless_in_memory) const;

  // ---- resident memory across restarts (docs/architecture.md §14.2) ----

  /// The stable DRAM entries, for a successor daemon: the catalogue's bytes and a read-only fd
  /// of each entry's memfd (persistence/resident_state.hpp); and the leases whose memory is all
  /// in memfds (HOST_SHARED regions), with a duplicate fd of each. Joins, regions, GPU replicas,
  /// leases of other memory and pending registrations are not in it. Entries whose replica is
  /// not a sealed memfd are left out (logged). Errors: RESOURCE_EXHAUSTED / INTERNAL (out of fds).
  [[nodiscard]] result<persistence::resident_export> export_resident() const;

  /// What adopt_resident() did.
  struct adopt_report {
    std::size_t adopted = 0;
    std::uint64_t adopted_bytes = 0;
    std::size_t leases = 0;  ///< leases of client memfds re-established
    /// "<artifact id>: <reason>" for each entry refused (a memfd missing, unsealed or of the
    /// wrong size; the cache budget).
    std::vector<std::string> refused;
  };
  /// Takes over a predecessor's stable DRAM entries without copying a byte: each named memfd
  /// is checked (persistence::map_handed_memfd()), mapped and admitted with its entry's policy
  /// and owner uid. Each lease is re-established over its memfds (sealed against shrinking) with
  /// its registration id, owner (watched again), epoch and the TTL it had left. The fds no entry
  /// or lease names are closed. Then, in the background, every mi2
  /// entry's bytes are hashed again: one that is not its id's is dropped and logged (DATA_LOSS),
  /// never served again. Call it before serving. Errors: none of its own (refusals are reported).
  [[nodiscard]] adopt_report adopt_resident(const persistence::resident_state& resident,
                                            std::vector<persistence::named_fd> fds);

  /// How many adopted entries are still waiting for their background re-hash.
  [[nodiscard]] std::size_t adopted_unverified() const;

  /// Changes each time an entry enters or leaves the stable DRAM cache or a lease begins or
  /// ends, so that whoever mirrors the resident state (the systemd fd store) knows when to
  /// export it again.
  [[nodiscard]] std::uint64_t resident_generation() const;

  // ---- ownership (DECISIONS §8) ----

  /// The rule for every call that names a registration (Feed, KeepAlive, Commit, Abort, Revoke):
  /// it acts only for the process that owns the registration, pending or committed (its lease
  /// or join). An id the engine does not hold passes, so that the call itself answers NOT_FOUND
  /// or DEADLINE_EXCEEDED. `verb` opens the message ("commit registration").
  /// Errors: PERMISSION_DENIED naming the registration, its owner and the caller.
  [[nodiscard]] status check_owner(const std::string& registration_id, std::int32_t caller_pid,
                                   std::string_view verb) const;

  // ---- housekeeping ----

  /// Expires leases, joins and regions past their TTL now (the background thread calls this).
  void sweep();

  /// Releases every pending registration, lease, join and region of a process that exited.
  void release_owner(std::int32_t owner_pid);

 private:
  struct state;
  explicit engine(std::unique_ptr<state> s) noexcept;
  [[nodiscard]] status export_leases(persistence::resident_state& resident,
                                     std::vector<persistence::named_fd>& fds) const;
  void adopt_leases(const persistence::resident_state& resident, std::map<std::string, unique_fd>& by_name,
                    adopt_report& report);
  std::unique_ptr<state> state_;
};

}  // namespace tensorreg::registration
