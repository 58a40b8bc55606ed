#include "tensorreg/common/thread_pool.hpp"

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <latch>
#include <mutex>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using tensorreg::errc;
using tensorreg::fail;
using tensorreg::status;
using tensorreg::thread_pool;
using tensorreg::thread_pool_options;
using tensorreg::work_owner;

}  // namespace

TEST_CASE("thread_pool: parallel_for runs every index exactly once", "[common][thread_pool]") {
  for (const unsigned threads : {0U, 1U, 3U, 8U}) {
    thread_pool pool(threads);
    CHECK(pool.size() == threads);
    for (const std::size_t count : {0UL, 1UL, 2UL, 7UL, 1000UL}) {
      std::vector<std::atomic<int>> hits(count);
      const auto st = pool.parallel_for(count, [&](std::size_t i) -> status {
        ++hits[i];
        return {};
      });
      REQUIRE(st.has_value());
      for (std::size_t i = 0; i < count; ++i) CHECK(hits[i] == 1);
    }
  }
}

TEST_CASE("thread_pool: it tells whether callers run indices too", "[common][thread_pool]") {
  thread_pool helped(2);
  CHECK(helped.callers_help());
  thread_pool waiting(thread_pool_options{2, false, 0});
  CHECK_FALSE(waiting.callers_help());
  CHECK(waiting.size() == 2);
}

TEST_CASE("thread_pool: work spreads over the workers and the caller", "[common][thread_pool]") {
  thread_pool pool(3);
  std::latch all_in(4);  // every index blocks until four threads hold one: needs 3 workers + caller
  std::mutex mutex;
  std::set<std::thread::id> seen;
  const auto st = pool.parallel_for(4, [&](std::size_t) -> status {
    {
      std::lock_guard lock(mutex);
      seen.insert(std::this_thread::get_id());
    }
    all_in.arrive_and_wait();
    return {};
  });
  REQUIRE(st.has_value());
  CHECK(seen.size() == 4);
  CHECK(seen.count(std::this_thread::get_id()) == 1);
}

TEST_CASE("thread_pool: the first error stops new indices and is returned", "[common][thread_pool]") {
  thread_pool pool(4);
  std::atomic<std::size_t> ran{0};
  const auto st = pool.parallel_for(100000, [&](std::size_t i) -> status {
    ++ran;
    if (i == 10) return fail(errc::data_loss, "cannot hash leaf 10: corrupt");
    return {};
  });
  REQUIRE_FALSE(st.has_value());
  CHECK(st.error().code == errc::data_loss);
  CHECK(st.error().message == "cannot hash leaf 10: corrupt");
  CHECK(ran < 100000);

  // With no workers the caller stops at the error too.
  thread_pool none(0);
  std::size_t serial = 0;
  const auto st0 = none.parallel_for(50, [&](std::size_t i) -> status {
    ++serial;
    if (i == 5) return fail(errc::internal, "cannot go on: index 5");
    return {};
  });
  REQUIRE_FALSE(st0.has_value());
  CHECK(st0.error().message == "cannot go on: index 5");
  CHECK(serial == 6);
}

TEST_CASE("thread_pool: an exception is rethrown on the caller after the others finish", "[common][thread_pool]") {
  thread_pool pool(2);
  std::atomic<int> in_flight{0};
  CHECK_THROWS_WITH(pool.parallel_for(64,
                                      [&](std::size_t i) -> status {
                                        ++in_flight;
                                        std::this_thread::sleep_for(std::chrono::microseconds(200));
                                        --in_flight;
                                        if (i == 3) throw std::runtime_error("boom at 3");
                                        return {};
                                      }),
                    "boom at 3");
  CHECK(in_flight == 0);
}

TEST_CASE("thread_pool: concurrent and nested parallel_for calls complete", "[common][thread_pool]") {
  thread_pool pool(2);
  std::atomic<std::size_t> total{0};
  {
    std::vector<std::jthread> callers;
    for (int c = 0; c < 4; ++c) {
      callers.emplace_back([&] {
        for (int round = 0; round < 20; ++round) {
          const auto st = pool.parallel_for(50, [&](std::size_t) -> status {
            ++total;
            return {};
          });
          if (!st) total += 1000000;
        }
      });
    }
  }
  CHECK(total == 4 * 20 * 50);

  // A job on the pool may itself call parallel_for: the caller always makes progress.
  std::atomic<std::size_t> inner{0};
  const auto st = pool.parallel_for(8, [&](std::size_t) -> status {
    return pool.parallel_for(8, [&](std::size_t) -> status {
      ++inner;
      return {};
    });
  });
  REQUIRE(st.has_value());
  CHECK(inner == 64);
}

