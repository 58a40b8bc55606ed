// tensorregd — the tensorreg daemon: a thin shell over the registration engine.
//
// Parses options, creates the engine, binds the socket (server::create), prints "ready" only
// once the socket accepts connections, and serves until SIGINT/SIGTERM. Exit codes: 0 after a
// clean shutdown, 1 when it cannot start (another daemon live on the socket, bad directory),
// 2 for bad options (or a TENSORREG_FAULTS that does not parse).
//
// Everything after the options goes through one stderr logger (--log-level), shared by the
// engine, the dispatcher and the server; only the "ready" line is printed to stdout, where
// scripts and tests wait for it. Usage errors are printed before any logger exists.
#include <fcntl.h>
#include <fmt/core.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "dispatcher.hpp"
#include "fd_store.hpp"
#include "framing.hpp"
#include "host_memory.hpp"
#include "metrics_http.hpp"
#include "server.hpp"
#include "src/common/log.hpp"
#include "takeover.hpp"
#include "tensorreg/common/fault_injection.hpp"
#include "tensorreg/common/logger.hpp"
#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/metrics/registry.hpp"
#include "tensorreg/registration/engine.hpp"
#include "unix_socket.hpp"

#if TENSORREG_HAVE_CUDA
#include "tensorreg/cuda/device_memory_provider.hpp"
#endif
#if TENSORREG_HAVE_CLUSTER
#include "tensorreg/cluster/node.hpp"
#endif

