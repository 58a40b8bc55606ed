// tensorreg/persistence/task_table.hpp — the persistence tasks of StartPersistence
// (registration.md §1.6): their ids, states and progress, and waiting for them.
//
// A task's state moves PENDING → RUNNING → SUCCESS | FAILED | DEGRADED and never back; a task
// that reached one of the last three is terminal. One artifact has at most one live (pending or
// running) task: starting it again answers that task. The table keeps every live task and the
// newest `finished_limit` terminal ones (older terminal tasks are forgotten: NOT_FOUND).
//
// Thread-safety: every member function may be called from any number of threads at once; one
// mutex guards the table (a leaf: nothing else is locked under it), and wait() blocks on a
// condition variable with it released.
//
// Ownership: the table owns its tasks; answers are copies.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <string>

#include "tensorreg/common/error.hpp"

namespace tensorreg::persistence {

/// PersistenceState; the numbers are the wire's.
enum class task_state : std::int32_t { pending = 1, running = 2, degraded = 3, success = 4, failed = 5 };

/// "PENDING", "RUNNING", "DEGRADED", "SUCCESS" or "FAILED".
[[nodiscard]] std::string_view task_state_name(task_state state) noexcept;
[[nodiscard]] constexpr bool is_terminal(task_state s) noexcept {
  return s != task_state::pending && s != task_state::running;
}

/// What QueryPersistenceStatus answers about one task.
struct task_status {
  std::string task_id;
  std::string plan_id;
  std::string artifact_id;
  task_state state = task_state::pending;
  double progress = 0.0;  ///< 0.0 .. 1.0
  std::string degraded_reason;
  std::string last_error;  ///< set when FAILED: the code's name and the message
};

class task_table {
 public:
  explicit task_table(std::size_t finished_limit = 4096) : finished_limit_(finished_limit) {}

  /// The artifact's live task if it has one (`created` false), else a new PENDING task.
  struct started {
    task_status status;
    bool created = false;
  };
  [[nodiscard]] started start(const std::string& artifact_id);
  /// A new task that is already SUCCESS (the artifact was persisted before).
  [[nodiscard]] task_status record_done(const std::string& artifact_id);

  void set_running(const std::string& task_id);
  /// Progress of a running task, clamped to [0, 1].
  void set_progress(const std::string& task_id, double progress);
  /// Ends a task: SUCCESS, DEGRADED (with `reason`) or FAILED (with `reason` as last_error).
  void finish(const std::string& task_id, task_state state, std::string reason = {});

  /// Errors: NOT_FOUND (unknown or forgotten task).
  [[nodiscard]] result<task_status> find(const std::string& task_id) const;
  /// The newest task of an artifact. Errors: NOT_FOUND.
  [[nodiscard]] result<task_status> newest_of(const std::string& artifact_id) const;
  /// Waits until the task is terminal or `timeout` passes (zero: until terminal), and answers
  /// its status then. Errors: NOT_FOUND.
  [[nodiscard]] result<task_status> wait(const std::string& task_id, std::chrono::milliseconds timeout) const;

 private:
  void forget_old_locked();

  const std::size_t finished_limit_;
  mutable std::mutex mutex_;
  mutable std::condition_variable changed_;
  std::uint64_t next_ = 1;
  std::map<std::string, task_status> tasks_;   // by task id
  std::map<std::string, std::string> newest_;  // artifact id → its newest task id
  std::deque<std::string> finished_;           // terminal task ids, oldest first
};

}  // namespace tensorreg::persistence