TEST_CASE("thread_pool: submitted jobs run before the pool is destroyed", "[common][thread_pool]") {
  std::atomic<int> ran{0};
  {
    thread_pool pool(2);
    for (int i = 0; i < 100; ++i) pool.submit([&] { ++ran; });
  }
  CHECK(ran == 100);

  thread_pool none(0);
  none.submit([&] { ++ran; });  // no workers: runs on the caller
  CHECK(ran == 101);
}

namespace {

// Blocks a pool's only worker until release(), so that a test can queue work in a known order
// before any of it runs.
class worker_gate {
 public:
  explicit worker_gate(thread_pool& pool) {
    pool.submit([this] {
      std::unique_lock lock(mutex_);
      entered_ = true;
      changed_.notify_all();
      changed_.wait(lock, [&] { return released_; });
    });
    std::unique_lock lock(mutex_);
    changed_.wait(lock, [&] { return entered_; });
  }
  void release() {
    std::lock_guard lock(mutex_);
    released_ = true;
    changed_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  bool entered_ = false;
  bool released_ = false;
};

}  // namespace

TEST_CASE("thread_pool: owners' jobs are served round-robin, each owner's in order",
          "[common][thread_pool][concurrency]") {
  thread_pool pool(1);
  worker_gate gate(pool);
  std::vector<std::string> ran;  // only the one worker appends
  std::latch all_ran(6);         // read `ran` only once the worker is done with it
  const auto job = [&](std::string name) {
    return [&ran, &all_ran, name] {
      ran.push_back(name);
      all_ran.count_down();
    };
  };
  {
    thread_pool::owner_scope a(1);
    CHECK(thread_pool::current_owner() == 1);
    for (const char* n : {"a1", "a2", "a3", "a4"}) pool.submit(job(n));
  }
  CHECK(thread_pool::current_owner() == 0);
  {
    thread_pool::owner_scope b(2);
    for (const char* n : {"b1", "b2"}) pool.submit(job(n));
  }
  gate.release();
  all_ran.wait();
  CHECK(ran == std::vector<std::string>{"a1", "b1", "a2", "b2", "a3", "a4"});
}

TEST_CASE("thread_pool: two owners' parallel_for loops interleave one index at a time",
          "[common][thread_pool][concurrency]") {
  thread_pool pool(thread_pool_options{1, false});
  std::vector<std::string> ran;  // only the one worker appends (callers do not help)
  std::vector<std::thread::id> threads;
  std::optional<worker_gate> gate;
  gate.emplace(pool);
  // A big loop of owner 1 queues first, then a small one of owner 2; neither runs yet.
  const auto loop = [&](work_owner owner, std::string prefix, std::size_t count) {
    return std::thread([&, owner, prefix, count] {
      thread_pool::owner_scope scope(owner);
      const auto st = pool.parallel_for(count, [&, prefix](std::size_t i) -> status {
        ran.push_back(prefix + std::to_string(i));
        threads.push_back(std::this_thread::get_id());
        return {};
      });
      if (!st) ran.push_back(prefix + " failed");
    });
  };
  std::thread big = loop(1, "a", 8);
  while (pool.queued() < 1) std::this_thread::yield();  // a's one helper is queued
  std::thread small = loop(2, "b", 3);
  while (pool.queued() < 2) std::this_thread::yield();
  const std::thread::id callers[] = {big.get_id(), small.get_id()};
  gate->release();
  big.join();
  small.join();
  CHECK(ran == std::vector<std::string>{"a0", "b0", "a1", "b1", "a2", "b2", "a3", "a4", "a5", "a6", "a7"});
  // Neither caller ran an index: the owners' shares are the workers'.
  for (const auto& id : threads) {
    CHECK(id != callers[0]);
    CHECK(id != callers[1]);
  }
}

TEST_CASE("thread_pool: without helping callers, errors stop the loop and nested loops complete",
          "[common][thread_pool][concurrency]") {
  thread_pool pool(thread_pool_options{2, false});
  std::atomic<std::size_t> ran{0};
  const auto st = pool.parallel_for(100, [&](std::size_t i) -> status {
    ++ran;
    if (i == 3) return fail(errc::data_loss, "boom at 3");
    return {};
  });
  REQUIRE_FALSE(st);
  CHECK(st.error().code == errc::data_loss);
  CHECK(st.error().message == "boom at 3");
  CHECK(ran < 100);

  // Every worker blocked in an outer index still finishes its inner loop: it runs it itself.
  std::atomic<std::size_t> inner{0};
  const auto nested = pool.parallel_for(4, [&](std::size_t) -> status {
    return pool.parallel_for(8, [&](std::size_t) -> status {
      ++inner;
      return {};
    });
  });
  REQUIRE(nested.has_value());
  CHECK(inner == 32);
}
