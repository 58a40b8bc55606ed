// The engine facade: creates the parts, routes each call to the pending registration and its
// plan or to the catalogue, runs the sweep and owner-death releases, and logs every event.
// The rules live in the parts: registration/pending_registration.hpp (a registration's phases),
// registration/catalogue.hpp (committed artifacts, quiesce → drain → remove) and
// registration/plans/ (what each plan does at Begin, Feed and Commit).
#include "tensorreg/registration/engine.hpp"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <new>
#include <set>
#include <thread>
#include <tuple>
#include <utility>

#include "common/log.hpp"
#include "registration/catalogue.hpp"
#include "registration/engine_lock.hpp"
#include "registration/layout_cache.hpp"
#include "registration/owner_watch.hpp"
#include "registration/pending_registration.hpp"
#include "registration/plans/lease_repeat.hpp"
#include "registration/plans/plan.hpp"
#include "tensorreg/common/priority_inheriting_mutex.hpp"
#include "tensorreg/common/random.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/devices/device_identity.hpp"
#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/memory/shared_memory.hpp"
#include "tensorreg/persistence/resident_state.hpp"
#include "tensorreg/views/scatter.hpp"

namespace tensorreg::registration {
namespace {

using detail::pending_registration;
using std::chrono::milliseconds;

// How long stats() waits for the engine mutex before it answers the tables it read last: a
// fifth of GetStats' 1 ms budget (docs/architecture.md §8).
constexpr std::chrono::microseconds stats_patience{200};

std::string new_registration_id() {
  const auto ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
  return "reg_" + std::to_string(ns) + "_" + std::to_string(::getpid()) + "_" + std::to_string(random_u64());
}

std::string_view eviction_reason_name(stable::eviction_reason reason) {
  switch (reason) {
    case stable::eviction_reason::capacity: return "capacity: made room for another artifact";
    case stable::eviction_reason::spill: return "spill: made room for another artifact, a durable copy exists";
    case stable::eviction_reason::preempt: break;
  }
  return "preempt: made room for an export";
}

// A commit runs foreign code (allocation, the standard library, a provider) that may throw.
// An exception escaping it would leave the registration committing for ever, holding its
// regions and memory, and its client without an answer: it ends the commit as failed instead.
result<commit_response> guarded_commit(detail::plan& p, detail::commit_context& ctx, const std::string& id) {
  try {
    return p.commit(ctx);
  } catch (const std::bad_alloc&) {
    ctx.retryable = false;
    return fail(errc::resource_exhausted, "cannot commit registration '" + id + "': out of memory");
  } catch (const std::exception& e) {
    ctx.retryable = false;
    return fail(errc::internal, "cannot commit registration '" + id + "': " + e.what());
  } catch (...) {
    ctx.retryable = false;
    return fail(errc::internal, "cannot commit registration '" + id + "': an exception of unknown type");
  }
}

// The first few ids: a trainer's lease holds hundreds of regions, and a line each step naming
// them all would be most of the log.
std::string joined(const std::vector<std::string>& ids) {
  if (ids.empty()) return "none";
  constexpr std::size_t shown = 8;
  std::string out;
  for (std::size_t i = 0; i < ids.size() && i < shown; ++i) out += (out.empty() ? "" : ",") + ids[i];
  if (ids.size() > shown) out += " and " + std::to_string(ids.size() - shown) + " more";
  return out;
}

// What a durable write or a handed-on entry records of an artifact's descriptor (the cache
// policy is the caller's to add).
persistence::artifact_record record_of(const artifact_descriptor& d) {
  persistence::artifact_record r;
  r.artifact_id = d.artifact_id;
  r.id_kind = std::string(identity::id_kind_name(d.id_kind));
  r.index_multihash = d.index_multihash;
  r.data_multihash = d.data_multihash;
  r.schema_version = d.schema_version;
  r.encoding = d.encoding;
  r.total_size = d.total_size;
  return r;
}

}  // namespace

// Lock order. A thread holding one of these may take only those listed after it:
//   1. engine::state::mutex — the pending table and the catalogue (its artifacts, holders,
//      index store). Never held while hashing or copying, nor while draining.
//   2. pending_registration's mutex — one registration's phase, TTL and plan tables.
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
                                                       e.size_bytes, eviction_reason_name(e.reason));
                                      }},
                  options.max_stable_entries_per_uid),
        persist_pool(options.durable ? std::make_unique<thread_pool>(std::max(1u, options.persist_threads)) : nullptr) {
  }

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
                   joined(h.region_ids));
  }

  // Removes a pending registration and releases what it holds; returns whether it did. A
  // registration being committed is left to its commit, which is told to undo what it makes
  // (a lease or join) once done.
  bool drop_pending(const std::shared_ptr<pending_registration>& p) {
    if (!p->request_drop()) return false;
    {
      const detail::engine_lock lock(mutex);
      pending.erase(p->id());
    }
    p->release(regions);
    return true;
  }

  // Looks up an open registration for Feed/Commit/KeepAlive, applying lazy expiry (§4.3.1, §4.5).
  result<std::shared_ptr<pending_registration>> find_open(const std::string& id, std::string_view verb) {
    std::shared_ptr<pending_registration> p;
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

// ---- Create --------------------------------------------------------------------------------

result<std::unique_ptr<engine>> engine::create(engine_options options) {
  if (options.time == nullptr) options.time = &system_clock();
  auto s = std::make_unique<state>(std::move(options));
  auto* raw = s.get();
  if (s->options.watch_owners) {
    TENSORREG_TRY_ASSIGN(s->owners, detail::owner_watch::create([raw](std::int32_t pid) { raw->release_owner(pid); }));
  }
  if (s->options.sweep_interval.count() > 0) {
    s->sweeper = std::thread([raw] {
      std::unique_lock lock(raw->sweeper_mutex);
      while (!raw->stopping) {
        raw->sweeper_wake.wait_for(lock, raw->options.sweep_interval);
        if (raw->stopping) break;
        lock.unlock();
        raw->sweep();
        lock.lock();
      }
    });
  }
  if (raw->options.durable && raw->options.verify_persisted_at_start) {
    raw->persist_pool->submit([raw] { raw->verify_persisted(); });
  }
  return std::unique_ptr<engine>(new engine(std::move(s)));
}

engine::engine(std::unique_ptr<state> s) noexcept : state_(std::move(s)) {}

engine::~engine() {
  {
    std::lock_guard lock(state_->sweeper_mutex);
    state_->stopping = true;
  }
  state_->sweeper_wake.notify_all();
  if (state_->sweeper.joinable()) state_->sweeper.join();
  {
    // Background hashes stop at their next leaf; their jobs end before the catalogue goes.
    std::vector<std::shared_ptr<detail::background_hash>> cancelled;
    {
      const detail::engine_lock lock(state_->mutex);
      cancelled = state_->catalogue.cancel_all_hashes("the engine is stopping");
    }
    state::wait_stopped(cancelled);
    std::unique_lock jobs(state_->hash_jobs_mutex);
    state_->hash_jobs_idle.wait(jobs, [&] { return state_->hash_jobs == 0; });
  }
  state_->persist_cancel = true;  // writes in flight stop at their next chunk
  state_->persist_pool.reset();
  state_->owners.reset();  // no owner callback after this point
}

// ---- Begin ---------------------------------------------------------------------------------

result<begin_response> engine::begin(begin_request request) {
  const auto owner = request.owner_pid;
  return state_->rejected(state_->begin(std::move(request)), "begin", "a new registration", owner);
}

result<begin_response> engine::state::begin(begin_request r) {
  if (r.owner_pid <= 0) return fail(errc::invalid_argument, "cannot begin registration: owner_pid is required (>0)");
  auto resolved = policy::resolve(r.policy);
  if (!resolved) return tl::unexpected(with_context(std::move(resolved).error(), "cannot begin registration"));
  if (!r.client_artifact_id.empty()) {
    auto valid = identity::validate_cgid(r.client_artifact_id);
    if (!valid) return tl::unexpected(with_context(std::move(valid).error(), "cannot begin registration"));
  }
  if (r.has_view && !r.view) r.view = views::view_request{};  // empty options: refused by the view plan
  if (r.view && r.view->kind == views::registration_kind::piece) {
    // registration.md §7: a piece of a sealed assembly is refused at Begin (and again at Commit).
    if (options.max_total_size != 0 && r.view->canonical_size_bytes > options.max_total_size) {
      return fail(errc::resource_exhausted,
                  "cannot begin registration: canonical_size_bytes " + std::to_string(r.view->canonical_size_bytes) +
                      " exceeds this engine's limit of " + std::to_string(options.max_total_size) + " bytes");
    }
    const detail::engine_lock lock(mutex);
    auto it = catalogue.assemblies().find(r.client_artifact_id);
    if (it != catalogue.assemblies().end() && it->second->sealed()) {
      return fail(
          errc::failed_precondition,
          "cannot begin registration: assembly " + r.client_artifact_id + " is already sealed" +
              (it->second->snapshot().artifact_id.empty() ? std::string()
                                                          : " as artifact " + it->second->snapshot().artifact_id));
    }
  }
  if (r.total_size == 0) return fail(errc::invalid_argument, "cannot begin registration: total_size must be > 0");
  if (options.max_total_size != 0 && r.total_size > options.max_total_size) {
    return fail(errc::resource_exhausted, "cannot begin registration: total_size " + std::to_string(r.total_size) +
                                              " exceeds this engine's limit of " +
                                              std::to_string(options.max_total_size) + " bytes");
  }

  TENSORREG_TRY(check_pending_share(r.owner_pid));  // before anything is allocated
  if (std::holds_alternative<stable_dram_options>(r.plan)) {
    // Before the upload: a uid that keeps its share of the cache would only be refused at Commit.
    const detail::engine_lock lock(mutex);
    TENSORREG_TRY(catalogue.check_stable_share(r.owner_uid, "cannot begin stable_dram registration"));
  }
  detail::registration_facts facts{new_registration_id(), r.owner_pid,          r.device_id, r.total_size,
                                   r.client_artifact_id,  std::move(*resolved), r.owner_uid};
  begin_response response;
  response.registration_id = facts.id;
  response.device_id = r.device_id;
  response.total_size = r.total_size;
  detail::begin_context ctx;
  ctx.devices = devices.get();
  ctx.stable_budget = catalogue.cache().budget_bytes();
  ctx.stable_cache = &catalogue.cache();  // thread-safe on its own: used without the engine mutex
  ctx.resolve_index = [this](const begin_request& request) {
    return detail::resolve_index(request, [this](const std::string& hex_key) {
      const detail::engine_lock lock(mutex);
      return catalogue.find_index(hex_key);
    });
  };
  TENSORREG_TRY_ASSIGN(auto plan, detail::begin_plan(r, ctx, response));
  const std::uint32_t ttl_ms = r.ttl_ms.value_or(0);
  auto p = std::make_shared<pending_registration>(std::move(facts), ttl_ms, detail::ttl_deadline(time, ttl_ms),
                                                  std::move(plan));
  // Insert first, then watch: an owner that dies in between is then released by the watcher
  // (watching first could run release_owner before the registration was there to release).
  {
    const detail::engine_lock lock(mutex);
    TENSORREG_TRY(check_pending_share_locked(r.owner_pid));  // others may have begun meanwhile
    pending.insert(p);
  }
  if (auto watched = watch_owner(r.owner_pid); !watched) {
    (void)drop_pending(p);
    return tl::unexpected(std::move(watched).error());
  }
  tensorreg::log(log, log_level::debug, "began registration {} (owner_pid {}, plan {}, {} bytes)", p->id(),
                 p->owner_pid(), p->plan_name(), r.total_size);
  return response;
}

// ---- Feed ----------------------------------------------------------------------------------

status engine::feed(feed_request request) {
  const auto id = request.registration_id;
  auto out = state_->feed(std::move(request));
  if (!out) return state_->rejected(std::move(out), "feed", "registration " + id, state_->owner_of(id));
  return out;
}

status engine::state::feed(feed_request r) {
  TENSORREG_TRY_ASSIGN(auto p, find_open(r.registration_id, "feed"));
  const bool has_payload = !std::holds_alternative<std::monostate>(r.payload);
  if (!has_payload && r.storage_entries.empty() && r.tensor_aliases.empty()) {
    return fail(errc::invalid_argument, "cannot feed registration '" + p->id() + "': missing feed payload");
  }
  return p->feed(std::move(r), time, regions);
}

// ---- KeepAlive -----------------------------------------------------------------------------

status engine::keep_alive(const keep_alive_request& request) {
  return state_->rejected(state_->keep_alive(request), "keep-alive", "registration " + request.registration_id,
                          request.owner_pid);
}

status engine::state::keep_alive(const keep_alive_request& r) {
  bool open = false;
  {
    const detail::engine_lock lock(mutex);
    open = pending.find(r.registration_id) != nullptr || pending.buried(r.registration_id);
  }
  const std::string what = "cannot keep registration '" + r.registration_id + "' alive";
  if (open) {
    // An expired registration is not revived: DEADLINE_EXCEEDED, as Feed and Commit answer.
    TENSORREG_TRY_ASSIGN(auto p, find_open(r.registration_id, "keep alive"));
    return p->keep_alive(r.owner_pid, r.epoch, r.ttl_ms, time);
  }
  const detail::engine_lock lock(mutex);
  auto check_owner = [&](std::int32_t holder) -> status {
    if (r.owner_pid != holder) {
      return fail(errc::permission_denied, what + ": owner_pid " + std::to_string(r.owner_pid) +
                                               " is not the lease's owner " + std::to_string(holder));
    }
    return {};
  };
  if (auto* l = catalogue.find_lease(r.registration_id)) {
    TENSORREG_TRY(check_owner(l->owner_pid));
    l->epoch = r.epoch;
    l->expires = detail::ttl_deadline(time, r.ttl_ms);  // ttl 0 clears the expiry (§4.4)
    return {};
  }
  if (auto* j = catalogue.find_join(r.registration_id)) {
    TENSORREG_TRY(check_owner(j->owner_pid));
    j->expires = detail::ttl_deadline(time, r.ttl_ms);
    return {};
  }
  return fail(errc::not_found, what + ": no such registration or lease");
}

// ---- Commit --------------------------------------------------------------------------------

result<commit_response> engine::commit(const std::string& registration_id) {
  return commit(registration_id, commit_options{});
}

result<commit_response> engine::commit(const std::string& registration_id, const commit_options& options) {
  auto out = state_->commit(registration_id, options);
  if (!out)
    return state_->rejected(std::move(out), "commit", "registration " + registration_id,
                            state_->owner_of(registration_id));
  return out;
}

result<commit_response> engine::state::commit(const std::string& registration_id, const commit_options& how) {
  TENSORREG_TRY_ASSIGN(auto p, find_open(registration_id, "commit"));
  if (how.hash_in_background && p->facts().cgid.empty()) {
    // Before begin_commit: the registration stays open, to be committed without the option.
    return fail(errc::invalid_argument, "cannot commit registration '" + registration_id +
                                            "': hash_in_background needs a client_artifact_id (a cgid): an mi2 "
                                            "id is the hash itself, so its commit must compute it");
  }
  TENSORREG_TRY(p->begin_commit());
  // The hashing and copying below is this client's share of the pool (fair between owners).
  const thread_pool::owner_scope share(static_cast<work_owner>(static_cast<std::uint32_t>(p->owner_pid())));
  detail::commit_context ctx{p->facts(), [&p] { return p->ttl_ms(); }, catalogue, mutex, pool, devices.get(), time};
  ctx.cancelled = p->commit_cancel();  // revoke and owner death stop the hashing and copying
  ctx.regions = &regions;
  ctx.layouts = &layouts;
  ctx.verified_leaf_digests = how.verified_leaf_digests.get();
  result<commit_response> out = guarded_commit(p->committing_plan(), ctx, registration_id);
  if (!out && out.error().code == errc::cancelled) {
    ctx.retryable = false;
    out = fail(errc::cancelled, "cannot commit registration '" + registration_id +
                                    "': cancelled: it was revoked or its owner exited while it was committed");
  }
  // Only errors the client can fix by feeding more keep the registration open; other
  // FAILED_PRECONDITIONs (no GPU for a CUDA storage, a quiesced artifact, a "must" stable tier
  // with nothing to copy) would otherwise leave it, and its region refs, held until its TTL or
  // forever with TTL 0.
  const auto outcome = out             ? detail::commit_outcome::ok
                       : ctx.retryable ? detail::commit_outcome::retryable
                                       : detail::commit_outcome::failed;
  const auto end = p->finish_commit(outcome);
  if (end.stays_open) {
    if (end.drop) (void)drop_pending(p);  // revoked or its owner died meanwhile
    return out;
  }
  std::vector<std::shared_ptr<detail::background_hash>> cancelled;
  {
    const detail::engine_lock lock(mutex);
    pending.erase(p->id());
    if (end.drop) {
      // Revoked or its owner died meanwhile: undo the lease or join.
      if (auto undone = catalogue.revoke(p->id())) log_released(*undone, "revoked: dropped while it was committed");
    }
    cancelled = catalogue.take_cancelled();
  }
  wait_stopped(cancelled);
  if (!out) {
    p->release(regions);
    return out;
  }
  tensorreg::log(log, log_level::debug, "committed registration {} (owner_pid {}) as artifact {}{}", p->id(),
                 p->owner_pid(), out->descriptor.artifact_id, out->existed ? " (joined)" : "");
  if (how.hash_in_background) out->hash = start_background_hash(out->descriptor.artifact_id, p->owner_pid());
  // Policies asking for the shared disk (DURABLE, COLD, HA: registration.md §1.6) are persisted
  // now, in the background; the commit answers the task's id.
  const auto& resolved = p->facts().policy;
  out->replica_level = resolved.replica_level;
  out->replica_hosts = resolved.replica_hosts;
  out->replica_hosts_must = resolved.replica_hosts_must;
  if (options.durable && resolved.shared_disk >= policy::requirement::should) {
    auto task = start_persistence(out->descriptor.artifact_id, resolved.cache);
    if (task) {
      out->persistence_task_id = task->task_id;
    } else {
      tensorreg::log(log, log_level::warn, "cannot start persisting artifact {}: {}", out->descriptor.artifact_id,
                     task.error().message);
    }
  }
  return out;
}

// ---- Republish -----------------------------------------------------------------------------

result<republish_response> engine::republish(const republish_request& request) {
  return state_->rejected(state_->republish(request), "republish", "lease " + request.previous_registration_id,
                          request.owner_pid);
}

result<republish_response> engine::state::republish(const republish_request& r) {
  const std::string what = "cannot republish lease '" + r.previous_registration_id + "'";
  if (r.hash_in_background && r.client_artifact_id.empty()) {
    return fail(errc::invalid_argument, what +
                                            ": hash_in_background needs a client_artifact_id (a cgid): an mi2 id "
                                            "is the hash itself, so its commit must compute it");
  }
  begin_request b;
  {
    const detail::engine_lock lock(mutex);
    TENSORREG_TRY_ASSIGN(auto found, detail::republishable(catalogue, r.previous_registration_id, r.owner_pid));
    const auto [l, a] = found;
    b.device_id = l->device_id;
    b.total_size = a->descriptor.total_size;
  }
  b.ttl_ms = r.ttl_ms;
  b.owner_pid = r.owner_pid;
  lease_options repeat;
  repeat.repeat_of = r.previous_registration_id;
  b.plan = std::move(repeat);
  b.policy = r.policy;
  b.client_artifact_id = r.client_artifact_id;
  b.owner_uid = r.owner_uid;
  TENSORREG_TRY_ASSIGN(auto begun, begin(std::move(b)));
  commit_options how;
  how.hash_in_background = r.hash_in_background;
  auto committed = commit(begun.registration_id, how);
  if (!committed) {
    (void)abort(begun.registration_id);  // one left open (INVALID_ARGUMENT, retryable): nothing stays pending
    return tl::unexpected(std::move(committed).error());
  }
  republish_response out;
  out.registration_id = begun.registration_id;
  out.commit = std::move(*committed);
  if (r.revoke_previous) {
    out.revoked_previous = revoke(r.previous_registration_id, "replaced by lease " + begun.registration_id);
  }
  return out;
}

// ---- Background hash (registration.md §4.8) -----------------------------------------------------

hash_state engine::state::start_background_hash(const std::string& artifact_id, std::int32_t owner_pid) {
  std::shared_ptr<detail::background_hash> task;
  detail::hash_input input;
  {
    const detail::engine_lock lock(mutex);
    auto* a = catalogue.find(artifact_id);
    if (a != nullptr && a->hash && a->hash->status().state != hash_state::failed) {
      return a->hash->status().state;  // a join of an artifact whose hash runs or ran
    }
    auto found = catalogue.hash_input_of(artifact_id);
    if (!found) {
      // Revoked, or its owner exited, before the hash could start: nothing reads it.
      tensorreg::log(log, log_level::info, "background hash of {} not started: {}", artifact_id, found.error().message);
      return hash_state::failed;
    }
    input = std::move(*found);
    task = std::make_shared<detail::background_hash>(artifact_id);
    a->hash = task;
    std::lock_guard jobs(hash_jobs_mutex);
    ++hash_jobs;
  }
  // On the hash pool, queued under the committing client's share (the commit's owner_scope).
  pool.submit([this, task, input = std::move(input), owner_pid]() mutable {
    run_background_hash(task, std::move(input), owner_pid);
  });
  return hash_state::pending;
}

void engine::state::run_background_hash(const std::shared_ptr<detail::background_hash>& task, detail::hash_input input,
                                        std::int32_t owner_pid) {
  const auto& id = task->artifact_id();
  hash_status outcome;
  outcome.state = hash_state::failed;
  if (task->start_reading()) {
    const auto started = std::chrono::steady_clock::now();
    result<hash::digest> digest = fail(errc::internal, "no digest");
    try {
      digest = detail::hash_canonical(*input.view, pool, devices.get(), task->flag());
    } catch (const std::bad_alloc&) {
      digest = fail(errc::resource_exhausted, "out of memory");
    } catch (const std::exception& e) {
      digest = fail(errc::internal, e.what());
    } catch (...) {
      digest = fail(errc::internal, "an exception of unknown type");
    }
    input = {};  // the mappings may go once the lease does
    task->finish_reading();
    const auto ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - started).count();
    if (digest) {
      outcome.state = hash_state::done;
      outcome.data_multihash = hash::encode_multihash(*digest);
      tensorreg::log(log, log_level::debug, "background hash of {} (owner_pid {}) done in {} ms", id, owner_pid, ms);
    } else {
      outcome.message =
          "cannot hash " + id + ": " + std::string(errc_name(digest.error().code)) + ": " + digest.error().message;
    }
  }
  {
    const detail::engine_lock lock(mutex);
    auto* a = catalogue.find(id);
    const bool current = a != nullptr && a->hash == task;
    if (outcome.state == hash_state::done) {
      if (current) {
        outcome.mi2_id = "mi2:" + a->descriptor.index_multihash + ":" + outcome.data_multihash;
      } else {
        outcome = hash_status{hash_state::failed, {}, {}, "cannot hash " + id + ": the artifact is gone"};
      }
    }
    // Settled under the engine mutex with the alias: a waiter told DONE finds the mi2 id.
    const auto settled = task->settle(outcome);
    if (settled == hash_state::done) catalogue.add_alias(outcome.mi2_id, id);
    if (settled == hash_state::failed) {
      tensorreg::log(log, log_level::info, "background hash of {} (owner_pid {}) failed: {}", id, owner_pid,
                     task->status().message);
    }
  }
  std::lock_guard jobs(hash_jobs_mutex);
  --hash_jobs;
  hash_jobs_idle.notify_all();
}

