// tensorreg/common/priority_inheriting_mutex.hpp — a mutex whose holder inherits the priority
// of the threads that wait for it.
//
// Provides `priority_inheriting_mutex`, a Lockable (std::lock_guard, std::unique_lock,
// std::scoped_lock) over a PTHREAD_PRIO_INHERIT pthread mutex. The daemon's I/O thread runs
// SCHED_FIFO and answers GetStats and KeepAlive itself; when it waits for a lock that a worker
// holds, the kernel runs that worker at the I/O thread's priority until it lets go, so the
// answer does not wait for every other busy thread on the worker's core. With an ordinary
// mutex a preempted holder is exactly such a wait (priority inversion). Uncontended lock and
// unlock stay in user space, as with std::mutex.
//
// Thread-safety: as std::mutex. Not usable with std::condition_variable (use
// std::condition_variable_any). Ownership: none; not copyable or movable.
#pragma once

#include <pthread.h>

#include <chrono>

namespace tensorreg {

class priority_inheriting_mutex {
 public:
  priority_inheriting_mutex();
  ~priority_inheriting_mutex();
  priority_inheriting_mutex(const priority_inheriting_mutex&) = delete;
  priority_inheriting_mutex& operator=(const priority_inheriting_mutex&) = delete;

  /// Throws std::system_error where std::mutex::lock would (EDEADLK: the caller holds it).
  void lock();
  [[nodiscard]] bool try_lock() noexcept;
  /// Waits at most `patience` (TimedLockable, for std::unique_lock::try_lock_for).
  [[nodiscard]] bool try_lock_for(std::chrono::nanoseconds patience) noexcept;
  void unlock() noexcept;

 private:
  pthread_mutex_t mutex_;
};

}  // namespace tensorreg
