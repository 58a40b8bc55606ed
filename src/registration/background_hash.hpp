// src/registration/background_hash.hpp — the data hash of a CGID artifact, computed after its
// commit answered (registration.md §4.8; DECISIONS §5.19).
//
// Provides `background_hash`: one artifact's hash job, as its waiters, its cancellers and the
// job itself see it. Its life:
//
//   from       event                          to        notes
//   queued     start_reading()                reading   false (and nothing read) when cancelled
//   queued     request_cancel()               failed    the job finds it cancelled and reads nothing
//   reading    request_cancel()               reading   the job stops at its next leaf
//   reading    finish_reading()               read
//   read       settle(outcome)                done | failed   failed when a cancel came meanwhile
//   done       request_cancel()               done      the mi2 id stays known
//
// wait_stopped() returns once the job reads no more (never while it is `reading`): a lease that
// is revoked waits for it before its memory may go, so no byte of it is read after the revoke
// returns.
//
// Thread-safety: every member may be called from any thread. Its mutex is a leaf of the
// engine's lock order (docs/architecture.md §4): nothing is locked while holding it; settle()
// runs under the engine mutex. Ownership: shared by the artifact's catalogue entry, the job
// and its waiters.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>

#include "registration/materialize.hpp"
#include "tensorreg/registration/types.hpp"

namespace tensorreg::registration::detail {

class background_hash {
 public:
  explicit background_hash(std::string artifact_id) : artifact_id_(std::move(artifact_id)) {
    status_.state = hash_state::pending;
  }
  background_hash(const background_hash&) = delete;
  background_hash& operator=(const background_hash&) = delete;

  [[nodiscard]] const std::string& artifact_id() const noexcept { return artifact_id_; }
  /// Read by the hash between leaves.
  [[nodiscard]] cancel_flag flag() const noexcept { return &cancel_; }

  /// The job starts reading; false when it was cancelled first (it must read nothing then).
  [[nodiscard]] bool start_reading();
  /// The job reads no more (its hash returned, with or without a digest).
  void finish_reading();
  /// Records the job's outcome and wakes the waiters: `outcome` unless a cancel came first,
  /// then failed with the cancel's reason. Returns the state recorded.
  hash_state settle(hash_status outcome);

  /// Stops the job at its next leaf (a queued job never reads); a done hash stays done. Does not
  /// wait: call wait_stopped() with no engine lock held. `reason` becomes the failure message.
  void request_cancel(const std::string& reason);
  /// Returns once the job is not reading (at once when it never started or has finished).
  void wait_stopped();

  /// The state now.
  [[nodiscard]] hash_status status() const;
  /// Waits up to `timeout` (0 = no limit) for the hash to be done or failed; returns the state
  /// then (pending after a timeout).
  [[nodiscard]] hash_status wait(std::chrono::milliseconds timeout) const;

 private:
  const std::string artifact_id_;
  mutable std::mutex mutex_;  // a leaf
  mutable std::condition_variable changed_;
  hash_status status_;
  bool started_ = false;
  bool reading_ = false;
  std::string cancel_reason_;
  std::atomic<bool> cancel_{false};
};

}  // namespace tensorreg::registration::detail
