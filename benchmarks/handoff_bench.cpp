// handoff_bench — how long `tensorregd --takeover` takes to serve a Get, by bytes held.
//
// 1. Yardstick (same run): --runs times, a plain tensorregd is started on a fresh socket and
//    timed from fork() until its first GetStats is answered; the median is reported.
// 2. A daemon is started and filled by puts of --chunk bytes each (one safetensors file, one
//    word changed per put so that every put is a new artifact) until it holds the first of
//    --sizes; then a successor is started with --takeover on the same socket and timed from
//    fork() until a Get (GetArtifactMemfd) of the first artifact, on a new connection, is
//    answered by it. The successor then holds the memory: it is filled up to the next size and
//    taken over in turn. Goal: ≤ 1 s and independent of the bytes held (nothing is copied;
//    the successor's RssAnon, printed next to it, stays small).
//
// --under-load N: instead, issue #16's handoff test at any scale. A daemon holds N artifacts of
// --chunk bytes each; 4 clients keep getting random ones (every byte compared with what was
// put) and 4 keep putting new ones while a successor takes over; then every artifact committed
// before or during the handoff must be listed by the successor with the same bytes, and the
// successor's RssAnon must stay under a quarter of the bytes held (nothing copied). Exits 1 when
// any check fails.
//
// Usage: handoff_bench [TENSORREGD] [--sizes 1G,4G,8G] [--chunk 256M] [--runs 5] [--dir DIR]
//                      [--under-load N]
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
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "bench_support.hpp"
#include "tensorreg/client/connection.hpp"
#include "tensorreg/index/safetensors_bundle.hpp"

namespace {

namespace fs = std::filesystem;
using tensorreg::client::connection;
using clock_type = std::chrono::steady_clock;

constexpr const char* kUsage =
    "usage: handoff_bench [TENSORREGD] [--sizes 1G,4G,8G] [--chunk 256M] [--runs 5] [--dir DIR]\n"
    "  TENSORREGD     the daemon binary (default: env TENSORREGD)\n"
    "  --sizes LIST   bytes held at each takeover, ascending (default 1G,4G,8G)\n"
    "  --chunk N      bytes per artifact put (default 256M)\n"
    "  --runs N       plain starts timed for the yardstick (default 5)\n"
    "  --dir DIR      where the sockets and the model file go (default: a new temp dir)\n"
    "  --under-load N hand over N artifacts of --chunk bytes while 8 clients read and put\n";

double ms_since(clock_type::time_point t) {
  return std::chrono::duration<double, std::milli>(clock_type::now() - t).count();
}

[[noreturn]] void die(const std::string& why) {
  fmt::print(stderr, "handoff_bench: {}\n", why);
  std::exit(1);
}

std::uint64_t status_kb(pid_t pid, const std::string& field) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::stoull(line.substr(field.size() + 1));
  }
  return 0;
}

// A safetensors file of one F32 tensor of `bytes` bytes; returns the offset of its data.
std::uint64_t write_model(const fs::path& path, std::uint64_t bytes) {
  std::string header = fmt::format(R"({{"w":{{"dtype":"F32","shape":[{}],"data_offsets":[0,{}]}}}})", bytes / 4, bytes);
  while (header.size() % 8 != 0) header += ' ';
  std::ofstream out(path, std::ios::binary);
  const std::uint64_t n = header.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  std::vector<std::uint32_t> chunk(1 << 18);
  std::uint64_t written = 0, x = 0x9E3779B97F4A7C15ull;
  while (written < bytes) {
    for (auto& v : chunk) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      v = static_cast<std::uint32_t>(x);
    }
    const auto take = std::min<std::uint64_t>(bytes - written, chunk.size() * 4);
    out.write(reinterpret_cast<const char*>(chunk.data()), static_cast<std::streamsize>(take));
    written += take;
  }
  return 8 + n;
}

// One artifact per word: the model file with `word` as its first 8 data bytes.
struct model_file {
  fs::path path;
  std::uint64_t data_at = 0;
  std::string base;  // the tensor's bytes; the first 8 are the word

  model_file(const fs::path& p, std::uint64_t bytes) : path(p), data_at(write_model(p, bytes)) {
    std::ifstream in(path, std::ios::binary);
    in.seekg(static_cast<std::streamoff>(data_at));
    base.resize(bytes);
    in.read(base.data(), static_cast<std::streamsize>(bytes));
  }

