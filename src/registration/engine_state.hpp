// src/registration/engine_state.hpp — engine::state: the engine's parts and tables, and the
// lock order among them. Shared by the three files that implement `engine`:
//   engine.cpp             create, the registration calls (Begin to Abort), the sweep, owner death;
//   engine_artifacts.cpp   regions, committed artifacts (reads, GPU copies, deregistration, stats)
//                          and their views;
//   engine_persistence.cpp persisted copies and the resident-memory handoff.
// § references are registration.md's. Private to the library.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "common/log.hpp"
#include "memory/populated_reserve.hpp"
#include "registration/catalogue.hpp"
#include "registration/engine_lock.hpp"
#include "registration/layout_cache.hpp"
#include "registration/owner_watch.hpp"
#include "registration/pending_registration.hpp"
#include "tensorreg/common/priority_inheriting_mutex.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/registration/engine.hpp"

namespace tensorreg::registration {
namespace detail {

// How long stats() waits for the engine mutex before it answers the tables it read last: a
// fifth of GetStats' 1 ms budget (docs/architecture.md §8).
inline constexpr std::chrono::microseconds stats_patience{200};

// The first few ids: a trainer's lease holds hundreds of regions, and a line each step naming
// them all would be most of the log.
inline std::string joined(const std::vector<std::string>& ids) {
  if (ids.empty()) return "none";
  constexpr std::size_t shown = 8;
  std::string out;
  for (std::size_t i = 0; i < ids.size() && i < shown; ++i) out += (out.empty() ? "" : ",") + ids[i];
  if (ids.size() > shown) out += " and " + std::to_string(ids.size() - shown) + " more";
  return out;
}

inline std::string_view eviction_reason_name(stable::eviction_reason reason) {
  switch (reason) {
    case stable::eviction_reason::capacity: return "capacity: made room for another artifact";
    case stable::eviction_reason::spill: return "spill: made room for another artifact, a durable copy exists";
    case stable::eviction_reason::preempt: break;
  }
  return "preempt: made room for an export";
}

}  // namespace detail

// Lock order. A thread holding one of these may take only those listed after it:
//   1. engine::state::mutex — the pending table and the catalogue (its artifacts, holders,
//      index store). Never held while hashing or copying, nor while draining.
//   2. detail::pending_registration's mutex — one registration's phase, TTL and plan tables.
//   3. the leaves: region_registry's, stable_dram_cache's, stable_upload's, reader_gate's, layout_cache's and
//      background_hash's own mutexes, and the logger. (The cache's eviction listener logs, under 1.)
// restore_mutex (persistence) is taken before 1, never under it; the durable store's mutex
// and the persistence task table's are leaves (the cache's spill guard asks the store under 3).
// sweeper_mutex only paces the sweep thread; nothing else is taken under it. The owner watch
// calls release_owner() on its thread with none of these held. A Feed copy runs with none
// held; drain waits on a reader_gate's condition variable with none held, and a revoke waits for
// a background hash to stop reading (background_hash::wait_stopped) with none held.
// hash_jobs_mutex only counts background hash jobs; nothing else is taken under it.
struct engine::state {
  engine_options options;
  const clock& time;
  logger& log;
  thread_pool pool;
  regions::region_registry regions;
  std::shared_ptr<device_memory> devices;  // null = no GPU

  // 1. guards `catalogue` and `pending`. Priority-inheriting: the FIFO I/O thread takes it
  // for KeepAlive and GetStats, and must not wait for a worker that other threads preempted.
  mutable priority_inheriting_mutex mutex;
  // What stats() read under `mutex` last (the catalogue's counts and the pending table's
  // size), answered while a worker holds `mutex` longer than stats_patience. Its own lock is
  // only ever held to copy it.
  mutable priority_inheriting_mutex last_tables_mutex;
  mutable engine_stats last_tables;  // guarded by last_tables_mutex
  mutable std::atomic<bool> tables_read{false};
  detail::catalogue catalogue;    // committed artifacts and their holders
  detail::pending_table pending;  // open registrations and tombstones
  detail::layout_cache layouts;   // lease layouts committed before (its own leaf mutex)

  std::unique_ptr<detail::owner_watch> owners;
  std::mutex sweeper_mutex;
  std::condition_variable sweeper_wake;
  bool stopping = false;
  std::thread sweeper;