namespace {

constexpr const char* kUsage =
    "usage: tensorregd [options]\n"
    "  --socket PATH            listen here (default $TENSORREG_SOCKET, else\n"
    "                           $XDG_RUNTIME_DIR/tensorreg/tensorregd.sock, else\n"
    "                           /tmp/tensorreg-$UID/tensorregd.sock)\n"
    "  --metrics-addr HOST:PORT serve Prometheus metrics at http://HOST:PORT/metrics (off by\n"
    "                           default; port 0 picks one, printed before the ready line)\n"
    "  --stable-bytes N|P%      stable DRAM cache budget in bytes, or P percent of this host's\n"
    "                           memory (its cgroup's memory.max when lower); never more than that\n"
    "                           memory (0 = unlimited; default 0)\n"
    "  --replica-pool-bytes N   idle page-locked replica memory kept for fast GPU puts, beyond\n"
    "                           the stable budget (0 = none; default min(16 GiB, RAM / 8))\n"
    "  --populated-reserve N    shared memory kept faulted in for the next host put of N/2 to N\n"
    "                           bytes or more, beyond the stable budget (0 = none; default 0)\n"
    "  --snapshot-spare-bytes N largest snapshot lease after which the next one's device buffer\n"
    "                           is allocated ahead (one spare per GPU; default 0 = none)\n"
    "  --socket-group GROUP     let the members of GROUP connect too: the socket's directory may\n"
    "                           then be 0750 with that group (a system-wide daemon)\n"
    "  --persist-dir DIR        keep persisted artifacts here (created 0700; must be ours, 0700, not\n"
    "                           a symbolic link); without it StartPersistence is refused\n"
    "  --persist-threads N      persistence writes at once (default 2)\n"
    "  --persist-volume NAME    the persist directory is a shared filesystem that the other daemons\n"
    "                           started with NAME also use (docs/cluster.md §8): each finds\n"
    "                           the copies the others persisted; with --cluster the catalogue\n"
    "                           lists them under NAME\n"
    "  --max-frame-bytes N      largest frame accepted (default 67108864)\n"
    "  --max-sessions N         most concurrent connections (default 1024)\n"
    "  --max-sessions-per-uid N most concurrent connections of one uid (0 = no own limit;\n"
    "                           default 256)\n"
    "  --idle-timeout-ms N      close a connection idle this long (0 = never; default 60000)\n"
    "  --frame-timeout-ms N     close a connection whose frame is not whole this long after its\n"
    "                           first byte (0 = no limit; default 10000)\n"
    "  --max-total-size N       largest artifact a Begin accepts, in bytes (0 = no limit;\n"
    "                           default 1099511627776)\n"
    "  --max-pending-per-pid N  most registrations one process may have begun and not ended\n"
    "                           (0 = no limit; default 1024)\n"
    "  --max-regions-per-uid N  most regions of one uid (0 = only the registry's 4096; default 1024)\n"
    "  --max-stable-entries-per-uid N\n"
    "                           most stable DRAM cache entries one uid's commits create, each an\n"
    "                           open memfd (0 = no limit; default 4096)\n"
    "  --workers N              request worker threads (default: 4 per core, at least 16)\n"
    "  --max-in-flight N        most requests of one connection in flight; past it the daemon\n"
    "                           reads no more of that connection's frames (default 64)\n"
    "  --io-rt-priority N       SCHED_FIFO priority of the I/O thread (1-99) when the daemon may\n"
    "                           set one (CAP_SYS_NICE), else nice -10; 0 = fair share (default 1)\n"
    "  --log-level LEVEL        trace|debug|info|warn|error|off (default info; debug: each RPC)\n"
    "  --trust-client-pids      accept owner_pid other than the peer's from root or our uid\n"
    "  --no-warm-start          do not ready the GPUs (context, hash kernels, placement speeds,\n"
    "                           pinned buffers) before the ready line; the first GPU commit\n"
    "                           then pays for it\n"
    "  --takeover               take over the daemon serving --socket: its stable DRAM cache and\n"
    "                           its listening socket, without a copy (same uid or root only)\n"
    "  --cluster etcd://HOST:PORT/PREFIX\n"
    "                           join the cluster whose catalogue is that etcd (docs/cluster.md):\n"
    "                           advertise mi2 commits, pull ids not held here from the members\n"
    "  --transfer-addr IP:PORT  serve artifact leaves to the members here (with --cluster)\n"
    "  --host-id ID             this host's id in the cluster (default: host name and\n"
    "                           transfer address)\n"
    "  --replica-timeout-ms N   how long a commit waits for the copies on other hosts its\n"
    "                           policy asks for (remote/any min_replicas, ha; default 60000)\n"
    "  --version                print the version and exit\n";

struct options {
  std::string socket;
  std::string metrics_addr;    // empty: no metrics listener
  std::string persist_dir;     // empty: no persistence
  std::string persist_volume;  // empty: the persist directory is this daemon's alone
  unsigned persist_threads = 2;
  std::uint64_t stable_bytes = 0;
  std::string stable_bytes_note;  // why stable_bytes is not what was asked (logged at start)
  std::optional<gid_t> socket_group;
  std::optional<std::uint64_t> replica_pool_bytes;  // unset: the provider's default
  std::uint64_t snapshot_spare_bytes = 0;
  std::uint64_t populated_reserve_bytes = 0;
  std::uint32_t max_frame_bytes = 64u << 20;
  std::size_t max_sessions = 1024;
  std::size_t max_sessions_per_uid = 256;
  std::uint64_t idle_timeout_ms = 60'000;
  std::uint64_t frame_timeout_ms = 10'000;
  std::uint64_t max_total_size = std::uint64_t{1} << 40;
  std::size_t max_pending_per_pid = 1024;
  std::size_t max_regions_per_uid = 1024;
  std::size_t max_stable_entries_per_uid = 4096;
  unsigned workers = 0;
  std::size_t max_in_flight = 64;
  int io_rt_priority = 1;
  tensorreg::log_level log_level = tensorreg::log_level::info;
  bool trust_client_pids = false;
  bool warm_start = true;
  bool takeover = false;
  std::string cluster;        // empty: this host alone
  std::string transfer_addr;  // with --cluster
  std::string host_id;
  std::uint32_t replica_timeout_ms = 60'000;
  bool transfer_corrupt = false;  // test switch of the netns harness, not in --help
};

template <typename T>
bool parse_number(const std::string& text, T& out) {
  const auto* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, out);
  return ec == std::errc{} && ptr == end && !text.empty();
}

int bad_usage(const std::string& why) {
  fmt::print(stderr, "tensorregd: {}\n{}", why, kUsage);
  return 2;
}

