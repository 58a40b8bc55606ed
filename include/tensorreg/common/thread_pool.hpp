// tensorreg/common/thread_pool.hpp — a fixed-size pool of worker threads.
//
// Provides `thread_pool`: `parallel_for` (fork-join over an index range, the calling thread
// takes part) and `submit` (fire-and-forget jobs). Used by hashing to spread 4 MiB leaves over
// cores; results never depend on the number of threads.
//
// Thread-safety: every member function may be called concurrently from any number of
// threads, including from inside a job running on the pool (the caller of parallel_for always
// makes progress itself, so nesting cannot deadlock).
// Ownership: the pool owns its threads. The destructor runs the jobs already submitted, then
// joins; it must not be called from one of the pool's own threads.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>

#include "tensorreg/common/error.hpp"
#include "tensorreg/common/function_ref.hpp"

namespace tensorreg {

class thread_pool {
 public:
  /// Starts `threads` worker threads. Zero is allowed: parallel_for then runs on the caller
  /// alone and submit() runs the job on the caller before returning.
  explicit thread_pool(unsigned threads);
  ~thread_pool();

  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;
  thread_pool(thread_pool&&) = delete;
  thread_pool& operator=(thread_pool&&) = delete;

  /// Number of worker threads (not counting callers of parallel_for).
  [[nodiscard]] unsigned size() const noexcept;

  /// Runs fn(0) … fn(count - 1), spread over the workers and the calling thread, and returns
  /// when every started call has returned. Indices are handed out in increasing order, one
  /// at a time; there is no ordering between calls. Once a call returns a non-OK status the
  /// loop stops (calls already running finish; a thread racing the stop may start at most one
  /// more index) and that status is returned. An exception thrown by fn stops the loop
  /// the same way and is rethrown here once the other calls have returned.
  /// `fn` must stay valid until parallel_for returns (it is a function_ref).
  /// Errors: the first error returned by fn.
  [[nodiscard]] status parallel_for(std::size_t count, function_ref<status(std::size_t)> fn);

  /// Queues `job` to run once on some worker and returns at once (with size() == 0 it runs
  /// here, before returning). Jobs must not throw: a throwing job terminates the process, as
  /// an exception leaving a std::thread does.
  void submit(std::function<void()> job);

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace tensorreg
