// src/registration/catalogue.hpp — the committed artifacts and what holds them.
//
// Provides `catalogue`: every committed artifact with its holders (LIP leases, idempotent joins,
// daemon-owned GPU replicas, and its presence in the stable DRAM cache, which the catalogue
// owns), the registration → artifact map that Revoke and KeepAlive go through, and the index
// store that Begin's tensor_index_key looks up (registration.md §4.4–§4.6, §6.3).
//
// An artifact's life, `artifact_state`:
//
//   held ─quiesce()─▶ quiesced ─drain()─▶ draining ─last reader leaves─▶ quiesced ─remove()─▶ gone
//                          ▲                  │
//                          └──── timeout ─────┘  (DEADLINE_EXCEEDED; it stays quiesced)
//
// An artifact with no lease, join, GPU replica or stable replica left is gone as well (the
// stable cache may evict its replica at any time); empty entries are pruned lazily.
//
// Thread-safety: `catalogue` is not thread-safe: the engine calls it with the engine mutex held
// (see the lock order in engine_state.hpp), except `drain()`, which touches only a `reader_gate` and
// must be called WITHOUT the engine mutex. `reader_gate` is thread-safe.
//
// Ownership: the catalogue owns its artifacts, their leases (and the lease's region
// references, released when the lease ends) and GPU replicas, and the stable DRAM cache.
// Readers handed out by open_bytes() share the bytes they read; each holds the artifact's
// reader_gate, which outlives the catalogue if a reader does.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "registration/background_hash.hpp"
#include "tensorreg/common/clock.hpp"
#include "tensorreg/common/error.hpp"
#include "tensorreg/common/random.hpp"
#include "tensorreg/common/unique_fd.hpp"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/memory/segmented_view.hpp"
#include "tensorreg/regions/region_registry.hpp"
#include "tensorreg/registration/device_memory.hpp"
#include "tensorreg/registration/types.hpp"
#include "tensorreg/stable/stable_dram_cache.hpp"
#include "tensorreg/views/view_plan.hpp"
#include "views/assembly.hpp"

namespace tensorreg::registration::detail {

/// now + ttl_ms (saturating); nullopt for ttl 0 (no expiry).
[[nodiscard]] std::optional<clock::time_point> ttl_deadline(const clock& time, std::uint32_t ttl_ms);

using device_allocation_map = std::map<const memory::byte_source*, device_allocation>;

/// Everything a committed lease holds: the canonical buffer as a readable source, and the
/// sources it reads from (kept alive by their shared_ptrs).
struct lip_view {
  std::shared_ptr<const memory::segmented_view> bytes;
  std::vector<std::shared_ptr<const memory::byte_source>> keep_alive;
  /// The device mappings among keep_alive, by source, as a reader in another process would
  /// open the same memory (OpenArtifactDevice); null when there are none. Shared, and so never
  /// changed once made: a republished lease has its predecessor's, without a copy of hundreds.
  std::shared_ptr<const device_allocation_map> device_allocations;

  [[nodiscard]] bool on_device() const noexcept { return device_allocations && !device_allocations->empty(); }
};

/// A LIP lease: the producer's memory, held in place for one registration.
struct lease {
  std::string registration_id;
  std::int32_t owner_pid = 0;
  std::int32_t device_id = 0;
  std::optional<clock::time_point> expires;
  std::uint64_t epoch = 0;
  lip_view view;
  std::vector<std::string> region_ids;  ///< references held until the lease ends
  bool snapshot = false;                ///< view reads the daemon's copy (registration.md §5.4)
  /// Names `view`'s device layout for readers (device_layout::layout_token); 0: none.
  std::uint64_t layout_token = 0;
};

/// An idempotent join: a registration whose bytes were already held (§4.5).
struct join {
  std::string registration_id;
  std::int32_t owner_pid = 0;
  std::optional<clock::time_point> expires;
};

enum class artifact_state { held, quiesced, draining, gone };

/// "held", "quiesced", "draining" or "gone".
[[nodiscard]] std::string_view artifact_state_name(artifact_state state) noexcept;

/// Counts the readers of one artifact's bytes and lets deregister wait for the last to leave.
/// Thread-safety: every member may be called from any thread.
class reader_gate {
 public:
  void enter();
  void leave() noexcept;
  [[nodiscard]] std::size_t readers() const;
  /// Whether a drain is waiting on this gate now.
  [[nodiscard]] bool draining() const;
  /// Waits, up to `timeout`, for the last reader to leave; returns the readers still inside
  /// (0: drained). A zero timeout only looks.
  [[nodiscard]] std::size_t wait_drained(std::chrono::milliseconds timeout);

