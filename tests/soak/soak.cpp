// tensorreg_soak — 64 concurrent clients against one real tensorregd for a bounded time, then an
// audit of what the daemon holds (issue #15).
//
//   tensorreg_soak [--seconds N] [--clients N] [--killers N]
//
// Most clients are threads of this process, each with its own connection, doing a random mix
// of puts (small and large, new bytes and bytes already held: joins), leases of HOST_SHARED
// regions (sealed daemon memfds) that they keep alive and release, leases and pending
// registrations left to expire, aborts, keep-alives, deregisters, gets whose bytes are
// re-hashed, lists and stats. `--killers` of the clients are processes (tensorreg_hostile_peer)
// that are SIGKILLed half-way through a frame, in the middle of a commit, while holding a lease,
// or during a put, one after another.
//
// Afterwards: no pending registration, lease, region or mapping is left; the stable tier holds
// exactly the bytes of the artifacts listed; every one of them re-hashes to its id; once they
// are deregistered, the daemon's fds are back at their baseline. Then the daemon is stopped
// and must exit 0 (under ASan that includes LeakSanitizer's verdict). Prints operations,
// errors by code and leaks; exits 0 when nothing unexpected happened, 1 otherwise.
//
// The daemon is TENSORREG_DAEMON_PATH (or $TENSORREGD): an ASan build tree runs its own.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "client/access.hpp"
#include "client/raw_connection.hpp"
#include "support/child_process.hpp"
#include "support/daemon_probe.hpp"
#include "support/daemon_process.hpp"
#include "support/lip_requests.hpp"
#include "support/safetensors_writer.hpp"
#include "support/temp_dir.hpp"
#include "tensorreg/client/connection.hpp"
#include "tensorreg/common/error.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/identity/content_id.hpp"
#include "tensorreg/index/safetensors_bundle.hpp"

#ifndef TENSORREG_HOSTILE_PEER_PATH
#error "TENSORREG_HOSTILE_PEER_PATH must name the tensorreg_hostile_peer binary"
#endif

namespace {

namespace testing = tensorreg::testing;
namespace lip = tensorreg::testing::lip;
using tensorreg::errc;
using tensorreg::client::connection;
using raw_connection = tensorreg::client::raw::connection;
using bundle_ptr = std::unique_ptr<tensorreg::index::safetensors_bundle>;
using clock_type = std::chrono::steady_clock;
using namespace std::chrono_literals;

struct options {
  int seconds = 25;
  int clients = 64;
  int killers = 8;
};

// Codes a correct daemon never sends to these clients, whatever the interleaving.
bool unexpected(errc code) {
  switch (code) {
    case errc::unknown:
    case errc::invalid_argument:
    case errc::permission_denied:
    case errc::internal:
    case errc::data_loss:
    case errc::unimplemented: return true;
    default: return false;
  }
}

const char* code_name(int code) {
  static const char* names[] = {
      "OK",        "CANCELLED",      "UNKNOWN",           "INVALID_ARGUMENT",   "DEADLINE_EXCEEDED",
      "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
      "ABORTED",   "OUT_OF_RANGE",   "UNIMPLEMENTED",     "INTERNAL",           "UNAVAILABLE",
      "DATA_LOSS", "UNAUTHENTICATED"};
  return code >= 0 && code <= 16 ? names[code] : "?";
}

// One client's counts; merged under the mutex at the end.
struct tally {
  std::map<std::string, std::uint64_t> ops;
  std::map<int, std::uint64_t> errors;
  std::vector<std::string> problems;  // unexpected codes, hashes that do not match