result<hash_status> engine::wait_artifact_hash(const std::string& artifact_id,
                                               std::chrono::milliseconds timeout) const {
  std::shared_ptr<detail::background_hash> task;
  artifact_descriptor d;
  {
    const detail::engine_lock lock(state_->mutex);
    TENSORREG_TRY_ASSIGN(std::tie(task, d), state_->catalogue.hash_of(artifact_id));
  }
  if (task) return task->wait(timeout);
  hash_status out;
  if (d.id_kind == identity::id_kind::mi2) {
    // An mi2 artifact was hashed at its commit: its id is the answer (DECISIONS §5.19).
    out.state = hash_state::done;
    out.mi2_id = d.artifact_id;
    out.data_multihash = d.data_multihash;
  }
  return out;
}

// ---- Abort / Revoke --------------------------------------------------------------------------

status engine::abort(const std::string& registration_id) {
  auto out = state_->abort(registration_id);
  if (!out)
    return state_->rejected(std::move(out), "abort", "registration " + registration_id,
                            state_->owner_of(registration_id));
  return out;
}

status engine::state::abort(const std::string& registration_id) {
  std::shared_ptr<pending_registration> p;
  {
    const detail::engine_lock lock(mutex);
    p = pending.find(registration_id);
    if (!p) {
      if (pending.unbury(registration_id)) return {};  // expired: already released
      return fail(errc::not_found, "cannot abort registration '" + registration_id + "': no such registration");
    }
    if (p->phase() == detail::pending_phase::committing) {
      return fail(errc::failed_precondition,
                  "cannot abort registration '" + registration_id + "': it is being committed");
    }
  }
  (void)drop_pending(p);
  return {};
}

