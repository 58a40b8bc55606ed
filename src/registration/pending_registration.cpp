#include "registration/pending_registration.hpp"

#include <exception>
#include <new>
#include <utility>

namespace tensorreg::registration::detail {

std::string_view pending_phase_name(pending_phase phase) noexcept {
  switch (phase) {
    case pending_phase::open: return "open";
    case pending_phase::committing: return "committing";
    case pending_phase::committed: return "committed";
    case pending_phase::dropped: break;
  }
  return "dropped";
}

pending_registration::pending_registration(registration_facts facts, std::uint32_t ttl_ms,
                                           std::optional<clock::time_point> expires, std::unique_ptr<plan> p)
    : facts_(std::move(facts)), plan_(std::move(p)), ttl_ms_(ttl_ms), expires_(expires) {
  TENSORREG_ASSERT(plan_ != nullptr);
}

pending_phase pending_registration::phase() const {
  std::lock_guard lock(mutex_);
  return state_.phase;
}

std::uint32_t pending_registration::ttl_ms() const {
  std::lock_guard lock(mutex_);
  return ttl_ms_;
}

std::uint64_t pending_registration::epoch() const {
  std::lock_guard lock(mutex_);
  return epoch_;
}

bool pending_registration::expired(clock::time_point now) const {
  std::lock_guard lock(mutex_);
  return expires_ && *expires_ <= now && state_.phase != pending_phase::committing;
}

status pending_registration::feed(feed_request request, const clock& time, regions::region_registry& regions) {
  const std::string what = "cannot feed registration '" + id() + "'";
  std::unique_lock lock(mutex_);
  if (state_.phase == pending_phase::committed || state_.phase == pending_phase::dropped) {
    return fail(errc::not_found, what + ": no such registration");
  }
  if (state_.phase == pending_phase::committing)
    return fail(errc::failed_precondition, what + ": it is being committed");
  if (ttl_ms_ != 0) expires_ = ttl_deadline(time, ttl_ms_);  // every message is a keep-alive
  TENSORREG_TRY_ASSIGN(auto work, plan_->feed(request, facts_, regions, what));
  if (!work) return {};
  // Outside the lock, counted: Commit and release wait for `feeding` to drop to zero.
  ++state_.feeding;
  lock.unlock();
  // An exception must not skip the count below: Commit and release would wait for ever.
  status done;
  try {
    done = work();
  } catch (const std::bad_alloc&) {
    done = fail(errc::resource_exhausted, what + ": out of memory");
  } catch (const std::exception& e) {
    done = fail(errc::internal, what + ": " + e.what());
  }
  lock.lock();
  if (--state_.feeding == 0) idle_.notify_all();
  return done;
}

status pending_registration::keep_alive(std::int32_t owner_pid, std::uint64_t epoch, std::uint32_t ttl_ms,
                                        const clock& time) {
  std::lock_guard lock(mutex_);
  if (owner_pid != facts_.owner_pid) {
    return fail(errc::permission_denied, "cannot keep registration '" + id() + "' alive: owner_pid " +
                                             std::to_string(owner_pid) + " is not the registration's owner " +
                                             std::to_string(facts_.owner_pid));
  }
  epoch_ = epoch;
  if (ttl_ms > 0) {
    ttl_ms_ = ttl_ms;
    expires_ = ttl_deadline(time, ttl_ms);
  }
  return {};
}

status pending_registration::begin_commit() {
  std::unique_lock lock(mutex_);
  if (state_.phase == pending_phase::committed || state_.phase == pending_phase::dropped) {
    return fail(errc::not_found, "cannot commit registration '" + id() + "': no such registration");
  }
  if (state_.phase == pending_phase::committing) {
    return fail(errc::failed_precondition, "cannot commit registration '" + id() + "': a commit is already running");
  }
  state_.phase = pending_phase::committing;
  idle_.wait(lock, [&] { return state_.feeding == 0; });
  return {};
}

plan& pending_registration::committing_plan() {
  std::lock_guard lock(mutex_);
  TENSORREG_ASSERT(state_.phase == pending_phase::committing);
  return *plan_;
}

commit_end pending_registration::finish_commit(commit_outcome outcome) {
  std::lock_guard lock(mutex_);
  TENSORREG_ASSERT(state_.phase == pending_phase::committing);
  commit_end end;
  if (outcome == commit_outcome::retryable) {
    state_.phase = pending_phase::open;
    cancel_.store(false);
    end.stays_open = true;
    end.drop = std::exchange(state_.drop_after_commit, false);
    return end;
  }
  state_.phase = pending_phase::committed;
  end.drop = state_.drop_after_commit;
  return end;
}

bool pending_registration::request_drop() {
  std::lock_guard lock(mutex_);
  switch (state_.phase) {
    case pending_phase::open: state_.phase = pending_phase::dropped; return true;
    case pending_phase::committing:
      state_.drop_after_commit = true;
      cancel_.store(true);  // the commit's work is for nobody now: stop it early
      return false;
    case pending_phase::committed:
    case pending_phase::dropped: break;
  }
  return false;
}

void pending_registration::release(regions::region_registry& regions) {
  std::unique_lock lock(mutex_);
  TENSORREG_ASSERT(state_.phase == pending_phase::committed || state_.phase == pending_phase::dropped);
  idle_.wait(lock, [&] { return state_.feeding == 0; });
  plan_->release(regions);
}

// ---- pending_table ---------------------------------------------------------------------------

void pending_table::insert(std::shared_ptr<pending_registration> p) {
  auto id = p->id();
  const auto owner = p->owner_pid();
  if (by_id_.emplace(std::move(id), std::move(p)).second) ++per_owner_[owner];
  open_.store(by_id_.size(), std::memory_order_relaxed);
}

std::shared_ptr<pending_registration> pending_table::find(const std::string& id) const {
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : it->second;
}

void pending_table::erase(const std::string& id) {
  auto it = by_id_.find(id);
  if (it == by_id_.end()) return;
  auto count = per_owner_.find(it->second->owner_pid());
  TENSORREG_ASSERT(count != per_owner_.end() && count->second > 0);
  if (--count->second == 0) per_owner_.erase(count);
  by_id_.erase(it);
  open_.store(by_id_.size(), std::memory_order_relaxed);
}

std::size_t pending_table::count_of(std::int32_t owner_pid) const {
  auto it = per_owner_.find(owner_pid);
  return it == per_owner_.end() ? 0 : it->second;
}

std::vector<std::shared_ptr<pending_registration>> pending_table::all() const {
  std::vector<std::shared_ptr<pending_registration>> out;
  out.reserve(by_id_.size());
  for (const auto& [id, p] : by_id_) out.push_back(p);
  return out;
}

void pending_table::bury(const std::string& id, clock::time_point now) { tombstones_.emplace(id, now); }

bool pending_table::unbury(const std::string& id) { return tombstones_.erase(id) > 0; }

bool pending_table::buried(const std::string& id) const { return tombstones_.contains(id); }

void pending_table::forget_tombstones(clock::time_point now) {
  std::erase_if(tombstones_, [&](const auto& kv) { return kv.second + tombstone_life <= now; });
}

}  // namespace tensorreg::registration::detail