  void op(const std::string& name) { ++ops[name]; }
  template <typename T>
  bool check(const std::string& name, const tensorreg::result<T>& r) {
    op(name);
    if (r) return true;
    ++errors[static_cast<int>(r.error().code)];
    if (unexpected(r.error().code) && problems.size() < 20) {
      problems.push_back(name + ": " + code_name(static_cast<int>(r.error().code)) + " " + r.error().message);
    }
    return false;
  }
  void merge(const tally& other) {
    for (const auto& [k, v] : other.ops) ops[k] += v;
    for (const auto& [k, v] : other.errors) errors[k] += v;
    for (const auto& p : other.problems) problems.push_back(p);
  }
};

// Bytes shared by the clients: files opened once, put and leased by many (joins, ALREADY_EXISTS).
struct model_pool {
  std::vector<bundle_ptr> small;
  std::vector<bundle_ptr> large;
};

std::filesystem::path write_model(const std::filesystem::path& dir, std::uint32_t seed, std::size_t bytes) {
  const auto path = dir / ("m-" + std::to_string(seed) + ".safetensors");
  testing::write_safetensors(path,
                             {{"w", "F32", {static_cast<std::int64_t>(bytes / 4)}, testing::pattern_bytes(bytes, seed)},
                              {"ids", "I64", {2}, testing::pattern_bytes(16, seed + 7)}});
  return path;
}

bundle_ptr open_model(const std::filesystem::path& path) {
  auto b = tensorreg::index::safetensors_bundle::open({path.string()});
  if (!b) throw std::runtime_error("cannot open " + path.string() + ": " + b.error().message);
  return std::move(*b);
}

// Artifact ids put recently, for other clients to get and deregister.
class recent_ids {
 public:
  void add(const std::string& id) {
    std::lock_guard lock(mutex_);
    if (ids_.size() < 256) {
      ids_.push_back(id);
    } else {
      ids_[next_++ % ids_.size()] = id;
    }
  }
  std::string pick(std::mt19937& rng) {
    std::lock_guard lock(mutex_);
    if (ids_.empty()) return {};
    return ids_[rng() % ids_.size()];
  }

