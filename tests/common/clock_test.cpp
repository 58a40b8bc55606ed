#include "tensorreg/common/clock.hpp"

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <thread>
#include <vector>

#include "support/fake_clock.hpp"

using namespace std::chrono_literals;
namespace tr = tensorreg;

TEST_CASE("clock: the system clock is one monotonic object", "[common][clock]") {
  const tr::clock& a = tensorreg::system_clock();
  const tr::clock& b = tensorreg::system_clock();
  CHECK(&a == &b);
  const auto t0 = a.now();
  const auto t1 = a.now();
  CHECK(t1 >= t0);
}

TEST_CASE("clock: saturating_deadline adds a ttl and clamps instead of overflowing", "[common][clock]") {
  const tr::clock::time_point from{std::chrono::seconds(10)};
  CHECK(tensorreg::saturating_deadline(from, 1500ms) == from + 1500ms);
  CHECK(tensorreg::saturating_deadline(from, 0ms) == from);
  CHECK(tensorreg::saturating_deadline(from, -5ms) == from);
  CHECK(tensorreg::saturating_deadline(from, std::chrono::milliseconds::max()) == tr::clock::time_point::max());
  CHECK(tensorreg::saturating_deadline(tr::clock::time_point::max() - 1ms, 2ms) == tr::clock::time_point::max());
}

TEST_CASE("clock: the fake clock moves only when told", "[common][clock]") {
  tensorreg::testing::fake_clock fake;
  const tr::clock& c = fake;
  const auto start = c.now();
  CHECK(start == tensorreg::testing::fake_clock::default_start);
  CHECK(c.now() == start);
  fake.advance(250ms);
  CHECK(c.now() == start + 250ms);
  fake.set(start + 1h);
  CHECK(c.now() == start + 1h);
  fake.advance(-1h);
  CHECK(c.now() == start);
}

TEST_CASE("clock: the fake clock may be read while another thread advances it", "[common][clock]") {
  tensorreg::testing::fake_clock fake;
  const auto start = fake.now();
  constexpr int kSteps = 10'000;
  std::thread writer([&] {
    for (int i = 0; i < kSteps; ++i) fake.advance(1ms);
  });
  // Catch2 v2 assertions are not thread-safe: threads record, the main thread checks.
  std::atomic<int> went_backwards{0};
  std::vector<std::thread> readers;
  for (int r = 0; r < 3; ++r) {
    readers.emplace_back([&] {
      auto last = fake.now();
      for (int i = 0; i < kSteps; ++i) {
        const auto t = fake.now();
        if (t < last) went_backwards.fetch_add(1);
        last = t;
      }
    });
  }
  writer.join();
  for (auto& t : readers) t.join();
  CHECK(went_backwards.load() == 0);
  CHECK(fake.now() == start + std::chrono::milliseconds(kSteps));
}