bool engine::revoke(const std::string& registration_id, const std::string& reason) {
  return state_->revoke(registration_id, reason);
}

bool engine::state::revoke(const std::string& registration_id, const std::string& reason) {
  std::shared_ptr<pending_registration> p;
  std::optional<detail::released_holder> held;
  std::vector<std::shared_ptr<detail::background_hash>> cancelled;
  {
    const detail::engine_lock lock(mutex);
    pending.unbury(registration_id);
    p = pending.find(registration_id);
    held = catalogue.revoke(registration_id);
    cancelled = catalogue.take_cancelled();
  }
  // No byte of the lease is read by a background hash once the revoke returns (§4.8).
  wait_stopped(cancelled);
  if (held) log_released(*held, "revoked: " + reason);
  if (p) {
    const bool dropped = drop_pending(p);
    tensorreg::log(log, log_level::info, "registration {} (owner_pid {}) revoked{}: {}", registration_id,
                   p->owner_pid(), dropped ? "" : " (after its commit)", reason);
  }
  return held.has_value() || p != nullptr;
}

// ---- Regions -------------------------------------------------------------------------------

namespace {

// A VRAM region of CUDA VMM allocations: imports and maps them on the region's device, so the
// registry holds a ready mapping (docs/wire-format.md §12). What the registry checks for every
// region (owner, size, device ≥ 0) is checked first, so a bad request imports nothing.
status import_vmm_region(regions::register_request& request, device_memory* devices) {
  if (!request.vmm || request.device_mapping) return {};
  const auto& chunks = *request.vmm;
  if (request.owner_pid <= 0 || request.size_bytes == 0 || request.device_id < 0) return {};  // the registry's errors
  TENSORREG_TRY_ASSIGN(const std::uint64_t sum,
                       devices::vmm_chunks_total(chunks.fds.size(), chunks.chunk_bytes, "cannot register region"));
  if (sum != request.size_bytes) {
    return fail(errc::invalid_argument, "cannot register region: its CUDA VMM chunks hold " + std::to_string(sum) +
                                            " bytes, not size_bytes " + std::to_string(request.size_bytes));
  }
  if (devices == nullptr) {
    return fail(errc::failed_precondition, "cannot register region: CUDA VMM memory on device " +
                                               std::to_string(request.device_id) +
                                               " needs a GPU and this engine has none");
  }
  std::vector<int> fds;
  fds.reserve(chunks.fds.size());
  for (const auto& fd : chunks.fds) fds.push_back(fd.get());
  auto mapped = devices->import_vmm(request.owner_pid, request.device_id, fds, chunks.chunk_bytes);
  if (!mapped) return tl::unexpected(with_context(std::move(mapped).error(), "cannot register region"));
  request.device_mapping = std::move(*mapped);
  return {};
}

}  // namespace