 private:
  mutable std::mutex mutex_;  // a leaf: nothing is locked while holding it
  std::condition_variable left_;
  std::size_t readers_ = 0;
  std::size_t waiters_ = 0;
};

struct artifact {
  artifact_descriptor descriptor;
  std::shared_ptr<const index::canonical_index> index;
  std::map<std::string, lease> leases;  ///< by registration id
  std::map<std::string, join> joins;    ///< by registration id
  std::map<std::int32_t, device_buffer> gpu_replicas;
  /// The uid whose commit made each GPU replica, by device; absent where unknown (DECISIONS §8).
  std::map<std::int32_t, std::uint32_t> gpu_replica_uids;
  bool quiesced = false;  ///< no new readers, leases, joins or replicas: deregister has begun
  std::shared_ptr<reader_gate> gate = std::make_shared<reader_gate>();
  /// The background data hash of a cgid artifact (registration.md §4.8); null when none ran.
  std::shared_ptr<background_hash> hash;
  /// Views registered on it (registration.md §7), by view_id, with the plan that reads them.
  std::map<std::string, std::pair<view_record, std::shared_ptr<const views::view_plan>>> views;
};

/// What a background hash reads: the canonical bytes of a held artifact, and what keeps the
/// memory under them mapped while it reads.
struct hash_input {
  std::shared_ptr<const memory::segmented_view> view;
  std::vector<std::shared_ptr<const memory::byte_source>> keep_alive;
};

/// A lease or join that ended (revoked, expired, its owner exited).
struct released_holder {
  std::string registration_id;
  std::string artifact_id;
  std::int32_t owner_pid = 0;
  bool is_lease = false;  ///< else a join
  std::vector<std::string> region_ids;
};

/// What remove() took away.
struct removed_artifact {
  std::vector<std::string> released_region_ids;  ///< each region once
  std::size_t leases = 0;
  std::size_t joins = 0;
};

/// What a commit and the list answer of an assembly seen as `s` at `now`.
[[nodiscard]] assembly_status status_of(const views::assembly_snapshot& s, clock::time_point now);

class catalogue {
 public:
  /// `stable_entries_per_uid`: most cache entries the commits of one uid may have created
  /// (0 = no limit). REQUIRES: `regions` and `time` outlive the catalogue.
  catalogue(regions::region_registry& regions, std::uint64_t stable_bytes, const clock& time,
            stable::cache_hooks hooks = {}, std::size_t stable_entries_per_uid = 0);

  catalogue(const catalogue&) = delete;
  catalogue& operator=(const catalogue&) = delete;

  [[nodiscard]] stable::stable_dram_cache& cache() noexcept { return cache_; }
  [[nodiscard]] const stable::stable_dram_cache& cache() const noexcept { return cache_; }

  // ---- commits ----

  /// The entry of `artifact_id`, held or not (commits check `quiesced` and its holders); null
  /// when there is none.
  [[nodiscard]] artifact* find(const std::string& artifact_id);
  /// The entry for `d`, created if absent; also files `idx` in the index store.
  artifact& add(const artifact_descriptor& d, std::shared_ptr<const index::canonical_index> idx);
  void add_lease(artifact& a, lease l);
  void add_join(artifact& a, join j);
  /// An index by its hex sha256 key, or null: known for as long as an artifact using it exists.
  [[nodiscard]] std::shared_ptr<const index::canonical_index> find_index(const std::string& hex_key) const;
  /// Drops `artifact_id` if nothing holds it any more.
  void erase_if_empty(const std::string& artifact_id);

  // ---- the per-uid share of the stable cache (each entry keeps a memfd open) ----

  /// Whether `uid` may create another cache entry (always when unset or unlimited).
  /// Errors: RESOURCE_EXHAUSTED "<verb>: uid U already keeps its maximum of N artifacts in the
  /// stable DRAM cache".
  [[nodiscard]] status check_stable_share(std::optional<std::uint32_t> uid, const std::string& verb) const;
  /// Counts the cache entry just created for `artifact_id` against `uid` (nothing when unset);
  /// it is uncounted when the entry is evicted or removed.
  void note_stable_entry(const std::string& artifact_id, std::optional<std::uint32_t> uid);
  /// Leases added or ended since construction: with the stable cache's changes, what tells a
  /// mirror of the resident state (the systemd fd store) to export again.
  [[nodiscard]] std::uint64_t lease_changes() const noexcept { return lease_changes_; }
  /// The uid counted for the cache entry of `artifact_id`; nullopt when none is.
  [[nodiscard]] std::optional<std::uint32_t> stable_entry_uid(const std::string& artifact_id) const;

  // ---- holders by registration id ----

