// getstats_latency_bench — GetStats round trips of a real tensorregd, idle and under load, and
// the time the daemon takes to release a client killed in the middle of a 512 MiB commit.
//
// 1. Starts the daemon (path as the first argument or env TENSORREGD) on a socket in a fresh
//    temp directory and waits for "ready".
// 2. Idle: --samples GetStats round trips on one connection; p50 / p99 / max. This is the
//    yardstick of the same run.
// 3. Load: --clients client threads, each on its own connection, loop over mixed work (puts of
//    a 64 KiB and a --large-mib buffer, leases of a small buffer that are then released, Begins
//    that are then aborted) while one more connection times GetStats every 2 ms for --seconds.
//    Prints p50 / p99 / max under load next to the idle ones (goal: p99 ≤ 5 ms on 2 cores),
//    and how late the timing thread itself wakes from its 2 ms sleeps meanwhile: the OS
//    scheduler's floor for any round trip on the machine at that moment.
// 4. Release: a child process puts a --release-mib buffer; right after its copy is written (the
//    commit is then under way) it is SIGKILLed; we time until GetStats shows its registration
//    gone (pending_registrations back to the baseline), --release-runs times (goal ≤ 1 s). A
//    run where the commit had ended before the kill (one more artifact) is reported, not timed.
//
// Usage: getstats_latency_bench [TENSORREGD] [--clients N] [--seconds S] [--samples N]
//                               [--large-mib N] [--release-mib N] [--release-runs N] [--no-release]
// Output: one JSON line per measurement, then a table.
#include <fcntl.h>
#include <fmt/core.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "client/raw_connection.hpp"
#include "client/wire_convert.hpp"
#include "tensorreg/client/connection.hpp"
#include "tensorreg/index/safetensors_bundle.hpp"

namespace {

namespace fs = std::filesystem;
namespace wc = tensorreg::client::wire_convert;
using tensorreg::client::connection;
using clock_type = std::chrono::steady_clock;

constexpr const char* kUsage =
    "usage: getstats_latency_bench [TENSORREGD] [--clients N] [--seconds S] [--samples N]\n"
    "                              [--large-mib N] [--release-mib N] [--release-runs N] [--no-release]\n"
    "  TENSORREGD        the daemon binary (default: env TENSORREGD)\n"
    "  --clients N       loading clients, one connection each (default 64)\n"
    "  --seconds S       how long GetStats is timed under load (default 10)\n"
    "  --samples N       idle GetStats round trips (default 2000)\n"
    "  --large-mib N     size of the large puts (default 16)\n"
    "  --release-mib N   size of the put whose client is killed mid-commit (default 512)\n"
    "  --release-runs N  how many times (default 5)\n"
    "  --no-release      skip the release measurement\n";

struct options {
  std::string daemon;
  unsigned clients = 64;
  double seconds = 10;
  unsigned samples = 2000;
  std::uint64_t large_mib = 16;
  std::uint64_t release_mib = 512;
  unsigned release_runs = 5;
  bool release = true;
};

struct percentiles {
  double p50 = 0, p99 = 0, max = 0;
  std::size_t n = 0;
};

percentiles percentiles_of(std::vector<double> ms) {
  percentiles p;
  if (ms.empty()) return p;
  std::sort(ms.begin(), ms.end());
  const auto at = [&](double q) {
    return ms[std::min(ms.size() - 1, static_cast<std::size_t>(q * static_cast<double>(ms.size())))];
  };
  p.p50 = at(0.50);
  p.p99 = at(0.99);
  p.max = ms.back();
  p.n = ms.size();
  return p;
}

double ms_since(clock_type::time_point t) {
  return std::chrono::duration<double, std::milli>(clock_type::now() - t).count();
}

// A safetensors file of one F32 tensor of `bytes` bytes whose contents depend on `seed`.
fs::path write_model(const fs::path& dir, const std::string& name, std::uint64_t bytes, std::uint32_t seed) {
  std::string header = fmt::format(R"({{"w":{{"dtype":"F32","shape":[{}],"data_offsets":[0,{}]}}}})", bytes / 4, bytes);
  while (header.size() % 8 != 0) header += ' ';
  const fs::path path = dir / name;
  std::ofstream out(path, std::ios::binary);
  const std::uint64_t n = header.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  std::vector<std::uint32_t> chunk(1 << 18);
  std::uint64_t written = 0, x = seed * 0x9E3779B97F4A7C15ull + 1;
  while (written < bytes) {
    for (auto& v : chunk) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      v = static_cast<std::uint32_t>(x);
    }
    const auto take = std::min<std::uint64_t>(bytes - written, chunk.size() * 4);
    out.write(reinterpret_cast<const char*>(chunk.data()), static_cast<std::streamsize>(take));
    written += take;
  }
  return path;
}