// Returns the exit code on error (2), or -1 to go on.
int parse_options(const std::vector<std::string>& args, options& o) {
  for (std::size_t i = 0; i < args.size(); ++i) {
    const auto& a = args[i];
    auto value = [&]() -> const std::string* { return i + 1 < args.size() ? &args[++i] : nullptr; };
    auto bad = [&](const std::string& why) {
      fmt::print(stderr, "tensorregd: {}\n{}", why, kUsage);
      return 2;
    };
    if (a == "--help" || a == "-h") {
      fmt::print("{}", kUsage);
      return 0;
    } else if (a == "--version") {
      fmt::print("tensorregd {}\n", TENSORREG_VERSION);
      return 0;
    } else if (a == "--metrics-addr") {
      const auto* v = value();
      if (v == nullptr) return bad(a + " needs a value");
      // Checked here, so that a typo is a usage error (2) before anything starts.
      if (auto parsed = tensorreg::daemon::parse_host_port(*v); !parsed) return bad(parsed.error().message);
      o.metrics_addr = *v;
    } else if (a == "--stable-bytes") {
      const auto* v = value();
      if (v == nullptr) return bad(a + " needs a value");
      auto budget = tensorreg::daemon::parse_stable_budget(*v, tensorreg::daemon::usable_memory_bytes());
      if (!budget) return bad(budget.error().message);
      o.stable_bytes = budget->bytes;
      o.stable_bytes_note = budget->note;
    } else if (a == "--socket-group") {
      const auto* v = value();
      if (v == nullptr) return bad(a + " needs a value");
      auto gid = tensorreg::daemon::find_group(*v);
      if (!gid) return bad(gid.error().message);
      o.socket_group = *gid;
    } else if (a == "--trust-client-pids") {
      o.trust_client_pids = true;
    } else if (a == "--no-warm-start") {
      o.warm_start = false;
    } else if (a == "--takeover") {
      o.takeover = true;
    } else if (a == "--cluster" || a == "--transfer-addr" || a == "--host-id") {
      const auto* v = value();
      if (v == nullptr || v->empty()) return bad(a + " needs a value");
      (a == "--cluster" ? o.cluster : a == "--transfer-addr" ? o.transfer_addr : o.host_id) = *v;
    } else if (a == "--transfer-corrupt-for-tests") {
      o.transfer_corrupt = true;
    } else if (a == "--persist-volume") {
      const auto* v = value();
      if (v == nullptr) return bad(a + " needs a value");
      const bool plain = !v->empty() && v->size() <= 64 && std::all_of(v->begin(), v->end(), [](char ch) {
        return std::isalnum(static_cast<unsigned char>(ch)) != 0 || ch == '-' || ch == '.' || ch == '_';
      });
      if (!plain) return bad(a + " needs a name of 1 to 64 characters from [A-Za-z0-9._-], got '" + *v + "'");
      o.persist_volume = *v;
    } else if (a == "--socket" || a == "--persist-dir" || a == "--log-level") {
      const auto* v = value();
      if (v == nullptr) return bad(a + " needs a value");
      if (a == "--socket") {
        o.socket = *v;
      } else if (a == "--persist-dir") {
        if (v->empty()) return bad("--persist-dir needs a directory");
        o.persist_dir = *v;
      } else {
        auto level = tensorreg::parse_log_level(*v);
        if (!level) return bad(level.error().message);
        o.log_level = *level;
      }
    } else if (a == "--max-sessions-per-uid" || a == "--idle-timeout-ms" || a == "--frame-timeout-ms" ||
               a == "--max-total-size" || a == "--max-pending-per-pid" || a == "--max-regions-per-uid" ||
               a == "--max-stable-entries-per-uid") {
      const auto* v = value();
      if (v == nullptr) return bad(a + " needs a value");
      bool ok = a == "--max-sessions-per-uid"         ? parse_number(*v, o.max_sessions_per_uid)
                : a == "--idle-timeout-ms"            ? parse_number(*v, o.idle_timeout_ms)
                : a == "--frame-timeout-ms"           ? parse_number(*v, o.frame_timeout_ms)
                : a == "--max-pending-per-pid"        ? parse_number(*v, o.max_pending_per_pid)
                : a == "--max-regions-per-uid"        ? parse_number(*v, o.max_regions_per_uid)
                : a == "--max-stable-entries-per-uid" ? parse_number(*v, o.max_stable_entries_per_uid)
                                                      : parse_number(*v, o.max_total_size);
      if (!ok) return bad(a + " needs a number (0 = no limit), got '" + *v + "'");
    } else if (a == "--replica-timeout-ms") {
      const auto* v = value();
      if (v == nullptr) return bad(a + " needs a value");
      if (!parse_number(*v, o.replica_timeout_ms)) return bad(a + " needs a number, got '" + *v + "'");
    } else if (a == "--persist-threads") {
      const auto* v = value();
      if (v == nullptr) return bad(a + " needs a value");
      if (!parse_number(*v, o.persist_threads) || o.persist_threads == 0) {
        return bad(a + " needs a positive number, got '" + *v + "'");
      }
    } else if (a == "--io-rt-priority") {
      const auto* v = value();
      if (v == nullptr) return bad(a + " needs a value");
      if (!parse_number(*v, o.io_rt_priority) || o.io_rt_priority < 0 || o.io_rt_priority > 99) {
        return bad(a + " needs a number from 0 to 99, got '" + *v + "'");
      }
    } else if (a == "--replica-pool-bytes" || a == "--snapshot-spare-bytes" || a == "--populated-reserve" ||
               a == "--max-frame-bytes" || a == "--max-sessions" || a == "--workers" || a == "--max-in-flight") {
      const auto* v = value();
      if (v == nullptr) return bad(a + " needs a value");
      bool ok = a == "--replica-pool-bytes"     ? parse_number(*v, o.replica_pool_bytes.emplace())
                : a == "--snapshot-spare-bytes" ? parse_number(*v, o.snapshot_spare_bytes)
                : a == "--populated-reserve"    ? parse_number(*v, o.populated_reserve_bytes)
                : a == "--max-frame-bytes"      ? parse_number(*v, o.max_frame_bytes) && o.max_frame_bytes > 0
                : a == "--max-sessions"         ? parse_number(*v, o.max_sessions) && o.max_sessions > 0
                : a == "--max-in-flight"        ? parse_number(*v, o.max_in_flight) && o.max_in_flight > 0
                                                : parse_number(*v, o.workers);
      if (!ok) return bad(a + " needs a positive number, got '" + *v + "'");
    } else {
      return bad("unknown option '" + a + "'");
    }
  }
  if (!o.cluster.empty() && o.transfer_addr.empty()) return bad_usage("--cluster needs --transfer-addr");
  if (o.cluster.empty() && !o.transfer_addr.empty()) return bad_usage("--transfer-addr needs --cluster");
  if (!o.persist_volume.empty() && o.persist_dir.empty()) return bad_usage("--persist-volume needs --persist-dir");
  return -1;
}