result<regions::region_info> engine::register_region(regions::register_request request) {
  TENSORREG_TRY(import_vmm_region(request, state_->devices.get()));
  // Register first, then watch, for the same reason as in begin().
  const auto owner = request.owner_pid;
  TENSORREG_TRY_ASSIGN(auto info, state_->regions.register_region(std::move(request)));
  if (auto watched = state_->watch_owner(owner); !watched) {
    (void)state_->regions.unregister(info.id, owner, true);
    return tl::unexpected(std::move(watched).error());
  }
  return info;
}

result<bool> engine::unregister_region(const std::string& region_id, std::int32_t owner_pid, bool force) {
  return state_->regions.unregister(region_id, owner_pid, force);
}

// ---- Catalogue -----------------------------------------------------------------------------

result<artifact_summary> engine::get(const std::string& artifact_id) const {
  const auto& durable = state_->options.durable;
  result<artifact_summary> out;
  {
    const detail::engine_lock lock(state_->mutex);
    out = state_->catalogue.get(artifact_id);
  }
  if (durable) {
    if (out) {
      out->shared_disk = durable->contains(artifact_id);
    } else if (out.error().code == errc::not_found) {
      state_->discover_persisted(artifact_id);
      if (auto a = durable->find(artifact_id)) return state::summary_of(*a);
    }
  }
  return out;
}

std::vector<artifact_summary> engine::list() const {
  std::vector<artifact_summary> out;
  {
    const detail::engine_lock lock(state_->mutex);
    out = state_->catalogue.list();
  }
  const auto& durable = state_->options.durable;
  if (!durable) return out;
  // A shared directory: what the other daemons persisted or removed since.
  if (auto rescanned = durable->rescan(); !rescanned) {
    tensorreg::log(state_->log, log_level::warn, "{}", rescanned.error().message);
  }
  std::map<std::string, std::size_t> held;
  for (std::size_t i = 0; i < out.size(); ++i) held[out[i].descriptor.artifact_id] = i;
  for (const auto& a : durable->list()) {
    auto it = held.find(a.record.artifact_id);
    if (it != held.end()) {
      out[it->second].shared_disk = true;
    } else {
      out.push_back(state::summary_of(a));
    }
  }
  std::sort(out.begin(), out.end(),
            [](const auto& x, const auto& y) { return x.descriptor.artifact_id < y.descriptor.artifact_id; });
  return out;
}

result<std::shared_ptr<const index::canonical_index>> engine::index_of(const std::string& artifact_id) const {
  result<std::shared_ptr<const index::canonical_index>> out;
  {
    const detail::engine_lock lock(state_->mutex);
    out = state_->catalogue.index_of(artifact_id);
  }
  if (!out && out.error().code == errc::not_found && state_->options.durable) {
    state_->discover_persisted(artifact_id);
    if (auto a = state_->options.durable->find(artifact_id)) return a->index;
  }
  return out;
}

result<std::shared_ptr<const memory::byte_source>> engine::open_bytes(const std::string& artifact_id) {
  result<std::shared_ptr<const memory::byte_source>> out;
  {
    const detail::engine_lock lock(state_->mutex);
    out = state_->catalogue.open_bytes(artifact_id);
  }
  // Not held in memory but persisted: load it back into the stable cache and read that.
  if (!out) state_->discover_persisted(artifact_id);
  if (!out && state_->options.durable && state_->options.durable->contains(artifact_id)) {
    bool quiesced = false;
    {
      const detail::engine_lock lock(state_->mutex);
      const auto st = state_->catalogue.state_of(artifact_id);
      quiesced = st == detail::artifact_state::quiesced || st == detail::artifact_state::draining;
    }
    if (quiesced) return out;
    TENSORREG_TRY(state_->restore(artifact_id));
    const detail::engine_lock lock(state_->mutex);
    return state_->catalogue.open_bytes(artifact_id);
  }
  return out;
}

result<std::pair<std::shared_ptr<const index::canonical_index>, unique_fd>> engine::stable_replica_fd(
    const std::string& artifact_id) {
  const std::string verb = "cannot open the stable replica of " + artifact_id;
  std::shared_ptr<const memory::byte_source> replica;
  std::shared_ptr<const index::canonical_index> idx;
  const auto look = [&]() -> status {
    const detail::engine_lock lock(state_->mutex);
    TENSORREG_TRY_ASSIGN(std::tie(replica, idx), state_->catalogue.stable_replica(artifact_id, verb));
    return {};
  };
  auto found = look();
  // No stable replica, or no artifact, in memory, but a persisted copy: load it back (docs/architecture.md §14).
  if ((!found && found.error().code == errc::not_found) || (found && !replica)) {
    state_->discover_persisted(artifact_id);
    if (state_->options.durable && state_->options.durable->contains(artifact_id)) {
      TENSORREG_TRY(state_->restore(artifact_id));
      found = look();
    }
  }
  TENSORREG_TRY(std::move(found));
  TENSORREG_TRY_ASSIGN(auto fd, detail::export_replica_fd(replica, verb));
  return std::pair{std::move(idx), std::move(fd)};
}

result<bool> engine::place_on_device(const std::string& artifact_id, std::int32_t device_id) {
  const std::string verb = "cannot copy " + artifact_id + " to CUDA device " + std::to_string(device_id);
  if (!state_->devices) return fail(errc::failed_precondition, verb + ": no GPU is available to this engine");
  {
    const detail::engine_lock lock(state_->mutex);
    const auto* a = state_->catalogue.find(artifact_id);
    if (a != nullptr && a->gpu_replicas.contains(device_id)) return false;
  }
  // Its host bytes (the stable replica, loaded back from disk when only there; or a host
  // lease's): the source holds them, and a deregister waits for it, while the copy reads.
  auto bytes = open_bytes(artifact_id);
  if (!bytes) return tl::unexpected(with_context(std::move(bytes).error(), verb));
  TENSORREG_TRY_ASSIGN(auto copy, state_->devices->copy_from_host(device_id, **bytes));
  bytes->reset();
  const detail::engine_lock lock(state_->mutex);
  auto* a = state_->catalogue.find(artifact_id);
  if (a == nullptr) return fail(errc::not_found, verb + ": it was removed during the copy");
  if (a->quiesced) return fail(errc::failed_precondition, verb + ": it is being deregistered");
  if (a->gpu_replicas.contains(device_id)) return false;  // another copy landed first
  copy.device_id = device_id;
  a->gpu_replicas.emplace(device_id, std::move(copy));
  return true;
}

result<device_layout> engine::device_layout_of(const std::string& artifact_id, std::uint64_t known_layout) const {
  const detail::engine_lock lock(state_->mutex);
  return state_->catalogue.device_layout_of(artifact_id, known_layout);
}

result<std::int32_t> engine::resolve_device(std::int32_t device_id, std::string_view device_uuid) const {
  if (device_uuid.empty()) return device_id;
  if (!state_->devices) {
    return fail(errc::failed_precondition,
                "cannot find CUDA device " + std::string(device_uuid) + ": no GPU is available to this engine");
  }
  return state_->devices->device_by_uuid(device_uuid);
}

std::string engine::device_uuid(std::int32_t device_id) const {
  return state_->devices ? state_->devices->uuid_of(device_id) : std::string();
}

result<deregister_response> engine::deregister(const deregister_request& request) {
  return state_->rejected(state_->deregister(request), "deregister", "artifact " + request.artifact_id,
                          request.owner_pid);
}

