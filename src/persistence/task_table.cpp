#include "tensorreg/persistence/task_table.hpp"

#include <algorithm>

#include "tensorreg/common/random.hpp"

namespace tensorreg::persistence {

std::string_view task_state_name(task_state state) noexcept {
  switch (state) {
    case task_state::pending: return "PENDING";
    case task_state::running: return "RUNNING";
    case task_state::degraded: return "DEGRADED";
    case task_state::success: return "SUCCESS";
    case task_state::failed: return "FAILED";
  }
  return "UNSPECIFIED";
}

task_table::started task_table::start(const std::string& artifact_id) {
  std::lock_guard lock(mutex_);
  if (auto it = newest_.find(artifact_id); it != newest_.end()) {
    auto task = tasks_.find(it->second);
    if (task != tasks_.end() && !is_terminal(task->second.state)) return {task->second, false};
  }
  task_status s;
  // Unique within this daemon's life and unguessable across restarts.
  s.task_id = "persist_" + std::to_string(next_++) + "_" + random_hex(6);
  s.plan_id = "local-disk";  // one unsharded copy in --persist-dir
  s.artifact_id = artifact_id;
  tasks_[s.task_id] = s;
  newest_[artifact_id] = s.task_id;
  return {s, true};
}

task_status task_table::record_done(const std::string& artifact_id) {
  auto s = start(artifact_id);
  if (s.created) {
    finish(s.status.task_id, task_state::success);
    s.status.state = task_state::success;
    s.status.progress = 1.0;
  }
  return s.status;
}

void task_table::set_running(const std::string& task_id) {
  {
    std::lock_guard lock(mutex_);
    auto it = tasks_.find(task_id);
    if (it == tasks_.end() || it->second.state != task_state::pending) return;
    it->second.state = task_state::running;
  }
  changed_.notify_all();
}

void task_table::set_progress(const std::string& task_id, double progress) {
  std::lock_guard lock(mutex_);
  auto it = tasks_.find(task_id);
  if (it == tasks_.end() || is_terminal(it->second.state)) return;
  it->second.progress = std::clamp(progress, 0.0, 1.0);
}

void task_table::finish(const std::string& task_id, task_state state, std::string reason) {
  {
    std::lock_guard lock(mutex_);
    auto it = tasks_.find(task_id);
    if (it == tasks_.end() || is_terminal(it->second.state)) return;
    auto& t = it->second;
    t.state = is_terminal(state) ? state : task_state::failed;
    if (t.state == task_state::success) t.progress = 1.0;
    if (t.state == task_state::degraded)
      t.degraded_reason = std::move(reason);
    else if (t.state == task_state::failed)
      t.last_error = std::move(reason);
    finished_.push_back(task_id);
    forget_old_locked();
  }
  changed_.notify_all();
}

void task_table::forget_old_locked() {
  while (finished_.size() > finished_limit_) {
    const auto id = finished_.front();
    finished_.pop_front();
    auto it = tasks_.find(id);
    if (it == tasks_.end()) continue;
    auto newest = newest_.find(it->second.artifact_id);
    if (newest != newest_.end() && newest->second == id) newest_.erase(newest);
    tasks_.erase(it);
  }
}

result<task_status> task_table::find(const std::string& task_id) const {
  std::lock_guard lock(mutex_);
  auto it = tasks_.find(task_id);
  if (it == tasks_.end()) return fail(errc::not_found, "cannot find persistence task '" + task_id + "': no such task");
  return it->second;
}

result<task_status> task_table::newest_of(const std::string& artifact_id) const {
  std::lock_guard lock(mutex_);
  auto it = newest_.find(artifact_id);
  if (it == newest_.end()) {
    return fail(errc::not_found, "cannot find a persistence task of " + artifact_id + ": none was started");
  }
  return tasks_.at(it->second);
}

result<task_status> task_table::wait(const std::string& task_id, std::chrono::milliseconds timeout) const {
  std::unique_lock lock(mutex_);
  auto terminal = [&] {
    auto it = tasks_.find(task_id);
    return it == tasks_.end() || is_terminal(it->second.state);
  };
  if (timeout.count() == 0) {
    changed_.wait(lock, terminal);
  } else {
    changed_.wait_for(lock, timeout, terminal);
  }
  auto it = tasks_.find(task_id);
  if (it == tasks_.end())
    return fail(errc::not_found, "cannot wait for persistence task '" + task_id + "': no such task");
  return it->second;
}

}  // namespace tensorreg::persistence
