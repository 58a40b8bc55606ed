#include "request_pool.hpp"

#include <pthread.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <stdexcept>
#include <string>

namespace tensorreg::daemon {
namespace {

// Blocks the asynchronous signals in the calling thread for its lifetime, so that threads it
// starts inherit the mask. Faults stay deliverable: a blocked SIGBUS from a fault kills the
// process instead of reaching the handler.
class async_signals_blocked {
 public:
  async_signals_blocked() {
    sigset_t all;
    ::sigfillset(&all);
    for (int sig : {SIGBUS, SIGSEGV, SIGFPE, SIGILL, SIGTRAP, SIGSYS, SIGABRT}) ::sigdelset(&all, sig);
    ::pthread_sigmask(SIG_BLOCK, &all, &old_);
  }
  ~async_signals_blocked() { ::pthread_sigmask(SIG_SETMASK, &old_, nullptr); }
  async_signals_blocked(const async_signals_blocked&) = delete;
  async_signals_blocked& operator=(const async_signals_blocked&) = delete;

 private:
  sigset_t old_{};
};

}  // namespace

request_pool::request_pool(unsigned threads) {
  if (::sem_init(&ready_, 0, 0) != 0) throw std::runtime_error(std::string("sem_init: ") + std::strerror(errno));
  const async_signals_blocked blocked;
  threads_.reserve(std::max(1u, threads));
  for (unsigned i = 0; i < std::max(1u, threads); ++i) threads_.emplace_back([this] { work(); });
}

request_pool::~request_pool() {
  join();
  // Posted after the workers ended (by a thread that is not one of them): never run, but freed.
  while (job* j = take()) delete j;
  ::sem_destroy(&ready_);
}

void request_pool::push(job* j) noexcept {
  j->next = inbox_.load(std::memory_order_relaxed);
  while (!inbox_.compare_exchange_weak(j->next, j, std::memory_order_release, std::memory_order_relaxed)) {
  }
  ::sem_post(&ready_);
}

request_pool::job* request_pool::take() {
  const std::lock_guard lock(taken_mutex_);
  if (taken_ == nullptr) {
    // The inbox is newest first: reversed, it queues oldest first.
    job* newest = inbox_.exchange(nullptr, std::memory_order_acquire);
    while (newest != nullptr) {
      job* next = newest->next;
      newest->next = taken_;
      taken_ = newest;
      newest = next;
    }
  }
  job* oldest = taken_;
  if (oldest != nullptr) taken_ = oldest->next;
  return oldest;
}

void request_pool::work() {
  for (;;) {
    while (::sem_wait(&ready_) != 0) {
      // EINTR only: the semaphore is valid until every worker has returned.
    }
    // Every job posted one token; join() posts one per worker. A token that finds no job is
    // join()'s, and by then every job's own token has been or will be taken by a worker that
    // runs it, so this worker may end.
    std::unique_ptr<job> next(take());
    if (next) {
      next->run();
      continue;
    }
    if (joining_.load(std::memory_order_acquire)) return;
  }
}

void request_pool::join() {
  if (joining_.exchange(true, std::memory_order_acq_rel)) return;
  for (std::size_t i = 0; i < threads_.size(); ++i) ::sem_post(&ready_);
  for (auto& t : threads_) t.join();
}

}  // namespace tensorreg::daemon