result<deregister_response> engine::state::deregister(const deregister_request& r) {
  std::shared_ptr<detail::reader_gate> gate;
  std::vector<std::shared_ptr<detail::background_hash>> cancelled;
  discover_persisted(r.artifact_id);  // a shared directory's copy is removed as well
  {
    const detail::engine_lock lock(mutex);
    // 0. DECISIONS §8, under the same lock as quiesce: no other holder slips in between.
    if (r.owner_pid > 0) TENSORREG_TRY(catalogue.check_sole_holder(r.artifact_id, r.owner_pid));
    TENSORREG_TRY(catalogue.check_copy_owner(r.artifact_id, r.owner_uid));  // the daemon's copies
    auto quiesced = catalogue.quiesce(r.artifact_id);                       // 1. no new readers, leases or joins
    if (!quiesced && quiesced.error().code == errc::not_found && options.durable &&
        options.durable->contains(r.artifact_id)) {
      // Only the persisted copy is left (DECISIONS §5.11). Its putter is not recorded on disk,
      // so it is the daemon's own uid's, or root's, to remove (DECISIONS §8).
      if (r.owner_uid && *r.owner_uid != 0 && *r.owner_uid != ::geteuid()) {
        return fail(errc::permission_denied, "cannot deregister " + r.artifact_id +
                                                 ": only its persisted copy is left, which only uid " +
                                                 std::to_string(::geteuid()) + " (the daemon's) or root may remove");
      }
      gate = nullptr;
    } else {
      TENSORREG_TRY_ASSIGN(gate, std::move(quiesced));
    }
    cancelled = catalogue.take_cancelled();  // quiesce stops its background hash
  }
  wait_stopped(cancelled);
  if (!gate) {
    TENSORREG_TRY(options.durable->remove(r.artifact_id));
    tensorreg::log(log, log_level::info, "deregistered artifact {} (owner_pid {}): removed its persisted copy",
                   r.artifact_id, r.owner_pid);
    deregister_response response;
    response.drained = true;
    response.removed = true;
    return response;
  }
  // 2. drain: wait, with no lock held, for the readers to let go.
  const auto timeout = r.drain_timeout_ms != 0 ? milliseconds(r.drain_timeout_ms) : options.default_drain_timeout;
  TENSORREG_TRY(detail::catalogue::drain(r.artifact_id, *gate, r.wait_for_drain, timeout));
  deregister_response response;
  response.drained = true;
  // 3. revoke leases and joins, drop replicas.
  std::optional<detail::removed_artifact> removed;
  {
    const detail::engine_lock lock(mutex);
    removed = catalogue.remove(r.artifact_id);
  }
  if (!removed) return response;  // a concurrent deregister removed it
  if (options.durable && options.durable->contains(r.artifact_id)) {
    if (auto gone = options.durable->remove(r.artifact_id); !gone) {
      tensorreg::log(log, log_level::warn, "deregistered artifact {} but kept its persisted copy: {}", r.artifact_id,
                     gone.error().message);
    }
  }
  response.released_region_ids = std::move(removed->released_region_ids);
  response.removed = true;
  tensorreg::log(log, log_level::info,
                 "deregistered artifact {} (owner_pid {}): revoked {} leases and {} joins; released regions {}",
                 r.artifact_id, r.owner_pid, removed->leases, removed->joins, joined(response.released_region_ids));
  return response;
}

status engine::check_owner(const std::string& registration_id, std::int32_t caller_pid, std::string_view verb) const {
  const std::int32_t owner = state_->owner_of(registration_id);
  if (owner == 0 || owner == caller_pid) return {};
  return fail(errc::permission_denied, "cannot " + std::string(verb) + " '" + registration_id +
                                           "': it belongs to pid " + std::to_string(owner) +
                                           ", not to the calling process " + std::to_string(caller_pid));
}

std::optional<std::uint64_t> engine::stable_room() const {
  const detail::engine_lock lock(state_->mutex);
  const auto& cache = state_->catalogue.cache();
  const auto st = cache.stats();
  if (st.budget_bytes == 0) return std::nullopt;
  const auto used = st.bytes_used + st.reserved_bytes;
  const auto free = st.budget_bytes > used ? st.budget_bytes - used : 0;
  return std::min(st.budget_bytes, free + cache.evictable_bytes());
}

engine_stats engine::stats() const {
  auto& s = *state_;
  engine_stats out;
  {
    // The engine's own tables, read under its mutex when it comes free within stats_patience;
    // a worker holding it longer (a commit's bookkeeping, an owner's release) leaves this call
    // the tables the last one read, so GetStats on the I/O thread never waits behind it. The
    // first call waits: there is nothing earlier to answer.
    std::unique_lock tables(s.mutex, std::defer_lock);
    const bool read_before = s.tables_read.load(std::memory_order_acquire);
    if (read_before ? tables.try_lock_for(stats_patience) : (tables.lock(), true)) {
      s.catalogue.add_stats(out);
      out.pending_registrations = s.pending.size();
      tables.unlock();
      std::lock_guard last(s.last_tables_mutex);
      s.last_tables = out;
      s.tables_read.store(true, std::memory_order_release);
    } else {
      std::lock_guard last(s.last_tables_mutex);
      out = s.last_tables;
    }
  }
  out.regions = s.regions.size();
  out.open_mappings = s.devices ? s.devices->open_mappings() : 0;
  out.vmm_reserved_bytes = s.devices ? s.devices->vmm_reserved_bytes() : 0;
  out.ipc_opens = s.devices ? s.devices->ipc_opens() : 0;
  out.vmm_imports = s.devices ? s.devices->vmm_imports() : 0;
  if (s.options.durable) {
    const auto disk = s.options.durable->totals();
    out.shared_disk_artifacts = disk.artifacts;
    out.shared_disk_bytes = disk.bytes;
  }
  return out;
}

// ---- Housekeeping --------------------------------------------------------------------------

void engine::state::sweep() {
  const auto now = time.now();
  std::vector<std::shared_ptr<pending_registration>> expired;
  std::vector<detail::released_holder> ended;
  std::vector<std::shared_ptr<detail::background_hash>> cancelled;
  {
    const detail::engine_lock lock(mutex);
    for (const auto& p : pending.all()) {
      if (p->expired(now)) expired.push_back(p);
    }
    ended = catalogue.expire(now);
    for (const auto& cgid : catalogue.expire_assemblies(now)) {
      tensorreg::log(log, log_level::info, "assembly {} expired: no piece came within its TTL", cgid);
    }
    pending.forget_tombstones(now);
    cancelled = catalogue.take_cancelled();
  }
  wait_stopped(cancelled);
  for (const auto& h : ended) log_released(h, "expired: its TTL passed");
  for (const auto& p : expired) {
    if (!drop_pending(p)) continue;  // a commit started meanwhile, or someone else dropped it
    {
      const detail::engine_lock lock(mutex);
      pending.bury(p->id(), now);  // Feed/Commit still answer DEADLINE_EXCEEDED
    }
    tensorreg::log(log, log_level::info, "registration {} (owner_pid {}) expired: its TTL passed", p->id(),
                   p->owner_pid());
  }
  for (const auto& region : regions.sweep()) {
    tensorreg::log(log, log_level::info, "region {} expired: its TTL passed", region);
  }
}

void engine::state::release_owner(std::int32_t pid) {
  std::vector<std::shared_ptr<pending_registration>> owned;
  std::vector<detail::released_holder> ended;
  std::vector<std::shared_ptr<detail::background_hash>> cancelled;
  {
    const detail::engine_lock lock(mutex);
    for (const auto& p : pending.all()) {
      if (p->owner_pid() == pid) owned.push_back(p);
    }
    ended = catalogue.release_owner(pid);
    cancelled = catalogue.take_cancelled();
  }
  wait_stopped(cancelled);
  std::vector<std::string> dropped;
  for (const auto& p : owned) {
    if (drop_pending(p)) dropped.push_back(p->id());
  }
  const auto regions_gone = regions.release_owner(pid);
  std::vector<std::string> holders;
  for (const auto& h : ended) holders.push_back(h.registration_id);
  tensorreg::log(log, log_level::info,
                 "owner_pid {} exited: released pending registrations {}; leases and joins {}; regions {}", pid,
                 joined(dropped), joined(holders), joined(regions_gone));
}

void engine::sweep() { state_->sweep(); }

// ---- Views (registration.md §7) ------------------------------------------------------------

result<view_record> engine::view_of(const std::string& artifact_id, const std::string& view_id) const {
  const detail::engine_lock lock(state_->mutex);
  auto* a = state_->catalogue.find(artifact_id);
  if (a == nullptr || !state_->catalogue.get(artifact_id)) {
    return fail(errc::not_found, "cannot find view " + view_id + " of " + artifact_id + ": no such artifact");
  }
  auto it = a->views.find(view_id);
  if (it == a->views.end()) {
    return fail(errc::not_found, "cannot find view " + view_id + " of " + artifact_id + ": no such view");
  }
  return it->second.first;
}

