// cli/progress.hpp — what a long `tensorreg` command shows while the user waits, and how long
// the user waited.
//
// `progress` draws one status line on stderr, redrawn in place: bytes done of the total, the
// rate and the time so far while bytes move (put, export, lease, persist, get --out, a pull),
// or a spinner, a phase and the time so far while the daemon works without reporting bytes (its
// hash and commit, a durable copy, a restore, a pull before its manifest is in). Only when
// stderr is a terminal: piped or redirected, it writes nothing, so scripts and logs see only
// the results.
// The line is erased when the operation ends, before the result is printed.
//
// `seconds_waited()` is the wall time since the command started (main()), which is what the
// commands print as `time`.
//
// Thread-safety: update() and phase() may be called from any thread (put's writers call
// update() one at a time); a ticker thread of its own redraws the line every 200 ms so that the
// time moves while nothing else does. Ownership: the object owns its ticker thread and joins it
// in finish() or the destructor.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>

namespace tensorreg::cli {

/// Marks the command's start; called first thing in main().
void mark_command_start() noexcept;

/// Wall seconds since mark_command_start().
[[nodiscard]] double seconds_waited() noexcept;

/// "1.5 MiB", "12 B".
[[nodiscard]] std::string human_bytes(std::uint64_t n);

class progress {
 public:
  /// `label` starts the line ("put model.safetensors"). `enabled`: draw at all (default: stderr
  /// is a terminal and TERM is not "dumb").
  explicit progress(std::string label, bool enabled = stderr_is_terminal());
  ~progress();
  progress(const progress&) = delete;
  progress& operator=(const progress&) = delete;

  /// `done` of `total` bytes; the rate counts from the first call.
  void update(std::uint64_t done, std::uint64_t total);
  /// A phase without byte counts ("the daemon hashes 1.0 GiB and commits"); replaces the bar.
  void phase(std::string text);
  /// Erases the line and stops the ticker (idempotent).
  void finish();

  [[nodiscard]] bool enabled() const noexcept { return enabled_; }
  [[nodiscard]] static bool stderr_is_terminal() noexcept;

 private:
  void draw_locked();
  void tick();

  std::string label_;
  bool enabled_;
  std::mutex mutex_;
  std::condition_variable stop_;
  bool stopping_ = false;
  std::uint64_t done_ = 0;
  std::uint64_t total_ = 0;
  bool have_bytes_ = false;
  std::string phase_;
  std::uint64_t spins_ = 0;  // spinner position of a phase line
  std::chrono::steady_clock::time_point first_bytes_{};
  std::chrono::steady_clock::time_point last_draw_{};
  std::thread ticker_;
};

}  // namespace tensorreg::cli