std::unique_ptr<tensorreg::index::safetensors_bundle> open_bundle(const fs::path& p) {
  auto b = tensorreg::index::safetensors_bundle::open({p.string()});
  if (!b) {
    fmt::print(stderr, "cannot open '{}': {}\n", p.string(), b.error().message);
    std::exit(1);
  }
  return std::move(*b);
}

// The daemon as a child process on a socket of its own.
class daemon_child {
 public:
  daemon_child(const std::string& binary, const fs::path& dir) : socket_((dir / "run" / "tensorregd.sock").string()) {
    int out[2];
    if (::pipe(out) != 0) std::exit(1);
    pid_ = ::fork();
    if (pid_ == 0) {
      // Its log goes to a file next to the socket: the bench's output stays the measurements.
      const int log = ::open((dir / "tensorregd.log").c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
      if (log >= 0) ::dup2(log, 2);
      ::dup2(out[1], 1);
      ::close(out[0]);
      ::execl(binary.c_str(), binary.c_str(), "--socket", socket_.c_str(), static_cast<char*>(nullptr));
      std::_Exit(127);
    }
    ::close(out[1]);
    std::string seen;
    char buf[256];
    while (seen.find("ready") == std::string::npos) {
      const auto n = ::read(out[0], buf, sizeof buf);
      if (n <= 0) {
        fmt::print(stderr, "tensorregd '{}' exited before reporting ready: {}\n", binary, seen);
        std::exit(1);
      }
      seen.append(buf, static_cast<std::size_t>(n));
    }
    out_ = out[0];
  }
  ~daemon_child() {
    ::kill(pid_, SIGTERM);
    ::waitpid(pid_, nullptr, 0);
    ::close(out_);
  }
  daemon_child(const daemon_child&) = delete;
  daemon_child& operator=(const daemon_child&) = delete;
  [[nodiscard]] const std::string& socket() const noexcept { return socket_; }

 private:
  std::string socket_;
  pid_t pid_ = -1;
  int out_ = -1;
};

connection connect_or_exit(const std::string& socket) {
  auto c = connection::connect(socket);
  if (!c) {
    fmt::print(stderr, "cannot connect to '{}': {}\n", socket, c.error().message);
    std::exit(1);
  }
  return std::move(*c);
}

// One GetStats round trip, in ms.
double timed_stats(connection& c) {
  const auto t = clock_type::now();
  auto s = c.stats();
  const double ms = ms_since(t);
  if (!s) {
    fmt::print(stderr, "GetStats failed: {}\n", s.error().message);
    std::exit(1);
  }
  return ms;
}

struct load_counts {
  std::atomic<std::uint64_t> puts{0}, large_puts{0}, leases{0}, aborts{0}, errors{0};
  std::mutex mutex;
  std::string first_error;  // guarded by mutex

