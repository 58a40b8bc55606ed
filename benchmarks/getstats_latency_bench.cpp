// getstats_latency_bench — GetStats round trips of a real tensorregd, idle and under load, where
// their time goes, and the time the daemon takes to release a client killed mid-commit.
//
// 1. Starts the daemon (path as the first argument or env TENSORREGD) on a socket in a fresh
//    temp directory, its metrics on a loopback port, and waits for "ready".
// 2. Idle: --samples GetStats round trips on one connection; p50 / p99 / max. This is the
//    yardstick of the same run. The samples also place the daemon's clock: each answer carries
//    the daemon's uptime, read on its steady clock (CLOCK_MONOTONIC, as ours) while it handled
//    the request, so the daemon's start lies between (sent - uptime) and (received - uptime) of
//    every sample; the tightest pair of bounds places each later answer's stamp on our clock.
// 3. Load: --clients loading clients, each on its own connection, loop over mixed work (puts of
//    a 64 KiB and a --large-mib buffer, leases of a small buffer that are then released, Begins
//    that are then aborted) for --seconds. By default they run in a child process (this binary
//    again, with --load-only) and this process, one thread, times GetStats every 2 ms: what a
//    separate monitoring client sees. --load-in-process makes them threads of this process (as
//    the bench measured before; the timing thread is then one of 65 busy threads).
//    Each round trip is split at the daemon's stamp:
//      to daemon   our send, the daemon's I/O thread waking and reaching the frame, its decode
//                  and the engine's tables, up to the stamp;
//      back        the answer's encoding and write, and this process waking for it.
//    The daemon's own handling time of each GetStats (its tensorreg_rpc_duration_seconds
//    histogram, scraped before and after the load) is shown as bucket counts, and how late this
//    thread wakes from its own 2 ms sleeps (the scheduler's floor for this process).
//    Prints p50 / p99 / max under load next to the idle ones (goal: p99 <= 5 ms on 2 cores,
//    <= 1 ms where cores are free).
// 4. Release: a child process puts a --release-mib buffer; right after its copy is written (the
//    commit is then under way) it is SIGKILLed; we time until GetStats shows its registration
//    gone (pending_registrations back to the baseline), --release-runs times (goal <= 1 s). A
//    run where the commit had ended before the kill (one more artifact) is reported, not timed.
//
// --daemon-cpus, --load-cpus and --probe-cpus pin the daemon, the loading child and this
// process to CPU lists (e.g. "0-3,8"), to measure with cores kept free for the daemon and probe.
//
// Usage: getstats_latency_bench [TENSORREGD] [options]   (see kUsage)
// Output: one JSON line per measurement, then a table.
#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/core.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
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
#include <iterator>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench_support.hpp"
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
    "                              [--load-in-process] [--daemon-cpus L] [--load-cpus L] [--probe-cpus L]\n"
    "                              [--daemon-args S] [--own-sessions]\n"
    "  TENSORREGD         the daemon binary (default: env TENSORREGD)\n"
    "  --clients N        loading clients, one connection each (default 64)\n"
    "  --seconds S        how long GetStats is timed under load (default 10)\n"
    "  --samples N        idle GetStats round trips (default 2000)\n"
    "  --large-mib N      size of the large puts (default 16)\n"
    "  --release-mib N    size of the put whose client is killed mid-commit (default 512)\n"
    "  --release-runs N   how many times (default 5)\n"
    "  --no-release       skip the release measurement\n"
    "  --load-in-process  run the loading clients as threads of the timing process (default: a\n"
    "                     child process, the timing process has one thread)\n"
    "  --daemon-cpus L    pin the daemon to CPU list L (e.g. 0-3,8; default: no pinning)\n"
    "  --load-cpus L      pin the loading clients to CPU list L\n"
    "  --probe-cpus L     pin the timing process (and the release runs' child) to CPU list L\n"
    "  --own-sessions     run the daemon, the loading child and the timing process each in a\n"
    "                     session of its own (setsid), as a service, jobs and a monitor are:\n"
    "                     with autogroup scheduling each session shares the CPU as one group\n"
    "  --daemon-args S    more arguments for the daemon, split at spaces (e.g. '--io-rt-priority 0')\n"
    "internal: --load-only --socket PATH --dir DIR [--clients N]: the loading child\n";