  explicit state(engine_options o)
      : options(std::move(o)),
        time(*options.time),
        log(options.log != nullptr ? *options.log : null_logger()),
        // Commits only wait for their leaves: the workers hash and copy every leaf, taking the
        // owners' queues in turn, so commits share the cores by client (docs/architecture.md §9.1).
        pool(thread_pool_options{
            options.hash_threads != 0 ? options.hash_threads : std::max(1u, std::thread::hardware_concurrency()), false,
            options.hash_nice}),
        regions(time, regions::registry_options{options.region_capacity, options.region_capacity_per_uid,
                                                std::chrono::minutes(10)}),
        devices(options.devices),
        catalogue(regions, options.stable_bytes, time,
                  stable::cache_hooks{durable_predicate(options.durable),
                                      [this](const stable::evicted_entry& e) {
                                        tensorreg::log(log, log_level::info,
                                                       "stable DRAM cache evicted artifact {} ({} bytes): {}", e.key,
                                                       e.size_bytes, detail::eviction_reason_name(e.reason));
                                      }},
                  options.max_stable_entries_per_uid),
        persist_pool(options.durable ? std::make_unique<thread_pool>(std::max(1u, options.persist_threads)) : nullptr),
        publish_reserve(options.populated_reserve_bytes != 0
                            ? std::make_unique<memory::populated_reserve>(options.populated_reserve_bytes,
                                                                          detail::publish_memfd_name,
                                                                          [this] { return pending.open_now() != 0; })
                            : nullptr) {}

  // The spill guard of the stable cache (registration.md §6.3): an entry may be spilled when
  // the persist directory holds it. Unset without one, so that spill stays blocked.
  static std::function<bool(std::string_view)> durable_predicate(
      const std::shared_ptr<persistence::durable_store>& durable) {
    if (!durable) return {};
    return [d = durable.get()](std::string_view id) { return d->contains(id); };
  }

  // ---- background hashes (registration.md §4.8) ----
  std::mutex hash_jobs_mutex;
  std::condition_variable hash_jobs_idle;
  std::size_t hash_jobs = 0;  // queued or running; the engine waits for 0 before it goes

  hash_state start_background_hash(const std::string& artifact_id, std::int32_t owner_pid);
  void run_background_hash(const std::shared_ptr<detail::background_hash>& task, detail::hash_input input,
                           std::int32_t owner_pid);
  // Waits for each hash cancelled under the engine mutex to stop reading; call with no lock held.
  static void wait_stopped(const std::vector<std::shared_ptr<detail::background_hash>>& cancelled) {
    for (const auto& h : cancelled) h->wait_stopped();
  }

  // ---- persistence (docs/architecture.md §14) ----
  persistence::task_table tasks;
  std::atomic<bool> persist_cancel{false};  // set when the engine is destroyed
  std::mutex restore_mutex;                 // one restore at a time: a second waits and finds it
  // A client waits for a restore; the start-up verification only keeps the disk busy, so it
  // pauses while one runs and skips what a restore has checked leaf by leaf already.
  std::atomic<int> restores_running{0};
  std::set<std::string> checked_by_restore;  // guarded by restore_mutex
  // Declared last: destroyed first, while everything its jobs use is still there.
  std::unique_ptr<thread_pool> persist_pool;
  std::unique_ptr<memory::populated_reserve> publish_reserve;  // null without populated_reserve_bytes
  // Re-hashes adopted entries (adopt_resident()); made on first use, destroyed before the rest.
  std::unique_ptr<thread_pool> adopt_pool;
  std::atomic<std::size_t> adopted_unverified{0};

  result<persistence::task_status> start_persistence(const std::string& id, std::optional<policy::cache_policy> cache);
  void run_persistence(const std::string& task_id, const std::string& id, std::optional<policy::cache_policy> cache);
  status restore(const std::string& id);
  void verify_persisted();
  // In a persist directory shared with other daemons (docs/cluster.md §8), lists a copy of
  // `id` another one published since this engine opened it, so that the lookups after it find
  // it; nothing in a private one. Call with no engine lock held.
  void discover_persisted(const std::string& id) const {
    if (!options.durable) return;
    if (auto found = options.durable->discover(id); !found) {
      tensorreg::log(log, log_level::warn, "{}", found.error().message);
    }
  }
  // A summary of an artifact only the persist directory holds.
  static artifact_summary summary_of(const persistence::stored_artifact& a);

