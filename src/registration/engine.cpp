// The engine facade: creates the parts, routes each registration call (Begin to Abort) to the
// pending registration and its plan, runs the sweep and owner-death releases, and logs every
// event. Committed artifacts are engine_artifacts.cpp's, persistence engine_persistence.cpp's;
// engine_state.hpp holds what they share. The rules live in the parts:
// registration/pending_registration.hpp (a registration's phases), registration/catalogue.hpp
// (committed artifacts, quiesce → drain → remove) and registration/plans/ (what each plan does
// at Begin, Feed and Commit).
#include "tensorreg/registration/engine.hpp"

#include <unistd.h>

#include <algorithm>
#include <exception>
#include <new>
#include <tuple>
#include <utility>

#include "registration/engine_state.hpp"
#include "registration/plans/lease_repeat.hpp"
#include "registration/plans/plan.hpp"
#include "tensorreg/common/random.hpp"
#include "tensorreg/hash/multihash.hpp"

namespace tensorreg::registration {
namespace {

std::string new_registration_id() {
  const auto ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
  return "reg_" + std::to_string(ns) + "_" + std::to_string(::getpid()) + "_" + std::to_string(random_u64());
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

}  // namespace

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
  ctx.registration_id = facts.id;
  ctx.devices = devices.get();
  ctx.pool = &pool;
  ctx.stable_budget = catalogue.cache().budget_bytes();
  ctx.stable_cache = &catalogue.cache();  // thread-safe on its own: used without the engine mutex
  ctx.publish_reserve = publish_reserve.get();
  ctx.find_index = [this](const std::string& hex_key) {
    const detail::engine_lock lock(mutex);
    return catalogue.find_index(hex_key);
  };
  ctx.resolve_index = [find = ctx.find_index](const begin_request& request) {
    return detail::resolve_index(request, find);
  };
  // A piece's Begin moves its assembly's deadline, as its Commit does: one made here by a Begin
  // that then fails still expires.
  ctx.assembly_for = [this, deadline = detail::ttl_deadline(time, r.ttl_ms.value_or(0))](
                         const std::string& cgid, std::shared_ptr<const index::canonical_index> idx,
                         std::vector<views::byte_range> required) {
    const detail::engine_lock lock(mutex);
    auto found = catalogue.assembly_for(cgid, std::move(idx), std::move(required));
    if (found) (*found)->touch(deadline);
    return found;
  };
  TENSORREG_TRY_ASSIGN(auto plan, detail::begin_plan(r, ctx, response));
  const std::uint32_t ttl_ms = r.ttl_ms.value_or(0);
  auto p = std::make_shared<detail::pending_registration>(std::move(facts), ttl_ms, detail::ttl_deadline(time, ttl_ms),
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
  std::shared_ptr<detail::pending_registration> p;
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
  std::shared_ptr<detail::pending_registration> p;
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

// ---- Housekeeping --------------------------------------------------------------------------

void engine::state::sweep() {
  const auto now = time.now();
  std::vector<std::shared_ptr<detail::pending_registration>> expired;
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
  std::vector<std::shared_ptr<detail::pending_registration>> owned;
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
                 detail::joined(dropped), detail::joined(holders), detail::joined(regions_gone));
}

void engine::sweep() { state_->sweep(); }

}  // namespace tensorreg::registration