  [[nodiscard]] bool holds_registration(const std::string& registration_id) const;
  [[nodiscard]] lease* find_lease(const std::string& registration_id);
  /// The artifact a lease or join of `registration_id` holds, or null.
  [[nodiscard]] const artifact* artifact_of(const std::string& registration_id) const;
  /// A token no lease committed before has had (lease::layout_token).
  [[nodiscard]] std::uint64_t new_layout_token() noexcept { return ++last_layout_token_; }
  [[nodiscard]] join* find_join(const std::string& registration_id);
  /// Ends the lease or join of `registration_id` (releasing its region references); nullopt when
  /// there is none. Ending a lease cancels the artifact's background hash with `why`.
  std::optional<released_holder> revoke(const std::string& registration_id, const std::string& why = "was revoked");
  /// Ends every lease and join past its TTL at `now`, and prunes empty artifacts.
  std::vector<released_holder> expire(clock::time_point now);
  /// Ends every lease and join of `owner_pid`.
  std::vector<released_holder> release_owner(std::int32_t owner_pid);

  // ---- deregister: quiesce → drain → remove ----

  /// DECISIONS §8: a caller may deregister an artifact only when it holds every lease and join
  /// of it (none held is fine: the stable copy and GPU replicas are the daemon's). OK for an
  /// artifact not held here (quiesce answers NOT_FOUND).
  /// Errors: PERMISSION_DENIED naming the caller and another holder.
  [[nodiscard]] status check_sole_holder(const std::string& artifact_id, std::int32_t caller_pid) const;

  /// DECISIONS §8: the copies the daemon keeps of an artifact (its stable DRAM entry, its GPU
  /// replicas) belong to the uid whose commit made them; only that uid or root (0) may remove
  /// them. OK when `caller_uid` is unset (the embedder), for copies of no known uid, and for an
  /// artifact not held here. Errors: PERMISSION_DENIED naming the copy, its uid and the caller's.
  [[nodiscard]] status check_copy_owner(const std::string& artifact_id, std::optional<std::uint32_t> caller_uid) const;

  /// No new readers, leases, joins or replicas from now on; returns the gate to drain.
  /// Errors: NOT_FOUND.
  [[nodiscard]] result<std::shared_ptr<reader_gate>> quiesce(const std::string& artifact_id);
  /// Waits for the readers of a quiesced artifact to leave. Call WITHOUT the engine mutex.
  /// `wait` false only looks. Errors: DEADLINE_EXCEEDED naming the readers left (the artifact
  /// stays quiesced).
  [[nodiscard]] static status drain(const std::string& artifact_id, reader_gate& gate, bool wait,
                                    std::chrono::milliseconds timeout);
  /// Revokes its leases and joins, drops its replicas and removes it; nullopt when it is gone
  /// already (a concurrent deregister removed it).
  std::optional<removed_artifact> remove(const std::string& artifact_id);
  [[nodiscard]] artifact_state state_of(const std::string& artifact_id) const;

  // ---- reads ----

  /// Errors: NOT_FOUND.
  [[nodiscard]] result<artifact_summary> get(const std::string& artifact_id) const;
  [[nodiscard]] std::vector<artifact_summary> list() const;
  /// Errors: NOT_FOUND.
  [[nodiscard]] result<std::shared_ptr<const index::canonical_index>> index_of(const std::string& artifact_id) const;
  /// A reader of the artifact's bytes that holds its gate. Errors: NOT_FOUND,
  /// FAILED_PRECONDITION (quiesced, no readable copy).
  [[nodiscard]] result<std::shared_ptr<const memory::byte_source>> open_bytes(const std::string& artifact_id);
  /// The stable replica (null when none) and index. Errors: NOT_FOUND, FAILED_PRECONDITION
  /// (quiesced); `verb` opens the messages.
  [[nodiscard]] result<
      std::pair<std::shared_ptr<const memory::byte_source>, std::shared_ptr<const index::canonical_index>>>
  stable_replica(const std::string& artifact_id, const std::string& verb);
  /// Errors: NOT_FOUND, FAILED_PRECONDITION (quiesced, no GPU copy).
  [[nodiscard]] result<device_layout> device_layout_of(const std::string& artifact_id,
                                                       std::uint64_t known_layout = 0) const;
  /// Fills the artifact, lease and stable fields of `out`.
  void add_stats(engine_stats& out) const;

  // ---- PIECE assemblies (registration.md §7) ----

