// engine::stats() as GetStats reads it: exact when the engine mutex is free, and never held up
// by a worker that keeps the mutex (architecture.md §8).
#include "tensorreg/registration/engine.hpp"

#include <catch2/catch.hpp>

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "support/engine_helpers.hpp"

namespace {

using namespace tensorreg;
using namespace tensorreg::registration;
namespace t = tensorreg::testing;

const std::int32_t me = static_cast<std::int32_t>(::getpid());

// A fake clock that, once armed, parks the next thread that reads it until released: a
// worker reading the time under the engine mutex then holds the mutex for as long as the
// test likes.
class parking_clock final : public clock {
 public:
  [[nodiscard]] time_point now() const noexcept override {
    std::unique_lock lock(mutex_);
    if (armed_) {
      armed_ = false;
      parked_ = true;
      changed_.notify_all();
      changed_.wait(lock, [this] { return !parked_; });
    }
    return time_.now();
  }
  void arm() {
    std::lock_guard lock(mutex_);
    armed_ = true;
  }
  void wait_parked() const {
    std::unique_lock lock(mutex_);
    changed_.wait(lock, [this] { return parked_; });
  }
  void release() {
    std::lock_guard lock(mutex_);
    parked_ = false;
    changed_.notify_all();
  }

 private:
  t::fake_clock time_;
  mutable std::mutex mutex_;
  mutable std::condition_variable changed_;
  mutable bool armed_ = false;
  mutable bool parked_ = false;
};

}  // namespace

TEST_CASE("engine stats: a worker holding the engine mutex leaves stats the tables read last",
          "[engine][engine_stats][concurrency]") {
  const t::fake_clock unused;
  parking_clock clock;
  auto options = t::deterministic_options(unused);
  options.time = &clock;
  auto e = t::make_engine(std::move(options));
  REQUIRE_OK(t::register_stable(*e, t::small_model(), me));
  const auto before = e->stats();
  CHECK(before.artifacts == 1);
  CHECK(before.stable_artifacts == 1);

  // export_resident() reads the clock under the engine mutex: parked there, it holds it.
  clock.arm();
  std::thread holder([&] { (void)e->export_resident(); });
  clock.wait_parked();
  const auto asked = std::chrono::steady_clock::now();
  const auto during = e->stats();
  const auto waited = std::chrono::steady_clock::now() - asked;
  clock.release();
  holder.join();

  CHECK(waited < std::chrono::seconds(1));  // it waited 0.2 ms, not for the holder
  CHECK(during.artifacts == before.artifacts);
  CHECK(during.stable_artifacts == before.stable_artifacts);
  CHECK(during.pending_registrations == before.pending_registrations);
  CHECK(during.stable_bytes == before.stable_bytes);

  // Free again: read fresh.
  auto other = t::small_model();
  other.storages.front().bytes.front() ^= 1;
  REQUIRE_OK(t::register_stable(*e, other, me));
  CHECK(e->stats().artifacts == 2);
}