result<std::shared_ptr<const memory::byte_source>> engine::open_view(const std::string& artifact_id,
                                                                     const std::string& view_id) {
  std::shared_ptr<const views::view_plan> plan;
  {
    const detail::engine_lock lock(state_->mutex);
    auto* a = state_->catalogue.find(artifact_id);
    if (a == nullptr || !state_->catalogue.get(artifact_id)) {
      return fail(errc::not_found, "cannot open view " + view_id + " of " + artifact_id + ": no such artifact");
    }
    auto it = a->views.find(view_id);
    if (it == a->views.end()) {
      return fail(errc::not_found, "cannot open view " + view_id + " of " + artifact_id + ": no such view");
    }
    plan = it->second.second;
    auto replica = state_->catalogue.stable_replica(artifact_id, "cannot open view " + view_id + " of " + artifact_id);
    if (replica && replica->first) {
      if (const auto* shared = dynamic_cast<const memory::shared_memory*>(replica->first.get())) {
        return std::shared_ptr<const memory::byte_source>(
            std::make_shared<views::gathered_view>(plan, shared->bytes(), replica->first));
      }
    }
  }
  TENSORREG_TRY_ASSIGN(auto bytes, open_bytes(artifact_id));
  // The view is gathered from host memory: a stable replica (what every SERVER view makes) or
  // a lease of host memory; other bytes are copied to the host first.
  std::vector<std::byte> copy(bytes->size());
  TENSORREG_TRY(bytes->read(0, copy));
  auto owned = std::make_shared<std::vector<std::byte>>(std::move(copy));
  return std::shared_ptr<const memory::byte_source>(
      std::make_shared<views::gathered_view>(plan, std::span<const std::byte>(*owned), owned));
}

result<assembly_status> engine::assembly_of(const std::string& cgid) const {
  const detail::engine_lock lock(state_->mutex);
  auto it = state_->catalogue.assemblies().find(cgid);
  if (it == state_->catalogue.assemblies().end()) {
    return fail(errc::not_found, "cannot find assembly " + cgid + ": no piece of it is held here");
  }
  return detail::status_of(it->second->snapshot(), state_->time.now());
}

std::vector<assembly_status> engine::assemblies() const {
  const detail::engine_lock lock(state_->mutex);
  return state_->catalogue.assembly_statuses(state_->time.now());
}

// ---- Persistence -----------------------------------------------------------------------------

artifact_summary engine::state::summary_of(const persistence::stored_artifact& a) {
  artifact_summary out;
  auto& d = out.descriptor;
  d.artifact_id = a.record.artifact_id;
  d.index_multihash = a.record.index_multihash;
  d.data_multihash = a.record.data_multihash;
  d.schema_version = a.record.schema_version;
  d.encoding = a.record.encoding;
  d.total_size = a.record.total_size;
  d.id_kind = a.record.id_kind == "MI2" ? identity::id_kind::mi2 : identity::id_kind::cgid;
  out.shared_disk = true;
  return out;
}

result<persistence::task_status> engine::start_persistence(const std::string& artifact_id,
                                                           std::optional<policy::cache_policy> cache) {
  return state_->start_persistence(artifact_id, std::move(cache));
}

result<persistence::task_status> engine::state::start_persistence(const std::string& id,
                                                                  std::optional<policy::cache_policy> cache) {
  const std::string what = "cannot start persistence of " + id;
  if (!options.durable) {
    return fail(errc::failed_precondition, what + ": the daemon has no persist directory (tensorregd --persist-dir)");
  }
  discover_persisted(id);  // persisted by another daemon sharing the directory: done already
  {
    const detail::engine_lock lock(mutex);
    const auto st = catalogue.state_of(id);
    if (st == detail::artifact_state::quiesced || st == detail::artifact_state::draining) {
      return fail(errc::failed_precondition, what + ": the artifact is being deregistered");
    }
    if (st == detail::artifact_state::gone) {
      if (options.durable->contains(id)) return tasks.record_done(id);
      return fail(errc::not_found, what + ": no such artifact");
    }
  }
  if (options.durable->contains(id)) return tasks.record_done(id);
  auto started = tasks.start(id);
  if (started.created) {
    const auto task_id = started.status.task_id;
    persist_pool->submit([this, task_id, id, cache] { run_persistence(task_id, id, cache); });
    tensorreg::log(log, log_level::info, "persistence task {} of artifact {} queued", task_id, id);
  }
  return started.status;
}

void engine::state::run_persistence(const std::string& task_id, const std::string& id,
                                    std::optional<policy::cache_policy> cache) {
  tasks.set_running(task_id);
  auto run = [&]() -> status {
    if (persist_cancel) return fail(errc::cancelled, "the daemon is stopping");
    std::shared_ptr<const memory::byte_source> bytes;
    std::shared_ptr<const index::canonical_index> idx;
    persistence::artifact_record record;
    {
      const detail::engine_lock lock(mutex);
      // The reader holds the artifact's gate: a deregister waits for this write to finish.
      TENSORREG_TRY_ASSIGN(bytes, catalogue.open_bytes(id));
      TENSORREG_TRY_ASSIGN(idx, catalogue.index_of(id));
      TENSORREG_TRY_ASSIGN(auto summary, catalogue.get(id));
      const auto& d = summary.descriptor;
      record = record_of(d);
      if (cache) {
        record.cache = *cache;
      } else if (auto info = catalogue.cache().info(id)) {
        record.cache.retention = info->retention;
        record.cache.overflow = info->overflow;
        record.cache.required = info->required;
        record.cache.require_shared_disk_for_spill = info->require_shared_disk_for_spill;
        record.cache.require_remote_stable_for_spill = info->require_remote_stable_for_spill;
        if (info->retention == policy::retention::ttl) record.cache.retention = policy::retention::best_effort;
      }
    }
    const double total = static_cast<double>(record.total_size);
    return options.durable->write(
        record, *idx, *bytes,
        [&](std::uint64_t done, std::uint64_t) { tasks.set_progress(task_id, static_cast<double>(done) / total); },
        &persist_cancel);
  };
  auto done = run();
  if (done) {
    tasks.finish(task_id, persistence::task_state::success);
    tensorreg::log(log, log_level::info, "persistence task {} of artifact {}: SUCCESS", task_id, id);
  } else {
    const auto reason = std::string(errc_name(done.error().code)) + ": " + done.error().message;
    tasks.finish(task_id, persistence::task_state::failed, reason);
    tensorreg::log(log, log_level::info, "persistence task {} of artifact {}: FAILED: {}", task_id, id, reason);
  }
}

// Loads a persisted artifact back into the stable DRAM cache (subject to its budget).
status engine::state::restore(const std::string& id) {
  struct running_restore {
    std::atomic<int>& count;
    explicit running_restore(std::atomic<int>& c) : count(c) { count.fetch_add(1); }
    ~running_restore() { count.fetch_sub(1); }
    running_restore(const running_restore&) = delete;
    running_restore& operator=(const running_restore&) = delete;
  } running(restores_running);
  std::lock_guard restoring(restore_mutex);
  const std::string what = "cannot load " + id + " back from the persist directory";
  {
    const detail::engine_lock lock(mutex);
    if (catalogue.cache().contains(id)) return {};  // another restore got there first
  }
  auto stored = options.durable->find(id);
  if (!stored) return fail(errc::not_found, what + ": it is not there");
  const auto size = stored->record.total_size;
  TENSORREG_TRY_ASSIGN(auto reservation, catalogue.cache().reserve(size));
  TENSORREG_TRY_ASSIGN(auto memory, memory::shared_memory::create(size, "tensorreg-restored"));
  const auto started = std::chrono::steady_clock::now();
  if (auto loaded = options.durable->load(id, memory.mutable_bytes()); !loaded) {
    tensorreg::log(log, log_level::warn, "{}", loaded.error().message);
    return loaded;
  }
  checked_by_restore.insert(id);
  TENSORREG_TRY(memory.seal_read_only());
  auto replica = std::make_shared<const memory::shared_memory>(std::move(memory));
  auto summary = summary_of(*stored);
  const detail::engine_lock lock(mutex);
  auto admitted = catalogue.cache().admit(id, size, replica, stored->record.cache, &reservation);
  if (!admitted) return tl::unexpected(with_context(std::move(admitted).error(), what));
  if (!admitted->admitted) {
    return fail(errc::resource_exhausted, what + ": the stable cache did not keep it: " + admitted->skip_reason);
  }
  catalogue.add(summary.descriptor, stored->index);
  const auto ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - started).count();
  tensorreg::log(log, log_level::info, "loaded artifact {} ({} bytes) back from the persist directory in {} ms", id,
                 size, ms);
  return {};
}