// Every CUDA VMM allocation a client registers stays open here as an fd (OpenArtifactDevice
// hands it on to readers), so one large expandable-segments model is hundreds of fds and a few
// models pass the usual soft limit of 1 024: take the hard limit, as services do.
void raise_fd_limit(tensorreg::logger& log) {
  struct rlimit limit {};
  if (::getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
    limit.rlim_cur = limit.rlim_max;
    if (::setrlimit(RLIMIT_NOFILE, &limit) != 0) {
      tensorreg::log(log, tensorreg::log_level::warn, "cannot raise the open-file limit to {}; keeping the soft limit",
                     limit.rlim_max);
    }
  }
}

// Tests fail a real daemon's system calls by starting it with TENSORREG_FAULTS set
// (tensorreg/common/fault_injection.hpp; docs/architecture.md, "Testing"). Not in --help: it is
// no option for users. Text that does not parse refuses the start (2), as a bad option does.
// Returns the exit code on error, or -1 to go on.
int arm_faults_from_env(tensorreg::logger& log) {
  const char* spec = std::getenv("TENSORREG_FAULTS");
  if (spec == nullptr || *spec == '\0') return -1;
  if (auto armed = tensorreg::arm_faults(spec); !armed) {
    // Printed, not logged: like a usage error, it must show whatever the log level.
    fmt::print(stderr, "tensorregd: cannot start: TENSORREG_FAULTS: {}\n", armed.error().message);
    return 2;
  }
  tensorreg::log(log, tensorreg::log_level::warn, "fault injection armed from TENSORREG_FAULTS: {}", spec);
  return -1;
}