  void failed(std::string_view what, const tensorreg::error& e) {
    ++errors;
    std::lock_guard lock(mutex);
    if (first_error.empty()) first_error = fmt::format("{}: {}: {}", what, tensorreg::errc_name(e.code), e.message);
  }
};

void load_client(const std::string& socket, const tensorreg::index::safetensors_bundle& small,
                 const tensorreg::index::safetensors_bundle& large, const fs::path& leased_path,
                 std::atomic<bool>& stop, load_counts& counts) {
  // Each client leases bytes of its own: a second lease of the same bytes is ALREADY_EXISTS.
  const auto leased_bundle = open_bundle(leased_path);
  const auto& leased = *leased_bundle;
  auto c = connect_or_exit(socket);
  auto raw = tensorreg::client::raw::connection::connect(socket);
  if (!raw) std::exit(1);
  for (std::uint64_t round = 0; !stop; ++round) {
    switch (round % 8) {
      case 0:
      case 2:
      case 4: {
        auto p = c.put(small);
        p ? void(++counts.puts) : counts.failed("small put", p.error());
        break;
      }
      case 6: {
        auto p = c.put(large);
        p ? void(++counts.large_puts) : counts.failed("large put", p.error());
        break;
      }
      case 1:
      case 5: {
        auto l = c.register_lease(leased, 30'000);
        if (!l) {
          counts.failed("lease", l.error());
        } else if (auto r = l->release(); !r) {
          counts.failed("lease release", r.error());
        } else {
          ++counts.leases;
        }
        break;
      }
      default: {
        wc::begin_args b;
        b.plan = wc::begin_plan::lease_in_place;
        b.device_id = -1;
        b.total_size = 1 << 20;
        b.ttl_ms = 30'000;
        b.owner_pid = ::getpid();
        auto begun = (*raw)->call(wc::begin_request(b));
        if (!begun) {
          counts.failed("begin", begun.error());
        } else if (auto a = (*raw)->call(wc::abort_request(wc::registration_id_of(begun->response))); !a) {
          counts.failed("abort", a.error());
        } else {
          ++counts.aborts;
        }
      }
    }
  }
}

// The child of a release run: puts the model and tells the parent (one byte on `ready_fd`) once
// the copy is written, i.e. when the Feed and the Commit follow. It is killed before it returns.
[[noreturn]] void release_child(const std::string& socket, const fs::path& model, int ready_fd) {
  auto bundle = open_bundle(model);
  auto c = connect_or_exit(socket);
  tensorreg::client::put_options o;
  bool told = false;
  o.progress = [&](std::uint64_t done, std::uint64_t total) {
    if (done == total && !told) {
      told = true;
      const char byte = 1;
      (void)!::write(ready_fd, &byte, 1);
    }
  };
  (void)c.put(*bundle, o);
  std::_Exit(0);
}

void print_json(const char* phase, const percentiles& p) {
  fmt::print(
      R"({{"bench":"getstats_latency","phase":"{}","samples":{},"p50_ms":{:.3f},"p99_ms":{:.3f},"max_ms":{:.3f}}})"
      "\n",
      phase, p.n, p.p50, p.p99, p.max);
}

bool parse(int argc, char** argv, options& o) {
  if (const char* env = std::getenv("TENSORREGD")) o.daemon = env;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto next = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else if (a == "--no-release") {
      o.release = false;
    } else if (a == "--clients" || a == "--seconds" || a == "--samples" || a == "--large-mib" || a == "--release-mib" ||
               a == "--release-runs") {
      const char* v = next();
      if (v == nullptr) return false;
      const double x = std::atof(v);
      if (x <= 0) return false;
      if (a == "--clients") o.clients = static_cast<unsigned>(x);
      if (a == "--seconds") o.seconds = x;
      if (a == "--samples") o.samples = static_cast<unsigned>(x);
      if (a == "--large-mib") o.large_mib = static_cast<std::uint64_t>(x);
      if (a == "--release-mib") o.release_mib = static_cast<std::uint64_t>(x);
      if (a == "--release-runs") o.release_runs = static_cast<unsigned>(x);
    } else if (!a.empty() && a[0] != '-') {
      o.daemon = a;
    } else {
      return false;
    }
  }
  return !o.daemon.empty();
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  if (!parse(argc, argv, o)) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  char tmpl[] = "/tmp/getstats-bench-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) return 1;
  const fs::path dir = tmpl;
  const auto small_path = write_model(dir, "small.safetensors", 64 << 10, 1);
  const auto large_path = write_model(dir, "large.safetensors", o.large_mib << 20, 2);
  std::vector<fs::path> leased_paths;
  for (unsigned i = 0; i < o.clients; ++i) {
    leased_paths.push_back(write_model(dir, fmt::format("leased-{}.safetensors", i), 256 << 10, 100 + i));
  }
  const auto release_path = write_model(dir, "release.safetensors", o.release_mib << 20, 4);
  const auto small = open_bundle(small_path);
  const auto large = open_bundle(large_path);

  percentiles idle, loaded, wake;
  std::vector<double> releases;
  unsigned finished_before_kill = 0;
  load_counts counts;
  double load_seconds = 0;
  {
    daemon_child daemon(o.daemon, dir);
    auto probe = connect_or_exit(daemon.socket());

    // 2. Idle yardstick.
    std::vector<double> ms;
    for (unsigned i = 0; i < o.samples; ++i) ms.push_back(timed_stats(probe));
    idle = percentiles_of(ms);
    print_json("idle", idle);

    // 3. Under load.
    std::atomic<bool> stop{false};
    std::vector<std::thread> clients;
    for (unsigned i = 0; i < o.clients; ++i) {
      clients.emplace_back(load_client, daemon.socket(), std::cref(*small), std::cref(*large),
                           std::cref(leased_paths[i]), std::ref(stop), std::ref(counts));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(500));  // let every client get going
    ms.clear();
    std::vector<double> late;
    const auto load_start = clock_type::now();
    while (ms_since(load_start) < o.seconds * 1000) {
      ms.push_back(timed_stats(probe));
      // How late this thread wakes from a 2 ms sleep: the OS scheduler's share of any round
      // trip on this machine now, which no daemon can beat.
      const auto slept = clock_type::now();
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
      late.push_back(std::max(0.0, ms_since(slept) - 2.0));
    }
    wake = percentiles_of(late);
    load_seconds = ms_since(load_start) / 1000;
    stop = true;
    for (auto& t : clients) t.join();
    loaded = percentiles_of(ms);
    print_json("load", loaded);
    print_json("load_wakeup_lateness", wake);

    // 4. Release of a client killed mid-commit, on the now idle daemon.
    for (unsigned run = 0; o.release && run < o.release_runs; ++run) {
      auto before = probe.stats();
      if (!before) return 1;
      int ready[2];
      if (::pipe(ready) != 0) return 1;
      const pid_t child = ::fork();
      if (child == 0) {
        ::close(ready[0]);
        release_child(daemon.socket(), release_path, ready[1]);
      }
      ::close(ready[1]);
      char byte = 0;
      const bool got = ::read(ready[0], &byte, 1) == 1;
      ::close(ready[0]);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));  // the Feed and the Commit go out
      const auto killed = clock_type::now();
      ::kill(child, SIGKILL);
      ::waitpid(child, nullptr, 0);
      double released = -1;
      while (ms_since(killed) < 30'000) {
        auto now = probe.stats();
        if (!now) return 1;
        if (now->pending_registrations == before->pending_registrations) {
          released = ms_since(killed);
          if (now->artifacts > before->artifacts) {
            ++finished_before_kill;  // the commit ended first: nothing to time
            released = -1;
          }
          break;
        }
        std::this_thread::sleep_for(std::chrono::microseconds(500));
      }
      fmt::print(R"({{"bench":"getstats_latency","phase":"release","mib":{},"child_ready":{},"release_ms":{:.1f}}})"
                 "\n",
                 o.release_mib, got, released);
      if (released >= 0) releases.push_back(released);
    }
  }
  std::error_code ignored;
  fs::remove_all(dir, ignored);

  fmt::print("\nGetStats round trip (ms)      p50      p99      max   samples\n");
  fmt::print("idle (yardstick)          {:8.3f} {:8.3f} {:8.3f} {:9}\n", idle.p50, idle.p99, idle.max, idle.n);
  fmt::print("{:3} clients loading      {:8.3f} {:8.3f} {:8.3f} {:9}\n", o.clients, loaded.p50, loaded.p99, loaded.max,
             loaded.n);
  fmt::print("wake-up lateness, 2 ms sleep {:8.3f} {:8.3f} {:8.3f} {:9}   (the scheduler's floor under load)\n",
             wake.p50, wake.p99, wake.max, wake.n);
  fmt::print("p99 under load / idle p99: {:.1f}x; goal p99 <= 5 ms: {}\n", loaded.p99 / std::max(idle.p99, 1e-9),
             loaded.p99 <= 5.0 ? "met" : "NOT met");
  fmt::print("load in {:.1f} s: {} small puts, {} large puts ({} MiB), {} leases, {} aborts, {} errors\n", load_seconds,
             counts.puts.load(), counts.large_puts.load(), o.large_mib, counts.leases.load(), counts.aborts.load(),
             counts.errors.load());
  if (!counts.first_error.empty()) fmt::print("first error: {}\n", counts.first_error);
  if (o.release) {
    const auto r = percentiles_of(releases);
    fmt::print(
        "release of a client killed mid-commit ({} MiB put): {} timed runs, median {:.1f} ms, max {:.1f} ms; "
        "goal <= 1000 ms: {}; {} runs had committed before the kill\n",
        o.release_mib, r.n, r.p50, r.max, r.n > 0 && r.max <= 1000 ? "met" : "NOT met", finished_before_kill);
  }
  return 0;
}