 private:
  std::mutex mutex_;
  std::vector<std::string> ids_;
  std::size_t next_ = 0;
};

struct shared_state {
  std::string socket;
  clock_type::time_point end;
  const model_pool* pool = nullptr;
  std::filesystem::path scratch;
  recent_ids recent;
  std::mutex mutex;
  tally total;
};

void client_thread(shared_state& s, int index) {
  tally t;
  std::mt19937 rng(static_cast<std::uint32_t>(index) * 7919u + 17);
  auto opened = raw_connection::connect(s.socket);
  if (!t.check("connect", opened)) {
    std::lock_guard lock(s.mutex);
    s.total.merge(t);
    return;
  }
  std::shared_ptr<raw_connection> raw(std::move(*opened));
  connection c = tensorreg::client::connection_access::wrap(raw);
  const pid_t self = ::getpid();
  std::vector<tensorreg::client::lease> held;
  std::vector<std::string> joins;
  tensorreg::thread_pool hash_pool(1);
  std::uint32_t fresh = static_cast<std::uint32_t>(index) << 20;

  while (clock_type::now() < s.end) {
    const auto dice = static_cast<unsigned>(rng() % 100);
    if (dice < 14) {  // a small put of bytes the daemon may already hold (a join)
      const auto& b = s.pool->small[rng() % s.pool->small.size()];
      auto r = c.put(*b, {rng() % 4 == 0 ? "warm" : "cache", {}});
      if (t.check("put_small", r)) {
        s.recent.add(r->descriptor.artifact_id);
        // A put of bytes already held is a join the client holds (TTL 10 min) until it revokes it.
        if (r->existed) joins.push_back(r->registration_id);
      }
    } else if (dice < 22) {  // a small put of new bytes
      const auto path = write_model(s.scratch, ++fresh, 1024u << (rng() % 7));
      auto b = open_model(path);
      std::filesystem::remove(path);
      auto r = c.put(*b, {"cache", {}});
      if (t.check("put_new", r)) s.recent.add(r->descriptor.artifact_id);
    } else if (dice < 24) {  // a large put
      const auto& b = s.pool->large[rng() % s.pool->large.size()];
      auto r = c.put(*b, {"cache", {}});
      if (t.check("put_large", r)) {
        s.recent.add(r->descriptor.artifact_id);
        if (r->existed) joins.push_back(r->registration_id);
      }
    } else if (dice < 32) {  // a lease kept alive by its thread
      const auto& b = s.pool->small[rng() % s.pool->small.size()];
      auto r = c.register_lease(*b, 2000);
      if (t.check("lease", r)) held.push_back(std::move(*r));
      if (held.size() > 3) {
        t.check("lease_release", held.front().release());
        held.erase(held.begin());
      }
    } else if (dice < 36 && (!held.empty() || !joins.empty())) {  // a lease or a join revoked
      if (!held.empty()) {
        const auto i = rng() % held.size();
        t.check("lease_release", held[i].release());
        held.erase(held.begin() + static_cast<std::ptrdiff_t>(i));
      }
      if (!joins.empty()) {
        t.check("join_revoke", c.revoke(joins.back()));
        joins.pop_back();
      }
    } else if (dice < 40) {  // a lease left to expire (no keep-alive); its region goes with it
      auto r = lip::lease_bytes(*raw, lip::pattern(4096u << (rng() % 4), ++fresh), 300);
      if (t.check("lease_expiring", r)) {
        t.check("region_unregister", raw->call(lip::unregister_region(self, r->region_id)));
      }
    } else if (dice < 44) {  // a pending registration left to expire
      t.check("begin_expiring", raw->call(lip::begin(self, 4096, 200)));
    } else if (dice < 50) {  // begun, then aborted
      auto b = raw->call(lip::begin(self, 4096, 60'000));
      if (t.check("begin", b)) {
        t.check("abort", raw->call(lip::abort(b->response.begin_register_artifact().registration_id())));
      }
    } else if (dice < 55) {  // begun, kept alive, revoked
      auto b = raw->call(lip::begin(self, 4096, 1000));
      if (t.check("begin", b)) {
        const auto id = b->response.begin_register_artifact().registration_id();
        t.check("keep_alive", raw->call(lip::keep_alive(self, id, 1000)));
        t.check("keep_alive", raw->call(lip::keep_alive(self, id, 0)));
        t.check("revoke", raw->call(lip::revoke(id)));
      }
    } else if (dice < 60) {  // a deregister of something someone put
      if (auto id = s.recent.pick(rng); !id.empty()) t.check("deregister", c.deregister(id, rng() % 2 == 0));
    } else if (dice < 85) {  // a get, re-hashed when small
      if (auto id = s.recent.pick(rng); !id.empty()) {
        auto r = c.get(id);
        if (t.check("get", r) && r->descriptor.total_size <= (1u << 20)) {
          auto again = tensorreg::identity::content_id(r->index_json, r->memory, &hash_pool);
          t.op("rehash");
          if (!again || again->to_string() != id) {
            t.problems.push_back("rehash: " + id + " now hashes to " +
                                 (again ? again->to_string() : again.error().message));
          }
        }
      }
    } else if (dice < 92) {
      t.check("stats", c.stats());
    } else {
      t.check("list", c.list());
    }
  }
  for (auto& l : held) t.check("lease_release", l.release());
  for (const auto& j : joins) t.check("join_revoke", c.revoke(j));
  std::lock_guard lock(s.mutex);
  s.total.merge(t);
}

// A client process killed at a chosen moment, one after another until the end.
void killer_thread(shared_state& s, int index) {
  tally t;
  std::mt19937 rng(static_cast<std::uint32_t>(index) * 104729u + 3);
  std::uint32_t seed = 0x40000000u + static_cast<std::uint32_t>(index) * 100000u;
  const auto small_files = s.scratch / ("killer-" + std::to_string(index));
  std::filesystem::create_directories(small_files);
  while (clock_type::now() < s.end) {
    const auto dice = static_cast<unsigned>(rng() % 4);
    try {
      if (dice == 0) {
        testing::child_process peer({TENSORREG_HOSTILE_PEER_PATH, "half-frame", s.socket});
        if (peer.read_line(10s) == std::optional<std::string>("sent")) t.op("killed_mid_stream");
        peer.kill(SIGKILL);
        (void)peer.wait();
      } else if (dice == 1) {
        const std::uint64_t bytes = (8u + rng() % 56u) << 20;
        testing::child_process peer(
            {TENSORREG_HOSTILE_PEER_PATH, "mid-commit", s.socket, std::to_string(bytes), std::to_string(++seed)});
        if (peer.read_line(30s) == std::optional<std::string>("committing")) t.op("killed_mid_commit");
        std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 40));
        peer.kill(SIGKILL);
        (void)peer.wait();
      } else if (dice == 2) {
        testing::child_process peer({TENSORREG_HOSTILE_PEER_PATH, "lease", s.socket,
                                     std::to_string(4096u << (rng() % 8)), std::to_string(++seed)});
        auto line = peer.read_line(20s);
        if (line && line->rfind("leased 0", 0) == 0) t.op("killed_holding_lease");
        peer.kill(SIGKILL);
        (void)peer.wait();
      } else {
        const auto path = write_model(small_files, ++seed, 4096u << (rng() % 8));
        testing::child_process peer({TENSORREG_HOSTILE_PEER_PATH, "put", s.socket, path.string()});
        std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 60));
        peer.kill(SIGKILL);
        if (peer.wait() == 0) {
          t.op("put_by_process");
        } else {
          t.op("killed_mid_put");
        }
        std::filesystem::remove(path);
      }
    } catch (const std::exception& e) {
      t.problems.push_back(std::string("killer: ") + e.what());
    }
  }
  std::lock_guard lock(s.mutex);
  s.total.merge(t);
}