// The persist directory, scanned: manifests checked now (damaged copies quarantined), every
// leaf later in the background (the engine). TENSORREG_PERSIST_CHUNK_PAUSE_US slows writes down
// for tests that kill the daemon mid-write.
tensorreg::result<std::shared_ptr<tensorreg::persistence::durable_store>> open_persist_dir(const options& o,
                                                                                           tensorreg::logger& log) {
  using tensorreg::log_level;
  tensorreg::persistence::store_options so;
  if (!o.persist_volume.empty()) {
    // Shared with other daemons: this one's temporary directories carry a tag of its own that
    // it keeps across restarts (the host id, or the host name and its socket's path).
    so.shared = true;
    so.writer_tag = o.host_id;
    if (so.writer_tag.empty()) {
      char name[256] = {};
      (void)::gethostname(name, sizeof name - 1);
      so.writer_tag =
          std::string(name) + "-" + tensorreg::hash::to_hex(tensorreg::hash::sha256(o.socket)).substr(0, 16);
    }
  }
  if (const char* pause = std::getenv("TENSORREG_PERSIST_CHUNK_PAUSE_US"); pause != nullptr) {
    std::uint64_t us = 0;
    if (parse_number(std::string(pause), us)) {
      so.chunk_pause = std::chrono::microseconds(us);
      so.chunk_bytes = std::uint64_t{1} << 20;
    }
  }
  TENSORREG_TRY_ASSIGN(auto store, tensorreg::persistence::durable_store::open(o.persist_dir, so));
  for (const auto& q : store->quarantined()) {
    tensorreg::log(log, log_level::warn, "quarantined {} in the persist directory: {}", q.name, q.reason);
  }
  tensorreg::log(log, log_level::info, "persist directory {}{}: {} artifacts, {} quarantined", store->root(),
                 o.persist_volume.empty() ? std::string() : ", shared as volume " + o.persist_volume,
                 store->list().size(), store->quarantined().size());
  return std::shared_ptr<tensorreg::persistence::durable_store>(std::move(store));
}

#if TENSORREG_HAVE_CLUSTER
// The dispatcher's view of the cluster node (daemon/dispatcher.hpp keeps etcd and UCX out).
class cluster_adapter final : public tensorreg::daemon::cluster_hooks {
 public:
  explicit cluster_adapter(tensorreg::cluster::node& node) : node_(node) {}
  void committed(const std::string& artifact_id) override { node_.committed(artifact_id); }
  tensorreg::status fetch(const std::string& artifact_id) override { return node_.fetch(artifact_id); }
  std::vector<tensorreg::cluster::pull_status> pulls() const override { return node_.pulls(); }
  tensorreg::result<tensorreg::cluster::publish_status> publish(const std::string& artifact_id, std::uint32_t replicas,
                                                                bool all, std::chrono::milliseconds timeout) override {
    return node_.publish(artifact_id, replicas, all, timeout);
  }

 private:
  tensorreg::cluster::node& node_;
};

// --cluster: the node, or the reason it cannot start (exit 1; 2 for a URL that does not parse).
tensorreg::result<std::unique_ptr<tensorreg::cluster::node>> join_cluster(const options& o,
                                                                          tensorreg::registration::engine& engine,
                                                                          tensorreg::logger& log) {
  TENSORREG_TRY_ASSIGN(auto url, tensorreg::cluster::parse_cluster_url(o.cluster));
  tensorreg::cluster::node_options no;
  no.url = std::move(url);
  no.self.host_id = o.host_id;
  if (no.self.host_id.empty()) {
    char name[256] = {};
    (void)::gethostname(name, sizeof name - 1);
    no.self.host_id = std::string(name) + "_" + o.transfer_addr;
    for (auto& ch : no.self.host_id) {
      if (ch == ':') ch = '_';
    }
  }
  char name[256] = {};
  (void)::gethostname(name, sizeof name - 1);
  no.self.host_name = name;
  no.self.transfer_address = o.transfer_addr;
  no.self.capacity_bytes = o.stable_bytes;
  no.self.persist_volume = o.persist_volume;
  no.corrupt_leaves = o.transfer_corrupt;
  no.log = &log;
  return tensorreg::cluster::node::create(engine, std::move(no));
}
#endif

