// tensorreg/common/clock.hpp — an injectable monotonic clock.
//
// Provides the abstract `clock` (leveldb's Env idea, reduced to time): every component that
// keeps deadlines (TTL retention, pending registrations, leases) reads time through a
// `const clock&` handed to it, so tests substitute a fake clock (tests/support/fake_clock.hpp)
// and step time by hand instead of sleeping. `system_clock()` is the real one, backed by
// std::chrono::steady_clock. `saturating_deadline()` adds a TTL without overflowing.
//
// Thread-safety: `now()` is const and must be safe to call from any number of threads at once;
// every implementation (the real clock and the fake) is.
// Ownership: components hold a reference to a clock they do not own; the clock must outlive
// them. `system_clock()` returns a process-wide object that lives forever.
#pragma once

#include <chrono>

namespace tensorreg {

/// A source of monotonic time points.
class clock {
 public:
  using time_point = std::chrono::steady_clock::time_point;
  using duration = std::chrono::steady_clock::duration;

  virtual ~clock() = default;

  /// The current time. Never goes backwards for the real clock; a fake may be set anywhere.
  [[nodiscard]] virtual time_point now() const noexcept = 0;

 protected:
  clock() = default;
  clock(const clock&) = default;
  clock& operator=(const clock&) = default;
};

/// The real monotonic clock (std::chrono::steady_clock), one per process, never destroyed.
[[nodiscard]] const clock& system_clock() noexcept;

/// `from + ttl`, clamped to time_point::max() instead of overflowing; a negative ttl gives
/// `from`. Use it for deadlines computed from client-supplied TTLs.
[[nodiscard]] constexpr clock::time_point saturating_deadline(clock::time_point from,
                                                              std::chrono::milliseconds ttl) noexcept {
  using std::chrono::duration_cast;
  if (ttl <= std::chrono::milliseconds::zero()) return from;
  const auto headroom = clock::time_point::max() - from;
  // Compare in milliseconds so that converting a huge ttl to the clock's finer unit cannot overflow.
  if (ttl >= duration_cast<std::chrono::milliseconds>(headroom)) return clock::time_point::max();
  return from + duration_cast<clock::duration>(ttl);
}

}  // namespace tensorreg
