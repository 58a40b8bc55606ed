// tests/support/child_process.hpp — a helper program run as a separate process, its stdout
// read line by line, for tests that need a second pid (ownership checks) or a client that can
// be SIGKILLed at a chosen moment (mid-frame, mid-commit).
//
// Started with posix_spawn, so a test process with threads can start one safely (no fork of a
// threaded process that then runs arbitrary code).
//
// Thread-safety: one object per thread. Ownership: the object owns the child; its destructor
// SIGKILLs and reaps a child still running.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "tensorreg/common/unique_fd.hpp"

namespace tensorreg::testing {

class child_process {
 public:
  /// Runs `argv[0]` with `argv`; its stdout comes back through read_line(), its stderr goes
  /// to the test's. Throws std::runtime_error when it cannot be started.
  explicit child_process(const std::vector<std::string>& argv);
  ~child_process();
  child_process(const child_process&) = delete;
  child_process& operator=(const child_process&) = delete;
  child_process(child_process&& other) noexcept;
  child_process& operator=(child_process&& other) = delete;

  [[nodiscard]] pid_t pid() const noexcept { return pid_; }
  /// The next line the child printed (without '\n'), or nullopt at end of output or timeout.
  [[nodiscard]] std::optional<std::string> read_line(std::chrono::milliseconds within);
  /// Sends `signal`.
  void kill(int signal) const noexcept;
  /// Waits for the exit: the exit code, or 128 + the signal that ended it.
  int wait();

 private:
  pid_t pid_ = -1;
  unique_fd out_;
  std::string buffer_;
};

}  // namespace tensorreg::testing