result<engine::persisted_copy> engine::open_persisted(const std::string& artifact_id, bool unless_in_memory) const {
  const std::string what = "cannot open the persisted copy of " + artifact_id;
  bool held = false, resident = false, quiesced = false;
  {
    std::lock_guard lock(state_->mutex);
    const auto st = state_->catalogue.state_of(artifact_id);
    held = st != detail::artifact_state::gone;
    quiesced = st == detail::artifact_state::quiesced || st == detail::artifact_state::draining;
    resident = state_->catalogue.cache().contains(artifact_id);
  }
  const auto& durable = state_->options.durable;
  if (quiesced) return fail(errc::failed_precondition, what + ": it is being deregistered");
  if (resident && unless_in_memory) {
    return fail(errc::failed_precondition, what + ": it has a stable DRAM replica (read it with GetArtifactMemfd)");
  }
  if (!durable) {
    if (held)
      return fail(errc::failed_precondition, what + ": the daemon has no persist directory (tensorregd --persist-dir)");
    return fail(errc::not_found, what + ": not held here");
  }
  state_->discover_persisted(artifact_id);
  auto opened = durable->open_data(artifact_id);
  if (!opened) {
    // The store's message names the copy already (quarantined: why; an I/O error: the file).
    if (opened.error().code != errc::not_found) return tl::unexpected(std::move(opened).error());
    if (held) {
      return fail(errc::failed_precondition,
                  what +
                      ": it is not on the shared disk (held in memory only: read it with GetArtifactMemfd or "
                      "OpenArtifactDevice)");
    }
    return fail(errc::not_found, what + ": not held here");
  }
  persisted_copy out;
  out.descriptor = state::summary_of(*opened->artifact).descriptor;
  out.opened = std::move(*opened);
  return out;
}

void engine::state::verify_persisted() {
  const auto all = options.durable->list();
  tensorreg::log(log, log_level::info, "verifying {} persisted artifacts in {}", all.size(), options.durable->root());
  std::size_t ok = 0, bad = 0;
  for (std::size_t i = 0; i < all.size(); ++i) {
    if (persist_cancel) return;
    const auto& id = all[i].record.artifact_id;
    {
      std::lock_guard restoring(restore_mutex);
      if (checked_by_restore.contains(id)) {
        ++ok;
        continue;
      }
    }
    const auto yield_to_restores = [this](std::uint64_t, std::uint64_t) {
      while (restores_running.load() > 0 && !persist_cancel) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    };
    if (auto checked = options.durable->verify(id, yield_to_restores); checked) {
      ++ok;
    } else if (checked.error().code != errc::not_found) {
      ++bad;
      tensorreg::log(log, log_level::warn, "persisted artifact {} failed verification ({}): {}", id,
                     errc_name(checked.error().code), checked.error().message);
    }
    tensorreg::log(log, log_level::info, "verified {} of {} persisted artifacts ({} damaged)", i + 1, all.size(), bad);
  }
  tensorreg::log(log, log_level::info, "verification of the persist directory done: {} good, {} damaged", ok, bad);
}

result<persistence::task_status> engine::persistence_status(const std::string& task_id,
                                                            const std::string& artifact_id) const {
  if (!task_id.empty()) return state_->tasks.find(task_id);
  if (artifact_id.empty()) {
    return fail(errc::invalid_argument, "cannot query persistence status: neither task_id nor artifact_id given");
  }
  auto newest = state_->tasks.newest_of(artifact_id);
  if (!newest) state_->discover_persisted(artifact_id);
  // Persisted before this daemon started: a task that is SUCCESS already.
  if (!newest && state_->options.durable && state_->options.durable->contains(artifact_id)) {
    return state_->tasks.record_done(artifact_id);
  }
  return newest;
}

result<persistence::task_status> engine::wait_persistence(const std::string& task_id,
                                                          std::chrono::milliseconds timeout) const {
  return state_->tasks.wait(task_id, timeout);
}
void engine::release_owner(std::int32_t owner_pid) { state_->release_owner(owner_pid); }

// ---- Resident memory across restarts (docs/architecture.md §14.2) ----------------------------

result<persistence::resident_export> engine::export_resident() const {
  auto& s = *state_;
  struct item {
    persistence::resident_entry entry;
    std::shared_ptr<const memory::byte_source> replica;
  };
  std::vector<item> items;
  {
    const detail::engine_lock lock(s.mutex);
    const auto now = s.time.now();
    for (auto& [id, replica] : s.catalogue.cache().entries()) {
      // An artifact being deregistered is not handed on: its deregister ends with this daemon.
      if (s.catalogue.state_of(id) != detail::artifact_state::held) continue;
      auto summary = s.catalogue.get(id);
      auto idx = s.catalogue.index_of(id);
      auto info = s.catalogue.cache().info(id);
      if (!summary || !idx || !info) continue;
      item it;
      auto& r = it.entry.record;
      const auto& d = summary->descriptor;
      r = record_of(d);
      r.cache.retention = info->retention;
      r.cache.overflow = info->overflow;
      r.cache.required = info->required;
      r.cache.require_shared_disk_for_spill = info->require_shared_disk_for_spill;
      r.cache.require_remote_stable_for_spill = info->require_remote_stable_for_spill;
      if (info->retention == policy::retention::ttl) {
        // What is left of the TTL travels; a TTL already past makes the entry best effort.
        const auto left = info->deadline ? std::chrono::duration_cast<milliseconds>(*info->deadline - now).count() : 0;
        if (left > 0) {
          r.cache.ttl_ms = static_cast<std::uint64_t>(left);
        } else {
          r.cache.retention = policy::retention::best_effort;
        }
      }
      it.entry.index = std::move(*idx);
      it.entry.owner_uid = s.catalogue.stable_entry_uid(id);
      it.entry.fd_name = persistence::fd_name_of(id);
      it.replica = std::move(replica);
      items.push_back(std::move(it));
    }
  }
  persistence::resident_state resident;
  persistence::resident_export out;
  TENSORREG_TRY(export_leases(resident, out.fds));
  for (auto& it : items) {
    auto fd = detail::export_replica_fd(it.replica, "cannot hand on " + it.entry.record.artifact_id);
    if (!fd) {
      if (fd.error().code == errc::resource_exhausted) return tl::unexpected(std::move(fd).error());
      tensorreg::log(s.log, log_level::warn, "{}", fd.error().message);
      continue;
    }
    it.entry.persisted = s.options.durable && s.options.durable->contains(it.entry.record.artifact_id);
    out.fds.push_back(persistence::named_fd{it.entry.fd_name, std::move(*fd)});
    resident.entries.push_back(std::move(it.entry));
  }
  out.state = persistence::encode_resident_state(resident);
  return out;
}

engine::adopt_report engine::adopt_resident(const persistence::resident_state& resident,
                                            std::vector<persistence::named_fd> fds) {
  auto& s = *state_;
  adopt_report report;
  std::map<std::string, unique_fd> by_name;
  for (auto& f : fds) by_name.try_emplace(f.name, std::move(f.fd));  // a second fd of a name is closed
  struct adopted {
    persistence::resident_entry entry;
    std::shared_ptr<const memory::shared_memory> bytes;
  };
  std::vector<adopted> to_verify;
  const auto refuse = [&](const std::string& id, const std::string& why) {
    report.refused.push_back(id + ": " + why);
    tensorreg::log(s.log, log_level::warn, "did not adopt artifact {}: {}", id, why);
  };
  // Least recently used first, so that the most recently used ends most recently used here too.
  for (auto e = resident.entries.rbegin(); e != resident.entries.rend(); ++e) {
    const auto& id = e->record.artifact_id;
    unique_fd fd;
    if (auto f = by_name.find(e->fd_name); f != by_name.end()) {
      fd = std::move(f->second);
      by_name.erase(f);
    }
    auto mapped = persistence::map_handed_memfd(*e, std::move(fd));
    if (!mapped) {
      refuse(id, mapped.error().message);
      continue;
    }
    artifact_descriptor d;
    d.artifact_id = id;
    d.index_multihash = e->record.index_multihash;
    d.data_multihash = e->record.data_multihash;
    d.schema_version = e->record.schema_version;
    d.encoding = e->record.encoding;
    d.total_size = e->record.total_size;
    d.id_kind = e->record.id_kind == "MI2" ? identity::id_kind::mi2 : identity::id_kind::cgid;
    {
      const detail::engine_lock lock(s.mutex);
      if (s.catalogue.cache().contains(id)) {
        refuse(id, "this daemon holds it already");
        continue;
      }
      auto admitted = s.catalogue.cache().admit(id, d.total_size, *mapped, e->record.cache);
      if (!admitted || !admitted->admitted) {
        refuse(id, admitted ? admitted->skip_reason : admitted.error().message);
        continue;
      }
      s.catalogue.add(d, e->index);
      s.catalogue.note_stable_entry(id, e->owner_uid);
    }
    ++report.adopted;
    report.adopted_bytes += d.total_size;
    to_verify.push_back(adopted{*e, std::move(*mapped)});
  }
  adopt_leases(resident, by_name, report);
  for (const auto& [name, fd] : by_name) {
    tensorreg::log(s.log, log_level::debug, "closed handed-over fd '{}': no entry names it", name);
  }
  tensorreg::log(s.log, log_level::info,
                 "adopted {} stable DRAM entries ({} bytes) and {} leases without a copy; refused {}", report.adopted,
                 report.adopted_bytes, report.leases, report.refused.size());
  if (to_verify.empty()) return report;
  if (!s.adopt_pool) s.adopt_pool = std::make_unique<thread_pool>(1u);
  s.adopted_unverified += to_verify.size();
  s.adopt_pool->submit([&s, items = std::move(to_verify)] {
    std::size_t bad = 0;
    for (const auto& a : items) {
      auto checked = persistence::verify_resident_bytes(a.entry, *a.bytes, &s.persist_cancel);
      --s.adopted_unverified;
      if (checked || checked.error().code == errc::cancelled) continue;
      ++bad;
      const auto& id = a.entry.record.artifact_id;
      {
        const detail::engine_lock lock(s.mutex);
        // Only the adopted replica goes: a later put of the same id holds bytes checked at commit.
        if (s.catalogue.cache().lookup(id) == a.bytes) {
          s.catalogue.cache().remove(id);
          s.catalogue.erase_if_empty(id);
        }
      }
      tensorreg::log(s.log, log_level::error, "dropped adopted artifact {}: {}: {}", id,
                     errc_name(checked.error().code), checked.error().message);
    }
    tensorreg::log(s.log, log_level::info, "re-hashed {} adopted artifacts: {} dropped", items.size(), bad);
  });
  return report;
}