int serve(const options& o, tensorreg::logger& log) {
  using tensorreg::log_level;
  raise_fd_limit(log);
  if (!o.stable_bytes_note.empty()) tensorreg::log(log, log_level::warn, "{}", o.stable_bytes_note);
  // --takeover: the running daemon stops, finishes what is in flight and hands everything over
  // before this one opens anything it shares (the persist directory) (docs/architecture.md §14.2).
  std::optional<tensorreg::daemon::received_handoff> handed;
  if (o.takeover) {
    auto got = tensorreg::daemon::request_handoff(o.socket, std::chrono::seconds(120));
    if (!got) {
      tensorreg::log(log, log_level::error, "cannot take over the daemon on {}: {}", o.socket, got.error().message);
      return 1;
    }
    handed = std::move(*got);
    tensorreg::log(log, log_level::info, "pid {} handed over {} memfds and its socket", handed->predecessor,
                   handed->fds.size());
  }

  tensorreg::registration::engine_options eo;
  eo.log = &log;
  eo.stable_bytes = o.stable_bytes;
  eo.max_total_size = o.max_total_size;
  eo.max_pending_per_owner = o.max_pending_per_pid;
  eo.region_capacity_per_uid = o.max_regions_per_uid;
  eo.max_stable_entries_per_uid = o.max_stable_entries_per_uid;
  eo.populated_reserve_bytes = o.populated_reserve_bytes;
  if (!o.persist_dir.empty()) {
    auto durable = open_persist_dir(o, log);
    if (!durable) {
      tensorreg::log(log, log_level::error, "{}", durable.error().message);
      return 1;
    }
    eo.durable = std::move(*durable);
    eo.persist_threads = o.persist_threads;
    // A shared volume's copies are checked leaf by leaf wherever they are loaded; every member
    // re-reading the whole volume at each start would multiply its reads by the members.
    eo.verify_persisted_at_start = o.persist_volume.empty();
  }
#if TENSORREG_HAVE_CUDA
  // GPU memory when a device is present; otherwise CUDA-only requests fail FAILED_PRECONDITION.
  tensorreg::cuda::device_memory_provider::options device_options;
  if (o.replica_pool_bytes) device_options.replica_pool_bytes = *o.replica_pool_bytes;
  device_options.snapshot_spare_bytes = o.snapshot_spare_bytes;
  if (auto devices = tensorreg::cuda::device_memory_provider::create(device_options)) {
    // Before the ready line, so that the first GPU commit costs what later ones do.
    if (o.warm_start) {
      const auto t0 = std::chrono::steady_clock::now();
      if (auto warm = (*devices)->warm_up(); !warm) {
        tensorreg::log(log, log_level::warn, "cannot warm up the GPUs (they warm on first use): {}",
                       warm.error().message);
      } else {
        tensorreg::log(log, log_level::info, "warmed up {} GPU(s) in {:.0f} ms", (*devices)->device_count(),
                       std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
    }
    eo.devices = std::move(*devices);
  } else {
    tensorreg::log(log, log_level::warn, "running without GPU memory: {}", devices.error().message);
  }
#else
  tensorreg::log(log, log_level::warn,
                 "running without GPU memory: built without CUDA (-DTENSORREG_CUDA=OFF or no nvcc)");
#endif
  auto engine = tensorreg::registration::engine::create(eo);
  if (!engine) {
    tensorreg::log(log, log_level::error, "{}", engine.error().message);
    return 1;
  }
  tensorreg::daemon::dispatcher_options d;
#if TENSORREG_HAVE_CLUSTER
  std::unique_ptr<tensorreg::cluster::node> cluster_node;
  std::unique_ptr<cluster_adapter> cluster_hooks;
  if (!o.cluster.empty()) {
    auto joined = join_cluster(o, **engine, log);
    if (!joined) {
      tensorreg::log(log, log_level::error, "cannot join the cluster: {}", joined.error().message);
      return joined.error().code == tensorreg::errc::invalid_argument ? 2 : 1;
    }
    cluster_node = std::move(*joined);
    cluster_hooks = std::make_unique<cluster_adapter>(*cluster_node);
    d.cluster = cluster_hooks.get();
    d.cluster_url = o.cluster;
    d.replica_timeout = std::chrono::milliseconds(o.replica_timeout_ms);
    // Before the ready line, so that whoever waits for it knows where members pull from.
    fmt::print("tensorregd: transfers on {} as {}\n", cluster_node->server().address(),
               cluster_node->members().self().host_id);
  }
#else
  if (!o.cluster.empty()) {
    tensorreg::log(log, log_level::error, "cannot join the cluster: tensorregd was built without it (libcurl, UCX)");
    return 1;
  }
#endif
  d.trust_client_pids = o.trust_client_pids;
  d.daemon_uid = ::getuid();
  d.socket_path = o.socket;
  d.max_frame_bytes = o.max_frame_bytes;
  d.log = &log;
  tensorreg::metrics::registry metrics;
  d.metrics = &metrics;
  metrics.gauge_function("tensorreg_build_info", "The daemon's version (the value is always 1)", [] { return 1.0; },
                         {{"version", TENSORREG_VERSION}});
  tensorreg::daemon::dispatcher dispatch(**engine, d);
  tensorreg::daemon::server_options so;
  so.socket_path = o.socket;
  so.access.group = o.socket_group;
  so.max_frame_bytes = o.max_frame_bytes;
  so.max_sessions = o.max_sessions;
  so.max_sessions_per_uid = o.max_sessions_per_uid;
  so.idle_timeout = std::chrono::milliseconds(o.idle_timeout_ms);
  so.frame_timeout = std::chrono::milliseconds(o.frame_timeout_ms);
  so.workers = o.workers;
  so.max_in_flight_per_connection = o.max_in_flight;
  so.io_rt_priority = o.io_rt_priority;
  so.log = &log;
  // The predecessor's memory (a takeover), else what a service manager kept through a crash.
  auto stored = handed ? tensorreg::daemon::stored_fds{} : tensorreg::daemon::take_stored_fds();
  for (const auto& problem : stored.problems) {
    tensorreg::log(log, log_level::warn, "cannot read a catalogue from the systemd fd store: {}", problem);
  }
  const std::string* state_bytes = handed ? &handed->state : stored.state ? &*stored.state : nullptr;
  if (state_bytes != nullptr) {
    auto state = tensorreg::persistence::decode_resident_state(*state_bytes);
    if (!state) {
      tensorreg::log(log, log_level::error, "cannot adopt the handed-over memory: {}", state.error().message);
      if (handed) {
        (void)tensorreg::daemon::acknowledge(handed->connection.get(), tl::unexpected(state.error()));
        return 1;
      }
    } else {
      (void)(*engine)->adopt_resident(*state, handed ? std::move(handed->fds) : std::move(stored.memfds));
    }
  }
  stored.memfds.clear();

  // The listening socket's identity on disk, for unlink_if_ours() at shutdown.
  const auto adopted_listener = [&o](tensorreg::unique_fd fd) {
    tensorreg::daemon::listening_socket bound;
    struct stat st {};
    if (::lstat(o.socket.c_str(), &st) == 0) {
      bound.device = st.st_dev;
      bound.inode = st.st_ino;
    }
    bound.fd = std::move(fd);
    return bound;
  };
  auto srv = handed ? tensorreg::daemon::server::adopt(so, dispatch, adopted_listener(std::move(handed->listener)))
                    : tensorreg::daemon::server::create(so, dispatch);
  if (!srv) {
    tensorreg::log(log, log_level::error, "{}", srv.error().message);
    if (handed) (void)tensorreg::daemon::acknowledge(handed->connection.get(), tl::unexpected(srv.error()));
    return 1;
  }
  tensorreg::daemon::server* current = srv->get();
  const auto on_takeover = [&current] { current->hand_over(); };
  const auto control_path = tensorreg::daemon::takeover_path(o.socket);
  auto takeover =
      handed ? tensorreg::daemon::takeover_listener::adopt(control_path, std::move(handed->control_listener),
                                                           ::geteuid(), on_takeover, log)
             : tensorreg::daemon::takeover_listener::create(control_path, ::geteuid(), on_takeover, log, so.access);
  if (!takeover) {
    if (handed) {
      tensorreg::log(log, log_level::error, "{}", takeover.error().message);
      (void)tensorreg::daemon::acknowledge(handed->connection.get(), tl::unexpected(takeover.error()));
      return 1;
    }
    // A daemon still live on the control socket (its main socket was removed by hand) keeps it:
    // this one serves, but cannot be taken over.
    tensorreg::log(log, log_level::warn, "serving without takeover: {}", takeover.error().message);
  }
  if (handed) {
    // From here the old daemon exits: this one serves.
    if (auto acked = tensorreg::daemon::acknowledge(handed->connection.get(), {}); !acked) {
      tensorreg::log(log, log_level::warn, "cannot tell the old daemon the takeover is done: {}",
                     acked.error().message);
    }
    handed->connection.reset();
  }
  std::unique_ptr<tensorreg::daemon::metrics_http> metrics_listener;
  if (!o.metrics_addr.empty()) {
    tensorreg::daemon::metrics_http_options mo;
    mo.address = o.metrics_addr;
    mo.log = &log;
    auto listening = tensorreg::daemon::metrics_http::create(mo, [&metrics] { return metrics.render(); });
    for (int tries = 0; !listening && o.takeover && tries < 50; ++tries) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      listening = tensorreg::daemon::metrics_http::create(mo, [&metrics] { return metrics.render(); });
    }
    if (!listening) {
      tensorreg::log(log, log_level::error, "{}", listening.error().message);
      return 1;
    }
    metrics_listener = std::move(*listening);
    // Before the ready line, so that whoever waits for it knows where to scrape.
    fmt::print("tensorregd: metrics on {}\n", metrics_listener->url());
  }

  // Only now can a client connect: say so (scripts wait for this line).
  fmt::print("tensorregd: ready on {} (pid {})\n", o.socket, ::getpid());
  std::fflush(stdout);
  std::unique_ptr<tensorreg::daemon::fd_store_sync> fd_store;
  if (tensorreg::daemon::under_service_manager()) {
    fd_store = std::make_unique<tensorreg::daemon::fd_store_sync>(**engine, log, std::chrono::milliseconds(100),
                                                                  std::move(stored.names), stored.next_state_number);
    (void)tensorreg::daemon::notify("READY=1\nSTATUS=serving on " + o.socket + ", " +
                                    std::to_string((*engine)->stats().stable_bytes) + " bytes in stable DRAM");
  }
  std::size_t sessions = 0;
  for (;;) {
    sessions += (*srv)->run();
    auto successor = takeover ? (*takeover)->take_successor() : tensorreg::unique_fd();
    if (!successor) break;
    // A successor asked: the sessions are closed, nothing is in flight. Hand everything over;
    // keep duplicates of the listening fds to serve on if it does not take them.
    auto listener = (*srv)->take_listener();
    tensorreg::unique_fd main_copy(::fcntl(listener.get(), F_DUPFD_CLOEXEC, 0));
    tensorreg::daemon::handoff_payload payload;
    payload.listener = std::move(listener);
    payload.control_listener = (*takeover)->release_listener();
    tensorreg::unique_fd control_copy(::fcntl(payload.control_listener.get(), F_DUPFD_CLOEXEC, 0));
    auto resident = (*engine)->export_resident();
    tensorreg::status sent = resident ? tensorreg::status{} : tl::unexpected(resident.error());
    if (resident) {
      payload.resident = std::move(*resident);
      const auto fds = payload.resident.fds.size();
      sent = tensorreg::daemon::hand_over(successor.get(), std::move(payload), std::chrono::seconds(120));
      if (sent) {
        tensorreg::log(log, log_level::info, "handed {} stable memfds and the socket to the successor; exiting", fds);
        return 0;
      }
    }
    tensorreg::log(log, log_level::error, "the takeover failed ({}); serving on", sent.error().message);
    srv = tensorreg::daemon::server::adopt(so, dispatch, adopted_listener(std::move(main_copy)));
    if (!srv) {
      tensorreg::log(log, log_level::error, "{}", srv.error().message);
      return 1;
    }
    current = srv->get();
    takeover = tensorreg::daemon::takeover_listener::adopt(control_path, std::move(control_copy), ::geteuid(),
                                                           on_takeover, log);
    if (!takeover) {
      tensorreg::log(log, log_level::error, "{}", takeover.error().message);
      return 1;
    }
  }
  tensorreg::log(log, log_level::info, "stopped after {} sessions", sessions);
  return 0;
}

}  // namespace

