#include "daemon/request_pool.hpp"

#include <catch2/catch.hpp>

#include <pthread.h>

#include <atomic>
#include <csignal>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace {

using tensorreg::daemon::request_pool;

TEST_CASE("request_pool runs every job posted from many threads exactly once", "[concurrency]") {
  constexpr int kPosters = 4;
  constexpr int kJobsEach = 5000;
  std::vector<std::atomic<int>> runs(kPosters * kJobsEach);
  {
    request_pool pool(8);
    CHECK(pool.size() == 8);
    std::vector<std::thread> posters;
    for (int p = 0; p < kPosters; ++p) {
      posters.emplace_back([&, p] {
        for (int i = 0; i < kJobsEach; ++i) pool.post([&runs, k = p * kJobsEach + i] { runs[k].fetch_add(1); });
      });
    }
    for (auto& t : posters) t.join();
    pool.join();
  }
  int wrong = 0;
  for (auto& r : runs) wrong += r.load() == 1 ? 0 : 1;
  CHECK(wrong == 0);
}

TEST_CASE("request_pool starts jobs in the order they were posted", "[concurrency]") {
  request_pool pool(1);
  std::mutex m;
  std::vector<int> order;
  for (int i = 0; i < 1000; ++i) {
    pool.post([&, i] {
      const std::lock_guard lock(m);
      order.push_back(i);
    });
  }
  pool.join();
  REQUIRE(order.size() == 1000);
  for (int i = 0; i < 1000; ++i) REQUIRE(order[static_cast<std::size_t>(i)] == i);
}

TEST_CASE("request_pool's join runs the jobs that jobs post", "[concurrency]") {
  std::atomic<int> ran{0};
  request_pool pool(4);
  // Each link posts the next; join() must not end the workers before the chain does.
  struct link {
    request_pool* pool;
    std::atomic<int>* ran;
    int left;
    void operator()() const {
      ran->fetch_add(1);
      if (left > 0) pool->post(link{pool, ran, left - 1});
    }
  };
  pool.post(link{&pool, &ran, 499});
  pool.join();
  CHECK(ran.load() == 500);
  pool.join();  // a second join does nothing
  CHECK(ran.load() == 500);
}

TEST_CASE("request_pool takes move-only jobs and frees those never run", "[concurrency]") {
  auto value = std::make_shared<int>(7);
  std::atomic<int> seen{0};
  {
    request_pool pool(2);
    pool.post([p = std::make_unique<int>(41), &seen] { seen = *p + 1; });
    pool.join();
    CHECK(seen.load() == 42);
    // Posted after join: never run, but its captures are released with the pool.
    pool.post([value, &seen] { seen = *value; });
    CHECK(value.use_count() == 2);
  }
  CHECK(value.use_count() == 1);
  CHECK(seen.load() == 42);
}

TEST_CASE("request_pool workers leave faults to their own thread and termination to others", "[concurrency]") {
  sigset_t mask;
  sigemptyset(&mask);
  std::atomic<bool> read{false};
  request_pool pool(1);
  pool.post([&] {
    pthread_sigmask(SIG_BLOCK, nullptr, &mask);
    read = true;
  });
  pool.join();
  REQUIRE(read.load());
  // A blocked SIGBUS raised by a fault kills the process instead of reaching the guard's handler.
  CHECK(sigismember(&mask, SIGBUS) == 0);
  CHECK(sigismember(&mask, SIGSEGV) == 0);
  // SIGTERM and SIGINT are the I/O thread's (asio's signal_set), not a worker's.
  CHECK(sigismember(&mask, SIGTERM) == 1);
  CHECK(sigismember(&mask, SIGINT) == 1);
}

}  // namespace
