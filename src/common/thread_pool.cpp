#include "tensorreg/common/thread_pool.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <optional>
#include <stop_token>
#include <thread>
#include <vector>

namespace tensorreg {

struct thread_pool::impl {
  std::mutex mutex;
  std::condition_variable_any wake;
  std::deque<std::function<void()>> jobs;  // guarded by mutex
  std::vector<std::jthread> workers;

  void run(std::stop_token stop) {
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock lock(mutex);
        // Stop is honoured only once the queue is drained, so submitted jobs always run.
        wake.wait(lock, stop, [&] { return !jobs.empty(); });
        if (jobs.empty()) return;  // stop requested and nothing left
        job = std::move(jobs.front());
        jobs.pop_front();
      }
      job();
    }
  }

  void push(std::function<void()> job) {
    {
      std::lock_guard lock(mutex);
      jobs.push_back(std::move(job));
    }
    wake.notify_one();
  }
};

thread_pool::thread_pool(unsigned threads) : impl_(std::make_unique<impl>()) {
  impl_->workers.reserve(threads);
  for (unsigned i = 0; i < threads; ++i) {
    impl_->workers.emplace_back([state = impl_.get()](std::stop_token stop) { state->run(stop); });
  }
}

thread_pool::~thread_pool() {
  for (auto& worker : impl_->workers) worker.request_stop();
  impl_->wake.notify_all();
  impl_->workers.clear();  // joins
}

unsigned thread_pool::size() const noexcept { return static_cast<unsigned>(impl_->workers.size()); }

void thread_pool::submit(std::function<void()> job) {
  if (impl_->workers.empty()) {
    job();
    return;
  }
  impl_->push(std::move(job));
}

namespace {

// Shared by the caller and its helper jobs. Helpers hold it by shared_ptr because a helper
// may be dequeued only after parallel_for has returned (the pool was busy); such a late
// helper finds no index left and touches nothing but this block — never `fn`.
struct loop_state {
  loop_state(std::size_t n, function_ref<status(std::size_t)> f) : count(n), fn(f) {}

  const std::size_t count;
  const function_ref<status(std::size_t)> fn;
  std::atomic<std::size_t> next{0};
  std::atomic<bool> stopped{false};

  std::mutex mutex;
  std::condition_variable idle;
  unsigned active = 0;                 // helpers inside work(); guarded by mutex
  std::optional<error> first_error;    // guarded by mutex
  std::exception_ptr first_exception;  // guarded by mutex

  void record(error e) {
    std::lock_guard lock(mutex);
    if (!first_error && !first_exception) first_error = std::move(e);
    stopped.store(true);
  }

  void record(std::exception_ptr e) {
    std::lock_guard lock(mutex);
    if (!first_error && !first_exception) first_exception = std::move(e);
    stopped.store(true);
  }

  // Claims indices until none is left or the loop stopped.
  void work() {
    while (!stopped.load(std::memory_order_relaxed)) {
      const std::size_t i = next.fetch_add(1);
      if (i >= count) return;
      try {
        auto st = fn(i);
        if (!st) {
          record(std::move(st).error());
          return;
        }
      } catch (...) {
        record(std::current_exception());
        return;
      }
    }
  }
};

}  // namespace

status thread_pool::parallel_for(std::size_t count, function_ref<status(std::size_t)> fn) {
  if (count == 0) return {};
  const std::size_t helpers = std::min<std::size_t>(impl_->workers.size(), count - 1);
  if (helpers == 0) {
    for (std::size_t i = 0; i < count; ++i) TENSORREG_TRY(fn(i));
    return {};
  }

  auto state = std::make_shared<loop_state>(count, fn);
  for (std::size_t h = 0; h < helpers; ++h) {
    impl_->push([state] {
      {
        std::lock_guard lock(state->mutex);
        // Checked under the mutex: once the caller has seen active == 0 after finishing its
        // own loop, every index is claimed or the loop stopped, so we would find no work.
        if (state->stopped.load() || state->next.load() >= state->count) return;
        ++state->active;
      }
      state->work();
      {
        std::lock_guard lock(state->mutex);
        --state->active;
      }
      state->idle.notify_all();
    });
  }

  state->work();

  std::unique_lock lock(state->mutex);
  state->idle.wait(lock, [&] { return state->active == 0; });
  if (state->first_exception) std::rethrow_exception(state->first_exception);
  if (state->first_error) return tl::unexpected(std::move(*state->first_error));
  return {};
}

}  // namespace tensorreg
