#include "tensorreg/common/thread_pool.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <optional>
#include <stop_token>
#include <thread>
#include <unordered_map>
#include <vector>

namespace tensorreg {
namespace {

// The owner that work queued from this thread is charged to, and the pool this thread works
// for (null outside every pool): a worker that calls parallel_for must run indices itself,
// or a pool whose workers all wait on their own nested loops would deadlock.
thread_local work_owner current_owner_of_thread = 0;
thread_local const void* pool_of_thread = nullptr;

struct owned_job {
  work_owner owner;
  std::function<void()> run;
};

// Shared by the caller and its helper jobs. Helpers hold it by shared_ptr because a helper
// may be dequeued only after parallel_for has returned (the pool was busy); such a late
// helper finds no index left and touches nothing but this block — never `fn`.
struct loop_state {
  loop_state(std::size_t n, function_ref<status(std::size_t)> f) : count(n), fn(f) {}

  const std::size_t count;
  const function_ref<status(std::size_t)> fn;

  std::mutex mutex;
  std::condition_variable idle;
  std::size_t next = 0;                // guarded by mutex
  bool stopped = false;                // guarded by mutex
  unsigned running = 0;                // calls of fn in progress; guarded by mutex
  std::optional<error> first_error;    // guarded by mutex
  std::exception_ptr first_exception;  // guarded by mutex

  // Claims the next index, or nothing once every index is claimed or the loop stopped.
  std::optional<std::size_t> claim() {
    std::lock_guard lock(mutex);
    if (stopped || next >= count) return std::nullopt;
    ++running;
    return next++;
  }

  // Runs one claimed index and records how it ended. Returns whether indices are left.
  bool run(std::size_t i) {
    std::optional<error> failed;
    std::exception_ptr thrown;
    try {
      if (auto st = fn(i); !st) failed = std::move(st).error();
    } catch (...) {
      thrown = std::current_exception();
    }
    bool more = false;
    {
      std::lock_guard lock(mutex);
      --running;
      if ((failed || thrown) && !first_error && !first_exception) {
        if (failed) first_error = std::move(failed);
        if (thrown) first_exception = thrown;
      }
      if (failed || thrown) stopped = true;
      more = !stopped && next < count;
    }
    idle.notify_all();
    return more;
  }

  bool finished_locked() const { return running == 0 && (stopped || next >= count); }
};

}  // namespace

struct thread_pool::impl {
  bool callers_help = true;
  mutable std::mutex mutex;
  std::condition_variable_any wake;
  // One FIFO per owner with queued work, and the owners with queued work in the order they are
  // served: the front owner's oldest job runs next, then that owner goes to the back.
  std::unordered_map<work_owner, std::deque<std::function<void()>>> queues;  // guarded by mutex
  std::deque<work_owner> turns;                                              // guarded by mutex
  std::size_t queued = 0;                                                    // guarded by mutex
  std::vector<std::jthread> workers;

  void run(std::stop_token stop, int nice) {
    pool_of_thread = this;
    if (nice != 0) {
      // Best effort: a worker left at the default priority only shares the cores less kindly.
      errno = 0;
      const int now = ::getpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()));
      if (errno == 0) (void)::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), now + nice);
    }
    for (;;) {
      owned_job job;
      {
        std::unique_lock lock(mutex);
        // Stop is honoured only once the queues are drained, so submitted jobs always run.
        wake.wait(lock, stop, [&] { return !turns.empty(); });
        if (turns.empty()) return;  // stop requested and nothing left
        job = pop_locked();
      }
      current_owner_of_thread = job.owner;
      job.run();
      current_owner_of_thread = 0;
    }
  }

  owned_job pop_locked() {
    const work_owner owner = turns.front();
    turns.pop_front();
    auto it = queues.find(owner);
    owned_job job{owner, std::move(it->second.front())};
    it->second.pop_front();
    --queued;
    if (it->second.empty()) {
      queues.erase(it);
    } else {
      turns.push_back(owner);
    }
    return job;
  }

  void push(work_owner owner, std::function<void()> job) {
    {
      std::lock_guard lock(mutex);
      auto& queue = queues[owner];
      if (queue.empty()) turns.push_back(owner);
      queue.push_back(std::move(job));
      ++queued;
    }
    wake.notify_one();
  }

  // One helper's turn: runs a single index, then queues itself again behind the other owners'
  // work while indices are left (one index per turn is what makes the round-robin fair).
  void helper_turn(work_owner owner, const std::shared_ptr<loop_state>& state) {
    const auto i = state->claim();
    if (!i) return;
    if (state->run(*i)) push(owner, [this, owner, state] { helper_turn(owner, state); });
  }
};

thread_pool::thread_pool(unsigned threads) : thread_pool(thread_pool_options{threads, true}) {}

thread_pool::thread_pool(thread_pool_options options) : impl_(std::make_unique<impl>()) {
  impl_->callers_help = options.callers_help;
  impl_->workers.reserve(options.threads);
  for (unsigned i = 0; i < options.threads; ++i) {
    impl_->workers.emplace_back(
        [state = impl_.get(), nice = options.nice](std::stop_token stop) { state->run(stop, nice); });
  }
}

thread_pool::~thread_pool() {
  for (auto& worker : impl_->workers) worker.request_stop();
  impl_->wake.notify_all();
  impl_->workers.clear();  // joins
}

thread_pool::owner_scope::owner_scope(work_owner owner) noexcept : previous_(current_owner_of_thread) {
  current_owner_of_thread = owner;
}

thread_pool::owner_scope::~owner_scope() { current_owner_of_thread = previous_; }

work_owner thread_pool::current_owner() noexcept { return current_owner_of_thread; }

unsigned thread_pool::size() const noexcept { return static_cast<unsigned>(impl_->workers.size()); }

bool thread_pool::callers_help() const noexcept { return impl_->callers_help; }

unsigned thread_pool::concurrency() const noexcept { return size() + (callers_help() ? 1 : 0); }

std::size_t thread_pool::queued() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->queued;
}

void thread_pool::submit(std::function<void()> job) {
  if (impl_->workers.empty()) {
    job();
    return;
  }
  impl_->push(current_owner_of_thread, std::move(job));
}

status thread_pool::parallel_for(std::size_t count, function_ref<status(std::size_t)> fn) {
  if (count == 0) return {};
  // Inside one of our own workers the caller must help, or nested loops could deadlock.
  const bool caller_helps = impl_->callers_help || pool_of_thread == impl_.get();
  const std::size_t workers = impl_->workers.size();
  const std::size_t helpers = std::min<std::size_t>(workers, caller_helps ? count - 1 : count);
  if (helpers == 0) {
    for (std::size_t i = 0; i < count; ++i) TENSORREG_TRY(fn(i));
    return {};
  }

  auto state = std::make_shared<loop_state>(count, fn);
  const work_owner owner = current_owner_of_thread;
  impl* pool = impl_.get();
  for (std::size_t h = 0; h < helpers; ++h) {
    pool->push(owner, [pool, owner, state] { pool->helper_turn(owner, state); });
  }

  if (caller_helps) {
    while (auto i = state->claim()) {
      if (!state->run(*i)) break;
    }
  }

  std::unique_lock lock(state->mutex);
  state->idle.wait(lock, [&] { return state->finished_locked(); });
  if (state->first_exception) std::rethrow_exception(state->first_exception);
  if (state->first_error) return tl::unexpected(std::move(*state->first_error));
  return {};
}

}  // namespace tensorreg
