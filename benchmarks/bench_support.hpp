// benchmarks/bench_support.hpp — small helpers the CPU benchmarks share: byte counts from the
// command line, the process's CPU time, wall seconds, the median of a run's samples, a clock an
// in-process engine can be moved forward by (and such an engine), and a tensorregd child.
// Header-only; each bench is one translation unit.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "tensorreg/common/clock.hpp"
#include "tensorreg/registration/engine.hpp"

namespace tensorreg::bench {

/// "512", "64K", "16M" or "2G" (either case) as bytes; nullopt for anything else.
inline std::optional<std::uint64_t> parse_bytes(std::string_view text) {
  if (text.empty()) return std::nullopt;
  std::uint64_t mult = 1;
  const char last = text.back();
  if (last == 'K' || last == 'k') mult = 1ULL << 10;
  if (last == 'M' || last == 'm') mult = 1ULL << 20;
  if (last == 'G' || last == 'g') mult = 1ULL << 30;
  if (mult != 1) text.remove_suffix(1);
  try {
    std::size_t used = 0;
    const auto v = std::stoull(std::string(text), &used);
    if (used != text.size()) return std::nullopt;
    return v * mult;
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

/// CPU seconds used by the whole process: on a shared machine, work per CPU second shows what
/// the work itself costs, apart from time lost waiting for a core.
inline double process_cpu_seconds() {
  timespec ts{};
  ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

/// The median of `samples` (the upper one of an even count); REQUIRES: not empty.
inline double median(std::vector<double> samples) {
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

/// Wall seconds since `t0`.
inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// Runs fn(offset, length) over `chunk`-byte pieces of [0, size) on `threads` threads, each taking
/// the next piece in turn.
template <typename F>
void chunked(std::uint64_t size, std::uint64_t chunk, unsigned threads, F&& fn) {
  std::atomic<std::uint64_t> next{0};
  std::vector<std::thread> workers;
  for (unsigned t = 0; t < threads; ++t) {
    workers.emplace_back([&] {
      for (;;) {
        const auto at = next.fetch_add(chunk);
        if (at >= size) return;
        fn(at, std::min(chunk, size - at));
      }
    });
  }
  for (auto& w : workers) w.join();
}

/// Real time that a bench can move forward, so that what an in-process engine holds for a TTL
/// (a piece's assembly, and its buffer) expires right after a run.
class jump_clock final : public tensorreg::clock {
 public:
  [[nodiscard]] time_point now() const noexcept override { return std::chrono::steady_clock::now() + skipped_.load(); }
  void skip(duration d) noexcept { skipped_.store(skipped_.load() + d); }

 private:
  std::atomic<duration> skipped_{duration::zero()};
};

/// An engine in this process on `time` that sweeps only when the bench calls sweep() and watches
/// no owner process.
inline auto swept_by_hand_engine(jump_clock& time) {
  registration::engine_options options;
  options.time = &time;
  options.sweep_interval = std::chrono::milliseconds(0);
  options.watch_owners = false;
  return registration::engine::create(options).value();
}

/// A tensorregd started as `binary args...`, its stderr appended to `log`. wait_ready() reads
/// its stdout until "ready" (and exits the bench if it ended first). The destructor stops it
/// with SIGTERM and waits.
class daemon_child {
 public:
  daemon_child(const std::string& binary, const std::vector<std::string>& args, const std::filesystem::path& log) {
    int p[2];
    if (::pipe(p) != 0) fail("pipe failed");
    std::vector<std::string> argv_text{binary};
    argv_text.insert(argv_text.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : argv_text) argv.push_back(a.data());
    argv.push_back(nullptr);
    forked = std::chrono::steady_clock::now();
    pid = ::fork();
    if (pid == 0) {
      const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
      if (fd >= 0) ::dup2(fd, 2);
      ::dup2(p[1], 1);
      ::close(p[0]);
      ::execv(binary.c_str(), argv.data());
      std::_Exit(127);
    }
    ::close(p[1]);
    out_ = p[0];
  }
  ~daemon_child() {
    if (pid > 0) {
      ::kill(pid, SIGTERM);
      ::waitpid(pid, nullptr, 0);
    }
    if (out_ >= 0) ::close(out_);
  }
  daemon_child(const daemon_child&) = delete;
  daemon_child& operator=(const daemon_child&) = delete;

  void wait_ready() {
    std::string seen;
    char buf[256];
    while (seen.find("ready") == std::string::npos) {
      const auto n = ::read(out_, buf, sizeof buf);
      if (n <= 0) fail("tensorregd exited before reporting ready: " + seen);
      seen.append(buf, static_cast<std::size_t>(n));
    }
  }

  /// Waits for it to end by itself; its exit code, or 128 + the signal that ended it.
  int wait_exit() {
    int status = 0;
    ::waitpid(pid, &status, 0);
    pid = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

  pid_t pid = -1;
  std::chrono::steady_clock::time_point forked;  ///< just before the fork

 private:
  [[noreturn]] static void fail(const std::string& why) {
    std::fprintf(stderr, "bench: %s\n", why.c_str());
    std::exit(1);
  }

  int out_ = -1;
};

}  // namespace tensorreg::bench