struct options {
  std::string daemon;
  unsigned clients = 64;
  double seconds = 10;
  unsigned samples = 2000;
  std::uint64_t large_mib = 16;
  std::uint64_t release_mib = 512;
  unsigned release_runs = 5;
  bool release = true;
  bool load_in_process = false;
  bool own_sessions = false;
  std::string daemon_cpus, load_cpus, probe_cpus;
  std::vector<std::string> daemon_args;
  // The loading child (--load-only).
  bool load_only = false;
  std::string socket;
  std::string dir;
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

// Milliseconds of steady_clock (CLOCK_MONOTONIC, as the daemon's uptime) since its epoch.
double now_ms() { return std::chrono::duration<double, std::milli>(clock_type::now().time_since_epoch()).count(); }

// "0-3,8" as a CPU set; nullopt when it does not parse.
std::optional<cpu_set_t> parse_cpu_list(const std::string& text) {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::size_t at = 0;
  while (at < text.size()) {
    const auto comma = std::min(text.find(',', at), text.size());
    const std::string part = text.substr(at, comma - at);
    const auto dash = part.find('-');
    try {
      const int lo = std::stoi(part.substr(0, dash));
      const int hi = dash == std::string::npos ? lo : std::stoi(part.substr(dash + 1));
      if (lo < 0 || hi < lo || hi >= CPU_SETSIZE) return std::nullopt;
      for (int c = lo; c <= hi; ++c) CPU_SET(c, &set);
    } catch (const std::exception&) {
      return std::nullopt;
    }
    at = comma + 1;
  }
  if (CPU_COUNT(&set) == 0) return std::nullopt;
  return set;
}

// The CPUs this process may run on at start, before any pinning of ours.
cpu_set_t started_on() {
  static const cpu_set_t set = [] {
    cpu_set_t s;
    CPU_ZERO(&s);
    (void)::sched_getaffinity(0, sizeof s, &s);
    return s;
  }();
  return set;
}

// Pins the calling thread (and the threads and processes it makes after this) to `cpus`; empty:
// to the CPUs the bench started on, so that a child does not inherit another part's pinning.
void pin_to(const std::string& cpus) {
  if (cpus.empty()) {
    const cpu_set_t all = started_on();
    (void)::sched_setaffinity(0, sizeof all, &all);
    return;
  }
  const auto set = parse_cpu_list(cpus);
  if (!set || ::sched_setaffinity(0, sizeof(*set), &*set) != 0) {
    fmt::print(stderr, "cannot pin to CPUs '{}': {}\n", cpus, set ? std::strerror(errno) : "not a CPU list");
    std::_Exit(2);
  }
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

fs::path small_model(const fs::path& dir) { return dir / "small.safetensors"; }
fs::path large_model(const fs::path& dir) { return dir / "large.safetensors"; }
fs::path leased_model(const fs::path& dir, unsigned i) { return dir / fmt::format("leased-{}.safetensors", i); }

std::unique_ptr<tensorreg::index::safetensors_bundle> open_bundle(const fs::path& p) {
  auto b = tensorreg::index::safetensors_bundle::open({p.string()});
  if (!b) {
    fmt::print(stderr, "cannot open '{}': {}\n", p.string(), b.error().message);
    std::exit(1);
  }
  return std::move(*b);
}

// The daemon as a child process on a socket of its own, its metrics on a loopback port.
class daemon_child {
 public:
  daemon_child(const std::string& binary, const fs::path& dir, const std::string& cpus,
               const std::vector<std::string>& extra_args, bool own_session)
      : socket_((dir / "run" / "tensorregd.sock").string()) {
    std::vector<std::string> args{binary, "--socket", socket_, "--metrics-addr", "127.0.0.1:0"};
    args.insert(args.end(), extra_args.begin(), extra_args.end());
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    int out[2];
    if (::pipe(out) != 0) std::exit(1);
    pid_ = ::fork();
    if (pid_ == 0) {
      if (own_session) (void)::setsid();
      pin_to(cpus);
      // Its log goes to a file next to the socket: the bench's output stays the measurements.
      const int log = ::open((dir / "tensorregd.log").c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
      if (log >= 0) ::dup2(log, 2);
      ::dup2(out[1], 1);
      ::close(out[0]);
      ::execv(binary.c_str(), argv.data());
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
    // "tensorregd: metrics on http://127.0.0.1:PORT/metrics", printed before the ready line.
    const std::string marker = "http://127.0.0.1:";
    if (const auto at = seen.find(marker); at != std::string::npos) {
      metrics_port_ = std::atoi(seen.c_str() + at + marker.size());
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
  [[nodiscard]] int metrics_port() const noexcept { return metrics_port_; }
  [[nodiscard]] pid_t pid() const noexcept { return pid_; }

 private:
  std::string socket_;
  pid_t pid_ = -1;
  int out_ = -1;
  int metrics_port_ = 0;
};

// CPU seconds (user + system) process `pid` has used so far; 0 when it cannot be read.
double cpu_seconds_of(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/stat", pid));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto close = text.rfind(')');  // the name may hold spaces; the fields follow it
  if (close == std::string::npos) return 0;
  std::istringstream fields(text.substr(close + 2));
  std::string field;
  double ticks = 0;
  for (int i = 3; fields >> field && i <= 15; ++i) {
    if (i == 14 || i == 15) ticks += std::atof(field.c_str());  // utime, stime
  }
  return ticks / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

// The daemon's GetStats handling times so far: its tensorreg_rpc_duration_seconds buckets
// (cumulative counts by upper bound) for method GetStats, code OK. Empty when not scraped.
std::map<double, double> scrape_getstats_buckets(int port) {
  std::map<double, double> buckets;
  if (port <= 0) return buckets;
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return buckets;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<std::uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string text;
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0) {
    const std::string request = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if (::write(fd, request.data(), request.size()) == static_cast<ssize_t>(request.size())) {
      char buf[16384];
      for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;) text.append(buf, static_cast<std::size_t>(n));
    }
  }
  ::close(fd);
  const std::string family = "tensorreg_rpc_duration_seconds_bucket{";
  for (std::size_t at = 0; (at = text.find(family, at)) != std::string::npos; ++at) {
    const auto end = text.find('\n', at);
    const std::string line = text.substr(at, end - at);
    if (line.find("method=\"GetStats\"") == std::string::npos || line.find("code=\"OK\"") == std::string::npos) {
      continue;
    }
    const auto le = line.find("le=\"");
    const auto space = line.rfind(' ');
    if (le == std::string::npos || space == std::string::npos) continue;
    const std::string bound = line.substr(le + 4, line.find('"', le + 4) - le - 4);
    const double upper = bound == "+Inf" ? 1e300 : std::atof(bound.c_str());
    buckets[upper] = std::atof(line.c_str() + space + 1);
  }
  return buckets;
}

connection connect_or_exit(const std::string& socket) {
  auto c = connection::connect(socket);
  if (!c) {
    fmt::print(stderr, "cannot connect to '{}': {}\n", socket, c.error().message);
    std::exit(1);
  }
  return std::move(*c);
}

// One GetStats round trip on our clock (ms) and the daemon's stamp (its uptime, ms).
struct sample {
  double sent = 0, received = 0, stamp = 0;
  [[nodiscard]] double round_trip() const { return received - sent; }
};

sample timed_stats(connection& c) {
  sample s;
  s.sent = now_ms();
  auto stats = c.stats();
  s.received = now_ms();
  if (!stats) {
    fmt::print(stderr, "GetStats failed: {}\n", stats.error().message);
    std::exit(1);
  }
  s.stamp = stats->uptime_seconds * 1000;
  return s;
}

// Where the daemon's uptime 0 lies on our clock: within [lower, upper] by every sample.
struct daemon_clock {
  double lower = -1e300, upper = 1e300;
  void add(const sample& s) {
    lower = std::max(lower, s.sent - s.stamp);
    upper = std::min(upper, s.received - s.stamp);
  }
  [[nodiscard]] double start() const { return (lower + upper) / 2; }
  [[nodiscard]] double uncertainty() const { return (upper - lower) / 2; }
};

struct load_counts {
  std::atomic<std::uint64_t> puts{0}, large_puts{0}, leases{0}, aborts{0}, errors{0};
  std::atomic<unsigned> connected{0};
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
  ++counts.connected;
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

// The loading clients, as threads of the calling process.
class load_threads {
 public:
  // `cpus`: where the clients run (empty: where the bench started), whatever the caller's pinning.
  load_threads(const std::string& socket, const fs::path& dir, unsigned clients, const std::string& cpus)
      : small_(open_bundle(small_model(dir))), large_(open_bundle(large_model(dir))) {
    for (unsigned i = 0; i < clients; ++i) {
      threads_.emplace_back([this, socket, cpus, leased = leased_model(dir, i)] {
        pin_to(cpus);
        load_client(socket, *small_, *large_, leased, stop_, counts_);
      });
    }
    while (counts_.connected < clients) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ~load_threads() { stop(); }
  load_threads(const load_threads&) = delete;
  load_threads& operator=(const load_threads&) = delete;

  void stop() {
    stop_ = true;
    for (auto& t : threads_) {
      if (t.joinable()) t.join();
    }
  }
  [[nodiscard]] load_counts& counts() noexcept { return counts_; }

 private:
  std::unique_ptr<tensorreg::index::safetensors_bundle> small_, large_;
  std::atomic<bool> stop_{false};
  load_counts counts_;
  std::vector<std::thread> threads_;
};

// What the loading clients completed, as the child reports it.
struct load_report {
  std::uint64_t puts = 0, large_puts = 0, leases = 0, aborts = 0, errors = 0;
  std::string first_error;
};

// --load-only: the loading clients in this process until stdin closes; then one line of counts
// on stdout ("counts P L S A E") and the first error on the next.
int run_load_only(const options& o) {
  load_threads load(o.socket, o.dir, o.clients, {});
  std::fputs("running\n", stdout);
  std::fflush(stdout);
  char buf[64];
  while (::read(0, buf, sizeof buf) > 0) {
  }
  load.stop();
  auto& c = load.counts();
  fmt::print("counts {} {} {} {} {}\n{}\n", c.puts.load(), c.large_puts.load(), c.leases.load(), c.aborts.load(),
             c.errors.load(), c.first_error);
  std::fflush(stdout);
  return 0;
}

// The loading clients in a child process (this binary with --load-only).
class load_process {
 public:
  load_process(const options& o, const std::string& socket, const fs::path& dir) {
    int to_child[2], from_child[2];
    if (::pipe2(to_child, O_CLOEXEC) != 0 || ::pipe2(from_child, O_CLOEXEC) != 0) std::exit(1);
    const std::string self = fs::read_symlink("/proc/self/exe").string();
    const std::string clients = std::to_string(o.clients);
    pid_ = ::fork();
    if (pid_ == 0) {
      if (o.own_sessions) (void)::setsid();
      pin_to(o.load_cpus);
      ::dup2(to_child[0], 0);
      ::dup2(from_child[1], 1);
      ::execl(self.c_str(), self.c_str(), "--load-only", "--socket", socket.c_str(), "--dir", dir.c_str(), "--clients",
              clients.c_str(), static_cast<char*>(nullptr));
      std::_Exit(127);
    }
    ::close(to_child[0]);
    ::close(from_child[1]);
    stop_fd_ = to_child[1];
    out_ = ::fdopen(from_child[0], "r");
    char line[256];
    if (out_ == nullptr || std::fgets(line, sizeof line, out_) == nullptr || std::string(line) != "running\n") {
      fmt::print(stderr, "the loading child did not start\n");
      std::exit(1);
    }
  }
  ~load_process() {
    if (stop_fd_ >= 0) (void)stop();
    if (out_ != nullptr) std::fclose(out_);
  }
  load_process(const load_process&) = delete;
  load_process& operator=(const load_process&) = delete;

  [[nodiscard]] pid_t pid() const noexcept { return pid_; }

  // Ends the load (stdin closes) and returns what it completed.
  load_report stop() {
    ::close(stop_fd_);
    stop_fd_ = -1;
    load_report r;
    char line[1024];
    if (std::fgets(line, sizeof line, out_) != nullptr) {
      (void)std::sscanf(line, "counts %lu %lu %lu %lu %lu", &r.puts, &r.large_puts, &r.leases, &r.aborts, &r.errors);
    }
    if (std::fgets(line, sizeof line, out_) != nullptr) {
      r.first_error = line;
      while (!r.first_error.empty() && r.first_error.back() == '\n') r.first_error.pop_back();
    }
    int status = 0;
    ::waitpid(pid_, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) r.first_error += " (the loading child failed)";
    return r;
  }

 private:
  pid_t pid_ = -1;
  int stop_fd_ = -1;
  std::FILE* out_ = nullptr;
};

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
    } else if (a == "--daemon-args") {
      const char* v = next();
      if (v == nullptr) return false;
      const std::string text = v;
      for (std::size_t at = 0; at < text.size();) {
        const auto space = std::min(text.find(' ', at), text.size());
        if (space > at) o.daemon_args.push_back(text.substr(at, space - at));
        at = space + 1;
      }
    } else if (a == "--own-sessions") {
      o.own_sessions = true;
    } else if (a == "--load-in-process") {
      o.load_in_process = true;
    } else if (a == "--load-only") {
      o.load_only = true;
    } else if (a == "--socket" || a == "--dir" || a == "--daemon-cpus" || a == "--load-cpus" || a == "--probe-cpus") {
      const char* v = next();
      if (v == nullptr) return false;
      std::string& field = a == "--socket"        ? o.socket
                           : a == "--dir"         ? o.dir
                           : a == "--daemon-cpus" ? o.daemon_cpus
                           : a == "--load-cpus"   ? o.load_cpus
                                                  : o.probe_cpus;
      field = v;
      if (a.ends_with("-cpus") && !parse_cpu_list(field)) return false;
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
  if (o.load_only) return !o.socket.empty() && !o.dir.empty();
  return !o.daemon.empty();
}

// The GetStats handling-time buckets (ms upper bound -> count) observed between two scrapes.
std::vector<std::pair<double, double>> bucket_counts(const std::map<double, double>& before,
                                                     const std::map<double, double>& after) {
  std::vector<std::pair<double, double>> out;
  double below = 0;
  for (const auto& [upper, cumulative] : after) {
    const auto b = before.find(upper);
    const double in_range = cumulative - (b != before.end() ? b->second : 0);
    out.emplace_back(upper * 1000, in_range - below);
    below = in_range;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  if (!parse(argc, argv, o)) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  if (o.load_only) return run_load_only(o);
  (void)started_on();
  if (o.own_sessions) {
    // A process group leader (as a shell starts us) cannot make a session: a child measures.
    const pid_t child = ::fork();
    if (child < 0) return 1;
    if (child > 0) {
      int status = 0;
      ::waitpid(child, &status, 0);
      return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
    }
    (void)::setsid();
  }
  char tmpl[] = "/tmp/getstats-bench-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) return 1;
  const fs::path dir = tmpl;
  (void)write_model(dir, small_model(dir).filename(), 64 << 10, 1);
  (void)write_model(dir, large_model(dir).filename(), o.large_mib << 20, 2);
  for (unsigned i = 0; i < o.clients; ++i) {
    (void)write_model(dir, leased_model(dir, i).filename(), 256 << 10, 100 + i);
  }
  const auto release_path = write_model(dir, "release.safetensors", o.release_mib << 20, 4);

  percentiles idle, loaded, to_daemon, back, wake;
  std::vector<std::pair<double, double>> handled;  // GetStats handling time: ms bucket -> count
  daemon_clock clock;
  std::size_t over_goal = 0, over_goal_daemon_side = 0;
  std::vector<double> releases;
  unsigned finished_before_kill = 0;
  load_report counts;
  double load_seconds = 0;
  double daemon_cpu = 0, load_cpu = 0;  // CPU seconds used while GetStats was timed under load
  {
    daemon_child daemon(o.daemon, dir, o.daemon_cpus, o.daemon_args, o.own_sessions);
    pin_to(o.probe_cpus);
    auto probe = connect_or_exit(daemon.socket());

    // 2. Idle yardstick, and the daemon's clock.
    std::vector<double> ms;
    for (unsigned i = 0; i < o.samples; ++i) {
      const auto s = timed_stats(probe);
      clock.add(s);
      ms.push_back(s.round_trip());
    }
    idle = percentiles_of(ms);
    print_json("idle", idle);

    // 3. Under load.
    std::optional<load_threads> threads;
    std::optional<load_process> child;
    if (o.load_in_process) {
      threads.emplace(daemon.socket(), dir, o.clients, o.load_cpus);
    } else {
      child.emplace(o, daemon.socket(), dir);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(500));  // let every client get going
    const auto buckets_before = scrape_getstats_buckets(daemon.metrics_port());
    // In-process load: this process's CPU, the timing thread's share included.
    const auto load_cpu_now = [&] {
      return child ? cpu_seconds_of(child->pid()) : tensorreg::bench::process_cpu_seconds();
    };
    const double daemon_cpu_before = cpu_seconds_of(daemon.pid()), load_cpu_before = load_cpu_now();
    std::vector<sample> samples;
    std::vector<double> late;
    const auto load_start = clock_type::now();
    while (ms_since(load_start) < o.seconds * 1000) {
      samples.push_back(timed_stats(probe));
      // How late this thread wakes from a 2 ms sleep: the OS scheduler's share of any round
      // trip of this process now, which no daemon can beat.
      const auto slept = clock_type::now();
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
      late.push_back(std::max(0.0, ms_since(slept) - 2.0));
    }
    load_seconds = ms_since(load_start) / 1000;
    daemon_cpu = cpu_seconds_of(daemon.pid()) - daemon_cpu_before;
    load_cpu = load_cpu_now() - load_cpu_before;
    const auto buckets_after = scrape_getstats_buckets(daemon.metrics_port());
    if (threads) {
      threads->stop();
      auto& c = threads->counts();
      counts = {c.puts.load(), c.large_puts.load(), c.leases.load(), c.aborts.load(), c.errors.load(), c.first_error};
      threads.reset();
    } else {
      counts = child->stop();
      child.reset();
    }
    handled = bucket_counts(buckets_before, buckets_after);
    std::vector<double> rt, in, out;
    for (const auto& s : samples) {
      const double stamp = clock.start() + s.stamp;
      rt.push_back(s.round_trip());
      in.push_back(stamp - s.sent);
      out.push_back(s.received - stamp);
      if (s.round_trip() > 5.0) {
        ++over_goal;
        if (stamp - s.sent > s.received - stamp) ++over_goal_daemon_side;
      }
    }
    loaded = percentiles_of(rt);
    to_daemon = percentiles_of(in);
    back = percentiles_of(out);
    wake = percentiles_of(late);
    print_json("load", loaded);
    print_json("load_to_daemon_stamp", to_daemon);
    print_json("load_daemon_stamp_to_client", back);
    print_json("load_wakeup_lateness", wake);

    // 4. Release of a client killed mid-commit, on the now idle daemon.
    for (unsigned run = 0; o.release && run < o.release_runs; ++run) {
      auto before = probe.stats();
      if (!before) return 1;
      int ready[2];
      if (::pipe(ready) != 0) return 1;
      const pid_t child_pid = ::fork();
      if (child_pid == 0) {
        ::close(ready[0]);
        release_child(daemon.socket(), release_path, ready[1]);
      }
      ::close(ready[1]);
      char byte = 0;
      const bool got = ::read(ready[0], &byte, 1) == 1;
      ::close(ready[0]);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));  // the Feed and the Commit go out
      const auto killed = clock_type::now();
      ::kill(child_pid, SIGKILL);
      ::waitpid(child_pid, nullptr, 0);
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

  fmt::print("\nsessions: {}\n", o.own_sessions ? "daemon, load and timing process each in its own" : "one for all");
  fmt::print("load: {} ({} clients); daemon clock placed to +/- {:.3f} ms by the idle samples\n",
             o.load_in_process ? "threads of the timing process" : "a separate process", o.clients,
             clock.uncertainty());
  fmt::print("GetStats round trip (ms)         p50      p99      max   samples\n");
  fmt::print("idle (yardstick)             {:8.3f} {:8.3f} {:8.3f} {:9}\n", idle.p50, idle.p99, idle.max, idle.n);
  fmt::print("{:3} clients loading         {:8.3f} {:8.3f} {:8.3f} {:9}\n", o.clients, loaded.p50, loaded.p99,
             loaded.max, loaded.n);
  fmt::print("  send -> daemon's stamp     {:8.3f} {:8.3f} {:8.3f}\n", to_daemon.p50, to_daemon.p99, to_daemon.max);
  fmt::print("  daemon's stamp -> received {:8.3f} {:8.3f} {:8.3f}\n", back.p50, back.p99, back.max);
  fmt::print("wake-up lateness, 2 ms sleep {:8.3f} {:8.3f} {:8.3f} {:9}   (this process's scheduling floor)\n",
             wake.p50, wake.p99, wake.max, wake.n);
  std::string buckets;
  for (const auto& [upper, n] : handled) {
    if (n == 0) continue;
    buckets += upper > 1e200 ? fmt::format(" >60000 ms: {:.0f};", n) : fmt::format(" <={} ms: {:.0f};", upper, n);
  }
  fmt::print("daemon's handling of GetStats under load (tensorreg_rpc_duration_seconds):{}\n",
             buckets.empty() ? " not scraped" : buckets);
  fmt::print("round trips over 5 ms: {}, of them {} with most of their time before the daemon's stamp\n", over_goal,
             over_goal_daemon_side);
  fmt::print("p99 under load / idle p99: {:.1f}x; goal p99 <= 5 ms: {}\n", loaded.p99 / std::max(idle.p99, 1e-9),
             loaded.p99 <= 5.0 ? "met" : "NOT met");
  fmt::print("load in {:.1f} s: {} small puts, {} large puts ({} MiB), {} leases, {} aborts, {} errors\n", load_seconds,
             counts.puts, counts.large_puts, o.large_mib, counts.leases, counts.aborts, counts.errors);
  const double cpu = daemon_cpu + load_cpu;
  fmt::print("CPU while timed: daemon {:.2f} s, load {:.2f} s; {:.0f} small puts per CPU second of the two\n",
             daemon_cpu, load_cpu, cpu > 0 ? static_cast<double>(counts.puts) / cpu : 0.0);
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