  status watch_owner(std::int32_t pid) {
    if (!owners) return {};
    return owners->watch(pid);
  }

  // The owner of a registration, pending or committed, for log lines; 0 when unknown.
  std::int32_t owner_of(const std::string& registration_id) {
    const detail::engine_lock lock(mutex);
    if (auto p = pending.find(registration_id)) return p->owner_pid();
    if (auto* l = catalogue.find_lease(registration_id)) return l->owner_pid;
    if (auto* j = catalogue.find_join(registration_id)) return j->owner_pid;
    return 0;
  }

  template <typename T>
  T rejected(T out, std::string_view call, std::string_view subject, std::int32_t owner_pid) {
    if (!out) {
      tensorreg::log(log, log_level::info, "{} of {} (owner_pid {}) rejected: {}: {}", call, subject, owner_pid,
                     errc_name(out.error().code), out.error().message);
    }
    return out;
  }

  void log_released(const detail::released_holder& h, std::string_view why) {
    tensorreg::log(log, log_level::info, "{} {} of artifact {} (owner_pid {}) {}; released regions {}",
                   h.is_lease ? "lease" : "join", h.registration_id, h.artifact_id, h.owner_pid, why,
                   detail::joined(h.region_ids));
  }

  // Removes a pending registration and releases what it holds; returns whether it did. A
  // registration being committed is left to its commit, which is told to undo what it makes
  // (a lease or join) once done.
  bool drop_pending(const std::shared_ptr<detail::pending_registration>& p) {
    if (!p->request_drop()) return false;
    {
      const detail::engine_lock lock(mutex);
      pending.erase(p->id());
    }
    p->release(regions);
    return true;
  }

  // Looks up an open registration for Feed/Commit/KeepAlive, applying lazy expiry (§4.3.1, §4.5).
  result<std::shared_ptr<detail::pending_registration>> find_open(const std::string& id, std::string_view verb) {
    std::shared_ptr<detail::pending_registration> p;
    {
      const detail::engine_lock lock(mutex);
      if (pending.unbury(id)) {  // the client has been told; the metadata is gone
        return fail(errc::deadline_exceeded,
                    "cannot " + std::string(verb) + " registration '" + id + "': its TTL expired");
      }
      p = pending.find(id);
      if (!p)
        return fail(errc::not_found,
                    "cannot " + std::string(verb) + " registration '" + id + "': no such registration");
    }
    if (p->expired(time.now())) {
      if (drop_pending(p)) {
        tensorreg::log(log, log_level::info, "registration {} (owner_pid {}) expired: its TTL passed", id,
                       p->owner_pid());
      }
      return fail(errc::deadline_exceeded,
                  "cannot " + std::string(verb) + " registration '" + id + "': its TTL expired");
    }
    return p;
  }

  // One owner's pending registrations (each may hold staging memory and fds until its TTL)
  // stay within max_pending_per_owner. Errors: RESOURCE_EXHAUSTED.
  status check_pending_share_locked(std::int32_t owner_pid) const {
    const auto cap = options.max_pending_per_owner;
    if (cap == 0 || pending.count_of(owner_pid) < cap) return {};
    return fail(errc::resource_exhausted, "cannot begin registration: owner_pid " + std::to_string(owner_pid) +
                                              " already has its maximum of " + std::to_string(cap) +
                                              " pending registrations");
  }
  status check_pending_share(std::int32_t owner_pid) const {
    const detail::engine_lock lock(mutex);
    return check_pending_share_locked(owner_pid);
  }

  result<begin_response> begin(begin_request r);
  status feed(feed_request r);
  status keep_alive(const keep_alive_request& r);
  result<commit_response> commit(const std::string& registration_id, const commit_options& how);
  status abort(const std::string& registration_id);
  result<deregister_response> deregister(const deregister_request& r);
  bool revoke(const std::string& registration_id, const std::string& reason);
  result<republish_response> republish(const republish_request& r);
  void sweep();
  void release_owner(std::int32_t pid);
};

}  // namespace tensorreg::registration
