// tests/support/daemon_process.hpp — a real tensorregd started on a fresh socket in a temp dir.
//
// Starts the built daemon binary (TENSORREG_DAEMON_PATH) as a child process, waits until it
// prints "ready" (so the socket accepts connections), and stops it with SIGTERM on
// destruction. stop() reports the exit status so tests can check clean shutdowns. Its stdout
// and stderr go to one file (output()), or, when asked, stderr to a file of its own
// (error_output()) for tests of what the daemon logs.
#pragma once

#include <sys/types.h>

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "support/temp_dir.hpp"

namespace tensorreg::testing {

class daemon_process {
 public:
  /// Starts tensorregd with `--socket <dir>/run/tensorregd.sock` and `extra_args`; throws if it
  /// does not report ready within 10 s.
  explicit daemon_process(std::vector<std::string> extra_args = {});
  /// Starts one on an explicit socket path (for second-instance and stale-socket tests).
  daemon_process(std::string socket_path, std::vector<std::string> extra_args, bool expect_ready);
  /// Where the daemon's stderr goes.
  enum class stderr_to { output, own_file };
  /// Starts one like the first constructor, its stderr to `where`.
  daemon_process(std::vector<std::string> extra_args, stderr_to where);
  /// What a service manager hands a daemon it (re)starts: fds at 3, 4, … with LISTEN_FDS,
  /// LISTEN_FDNAMES (names joined by ':') and LISTEN_PID set to the child's pid (sd_listen_fds(3)).
  struct listen_fds {
    std::vector<int> fds;  ///< the test's; duplicated into the child
    std::vector<std::string> names;
  };
  /// Starts one on `socket_path` with `passed` as a service manager would pass them.
  daemon_process(std::string socket_path, std::vector<std::string> extra_args, listen_fds passed);
  ~daemon_process();
  daemon_process(const daemon_process&) = delete;
  daemon_process& operator=(const daemon_process&) = delete;

  [[nodiscard]] const std::string& socket_path() const noexcept { return socket_; }
  [[nodiscard]] pid_t pid() const noexcept { return pid_; }
  /// Everything the daemon wrote to stdout, and to stderr unless that has its own file, so far.
  [[nodiscard]] std::string output() const;
  /// Everything the daemon wrote to stderr so far (the same as output() unless stderr_to::own_file).
  [[nodiscard]] std::string error_output() const;

  /// Sends `signal` and waits for the exit; returns the exit code (or 128 + signal).
  int stop(int signal = 15);
  /// Waits for the process to exit on its own (up to 10 s); returns the exit code or nullopt.
  std::optional<int> wait_exit();

 private:
  void start(std::vector<std::string> extra_args, bool expect_ready, const listen_fds* passed = nullptr);

  temp_dir dir_;
  std::string socket_;
  std::filesystem::path log_;
  std::filesystem::path err_log_;  // == log_ unless stderr has its own file
  pid_t pid_ = -1;
};

}  // namespace tensorreg::testing