int parse(int argc, char** argv, options& o) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has_value = i + 1 < argc;
    if (a == "--seconds" && has_value) {
      o.seconds = std::stoi(argv[++i]);
    } else if (a == "--clients" && has_value) {
      o.clients = std::stoi(argv[++i]);
    } else if (a == "--killers" && has_value) {
      o.killers = std::stoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: tensorreg_soak [--seconds N] [--clients N] [--killers N]\n");
      return 2;
    }
  }
  if (o.seconds <= 0 || o.clients <= 0 || o.killers < 0 || o.killers > o.clients) {
    std::fprintf(stderr, "tensorreg_soak: need seconds > 0 and 0 <= killers <= clients\n");
    return 2;
  }
  return 0;
}

int run(const options& o) {
  testing::daemon_process daemon(
      {"--stable-bytes", std::to_string(256u << 20), "--idle-timeout-ms", "3000", "--frame-timeout-ms", "1000"});
  testing::temp_dir dir;
  model_pool pool;
  for (std::uint32_t i = 0; i < 48; ++i) pool.small.push_back(open_model(write_model(dir.path(), i, 1024u << (i % 8))));
  for (std::uint32_t i = 0; i < 3; ++i) {
    pool.large.push_back(open_model(write_model(dir.path(), 900 + i, (8u + 8u * i) << 20)));
  }

  auto probe_raw = raw_connection::connect(daemon.socket_path());
  if (!probe_raw) {
    std::fprintf(stderr, "soak: cannot connect: %s\n", probe_raw.error().message.c_str());
    return 1;
  }
  std::shared_ptr<raw_connection> probe_wire(std::move(*probe_raw));
  connection probe = tensorreg::client::connection_access::wrap(probe_wire);
  // The daemon keeps a pidfd for each live process that ever owned something, until it exits
  // (owner_watch); this process will be one, so it is one at the baseline too. The peers' are
  // the ones that must go.
  if (auto begun = probe_wire->call(lip::begin(::getpid(), 4096, 60'000)); begun) {
    (void)probe_wire->call(lip::abort(begun->response.begin_register_artifact().registration_id()));
  }
  auto baseline = testing::snapshot(daemon.pid(), probe);
  if (!baseline) {
    std::fprintf(stderr, "soak: cannot ask the daemon's stats: %s\n", baseline.error().message.c_str());
    return 1;
  }
  const std::string baseline_fds = testing::describe_fds(daemon.pid());
  std::printf("soak: %d clients (%d of them processes SIGKILLed in turn) for %d s; daemon pid %d\n", o.clients,
              o.killers, o.seconds, static_cast<int>(daemon.pid()));
  std::printf("baseline: %s\n", baseline->describe().c_str());
  std::fflush(stdout);

  shared_state s;
  s.socket = daemon.socket_path();
  s.pool = &pool;
  s.scratch = dir.path() / "scratch";
  std::filesystem::create_directories(s.scratch);
  const auto started = clock_type::now();
  s.end = started + std::chrono::seconds(o.seconds);
  std::vector<std::thread> threads;
  for (int i = 0; i < o.clients; ++i) {
    if (i < o.killers) {
      threads.emplace_back(killer_thread, std::ref(s), i);
    } else {
      threads.emplace_back(client_thread, std::ref(s), i);
    }
  }
  std::uint64_t peak_rss = 0;
  while (clock_type::now() < s.end) {
    peak_rss = std::max(peak_rss, testing::resident_bytes(daemon.pid()));
    std::this_thread::sleep_for(250ms);
  }
  for (auto& t : threads) t.join();
  const double ran = std::chrono::duration<double>(clock_type::now() - started).count();

  std::uint64_t total_ops = 0, total_errors = 0;
  for (const auto& [name, n] : s.total.ops) total_ops += n;
  for (const auto& [code, n] : s.total.errors) total_errors += n;
  std::printf("ran %.1f s: %llu operations (%.0f/s)\n", ran, static_cast<unsigned long long>(total_ops),
              static_cast<double>(total_ops) / ran);
  std::printf("operations:");
  for (const auto& [name, n] : s.total.ops) std::printf(" %s %llu", name.c_str(), static_cast<unsigned long long>(n));
  std::printf("\nerrors by code (%llu):", static_cast<unsigned long long>(total_errors));
  for (const auto& [code, n] : s.total.errors)
    std::printf(" %s %llu", code_name(code), static_cast<unsigned long long>(n));
  std::printf("\n");

  std::vector<std::string> problems = s.total.problems;
  // Settle: expiries (TTL 200-300 ms, swept every 500 ms), owner deaths, closing connections.
  testing::daemon_snapshot settled;
  const bool quiet = testing::eventually(
      [&] {
        auto now = testing::snapshot(daemon.pid(), probe);
        if (!now) return false;
        settled = *now;
        return now->stats.pending_registrations == 0 && now->stats.leases == 0 && now->stats.regions == 0 &&
               now->stats.open_mappings == 0;
      },
      20s);
  std::printf("after the clients: %s\n", settled.describe().c_str());
  if (!quiet) problems.push_back("leaked: " + settled.describe());

  // The stable tier holds exactly the listed artifacts, each re-hashing to its id.
  auto listed = probe.list();
  std::uint64_t listed_stable = 0, rehashed = 0;
  if (!listed) {
    problems.push_back("list: " + listed.error().message);
  } else {
    for (const auto& a : *listed) {
      if (std::find(a.tiers.begin(), a.tiers.end(), tensorreg::client::tier::stable_dram) == a.tiers.end()) {
        problems.push_back("survivor without a stable copy: " + a.descriptor.artifact_id);
        continue;
      }
      listed_stable += a.descriptor.total_size;
      auto again = testing::rehash(probe, a.descriptor.artifact_id);
      if (!again || *again != a.descriptor.artifact_id) {
        problems.push_back("survivor " + a.descriptor.artifact_id +
                           " does not re-hash: " + (again ? *again : again.error().message));
      } else {
        ++rehashed;
      }
    }
    if (listed_stable != settled.stable_bytes) {
      problems.push_back("stable bytes " + std::to_string(settled.stable_bytes) + " but the listed artifacts hold " +
                         std::to_string(listed_stable));
    }
    std::printf("survivors: %zu artifacts, %llu stable bytes (stats: %llu), %llu re-hashed to their ids\n",
                listed->size(), static_cast<unsigned long long>(listed_stable),
                static_cast<unsigned long long>(settled.stable_bytes), static_cast<unsigned long long>(rehashed));
    for (const auto& a : *listed) {
      auto gone = probe.deregister(a.descriptor.artifact_id);
      if (!gone) problems.push_back("deregister " + a.descriptor.artifact_id + ": " + gone.error().message);
    }
  }
  // With the survivors gone, the daemon holds what it held before the clients came.
  std::string leaked;
  testing::daemon_snapshot last;
  testing::eventually(
      [&] {
        auto now = testing::snapshot(daemon.pid(), probe);
        if (!now) return false;
        last = *now;
        leaked = testing::leaks(*baseline, *now);
        return leaked.empty();
      },
      10s);
  std::printf("after deregistering them: %s\n", last.describe().c_str());
  std::printf("leaks: %s\n", leaked.empty() ? "none" : leaked.c_str());
  std::printf("daemon rss: %llu MiB at start, %llu MiB peak, %llu MiB at the end\n",
              static_cast<unsigned long long>(baseline->rss_bytes >> 20),
              static_cast<unsigned long long>(peak_rss >> 20), static_cast<unsigned long long>(last.rss_bytes >> 20));
  if (!leaked.empty()) {
    problems.push_back("leaks: " + leaked);
    std::printf("daemon fds at the start:\n%sdaemon fds now:\n%s", baseline_fds.c_str(),
                testing::describe_fds(daemon.pid()).c_str());
  }

  const int code = daemon.stop(SIGTERM);
  std::printf("daemon exit: %d\n", code);
  if (code != 0) {
    problems.push_back("the daemon exited " + std::to_string(code));
    const auto out = daemon.output();
    std::fprintf(stderr, "daemon output (last 4000 bytes):\n%s\n",
                 out.substr(out.size() > 4000 ? out.size() - 4000 : 0).c_str());
  }
  for (const auto& p : problems) std::printf("PROBLEM: %s\n", p.c_str());
  std::printf("soak: %s\n", problems.empty() ? "OK" : "FAILED");
  return problems.empty() ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  if (const int bad = parse(argc, argv, o)) return bad;
  ::signal(SIGPIPE, SIG_IGN);
  try {
    return run(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tensorreg_soak: %s\n", e.what());
    return 1;
  }
}
