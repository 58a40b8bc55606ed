#include "tensorreg/common/priority_inheriting_mutex.hpp"

#include <catch2/catch.hpp>

#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>

namespace {

using tensorreg::priority_inheriting_mutex;
using namespace std::chrono_literals;

pid_t this_thread_id() { return static_cast<pid_t>(syscall(SYS_gettid)); }

struct thread_sched_state {
  char state = '?';
  long priority = 0;  // the kernel's effective priority: 20 + nice, or -1 - the RT priority
};

// Fields 3 and 18 of /proc/self/task/<tid>/stat; field 2 (the name) may hold spaces, so the
// fields are counted from its closing parenthesis.
std::optional<thread_sched_state> read_sched_state(pid_t tid) {
  std::ifstream file("/proc/self/task/" + std::to_string(tid) + "/stat");
  std::string line;
  if (!std::getline(file, line)) return std::nullopt;
  const auto close = line.rfind(')');
  if (close == std::string::npos) return std::nullopt;
  std::istringstream rest(line.substr(close + 1));
  thread_sched_state out;
  std::string skip;
  rest >> out.state;
  for (int field = 4; field < 18; ++field) rest >> skip;
  rest >> out.priority;
  if (!rest) return std::nullopt;
  return out;
}

// A normal thread holds the mutex while a SCHED_FIFO-2 thread waits for it. Returns the
// holder's effective priority once the waiter sleeps in the lock (or once it changed), or
// nothing when this process may not use SCHED_FIFO.
template <class Mutex>
std::optional<long> holder_priority_while_fifo_waits() {
  Mutex mutex;
  std::atomic<pid_t> holder{0}, waiter{0};
  std::atomic<bool> release{false}, refused{false};

  std::thread low([&] {
    std::lock_guard lock(mutex);
    holder = this_thread_id();
    while (!release.load()) std::this_thread::sleep_for(1ms);
  });
  while (holder.load() == 0) std::this_thread::yield();
  const auto base = read_sched_state(holder.load());

  std::thread high([&] {
    sched_param param{};
    param.sched_priority = 2;
    if (pthread_setschedparam(pthread_self(), SCHED_FIFO, &param) != 0) {
      refused = true;
      waiter = -1;
      return;
    }
    waiter = this_thread_id();
    std::lock_guard lock(mutex);
  });
  while (waiter.load() == 0) std::this_thread::yield();

  std::optional<long> seen;
  for (auto until = std::chrono::steady_clock::now() + 5s; !refused.load() && std::chrono::steady_clock::now() < until;
       std::this_thread::sleep_for(1ms)) {
    const auto held = read_sched_state(holder.load());
    const auto waiting = read_sched_state(waiter.load());
    if (!held || !waiting) break;
    if ((base && held->priority != base->priority) || waiting->state == 'S') {
      seen = read_sched_state(holder.load())->priority;
      break;
    }
  }
  release = true;
  high.join();
  low.join();
  if (refused.load()) return std::nullopt;
  return seen;
}

}  // namespace

TEST_CASE("priority_inheriting_mutex: locks, excludes and tries as a mutex does", "[common][priority_mutex]") {
  priority_inheriting_mutex mutex;
  {
    std::lock_guard lock(mutex);
    std::atomic<bool> other_got_it{true};
    std::thread other([&] { other_got_it = mutex.try_lock(); });
    other.join();
    CHECK_FALSE(other_got_it.load());
  }
  REQUIRE(mutex.try_lock());
  mutex.unlock();

  std::uint64_t counter = 0;
  {
    std::jthread a([&] {
      for (int i = 0; i < 20000; ++i) {
        std::lock_guard lock(mutex);
        ++counter;
      }
    });
    std::jthread b([&] {
      for (int i = 0; i < 20000; ++i) {
        std::lock_guard lock(mutex);
        ++counter;
      }
    });
  }
  CHECK(counter == 40000);
}

TEST_CASE("priority_inheriting_mutex: the holder runs at the priority of a FIFO waiter",
          "[common][priority_mutex][concurrency]") {
  // An ordinary mutex leaves the holder at its normal priority (20 = nice 0) while the FIFO
  // thread sleeps: the inversion. The priority-inheriting one lifts it to FIFO 2 (-3).
  const auto plain = holder_priority_while_fifo_waits<std::mutex>();
  if (!plain) {
    WARN("skipped: this process may not use SCHED_FIFO");
    return;
  }
  CHECK(*plain == 20);
  const auto inheriting = holder_priority_while_fifo_waits<priority_inheriting_mutex>();
  REQUIRE(inheriting.has_value());
  CHECK(*inheriting == -3);
}

TEST_CASE("priority_inheriting_mutex: try_lock_for gives up on a held mutex and takes a free one",
          "[common][priority_mutex][concurrency]") {
  priority_inheriting_mutex m;
  std::atomic<bool> held{false};
  std::atomic<bool> done{false};
  std::thread holder([&] {
    std::lock_guard lock(m);
    held = true;
    while (!done) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  });
  while (!held) std::this_thread::yield();
  const auto asked = std::chrono::steady_clock::now();
  const bool got = m.try_lock_for(std::chrono::milliseconds(20));
  const auto waited = std::chrono::steady_clock::now() - asked;
  done = true;
  holder.join();
  CHECK_FALSE(got);
  CHECK(waited >= std::chrono::milliseconds(19));  // it waited its patience, then gave up
  REQUIRE(m.try_lock_for(std::chrono::milliseconds(20)));
  m.unlock();
}