int main(int argc, char** argv) try {
  // While this is the only thread: mallopt() is not safe beside allocating threads.
  tensorreg::daemon::keep_frame_buffers_on_heap(tensorreg::daemon::default_max_frame_bytes, std::uint64_t{128} << 20);
  options o;
  if (int rc = parse_options(std::vector<std::string>(argv + 1, argv + argc), o); rc >= 0) return rc;
  if (!o.cluster.empty()) {
    // UCX reads it when the transfer server starts: a daemon restarted at once (after a crash)
    // gets its transfer port back while the dead one's connections are in TIME_WAIT. Set here,
    // while this is the only thread; a value in the environment wins.
    ::setenv("UCX_TCP_CM_REUSEADDR", "y", 0);
  }
  if (o.socket.empty()) {
    const char* env = std::getenv("TENSORREG_SOCKET");
    o.socket = env != nullptr && *env != '\0' ? std::string(env) : tensorreg::daemon::default_socket_path();
  }
  const auto log = tensorreg::stderr_logger(o.log_level);
  if (int rc = arm_faults_from_env(*log); rc >= 0) return rc;
  try {
    return serve(o, *log);
  } catch (const std::exception& e) {
    tensorreg::log(*log, tensorreg::log_level::error, "{}", e.what());
    return 1;
  }
} catch (const std::exception& e) {
  // Before the logger exists (or when it cannot be made): the one place left to say why.
  fmt::print(stderr, "tensorregd: {}\n", e.what());
  return 1;
}
