// tensorreg/common/thread_pool.hpp — a fixed-size pool of worker threads shared fairly by owners.
//
// Provides `thread_pool`: `parallel_for` (fork-join over an index range) and `submit`
// (fire-and-forget jobs). Used by hashing and copying to spread 4 MiB leaves over cores;
// results never depend on the number of threads.
//
// Fairness: every job and every index of a parallel_for belongs to an owner (a `work_owner`,
// e.g. the pid of the client whose commit it is), taken from the `owner_scope` of the thread
// that queues it (0 when none). Each owner has a FIFO queue and the workers serve the owners
// round-robin, one index of a parallel_for at a time, so a client hashing 16 GiB delays another
// client's 4 MiB by a few indices, not by its whole loop. Work queued from a pool thread keeps
// the owner of the job that queues it.
//
// Callers: by default the caller of parallel_for also runs indices itself, outside the queues.
// A pool built with `callers_help = false` leaves every index to its workers (the caller only
// waits), so that the owners' shares hold however many threads call in; a caller that is itself
// one of the pool's workers still runs indices itself, so nesting cannot deadlock.
//
// Thread-safety: every member function may be called concurrently from any number of
// threads, including from inside a job running on the pool. `owner_scope` is per thread.
// Ownership: the pool owns its threads. The destructor runs the jobs already submitted, then
// joins; it must not be called from one of the pool's own threads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

#include "tensorreg/common/error.hpp"
#include "tensorreg/common/function_ref.hpp"

namespace tensorreg {

/// Whose work a job is; the pool shares its workers round-robin between owners. 0 = no owner.
using work_owner = std::uint64_t;

struct thread_pool_options {
  unsigned threads = 0;
  /// Whether the caller of parallel_for runs indices itself (see the header comment).
  bool callers_help = true;
  /// Added to each worker's nice value (Linux: per thread; raising it needs no privilege), so
  /// that bulk work yields the cores to latency-sensitive threads; 0 = unchanged.
  int nice = 0;
};

class thread_pool {
 public:
  /// Starts `threads` worker threads. Zero is allowed: parallel_for then runs on the caller
  /// alone and submit() runs the job on the caller before returning.
  explicit thread_pool(unsigned threads);
  explicit thread_pool(thread_pool_options options);
  ~thread_pool();

  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;
  thread_pool(thread_pool&&) = delete;
  thread_pool& operator=(thread_pool&&) = delete;

  /// Sets the owner of the work this thread queues (parallel_for, submit) until destroyed,
  /// then restores the previous one. Scopes nest; they are not shared between threads.
  class owner_scope {
   public:
    explicit owner_scope(work_owner owner) noexcept;
    ~owner_scope();
    owner_scope(const owner_scope&) = delete;
    owner_scope& operator=(const owner_scope&) = delete;

   private:
    work_owner previous_;
  };

  /// The owner this thread's work is queued under now.
  [[nodiscard]] static work_owner current_owner() noexcept;

  /// Number of worker threads (not counting callers of parallel_for).
  [[nodiscard]] unsigned size() const noexcept;

  /// Whether callers of parallel_for run indices themselves (pool_options::callers_help): how
  /// many indices can run at once is size() plus one per such caller.
  [[nodiscard]] bool callers_help() const noexcept;

  /// How many indices of one parallel_for can run at once: size(), plus the caller where
  /// callers_help().
  [[nodiscard]] unsigned concurrency() const noexcept;

  /// Jobs queued and not yet started, of every owner (each parallel_for queues up to size()
  /// helper turns). A snapshot, for tests and statistics.
  [[nodiscard]] std::size_t queued() const;

  /// Runs fn(0) … fn(count - 1), spread over the workers (and the calling thread, see
  /// callers_help), and returns when every started call has returned. Indices are handed out
  /// in increasing order, one at a time; there is no ordering between calls. Once a call
  /// returns a non-OK status the loop stops (calls already running finish; no index starts
  /// after the stop is recorded) and that status is returned. An exception thrown by fn stops
  /// the loop the same way and is rethrown here once the other calls have returned.
  /// `fn` must stay valid until parallel_for returns (it is a function_ref).
  /// Errors: the first error returned by fn.
  [[nodiscard]] status parallel_for(std::size_t count, function_ref<status(std::size_t)> fn);

  /// Queues `job` to run once on some worker, under this thread's owner, and returns at once
  /// (with size() == 0 it runs here, before returning). Jobs must not throw: a throwing job
  /// terminates the process, as an exception leaving a std::thread does.
  void submit(std::function<void()> job);

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace tensorreg
