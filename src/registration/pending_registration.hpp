// src/registration/pending_registration.hpp — an open registration between Begin and Commit.
//
// Provides `pending_registration`, whose life is `pending_phase` (registration.md §4.3–§4.6;
// DECISIONS §5.6), every transition in this file:
//
//   from        event                           to          notes
//   open        feed begins / ends              open        `feeding` counts copies outside the lock
//   open        begin_commit()                  committing  waits for `feeding` to reach 0
//   committing  finish_commit(ok | failed)      committed   a drop asked meanwhile is reported back
//   committing  finish_commit(retryable)        open        a drop asked meanwhile is reported back
//   open        request_drop()                  dropped     abort, revoke, owner death, expiry
//   committing  request_drop()                  committing  deferred: finish_commit reports it
//   committed,  feed, commit                    —           NOT_FOUND ("no such registration")
//   dropped
//
// and `pending_table`, the engine's pending registrations by id plus the tombstones of expired
// ones (an expired id answers DEADLINE_EXCEEDED once, then NOT_FOUND).
//
// Thread-safety: pending_registration's members may be called from any thread; each takes the
// registration's own mutex (lock order: the engine mutex, then this one; see engine_state.hpp). Plan
// work a Feed returns runs outside it. pending_table is not thread-safe: the engine mutex
// guards it.
//
// Ownership: a registration owns its plan (staging memory, buffers, region references) until
// Commit hands them to the catalogue or release() gives them back.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "registration/plans/plan.hpp"
#include "tensorreg/common/clock.hpp"
#include "tensorreg/common/error.hpp"
#include "tensorreg/regions/region_registry.hpp"
#include "tensorreg/registration/types.hpp"

namespace tensorreg::registration::detail {

enum class pending_phase { open, committing, committed, dropped };

/// "open", "committing", "committed" or "dropped".
[[nodiscard]] std::string_view pending_phase_name(pending_phase phase) noexcept;

/// How a commit ended, for finish_commit().
enum class commit_outcome {
  ok,         ///< published
  retryable,  ///< failed, but the client can fix it by feeding more: the registration stays open
  failed,     ///< failed for good: the registration is closed
};

/// What finish_commit() leaves the engine to do.
struct commit_end {
  bool stays_open = false;  ///< retryable: still in the pending table
  /// Revoke, owner death or expiry came while the commit ran: drop the registration (open) or
  /// undo what the commit published (closed).
  bool drop = false;
};

class pending_registration {
 public:
  pending_registration(registration_facts facts, std::uint32_t ttl_ms, std::optional<clock::time_point> expires,
                       std::unique_ptr<plan> p);

  pending_registration(const pending_registration&) = delete;
  pending_registration& operator=(const pending_registration&) = delete;

  [[nodiscard]] const registration_facts& facts() const noexcept { return facts_; }
  [[nodiscard]] const std::string& id() const noexcept { return facts_.id; }
  [[nodiscard]] std::int32_t owner_pid() const noexcept { return facts_.owner_pid; }
  [[nodiscard]] std::string_view plan_name() const noexcept { return plan_->name(); }

  [[nodiscard]] pending_phase phase() const;
  [[nodiscard]] std::uint32_t ttl_ms() const;
  [[nodiscard]] std::uint64_t epoch() const;
  /// Whether its TTL passed at `now`. A registration being committed never expires.
  [[nodiscard]] bool expired(clock::time_point now) const;

  /// Applies one Feed message: extends the TTL (every message is a keep-alive), then runs the
  /// plan's feed under the lock and the work it returns outside it.
  /// Errors: NOT_FOUND (committed or dropped), FAILED_PRECONDITION (being committed), the plan's.
  [[nodiscard]] status feed(feed_request request, const clock& time, regions::region_registry& regions);

  /// Extends the TTL; `ttl_ms` 0 keeps the current one. Errors: PERMISSION_DENIED (another owner).
  [[nodiscard]] status keep_alive(std::int32_t owner_pid, std::uint64_t epoch, std::uint32_t ttl_ms, const clock& time);

  /// open → committing, once every Feed copy has finished.
  /// Errors: NOT_FOUND (committed or dropped), FAILED_PRECONDITION (a commit is already running).
  [[nodiscard]] status begin_commit();
  /// The plan, for the commit that begin_commit() admitted. REQUIRES: phase committing.
  [[nodiscard]] plan& committing_plan();
  /// Set while committing once a drop is asked for, so that the commit stops early.
  [[nodiscard]] cancel_flag commit_cancel() const noexcept { return &cancel_; }
  /// committing → open (retryable) or committed. REQUIRES: phase committing.
  [[nodiscard]] commit_end finish_commit(commit_outcome outcome);

  /// open → dropped: returns true, and the caller removes it from the pending table and calls
  /// release(). While committing the drop is deferred to finish_commit(); closed: false.
  [[nodiscard]] bool request_drop();
  /// Waits for Feed copies to finish, then gives back what the plan holds.
  /// REQUIRES: phase committed or dropped.
  void release(regions::region_registry& regions);

 private:
  // The phase and the facts that qualify it, changed together under mutex_.
  struct phase_state {
    pending_phase phase = pending_phase::open;
    int feeding = 0;                 // Feed calls working outside the lock (chunk copies)
    bool drop_after_commit = false;  // a drop came while committing
  };

  const registration_facts facts_;
  const std::unique_ptr<plan> plan_;

  // Guards everything below and the plan's tables during Feed. Lock order: taken after the
  // engine mutex, never before it; the region registry's lock may be taken under it.
  mutable std::mutex mutex_;
  std::condition_variable idle_;  // signalled when state_.feeding drops to 0
  phase_state state_;
  std::atomic<bool> cancel_{false};  // read by the commit's workers without mutex_
  std::uint32_t ttl_ms_ = 0;
  std::optional<clock::time_point> expires_;
  std::uint64_t epoch_ = 0;
};

/// The engine's pending registrations and tombstones. Not thread-safe (the engine mutex),
/// except open_now().
class pending_table {
 public:
  /// How long an expired registration's id keeps answering DEADLINE_EXCEEDED rather than
  /// NOT_FOUND.
  static constexpr std::chrono::milliseconds tombstone_life{10 * 60 * 1000};

  void insert(std::shared_ptr<pending_registration> p);
  [[nodiscard]] std::shared_ptr<pending_registration> find(const std::string& id) const;
  void erase(const std::string& id);
  [[nodiscard]] std::vector<std::shared_ptr<pending_registration>> all() const;
  [[nodiscard]] std::size_t size() const noexcept { return by_id_.size(); }
  /// size() as of the last insert or erase, for threads without the engine mutex.
  [[nodiscard]] std::size_t open_now() const noexcept { return open_.load(std::memory_order_relaxed); }
  /// Pending registrations of `owner_pid`.
  [[nodiscard]] std::size_t count_of(std::int32_t owner_pid) const;

  /// Remembers that `id` expired at `now`.
  void bury(const std::string& id, clock::time_point now);
  /// Forgets the tombstone of `id`; returns whether there was one.
  bool unbury(const std::string& id);
  [[nodiscard]] bool buried(const std::string& id) const;
  /// Forgets tombstones older than tombstone_life.
  void forget_tombstones(clock::time_point now);

 private:
  std::unordered_map<std::string, std::shared_ptr<pending_registration>> by_id_;
  std::unordered_map<std::int32_t, std::size_t> per_owner_;  // entries of by_id_ by owner_pid
  std::unordered_map<std::string, clock::time_point> tombstones_;
  std::atomic<std::size_t> open_{0};  // by_id_.size(), mirrored
};

}  // namespace tensorreg::registration::detail