  /// The assemblies by cgid, open or sealed, until they expire.
  [[nodiscard]] std::map<std::string, std::shared_ptr<views::assembly>>& assemblies() noexcept { return assemblies_; }
  /// The assembly of `cgid`, made empty (over `idx`, to cover `required`) when there is none.
  /// Errors: RESOURCE_EXHAUSTED (its buffer cannot be made).
  [[nodiscard]] result<std::shared_ptr<views::assembly>> assembly_for(const std::string& cgid,
                                                                      std::shared_ptr<const index::canonical_index> idx,
                                                                      std::vector<views::byte_range> required);
  /// Drops the assemblies past their deadline at `now` (their buffers go with the last commit
  /// that uses them); returns their cgids.
  std::vector<std::string> expire_assemblies(clock::time_point now);
  /// Where each assembly stands at `now`, by cgid.
  [[nodiscard]] std::vector<assembly_status> assembly_statuses(clock::time_point now) const;

  // ---- background hashes (registration.md §4.8) ----

  /// The bytes a background hash of `artifact_id` reads: a live lease (the producer's memory,
  /// what readers map), else a GPU replica, else the stable replica.
  /// Errors: NOT_FOUND, FAILED_PRECONDITION (quiesced, no readable copy).
  [[nodiscard]] result<hash_input> hash_input_of(const std::string& artifact_id);
  /// Records that `cgid`'s background hash found `mi2`: Get and Open by `mi2` reach `cgid` while
  /// its hash is the one that found it and no artifact of that id is held itself.
  void add_alias(const std::string& mi2, const std::string& cgid);
  /// The hash of `artifact_id` (or of the cgid its mi2 alias names), null when it has none, and
  /// the artifact's descriptor; else a cancelled hash of an artifact that is gone (kept for
  /// its late waiters), or NOT_FOUND.
  [[nodiscard]] result<std::pair<std::shared_ptr<background_hash>, artifact_descriptor>> hash_of(
      const std::string& artifact_id) const;
  /// The hashes cancelled since the last call; the caller waits for each to stop reading
  /// (background_hash::wait_stopped) after it lets go of the engine mutex.
  [[nodiscard]] std::vector<std::shared_ptr<background_hash>> take_cancelled();
  /// Cancels every background hash (the engine is going away) and returns them.
  [[nodiscard]] std::vector<std::shared_ptr<background_hash>> cancel_all_hashes(const std::string& why);

 private:
  [[nodiscard]] bool is_empty(const std::string& id, const artifact& a) const;
  [[nodiscard]] const artifact* find_held(const std::string& id) const;
  void end_lease(lease& l);
  // Cancels `a`'s background hash, which may be reading the lease that ends, with `why`.
  void cancel_hash(artifact& a, const std::string& why);
  void forget_stable_entry(const std::string& artifact_id);

  regions::region_registry& regions_;
  const std::size_t stable_entries_per_uid_;
  // Who created each counted cache entry, and how many each uid has. Every cache eviction
  // happens in an admission, under the engine mutex, as do these updates.
  std::unordered_map<std::string, std::uint32_t> stable_entry_uid_;
  std::unordered_map<std::uint32_t, std::size_t> stable_entries_of_uid_;
  stable::stable_dram_cache cache_;
  std::map<std::string, artifact> artifacts_;                              // by artifact id
  std::unordered_map<std::string, std::string> artifact_of_registration_;  // leases and joins
  // By hex key. Weak: the artifacts own their indexes, so an index goes with the last artifact
  // that uses it; expired entries are pruned as the store grows and when looked up.
  mutable std::unordered_map<std::string, std::weak_ptr<const index::canonical_index>> index_store_;
  std::size_t index_store_pruned_at_ = 0;  // index_store_'s size after the last prune
  // mi2 id → the cgids whose background hash found it (registration.md §4.8). An entry counts
  // only while that cgid is held with that same hash done; stale ones are pruned on lookup.
  mutable std::unordered_map<std::string, std::vector<std::string>> aliases_;
  std::vector<std::shared_ptr<background_hash>> cancelled_;  // not yet waited for
  // Cancelled hashes of artifacts that may be gone, so a late WaitArtifactHash still answers
  // HASH_FAILED with the reason; the oldest go first past kept_hash_tombstones.
  static constexpr std::size_t kept_hash_tombstones = 1024;
  std::map<std::string, std::shared_ptr<background_hash>> hash_tombstones_;
  std::vector<std::string> hash_tombstone_order_;
  std::uint64_t lease_changes_ = 0;
  std::map<std::string, std::shared_ptr<views::assembly>> assemblies_;  // by cgid
  // Random start: a reader's token from a daemon before a restart names nothing here.
  std::uint64_t last_layout_token_ = random_u64() >> 1;
};

/// A read-only fd of the memfd holding `replica`, marked exported (never recycled).
/// Errors: FAILED_PRECONDITION (not a memfd replica), INTERNAL (cannot reopen it); `verb`
/// opens the messages.
[[nodiscard]] result<unique_fd> export_replica_fd(const std::shared_ptr<const memory::byte_source>& replica,
                                                  const std::string& verb);

}  // namespace tensorreg::registration::detail
