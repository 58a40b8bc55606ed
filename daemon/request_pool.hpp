// daemon/request_pool.hpp — the threads that handle requests, fed by the I/O thread without a
// lock.
//
// Provides `request_pool`: post() hands a job to one of a fixed set of worker threads; jobs start
// in the order posted.
//
// Why not asio::thread_pool: its queue is one mutex, which its workers take to dequeue and to
// sleep. The I/O thread runs SCHED_FIFO and posts every request that is not immediate; when a
// worker holding that mutex is preempted by another fair-share thread, the I/O thread sleeps on
// it until the holder gets a core again, often milliseconds, and every client's frames wait with
// it. post() here takes no lock: it pushes onto a lock-free stack and posts a semaphore (neither
// can wait for another thread). The workers take the stack whole, under a lock only they use,
// and run its jobs oldest first.
//
// Thread-safety: post() from any thread, workers included. join() once, from a thread that is
// not a worker. Ownership: the pool owns its threads and the jobs not yet run; the destructor
// joins.
#pragma once

#include <semaphore.h>

#include <atomic>
#include <cstddef>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace tensorreg::daemon {

class request_pool {
 public:
  /// Starts `threads` workers (at least one). They block the asynchronous signals (SIGINT,
  /// SIGTERM, ...), which the I/O thread handles, and keep the synchronous ones (SIGBUS of a
  /// guarded read of client memory must reach the thread that faulted).
  explicit request_pool(unsigned threads);
  ~request_pool();

  request_pool(const request_pool&) = delete;
  request_pool& operator=(const request_pool&) = delete;
  request_pool(request_pool&&) = delete;
  request_pool& operator=(request_pool&&) = delete;

  /// Queues `fn()` (void(), move-only allowed). Never waits for a worker.
  template <typename F>
  void post(F fn) {
    push(std::make_unique<job_of<F>>(std::move(fn)).release());
  }

  /// Runs every job posted before it and every job those post, then ends the workers. Jobs
  /// posted later are never run; the destructor frees them.
  void join();

  [[nodiscard]] std::size_t size() const noexcept { return threads_.size(); }

 private:
  struct job {
    virtual ~job() = default;
    virtual void run() = 0;
    job* next = nullptr;
  };
  template <typename F>
  struct job_of final : job {
    explicit job_of(F fn) : f(std::move(fn)) {}
    void run() override { f(); }
    F f;
  };

  void push(job* j) noexcept;
  job* take();  // the oldest job, or nullptr
  void work();

  std::atomic<job*> inbox_{nullptr};  // posted and not yet taken, newest first
  std::mutex taken_mutex_;            // the workers' own lock; post() never takes it
  job* taken_ = nullptr;              // guarded by taken_mutex_: taken from the inbox, oldest first
  sem_t ready_;                       // one post per job, and one per worker at join()
  std::atomic<bool> joining_{false};
  std::vector<std::thread> threads_;
};

}  // namespace tensorreg::daemon