// `seg` as segments whose sources are not segmented_views: a lease's view reads through the
// view of its storages (normalized: PAD as zero), which reads the memory. Gaps read as zero at
// every level, so the pieces that cover nothing are simply left out. False when nested deeper
// than a lease's views ever are.
static bool flatten_segment(const memory::segment& seg, std::vector<memory::segment>& out, int depth = 0) {
  const auto* inner = dynamic_cast<const memory::segmented_view*>(seg.source);
  if (inner == nullptr) {
    out.push_back(seg);
    return true;
  }
  if (depth > 4) return false;
  const std::uint64_t begin = seg.source_offset, end = seg.source_offset + seg.length;
  for (const auto& s : inner->segments()) {
    const auto lo = std::max(begin, s.offset), hi = std::min(end, s.offset + s.length);
    if (lo >= hi) continue;
    const memory::segment part{seg.offset + (lo - begin), hi - lo, s.source, s.source_offset + (lo - s.offset)};
    if (!flatten_segment(part, out, depth + 1)) return false;
  }
  return true;
}

// Leases of client memfds (HOST_SHARED regions) travel with the stable entries: the lease's
// segments, and a duplicate fd of each memfd they read. A lease over any other memory (device
// memory, a client's mapped file) is left out, and its artifact goes with the old daemon.
status engine::export_leases(persistence::resident_state& resident, std::vector<persistence::named_fd>& fds) const {
  auto& s = *state_;
  const detail::engine_lock lock(s.mutex);
  const auto now = s.time.now();
  for (const auto& summary : s.catalogue.list()) {
    if (summary.leases == 0) continue;
    const auto& id = summary.descriptor.artifact_id;
    auto* a = s.catalogue.find(id);
    if (a == nullptr || a->quiesced) continue;
    for (const auto& [registration_id, l] : a->leases) {
      if (!l.view.bytes || l.view.on_device()) continue;
      if (l.expires && *l.expires <= now) continue;
      persistence::resident_lease out;
      std::map<const memory::byte_source*, std::uint32_t> source_index;
      std::vector<const memory::shared_memory*> memfds;
      std::vector<memory::segment> flat;
      bool carried = true;
      for (const auto& seg : l.view.bytes->segments()) carried = carried && flatten_segment(seg, flat);
      for (const auto& seg : flat) {
        if (!carried) break;
        const auto* memfd = dynamic_cast<const memory::shared_memory*>(seg.source);
        if (memfd == nullptr) {
          carried = false;
          break;
        }
        auto [at, added] = source_index.emplace(seg.source, static_cast<std::uint32_t>(memfds.size()));
        if (added) memfds.push_back(memfd);
        out.segments.push_back({seg.offset, seg.length, at->second, seg.source_offset});
      }
      if (!carried) {
        tensorreg::log(s.log, log_level::info, "lease {} of artifact {} is not handed on: its memory is not a memfd",
                       registration_id, id);
        continue;
      }
      std::vector<persistence::named_fd> lease_fds;
      for (std::size_t k = 0; k < memfds.size(); ++k) {
        auto fd = memfds[k]->duplicate_fd();
        if (!fd) return tl::unexpected(std::move(fd).error());
        const auto name = persistence::lease_source_name(registration_id, k);
        out.sources.push_back({name, memfds[k]->size()});
        lease_fds.push_back(persistence::named_fd{name, std::move(*fd)});
      }
      auto& r = out.artifact.record;
      const auto& d = a->descriptor;
      r = record_of(d);
      out.artifact.index = a->index;
      out.artifact.fd_name = persistence::fd_name_of(id);
      out.registration_id = registration_id;
      out.owner_pid = l.owner_pid;
      out.device_id = l.device_id;
      out.epoch = l.epoch;
      if (l.expires) {
        out.ttl_left_ms = static_cast<std::uint64_t>(
            std::max<std::int64_t>(1, std::chrono::duration_cast<milliseconds>(*l.expires - now).count()));
      }
      resident.leases.push_back(std::move(out));
      for (auto& f : lease_fds) fds.push_back(std::move(f));
    }
  }
  return {};
}

void engine::adopt_leases(const persistence::resident_state& resident, std::map<std::string, unique_fd>& by_name,
                          adopt_report& report) {
  auto& s = *state_;
  for (const auto& l : resident.leases) {
    const auto& id = l.artifact.record.artifact_id;
    const auto refuse = [&](const std::string& why) {
      report.refused.push_back("lease " + l.registration_id + " of " + id + ": " + why);
      tensorreg::log(s.log, log_level::warn, "did not adopt lease {} of artifact {}: {}", l.registration_id, id, why);
    };
    std::vector<std::shared_ptr<const memory::byte_source>> sources;
    std::string problem;
    for (const auto& src : l.sources) {
      unique_fd fd;
      if (auto f = by_name.find(src.fd_name); f != by_name.end()) {
        fd = std::move(f->second);
        by_name.erase(f);
      }
      if (!fd) {
        problem = "no fd arrived for its source " + src.fd_name;
        break;
      }
      // Client memory: sealed against shrinking (as a region must be), not against writes.
      auto mapped = memory::shared_memory::adopt_sealed(std::move(fd), src.size);
      if (!mapped) {
        problem = mapped.error().message;
        break;
      }
      sources.push_back(std::make_shared<const memory::shared_memory>(std::move(*mapped)));
    }
    if (!problem.empty()) {
      refuse(problem);
      continue;
    }
    std::vector<memory::segment> segments;
    for (const auto& seg : l.segments) {
      segments.push_back({seg.offset, seg.length, sources[seg.source].get(), seg.source_offset});
    }
    auto view = memory::segmented_view::create(l.artifact.record.total_size, std::move(segments));
    if (!view) {
      refuse(view.error().message);
      continue;
    }
    artifact_descriptor d;
    d.artifact_id = id;
    d.index_multihash = l.artifact.record.index_multihash;
    d.data_multihash = l.artifact.record.data_multihash;
    d.schema_version = l.artifact.record.schema_version;
    d.encoding = l.artifact.record.encoding;
    d.total_size = l.artifact.record.total_size;
    d.id_kind = l.artifact.record.id_kind == "MI2" ? identity::id_kind::mi2 : identity::id_kind::cgid;
    {
      const detail::engine_lock lock(s.mutex);
      if (s.catalogue.holds_registration(l.registration_id)) {
        refuse("this daemon holds that registration already");
        continue;
      }
      auto* held = s.catalogue.find(id);
      if (held != nullptr && held->quiesced) {
        refuse("the artifact is being deregistered");
        continue;
      }
      auto& a = held != nullptr ? *held : s.catalogue.add(d, l.artifact.index);
      detail::lease lease;
      lease.registration_id = l.registration_id;
      lease.owner_pid = l.owner_pid;
      lease.device_id = l.device_id;
      lease.epoch = l.epoch;
      if (l.ttl_left_ms) lease.expires = s.time.now() + milliseconds(*l.ttl_left_ms);
      lease.view.bytes = std::make_shared<const memory::segmented_view>(std::move(*view));
      lease.view.keep_alive = std::move(sources);
      s.catalogue.add_lease(a, std::move(lease));
    }
    // Its owner's exit releases it here too; an owner already gone is released now.
    if (auto watched = s.watch_owner(l.owner_pid); !watched) {
      {
        const detail::engine_lock lock(s.mutex);
        (void)s.catalogue.revoke(l.registration_id);
        s.catalogue.erase_if_empty(id);
      }
      refuse("its owner pid " + std::to_string(l.owner_pid) + " cannot be watched: " + watched.error().message);
      continue;
    }
    ++report.leases;
  }
}

std::size_t engine::adopted_unverified() const { return state_->adopted_unverified.load(); }

std::uint64_t engine::resident_generation() const {
  const detail::engine_lock lock(state_->mutex);
  return state_->catalogue.cache().stats().changes + state_->catalogue.lease_changes();
}

}  // namespace tensorreg::registration