  std::unique_ptr<tensorreg::index::safetensors_bundle> with_word(std::uint64_t word) const {
    const int fd = ::open(path.c_str(), O_WRONLY);
    if (fd < 0 || ::pwrite(fd, &word, sizeof word, static_cast<off_t>(data_at)) != sizeof word) die("pwrite");
    ::close(fd);
    auto bundle = tensorreg::index::safetensors_bundle::open({path.string()});
    if (!bundle) die("cannot open the model: " + bundle.error().message);
    return std::move(*bundle);
  }

  // The artifact's canonical bytes (one tensor at offset 0) are the tensor's.
  bool same(const tensorreg::client::stable_replica& r, std::uint64_t word) const {
    const auto b = r.memory.bytes();
    if (r.descriptor.total_size != base.size() || b.size() < base.size()) return false;
    return std::memcmp(b.data(), &word, sizeof word) == 0 &&
           std::memcmp(b.data() + sizeof word, base.data() + sizeof word, base.size() - sizeof word) == 0;
  }
};

// Connects, retrying until the socket accepts (a daemon just started).
connection connect_retrying(const std::string& socket) {
  for (;;) {
    auto c = connection::connect(socket);
    if (c) return std::move(*c);
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

int handoff_under_load(const std::string& binary, const fs::path& dir, std::uint64_t artifacts, std::uint64_t chunk) {
  const auto log = dir / "tensorregd.log";
  const auto socket = (dir / "load" / "tensorregd.sock").string();
  const model_file held_model(dir / "held.safetensors", chunk);
  auto old_daemon =
      std::make_unique<tensorreg::bench::daemon_child>(binary, std::vector<std::string>{"--socket", socket}, log);
  old_daemon->wait_ready();
  std::mutex mutex;
  std::map<std::string, std::pair<int, std::uint64_t>> committed;  // id -> (model: -1 held, k putter k; word)
  {
    auto c = connect_retrying(socket);
    for (std::uint64_t i = 0; i < artifacts; ++i) {
      auto put = c.put(*held_model.with_word(i + 1));
      if (!put) die("put failed: " + put.error().message);
      committed[put->descriptor.artifact_id] = {-1, i + 1};
    }
  }
  constexpr int kReaders = 4, kPutters = 4;
  std::vector<std::unique_ptr<model_file>> put_models;
  for (int k = 0; k < kPutters; ++k) {
    put_models.push_back(std::make_unique<model_file>(dir / fmt::format("put-{}.safetensors", k), chunk));
  }
  const auto model_of = [&](int m) -> const model_file& { return m < 0 ? held_model : *put_models[m]; };
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> reads{0}, puts{0}, wrong{0}, lost{0}, failed_reads{0}, failed_puts{0};
  std::vector<std::thread> clients;
  for (int k = 0; k < kReaders; ++k) {
    clients.emplace_back([&, k] {
      std::mt19937_64 rng(static_cast<unsigned>(k));
      auto c = connect_retrying(socket);
      while (!stop) {
        std::pair<std::string, std::pair<int, std::uint64_t>> pick;
        {
          std::lock_guard lock(mutex);
          auto it = committed.begin();
          std::advance(it, static_cast<long>(rng() % committed.size()));
          pick = *it;
        }
        auto got = c.get(pick.first);
        if (!got) {
          ++(got.error().code == tensorreg::errc::not_found ? lost : failed_reads);
          continue;
        }
        ++(model_of(pick.second.first).same(*got, pick.second.second) ? reads : wrong);
      }
    });
  }
  for (int k = 0; k < kPutters; ++k) {
    clients.emplace_back([&, k] {
      auto c = connect_retrying(socket);
      // Words of their own (every model file has the same pattern): each put is a new artifact.
      for (std::uint64_t word = (static_cast<std::uint64_t>(k) + 1) << 40; !stop; ++word) {
        auto put = c.put(*put_models[static_cast<std::size_t>(k)]->with_word(word));
        if (!put) {
          ++failed_puts;  // cut off by the handoff: a put is not idempotent, so not retried for us
          continue;
        }
        std::lock_guard lock(mutex);
        committed[put->descriptor.artifact_id] = {k, word};
        ++puts;
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  auto successor = std::make_unique<tensorreg::bench::daemon_child>(
      binary, std::vector<std::string>{"--socket", socket, "--takeover"}, log);
  successor->wait_ready();
  const double ready_ms = ms_since(successor->forked);
  const int old_code = old_daemon->wait_exit();
  const double old_exit_ms = ms_since(successor->forked);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  stop = true;
  for (auto& t : clients) t.join();

  auto c = connect_retrying(socket);
  auto listed = c.list();
  if (!listed) die("ListArtifacts after the handoff failed: " + listed.error().message);
  std::set<std::string> ids;
  for (const auto& a : *listed) ids.insert(a.descriptor.artifact_id);
  std::uint64_t missing = 0, differ = 0;
  for (const auto& [id, what] : committed) {
    if (ids.count(id) == 0) ++missing;
    auto got = c.get(id);
    if (!got || !model_of(what.first).same(*got, what.second)) ++differ;
  }
  const std::uint64_t held_kb = artifacts * chunk / 1024;
  const auto anon_kb = status_kb(successor->pid, "RssAnon");
  const auto shmem_kb = status_kb(successor->pid, "RssShmem");
  const bool ok = old_code == 0 && wrong == 0 && lost == 0 && failed_reads == 0 && reads > 0 && puts > 0 &&
                  missing == 0 && differ == 0 && anon_kb < held_kb / 4;
  fmt::print(
      "{{\"bench\":\"handoff\",\"what\":\"under_load\",\"artifacts\":{},\"held_bytes\":{},\"successor_ready_ms\":{:.1f}"
      ","
      "\"old_exit_ms\":{:.1f},\"old_exit_code\":{},\"reads\":{},\"puts\":{},\"wrong_bytes\":{},\"lost\":{},"
      "\"failed_reads\":{},\"puts_cut_off\":{},\"committed\":{},\"missing_after\":{},\"differ_after\":{},"
      "\"successor_rss_anon_kb\":{},\"successor_rss_shmem_kb\":{},\"ok\":{}}}\n",
      artifacts, artifacts * chunk, ready_ms, old_exit_ms, old_code, reads.load(), puts.load(), wrong.load(),
      lost.load(), failed_reads.load(), failed_puts.load(), committed.size(), missing, differ, anon_kb, shmem_kb, ok);
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::string binary = std::getenv("TENSORREGD") != nullptr ? std::getenv("TENSORREGD") : "";
  std::vector<std::uint64_t> sizes{std::uint64_t{1} << 30, std::uint64_t{4} << 30, std::uint64_t{8} << 30};
  std::uint64_t chunk = std::uint64_t{256} << 20;
  unsigned runs = 5;
  std::uint64_t under_load = 0;
  std::string dir_arg;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) die(a + " needs a value\n" + kUsage);
      return argv[++i];
    };
    if (a == "--help" || a == "-h") {
      fmt::print("{}", kUsage);
      return 0;
    } else if (a == "--sizes") {
      sizes.clear();
      std::string list = value();
      for (std::size_t at = 0; at <= list.size();) {
        const auto end = std::min(list.find(',', at), list.size());
        auto n = tensorreg::bench::parse_bytes(list.substr(at, end - at));
        if (!n) die("--sizes needs sizes like 1G,4G");
        sizes.push_back(*n);
        at = end + 1;
      }
    } else if (a == "--chunk") {
      auto n = tensorreg::bench::parse_bytes(value());
      if (!n || *n < 4096 || *n % 4 != 0) die("--chunk needs a size like 256M");
      chunk = *n;
    } else if (a == "--runs") {
      runs = static_cast<unsigned>(std::stoul(value()));
    } else if (a == "--dir") {
      dir_arg = value();
    } else if (a == "--under-load") {
      under_load = std::stoull(value());
      if (under_load == 0) die("--under-load needs a number of artifacts > 0");
    } else if (!a.empty() && a[0] != '-') {
      binary = a;
    } else {
      die("unknown option " + a + "\n" + kUsage);
    }
  }
  if (binary.empty()) die(std::string("no daemon binary given\n") + kUsage);
  const fs::path dir =
      dir_arg.empty() ? fs::temp_directory_path() / ("handoff_bench-" + std::to_string(::getpid())) : fs::path(dir_arg);
  fs::create_directories(dir);
  const auto log = dir / "tensorregd.log";
  if (under_load != 0) {
    const int code = handoff_under_load(binary, dir, under_load, chunk);
    std::error_code ignored;
    if (dir_arg.empty()) fs::remove_all(dir, ignored);
    return code;
  }

  // 1. The yardstick: a plain start until its first GetStats.
  std::vector<double> starts;
  for (unsigned r = 0; r < runs; ++r) {
    const auto socket = (dir / ("y" + std::to_string(r)) / "tensorregd.sock").string();
    tensorreg::bench::daemon_child d(binary, {"--socket", socket}, log);
    auto c = connect_retrying(socket);
    if (!c.stats()) die("GetStats failed");
    starts.push_back(ms_since(d.forked));
  }
  std::sort(starts.begin(), starts.end());
  const double yardstick = starts[starts.size() / 2];
  fmt::print("{{\"bench\":\"handoff\",\"what\":\"plain_start_to_first_getstats\",\"median_ms\":{:.1f},\"runs\":{}}}\n",
             yardstick, runs);

  // 2. Fill, take over, fill more, take over again.
  const auto socket = (dir / "run" / "tensorregd.sock").string();
  const auto model = dir / "model.safetensors";
  const auto data_at = write_model(model, chunk);
  auto current =
      std::make_unique<tensorreg::bench::daemon_child>(binary, std::vector<std::string>{"--socket", socket}, log);
  current->wait_ready();
  std::uint64_t held = 0, puts = 0;
  std::string first_id;
  struct row {
    std::uint64_t held;
    double ms, old_exit_ms;
    std::uint64_t anon_kb, shmem_kb;
  };
  std::vector<row> rows;
  for (const auto target : sizes) {
    {
      auto c = connect_retrying(socket);
      while (held < target) {
        {
          // One word of the tensor changes, so that the put is a new artifact.
          const int fd = ::open(model.c_str(), O_WRONLY);
          const std::uint64_t word = ++puts;
          if (fd < 0 || ::pwrite(fd, &word, sizeof word, static_cast<off_t>(data_at)) != sizeof word) die("pwrite");
          ::close(fd);
        }
        auto bundle = tensorreg::index::safetensors_bundle::open({model.string()});
        if (!bundle) die("cannot open the model: " + bundle.error().message);
        auto put = c.put(**bundle);
        if (!put) die("put failed: " + put.error().message);
        if (first_id.empty()) first_id = put->descriptor.artifact_id;
        held += chunk;
      }
    }
    auto next = std::make_unique<tensorreg::bench::daemon_child>(
        binary, std::vector<std::string>{"--socket", socket, "--takeover"}, log);
    next->wait_ready();
    auto c = connect_retrying(socket);
    auto got = c.get(first_id);
    if (!got) die("Get after the takeover failed: " + got.error().message);
    const double ms = ms_since(next->forked);
    const int old_code = current->wait_exit();
    const double old_exit_ms = ms_since(next->forked);
    if (old_code != 0) die("the old daemon exited with " + std::to_string(old_code));
    rows.push_back({held, ms, old_exit_ms, status_kb(next->pid, "RssAnon"), status_kb(next->pid, "RssShmem")});
    fmt::print(
        "{{\"bench\":\"handoff\",\"what\":\"takeover_to_first_get\",\"held_bytes\":{},\"ms\":{:.1f},"
        "\"ratio_to_plain_start\":{:.2f},\"old_exit_ms\":{:.1f},\"successor_rss_anon_kb\":{},"
        "\"successor_rss_shmem_kb\":{}}}\n",
        held, ms, ms / yardstick, old_exit_ms, rows.back().anon_kb, rows.back().shmem_kb);
    std::fflush(stdout);
    current = std::move(next);
  }
  current.reset();
  fmt::print("\nplain start → first GetStats (yardstick): median {:.1f} ms of {} runs\n", yardstick, runs);
  fmt::print("{:>10} {:>14} {:>10} {:>14} {:>14} {:>14}\n", "held GiB", "takeover→Get", "× start", "old exited",
             "RssAnon MiB", "RssShmem MiB");
  for (const auto& r : rows) {
    fmt::print("{:>10.2f} {:>11.1f} ms {:>10.2f} {:>11.1f} ms {:>14.1f} {:>14.1f}\n",
               static_cast<double>(r.held) / (1 << 30), r.ms, r.ms / yardstick, r.old_exit_ms,
               static_cast<double>(r.anon_kb) / 1024, static_cast<double>(r.shmem_kb) / 1024);
  }
  std::error_code ignored;
  if (dir_arg.empty()) fs::remove_all(dir, ignored);
  return 0;
}
