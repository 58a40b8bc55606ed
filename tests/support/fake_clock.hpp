// tests/support/fake_clock.hpp — a clock that moves only when a test says so.
//
// Starts at a fixed, non-zero time point (so "deadline 0" bugs show), then moves by
// `advance()` or jumps with `set()`. Thread-safe: the time is one atomic, so threads may read
// `now()` while the test advances it.
#pragma once

#include <atomic>
#include <chrono>

#include "tensorreg/common/clock.hpp"

namespace tensorreg::testing {

class fake_clock final : public clock {
 public:
  /// Where a fresh fake clock starts: one million seconds after the steady clock's epoch.
  static constexpr time_point default_start = time_point{std::chrono::seconds(1'000'000)};

  explicit fake_clock(time_point start = default_start) noexcept : ticks_(start.time_since_epoch().count()) {}

  [[nodiscard]] time_point now() const noexcept override {
    return time_point{duration{ticks_.load(std::memory_order_acquire)}};
  }

  /// Moves time forward (or backward, for a negative `by`).
  void advance(duration by) noexcept { ticks_.fetch_add(by.count(), std::memory_order_acq_rel); }

  /// Jumps to `to`.
  void set(time_point to) noexcept { ticks_.store(to.time_since_epoch().count(), std::memory_order_release); }

 private:
  std::atomic<duration::rep> ticks_;
};

}  // namespace tensorreg::testing
