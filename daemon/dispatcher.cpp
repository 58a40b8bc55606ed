#include "dispatcher.hpp"

#include <fmt/format.h>
#include <google/protobuf/arena.h>
#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/wire_format_lite.h>

#include <fcntl.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

#include "src/common/log.hpp"
#include "wire_convert.hpp"

// Layout: the per-connection state; then dispatcher::impl with the policy checks, one short
// handler per RPC, the unary path, the Feed stream path and the log lines of each answer.
// Every message field the handlers turn into a library value, or fill from one, goes through
// wire_convert.

namespace tensorreg::daemon {
namespace {

namespace wire = convert::wire;
namespace v2 = convert::v2;
namespace reg = ::tensorreg::registration;

std::string fd_count(std::size_t n) { return n == 1 ? "1 file descriptor" : std::to_string(n) + " file descriptors"; }

error fds_unused(std::string_view verb, std::size_t n) {
  return error{errc::invalid_argument,
               fmt::format("cannot {}: {} arrived with a message that uses none", verb, fd_count(n))};
}

// A response on its way out. It stays a message until the RPC's log line has read its status.
struct answer {
  wire::Response response;
  std::vector<unique_fd> fds;
  std::string subject;  // for the log line, where the request itself names none (a stream's end)
};

answer error_answer(std::uint64_t request_id, const error& e) {
  return answer{convert::error_response(request_id, e), {}, {}};
}

frame_out serialize(answer a) {
  frame_out out{a.response.SerializeAsString(), std::move(a.fds)};
  out.close_after = a.response.request_id() == 0;  // docs/wire-format.md §4: id-0 answers end the connection
  return out;
}

// ---- Connections -----------------------------------------------------------------------------

// One Feed stream of a connection, by request_id (DECISIONS §4: one answer per stream).
struct feed_stream {
  std::string registration_id;  // fixed by the first frame
  bool failed = false;          // answered early; later frames are ignored
};

}  // namespace

class dispatcher::connection {
 public:
  connection(const peer_credentials& peer, std::atomic<std::size_t>& open) : peer_(peer), open_(&open) { ++*open_; }
  ~connection() { close(); }
  connection(const connection&) = delete;
  connection& operator=(const connection&) = delete;

  void close() noexcept {
    std::lock_guard lock(mutex_);
    streams_.clear();
    if (open_ != nullptr) --*std::exchange(open_, nullptr);
  }

  [[nodiscard]] const peer_credentials& peer() const noexcept { return peer_; }
  // Unary requests of one connection run concurrently with each other and with its stream
  // frames: the tables below are touched only under mutex(). A feed_stream's fields are used
  // by the stream frames alone (one at a time), except `failed`, which is set under mutex().
  [[nodiscard]] std::mutex& mutex() noexcept { return mutex_; }
  [[nodiscard]] std::unordered_map<std::uint64_t, feed_stream>& streams() noexcept { return streams_; }
  [[nodiscard]] std::unordered_set<std::uint64_t>& unary_in_flight() noexcept { return unary_in_flight_; }

 private:
  peer_credentials peer_;
  std::atomic<std::size_t>* open_;
  std::mutex mutex_;
  std::unordered_map<std::uint64_t, feed_stream> streams_;  // guarded by mutex_
  std::unordered_set<std::uint64_t> unary_in_flight_;       // guarded by mutex_
};

// ---- The handlers --------------------------------------------------------------------------

namespace {

// One unary request on its way through: the request, the fds that came with it, and what goes
// back (the body is filled into `response`; fds to send into `fds_out`).
struct call {
  const peer_credentials& peer;
  wire::Request& request;
  std::vector<unique_fd>& fds_in;
  wire::Response response;
  std::vector<unique_fd> fds_out;
};

}  // namespace

// Longest display_name a Begin may carry (docs/wire-format.md §14), and how many names of each
// table are kept before it is cleaned: the pending table loses names of registrations that
// expired (all of them, when full: names are for people, never worth memory); the artifact
// table keeps those of artifacts still listed.
constexpr std::size_t kMaxDisplayName = 256;
constexpr std::size_t kMaxPendingNames = 16384;
constexpr std::size_t kMaxArtifactNames = 65536;

struct dispatcher::impl {
  registration::engine& engine;
  dispatcher_options options;
  logger& log;
  std::atomic<std::size_t> connections{0};
  const std::chrono::steady_clock::time_point daemon_started = std::chrono::steady_clock::now();
  // What GetStats and the metrics report (docs/wire-format.md §14).
  metrics::counter requests, request_errors, hits, misses, bytes_registered;
  // tensorreg_rpc_duration_seconds by method (the request's body field number) and code, each
  // looked up in the registry once. The lookup takes the registry's lock, and immediate
  // requests are counted on the I/O thread, which must never wait for a worker holding it.
  static constexpr std::size_t kMethodSlots = 64;
  static constexpr std::size_t kCodeSlots = 18;  // 0..16, then every other value ("UNKNOWN")
  std::array<std::array<std::atomic<metrics::histogram*>, kCodeSlots>, kMethodSlots> rpc_durations{};
  registration::engine_stats scraped;  // the engine's tables at the last scrape (the registry's lock)
  // Names given at Begin, by registration id until its commit, then by artifact id.
  std::mutex names_mutex;
  std::unordered_map<std::string, std::string> pending_names;
  // By artifact id: the name and the generation it was added in (see prune_names).
  std::unordered_map<std::string, std::pair<std::string, std::uint64_t>> artifact_names;
  std::uint64_t names_generation = 0;

  impl(registration::engine& e, dispatcher_options o)
      : engine(e), options(std::move(o)), log(options.log != nullptr ? *options.log : null_logger()) {
    if (options.metrics != nullptr) register_metrics(*options.metrics);
  }

  double uptime_seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - daemon_started).count();
  }

  // Conventional names and units (docs/architecture.md, "Metrics"). The engine's tables are
  // read once per scrape by the collector; the samples then read that snapshot.
  void register_metrics(metrics::registry& r) {
    auto count = [&r](std::string_view name, std::string_view help, const metrics::counter& c) {
      r.counter_function(name, help, [&c] { return static_cast<double>(c.value()); });
    };
    count("tensorreg_bytes_registered_total", "Canonical bytes of commits that created an artifact", bytes_registered);
    count("tensorreg_bytes_hashed_total", "Bytes hashed on the host (SHA-256 leaves)",
          metrics::process_counters().bytes_hashed);
    count("tensorreg_bytes_copied_total", "Bytes copied into daemon-owned memory",
          metrics::process_counters().bytes_copied);
    count("tensorreg_cache_hits_total", "Requests naming an artifact the daemon held (reads, puts of held content)",
          hits);
    count("tensorreg_cache_misses_total", "Reads of an unknown artifact and puts that stored new content", misses);
    count("tensorreg_requests_total", "RPC answers sent", requests);
    count("tensorreg_request_errors_total", "RPC answers with a status other than OK", request_errors);
    r.add_collector([this] { scraped = engine.stats(); });
    auto snap = [&r, this](std::string_view name, std::string_view help, auto field, bool is_counter = false) {
      auto read = [this, field] { return static_cast<double>(scraped.*field); };
      if (is_counter) {
        r.counter_function(name, help, read);
      } else {
        r.gauge_function(name, help, read);
      }
    };
    using es = registration::engine_stats;
    snap("tensorreg_stable_bytes", "Bytes held in the stable DRAM cache", &es::stable_bytes);
    snap("tensorreg_stable_budget_bytes", "The stable DRAM cache's budget (0 = unlimited)", &es::stable_budget);
    snap("tensorreg_stable_reserved_bytes", "Stable budget held by uploads in progress", &es::stable_reserved_bytes);
    snap("tensorreg_populated_reserve_bytes", "Shared memory faulted in ahead of the next host put",
         &es::populated_reserve_bytes);
    snap("tensorreg_populated_reserve_taken_total", "Host puts that took the populated reserve",
         &es::populated_reserve_taken, true);
    snap("tensorreg_evictions_total", "Stable DRAM cache entries evicted to make room", &es::stable_evictions, true);
    snap("tensorreg_evicted_bytes_total", "Bytes of stable DRAM cache entries evicted", &es::stable_evicted_bytes,
         true);
    snap("tensorreg_artifacts", "Committed artifacts", &es::artifacts);
    snap("tensorreg_leases", "Active lease-in-place leases", &es::leases);
    snap("tensorreg_leased_bytes", "Bytes of artifacts held in place by leases", &es::leased_bytes);
    snap("tensorreg_regions", "Registered VRAM and HOST_SHARED regions", &es::regions);
    snap("tensorreg_mappings", "Open CUDA IPC and memfd mappings", &es::open_mappings);
    snap("tensorreg_vmm_reserved_bytes", "Address space reserved for CUDA VMM imports", &es::vmm_reserved_bytes);
    snap("tensorreg_ipc_opens_total", "CUDA IPC handles opened by the driver", &es::ipc_opens, true);
    snap("tensorreg_vmm_imports_total", "CUDA VMM imports made", &es::vmm_imports, true);
    snap("tensorreg_pending_registrations", "Registrations begun and not yet committed, aborted or expired",
         &es::pending_registrations);
    r.gauge_function("tensorreg_clients", "Open client connections (sessions)",
                     [this] { return static_cast<double>(connections.load()); });
    r.gauge_function("tensorreg_uptime_seconds", "Seconds since the daemon started",
                     [this] { return uptime_seconds(); });
  }

  // Counts one answer: requests, errors, and its time in tensorreg_rpc_duration_seconds.
  void count_answer(const wire::Request& request, const answer& out, std::chrono::steady_clock::time_point begun) {
    requests.add();
    const auto code = static_cast<errc>(out.response.status().code());
    if (code != errc::ok) request_errors.add();
    if (options.metrics == nullptr) return;
    const auto body = is_end_marker(request) ? wire::Request::kFeedRegisterArtifactStream : request.body_case();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - begun).count();
    const auto lookup = [&] {
      return &options.metrics->histogram_of(
          "tensorreg_rpc_duration_seconds", "Time from a request frame to its answer, by method and code",
          metrics::latency_buckets(),
          {{"method", std::string(convert::rpc_name(body))}, {"code", std::string(errc_name(code))}});
    };
    const auto method_slot = static_cast<std::size_t>(body);
    if (method_slot >= kMethodSlots) {
      lookup()->observe(seconds);
      return;
    }
    auto& slot = rpc_durations[method_slot][std::min(static_cast<std::size_t>(code), kCodeSlots - 1)];
    metrics::histogram* h = slot.load(std::memory_order_acquire);
    if (h == nullptr) {
      h = lookup();  // two threads may both look up: the registry returns the same histogram
      slot.store(h, std::memory_order_release);
    }
    h->observe(seconds);
  }

  // A request that names an artifact found it (hit) or not (miss).
  void count_lookup(const status& done) {
    if (done) {
      hits.add();
    } else if (done.error().code == errc::not_found) {
      misses.add();
    }
  }

  status check_display_name(const std::string& name) const {
    if (name.size() > kMaxDisplayName) {
      return fail(errc::invalid_argument, fmt::format("cannot begin registration: display_name is {} bytes, more than "
                                                      "{}",
                                                      name.size(), kMaxDisplayName));
    }
    for (unsigned char ch : name) {
      if (ch < 0x20 || ch == 0x7f) {
        return fail(errc::invalid_argument,
                    fmt::format("cannot begin registration: display_name holds control character 0x{:02x}", ch));
      }
    }
    return {};
  }

  std::size_t artifact_names_size() {
    std::lock_guard lock(names_mutex);
    return artifact_names.size();
  }

  // Starts a generation: names added from now on are newer than a list taken after this.
  std::uint64_t next_names_generation() {
    std::lock_guard lock(names_mutex);
    return ++names_generation;
  }

  // Drops the names of artifacts the engine no longer holds. `listed` was taken after
  // next_names_generation() returned `generation`, outside the lock (the engine's mutex is never
  // taken under names_mutex): names added since are of commits it may not show, so they stay.
  void prune_names(const std::vector<registration::artifact_summary>& listed, std::uint64_t generation) {
    std::unordered_set<std::string_view> held;
    for (const auto& a : listed) held.insert(a.descriptor.artifact_id);
    std::lock_guard lock(names_mutex);
    std::erase_if(artifact_names,
                  [&](const auto& entry) { return entry.second.second < generation && !held.contains(entry.first); });
  }

  void forget_pending_name(const std::string& registration_id) {
    std::lock_guard lock(names_mutex);
    pending_names.erase(registration_id);
  }

  // DECISIONS §4: owner_pid must be the peer's own pid, unless trusted. owner_pid <= 0 is left
  // to the engine, which rejects it with its own message.
  status check_owner(const peer_credentials& peer, std::int32_t owner_pid, std::string_view verb) const {
    if (owner_pid <= 0 || owner_pid == peer.pid) return {};
    if (trusted(peer)) return {};
    return fail(errc::permission_denied, fmt::format("cannot {}: owner_pid {} is not the calling process {} (start "
                                                     "tensorregd with --trust-client-pids to allow it)",
                                                     verb, owner_pid, peer.pid));
  }

  // A peer that may name an owner_pid other than its own (DECISIONS §4).
  bool trusted(const peer_credentials& peer) const {
    return options.trust_client_pids && (peer.uid == 0 || peer.uid == options.daemon_uid);
  }

  // DECISIONS §8, for the calls that name a registration without an owner_pid (Feed, Commit,
  // Abort, Revoke): the peer must own it. A trusted peer's pid is not the one it registered
  // with (another PID namespace), so it is not checked. KeepAlive and UnregisterRegion carry
  // owner_pid: check_owner pins it to the peer and the engine compares it with the owner.
  status check_registration_owner(const peer_credentials& peer, const std::string& registration_id,
                                  std::string_view verb) const {
    if (trusted(peer)) return {};
    return engine.check_owner(registration_id, peer.pid, verb);
  }

  status begin(call& c) {
    auto& in = *c.request.mutable_begin_register_artifact();
    TENSORREG_TRY(check_owner(c.peer, in.owner_pid(), "begin registration"));
    TENSORREG_TRY(check_display_name(in.display_name()));
    TENSORREG_TRY(resolve_device(in));
    if (auto bad = convert::malformed_view(in)) return tl::unexpected(std::move(*bad));
    auto request = convert::to_begin(in);
    TENSORREG_TRY(check_replica_policy(request.policy, request.client_artifact_id));
    TENSORREG_TRY(convert::take_begin_files(in, c.fds_in, request));
    request.owner_uid = c.peer.uid;  // the uid's share of the stable cache
    TENSORREG_TRY_ASSIGN(auto begun, engine.begin(std::move(request)));
    auto* hs = std::get_if<reg::stable_dram_handshake>(&begun.handshake);
    if (hs != nullptr && hs->publish && hs->publish->memory) {
      auto fd = hs->publish->memory->duplicate_fd();
      if (!fd) {
        (void)engine.abort(begun.registration_id);
        return tl::unexpected(with_context(std::move(fd).error(), "cannot begin registration"));
      }
      c.fds_out.push_back(std::move(*fd));
    }
    convert::fill_begin(*c.response.mutable_begin_register_artifact(), begun);
    if (!in.display_name().empty()) {
      std::lock_guard lock(names_mutex);
      if (pending_names.size() >= kMaxPendingNames) pending_names.clear();
      pending_names.emplace(begun.registration_id, in.display_name());
    }
    return {};
  }

  status keep_alive(call& c) {
    const auto& in = c.request.keep_alive_register_artifact();
    TENSORREG_TRY(
        check_owner(c.peer, in.owner_pid(), fmt::format("keep registration '{}' alive", in.registration_id())));
    TENSORREG_TRY(engine.keep_alive(convert::to_keep_alive(in)));
    c.response.mutable_keep_alive_register_artifact();
    return {};
  }

  status commit(call& c) {
    const auto& id = c.request.commit_registered_artifact().registration_id();
    TENSORREG_TRY(check_registration_owner(c.peer, id, "commit registration"));
    auto committed = engine.commit(id, convert::to_commit_options(c.request.commit_registered_artifact()));
    if (!committed && committed.error().code == errc::failed_precondition) {
      // The registration may stay open (more to feed): keep its name until it ends.
      return tl::unexpected(std::move(committed).error());
    }
    std::string name;
    {
      std::lock_guard lock(names_mutex);
      if (auto it = pending_names.find(id); it != pending_names.end()) {
        name = std::move(it->second);
        pending_names.erase(it);
      }
      if (committed && !name.empty()) {
        artifact_names.try_emplace(committed->descriptor.artifact_id, std::move(name), names_generation);
      }
    }
    if (committed && artifact_names_size() > kMaxArtifactNames) {
      const auto generation = next_names_generation();
      prune_names(engine.list(), generation);
    }
    TENSORREG_TRY_ASSIGN(auto done, std::move(committed));
    TENSORREG_TRY(committed_by(c.peer, id, done, c.request.commit_registered_artifact().replica_timeout_ms()));
    convert::fill_commit(*c.response.mutable_commit_registered_artifact(), done);
    return {};
  }

  // What follows every commit: counters, the eviction line, the cluster's advert and replicas
  // (waited for up to `replica_timeout_ms`, the request's: 0 = the daemon's).
  status committed_by(const peer_credentials& peer, const std::string& id, reg::commit_response& done,
                      std::uint32_t replica_timeout_ms) {
    if (!done.evicted.empty()) {
      // The engine logs each eviction; this line says whose commit caused them.
      tensorreg::log(log, log_level::info, "commit of registration {} by pid {} as {} evicted {} to make room", id,
                     peer.pid, done.descriptor.artifact_id, fmt::join(done.evicted, ", "));
    }
    if (done.existed) {
      hits.add();
    } else {
      misses.add();
      bytes_registered.add(done.descriptor.total_size);
    }
    if (options.cluster != nullptr && !done.existed) options.cluster->committed(done.descriptor.artifact_id);
    return place_replicas(done, replica_timeout_ms);
  }

  // Ours: a new version over a lease's memory and layout (docs/wire-format.md §20).
  status republish_lease(call& c) {
    const auto& in = c.request.republish_lease();
    TENSORREG_TRY(check_owner(c.peer, in.owner_pid(), fmt::format("republish lease '{}'", in.registration_id())));
    auto request = convert::to_republish(in);
    request.owner_uid = c.peer.uid;
    TENSORREG_TRY(check_replica_policy(request.policy, request.client_artifact_id));
    // The previous lease ends only once the new one has passed everything after its commit
    // (the replicas a policy must have): a refused republish changes nothing, and the new
    // lease, whose id the error does not carry, is revoked again.
    const bool revoke_previous = std::exchange(request.revoke_previous, false);
    TENSORREG_TRY_ASSIGN(auto done, engine.republish(request));
    if (auto placed = committed_by(c.peer, done.registration_id, done.commit, in.replica_timeout_ms()); !placed) {
      (void)engine.revoke(done.registration_id, "its republish failed: " + placed.error().message);
      return placed;
    }
    if (revoke_previous) {
      done.revoked_previous =
          engine.revoke(request.previous_registration_id, "replaced by lease " + done.registration_id);
      forget_pending_name(request.previous_registration_id);
    }
    auto& out = *c.response.mutable_republish_lease();
    out.set_registration_id(done.registration_id);
    out.set_revoked_previous(done.revoked_previous);
    convert::fill_commit(*out.mutable_commit(), done.commit);
    return {};
  }

  // docs/cluster.md §5 (Policies): a must tier that asks for stable copies on other hosts is
  // refused at Begin when it cannot be honoured at all: without --cluster, or for a cgid
  // (only mi2 ids are replicated). A policy that does not resolve is the engine's to refuse.
  status check_replica_policy(const std::optional<policy::store_policy>& wanted, const std::string& cgid) const {
    const auto resolved = policy::resolve(wanted);
    if (!resolved || resolved->replica_hosts_must <= 1) return {};
    if (options.cluster == nullptr) {
      return fail(errc::failed_precondition,
                  fmt::format("cannot begin registration: its policy must keep stable copies on {} hosts and the "
                              "daemon runs without --cluster",
                              resolved->replica_hosts_must));
    }
    if (!cgid.empty()) {
      return fail(errc::invalid_argument,
                  fmt::format("cannot begin registration: its policy must keep stable copies on {} hosts and "
                              "{} is a cgid: only mi2 artifacts are replicated",
                              resolved->replica_hosts_must, cgid));
    }
    return {};
  }

  // docs/cluster.md §5 (Policies): after the local commit, the stable copies the policy asks
  // for on other hosts are placed through the cluster (node::publish) and waited for up to
  // --replica-timeout-ms, or the commit's own shorter replica_timeout_ms (a may tier: asked,
  // not waited for); the result is the commit's remote_stable_tier. A must tier not met fails
  // the commit (the artifact stays committed here and the asks stay: DECISIONS §5.21).
  status place_replicas(reg::commit_response& done, std::uint32_t replica_timeout_ms) {
    if (done.replica_hosts <= 1 || done.replica_level == policy::requirement::none) return {};
    const auto& id = done.descriptor.artifact_id;
    const bool must = done.replica_hosts_must > 1;
    auto degraded = [&](std::string why) -> status {
      if (must) return fail(errc::failed_precondition, fmt::format("cannot keep stable copies of {}: {}", id, why));
      done.remote_stable_tier = reg::local_stable_tier_result{reg::local_stable_status::degraded, std::move(why)};
      return {};
    };
    if (options.cluster == nullptr) {
      return degraded(
          fmt::format("the policy asks for {} hosts and the daemon runs without --cluster", done.replica_hosts));
    }
    if (done.descriptor.id_kind != identity::id_kind::mi2) {
      return degraded(
          fmt::format("the policy asks for {} hosts and only mi2 artifacts are replicated", done.replica_hosts));
    }
    const bool wait = done.replica_level != policy::requirement::may;
    // A client may wait less than the daemon allows, never more: a request worker waits.
    auto timeout = options.replica_timeout;
    if (replica_timeout_ms != 0) timeout = std::min(timeout, std::chrono::milliseconds(replica_timeout_ms));
    if (!wait) timeout = std::chrono::milliseconds(0);
    auto placed = options.cluster->publish(id, done.replica_hosts, false, timeout);
    if (!placed) {
      if (must) return tl::unexpected(std::move(placed).error());
      return degraded(std::move(placed).error().message);
    }
    const auto held = static_cast<std::uint32_t>(placed->holders.size());
    if (placed->reached) {
      done.remote_stable_tier = reg::local_stable_tier_result{
          reg::local_stable_status::ready, fmt::format("{} of {} hosts hold it", held, done.replica_hosts)};
      return {};
    }
    // Why it stopped short: every member holds it, or the time was up.
    const auto when = held >= placed->members ? fmt::format("; the cluster has {} members", placed->members)
                                              : fmt::format(" after {} ms", timeout.count());
    if (must && held < done.replica_hosts_must) {
      return fail(errc::deadline_exceeded,
                  fmt::format("cannot keep stable copies of {} on {} hosts: {} hold it{} (it stays committed here; "
                              "the hosts asked may still pull it)",
                              id, done.replica_hosts_must, held, when));
    }
    done.remote_stable_tier = reg::local_stable_tier_result{
        reg::local_stable_status::degraded,
        wait ? fmt::format("{} of {} hosts hold it{}", held, done.replica_hosts, when)
             : fmt::format("{} of {} hosts hold it; the others were asked (a may tier is not waited for)", held,
                           done.replica_hosts)};
    return {};
  }

  // docs/cluster.md §5: an id not held here is fetched from the cluster before it is served.
  // Only a NOT_FOUND from the engine asks the cluster; its answer (NOT_FOUND, UNAVAILABLE)
  // replaces it.
  status ensure_local(const std::string& artifact_id) {
    if (options.cluster == nullptr) return {};
    auto held = engine.get(artifact_id);
    if (held || held.error().code != errc::not_found) return {};
    return options.cluster->fetch(artifact_id);
  }

  status abort(call& c) {
    const auto& id = c.request.abort_registered_artifact().registration_id();
    TENSORREG_TRY(check_registration_owner(c.peer, id, "abort registration"));
    TENSORREG_TRY(engine.abort(id));
    forget_pending_name(id);
    c.response.mutable_abort_registered_artifact();
    return {};
  }

  status revoke(call& c) {
    const auto& in = c.request.revoke_registered_artifact();
    TENSORREG_TRY(check_registration_owner(c.peer, in.registration_id(), "revoke registration"));
    const bool revoked = engine.revoke(in.registration_id(), in.reason());
    forget_pending_name(in.registration_id());
    c.response.mutable_revoke_registered_artifact()->set_revoked(revoked);
    return {};
  }

  status register_region(call& c) {
    auto& in = *c.request.mutable_register_region();
    TENSORREG_TRY(check_owner(c.peer, in.owner_pid(), "register region"));
    const std::size_t used = convert::fds_used(in);
    if (c.fds_in.size() > used) {
      return fail(errc::invalid_argument, fmt::format("cannot register region: {} arrived with a message that uses {}",
                                                      fd_count(c.fds_in.size()),
                                                      used == 0   ? std::string("none")
                                                      : used == 1 ? std::string("one")
                                                                  : std::to_string(used)));
    }
    TENSORREG_TRY(resolve_device(in));
    auto request = convert::to_region_request(in);
    request.owner_uid = c.peer.uid;  // the uid's share of the registry
    const auto asked = request.host_shared;
    if (in.has_cuda_vmm()) {
      TENSORREG_TRY(convert::take_vmm_chunks(in, c.fds_in, request));
    } else if (used == 1 && !c.fds_in.empty()) {
      request.memfd = std::move(c.fds_in.front());
    }
    TENSORREG_TRY_ASSIGN(auto info, engine.register_region(std::move(request)));
    if (asked && asked->daemon_managed && info.memory) {
      // The client maps the daemon's slab through this fd (docs/wire-format.md §7).
      auto fd = info.memory->duplicate_fd();
      if (!fd) {
        (void)engine.unregister_region(info.id, info.owner_pid, true);
        return tl::unexpected(with_context(std::move(fd).error(), "cannot register region"));
      }
      c.fds_out.push_back(std::move(*fd));
    }
    convert::fill_region(*c.response.mutable_register_region(), info, asked);
    return {};
  }

  status unregister_region(call& c) {
    const auto& in = c.request.unregister_region();
    TENSORREG_TRY(check_owner(c.peer, in.owner_pid(), fmt::format("unregister region '{}'", in.region_id())));
    TENSORREG_TRY_ASSIGN(bool released, engine.unregister_region(in.region_id(), in.owner_pid(), in.force()));
    convert::fill_unregister(*c.response.mutable_unregister_region(), released);
    return {};
  }

  status register_vram_region(call& c) {
    auto& in = *c.request.mutable_register_vram_region();
    TENSORREG_TRY(check_owner(c.peer, in.owner_pid(), "register VRAM region"));
    TENSORREG_TRY(resolve_device(in));
    auto request = convert::to_region_request(in);
    request.owner_uid = c.peer.uid;
    TENSORREG_TRY_ASSIGN(auto info, engine.register_region(std::move(request)));
    convert::fill_vram_region(*c.response.mutable_register_vram_region(), info);
    return {};
  }

  status unregister_vram_region(call& c) {
    const auto& in = c.request.unregister_vram_region();
    TENSORREG_TRY(check_owner(c.peer, in.owner_pid(), fmt::format("unregister VRAM region '{}'", in.region_id())));
    TENSORREG_TRY_ASSIGN(bool released, engine.unregister_region(in.region_id(), in.owner_pid(), in.force()));
    convert::fill_unregister(*c.response.mutable_unregister_vram_region(), released);
    return {};
  }

  status get_server_config(call& c) {
    convert::fill_config(*c.response.mutable_get_server_config(), options.socket_path, engine.stats());
    if (!options.cluster_url.empty()) c.response.mutable_get_server_config()->set_cluster_url(options.cluster_url);
    return {};
  }

  status get_artifact_index(call& c) {
    const auto& id = c.request.get_artifact_index_by_id().artifact_id();
    TENSORREG_TRY_ASSIGN(auto index, engine.index_of(id));
    TENSORREG_TRY_ASSIGN(auto summary, engine.get(id));
    convert::fill_index(*c.response.mutable_get_artifact_index_by_id(), *index, summary.descriptor);
    if (const auto& view_id = c.request.get_artifact_index_by_id().view_id(); !view_id.empty()) {
      TENSORREG_TRY_ASSIGN(auto view, engine.view_of(id, view_id));  // registration.md §7
      convert::fill_view(*c.response.mutable_get_artifact_index_by_id()->mutable_view(), view);
    }
    return {};
  }

  status deregister(call& c) {
    const auto& in = c.request.deregister_artifact();
    if (in.has_owner_pid()) {
      TENSORREG_TRY(check_owner(c.peer, in.owner_pid(), fmt::format("deregister {}", in.artifact_id())));
    }
    auto request = convert::to_deregister(in);
    // DECISIONS §8: the call acts for the peer, which must hold every lease and join. A trusted
    // peer acts for the owner_pid it names, or, naming none, for the daemon.
    if (request.owner_pid <= 0) request.owner_pid = trusted(c.peer) ? 0 : c.peer.pid;
    // The copies the daemon keeps belong to the uid that put them (root may remove any).
    if (request.owner_pid != 0) request.owner_uid = c.peer.uid;
    TENSORREG_TRY_ASSIGN(auto done, engine.deregister(request));
    convert::fill_deregister(*c.response.mutable_deregister_artifact(), done);
    return {};
  }

  // registration.md §1.6, DECISIONS §5.11: one unsharded copy in --persist-dir, written on
  // the engine's persistence threads; Wait blocks this worker, never the I/O thread.
  status persistence(call& c) {
    if (c.request.has_start_persistence()) {
      const auto& in = c.request.start_persistence();
      TENSORREG_TRY_ASSIGN(auto cache, convert::to_persist_cache_policy(in));
      TENSORREG_TRY_ASSIGN(auto task, engine.start_persistence(in.artifact_id(), std::move(cache)));
      convert::fill_persistence(*c.response.mutable_start_persistence(), task);
      return {};
    }
    if (c.request.has_query_persistence_status()) {
      const auto& in = c.request.query_persistence_status();
      TENSORREG_TRY_ASSIGN(auto task, engine.persistence_status(in.task_id(), in.artifact_id()));
      convert::fill_persistence(*c.response.mutable_query_persistence_status(), task);
      return {};
    }
    const auto& in = c.request.wait_persistence_status();
    TENSORREG_TRY_ASSIGN(auto task, engine.wait_persistence(in.task_id(), std::chrono::milliseconds(in.timeout_ms())));
    convert::fill_persistence(*c.response.mutable_wait_persistence_status()->mutable_status(), task);
    return {};
  }

  // Ours (registration.md §4.8): waits for a cgid artifact's background hash. It tells only
  // whether bytes already readable by their id hash to an mi2 id, so it needs no reader check.
  status wait_artifact_hash(call& c) {
    const auto& in = c.request.wait_artifact_hash();
    TENSORREG_TRY_ASSIGN(auto st,
                         engine.wait_artifact_hash(in.artifact_id(), std::chrono::milliseconds(in.timeout_ms())));
    convert::fill_hash_status(*c.response.mutable_wait_artifact_hash(), st);
    return {};
  }

  status activate_stable_local_backing(call& c) {
    const auto& in = c.request.activate_stable_local_backing();
    TENSORREG_TRY(check_owner(c.peer, in.owner_pid(), "activate stable local backing"));
    return fail(errc::unimplemented, "cannot activate stable local backing: it is not implemented yet");
  }

  // RPCs that hand another process an artifact's memory (GetArtifactMemfd, OpenArtifactDevice)
  // answer only peers of the daemon's own uid and root: any artifact held becomes readable.
  status check_reader(const peer_credentials& peer, const std::string& verb) const {
    if (peer.uid == 0 || peer.uid == options.daemon_uid) return {};
    return fail(errc::permission_denied, fmt::format("cannot {}: uid {} is neither root nor the daemon's uid {}", verb,
                                                     peer.uid, options.daemon_uid));
  }

  // Ours: the stable DRAM replica's memfd, read-only, for zero-copy readers. The bytes of every
  // artifact held are visible through it, so only the daemon's own uid and root may ask.
  status get_artifact_memfd(call& c) {
    const auto& id = c.request.get_artifact_memfd().artifact_id();
    TENSORREG_TRY(check_reader(c.peer, "open the stable replica of " + id));
    TENSORREG_TRY(ensure_local(id));
    TENSORREG_TRY_ASSIGN(auto replica, engine.stable_replica_fd(id));
    TENSORREG_TRY_ASSIGN(auto summary, engine.get(id));
    convert::fill_memfd(*c.response.mutable_get_artifact_memfd(), *replica.first, summary.descriptor);
    c.fds_out.push_back(std::move(replica.second));
    return {};
  }

  // Ours (docs/wire-format.md §17): a read-only fd of an artifact's persisted bytes file, for a
  // reader that loads it itself (straight to a GPU). The same reader rule as GetArtifactMemfd:
  // the bytes of every persisted artifact become readable.
  status open_persisted_artifact(call& c) {
    const auto& in = c.request.open_persisted_artifact();
    TENSORREG_TRY(check_reader(c.peer, "open the persisted copy of " + in.artifact_id()));
    TENSORREG_TRY_ASSIGN(auto copy, engine.open_persisted(in.artifact_id(), in.unless_in_memory()));
    convert::fill_persisted(*c.response.mutable_open_persisted_artifact(), *copy.opened.artifact, copy.descriptor);
    c.fds_out.push_back(std::move(copy.opened.data));
    return {};
  }

  // Ours: the GPU memory behind an artifact, for a reader in another process to map zero-copy
  // (docs/wire-format.md §13). The reader can read and write the producer's memory through it,
  // so only the daemon's own uid and root may ask, as for GetArtifactMemfd.
  status open_artifact_device(call& c) {
    const auto& id = c.request.open_artifact_device().artifact_id();
    TENSORREG_TRY(check_reader(c.peer, "open the GPU memory of " + id));
    const auto& place_uuid = c.request.open_artifact_device().place_on_device_uuid();
    if (!place_uuid.empty()) TENSORREG_TRY(ensure_local(id));
    auto found = engine.device_layout_of(id, c.request.open_artifact_device().known_layout());
    // No GPU memory behind it, and the reader asks for a copy on its GPU (wire-format.md §13).
    if (!found && found.error().code == errc::failed_precondition && !place_uuid.empty() &&
        c.request.open_artifact_device().first_allocation() == 0) {
      TENSORREG_TRY_ASSIGN(auto device, engine.resolve_device(0, place_uuid));
      auto placed = engine.place_on_device(id, device);
      if (!placed)
        return tl::unexpected(with_context(std::move(placed).error(), "cannot open the GPU memory of " + id));
      if (*placed) {
        tensorreg::log(log, log_level::info, "copied {} to GPU {} for pid {} (OpenArtifactDevice)", id, place_uuid,
                       c.peer.pid);
      }
      found = engine.device_layout_of(id, c.request.open_artifact_device().known_layout());
    }
    TENSORREG_TRY_ASSIGN(auto layout, std::move(found));
    // Paging: this answer carries the VMM fds of allocations [first, end), at most
    // max_vmm_chunks of them (a region never has more, so every page makes progress).
    const std::size_t first = c.request.open_artifact_device().first_allocation();
    if (first > 0 && first >= layout.allocations.size()) {
      return fail(errc::invalid_argument,
                  fmt::format("cannot open the GPU memory of {}: first_allocation {} is past its "
                              "{} allocations",
                              id, first, layout.allocations.size()));
    }
    std::size_t end = first, fds = 0;
    while (end < layout.allocations.size()) {
      const auto& vmm = layout.allocations[end].vmm;
      const std::size_t n = vmm ? vmm->fds.size() : 0;
      if (fds + n > convert::max_vmm_chunks && end > first) break;
      fds += n;
      ++end;
    }
    // The page's fds, in the order fill_device_layout numbers them.
    for (std::size_t k = first; k < end; ++k) {
      const auto& vmm = layout.allocations[k].vmm;
      if (!vmm) continue;
      for (const auto& fd : vmm->fds) {
        unique_fd dup(::fcntl(fd.get(), F_DUPFD_CLOEXEC, 0));
        if (!dup) {
          return fail(errc::resource_exhausted, fmt::format("cannot open the GPU memory of {}: cannot duplicate a CUDA "
                                                            "VMM fd: {}",
                                                            id, std::strerror(errno)));
        }
        c.fds_out.push_back(std::move(dup));
      }
    }
    std::vector<std::string> device_uuids;
    device_uuids.reserve(layout.allocations.size());
    for (const auto& a : layout.allocations) device_uuids.push_back(engine.device_uuid(a.device_id));
    convert::fill_device_layout(*c.response.mutable_open_artifact_device(), layout, first, end, device_uuids);
    return {};
  }

  // device_uuid (ours, docs/wire-format.md §12) names the device when set: the message's
  // device_id becomes this daemon's ordinal of it.
  template <class Message>
  status resolve_device(Message& in) {
    if (in.device_uuid().empty()) return {};
    TENSORREG_TRY_ASSIGN(auto device, engine.resolve_device(in.device_id(), in.device_uuid()));
    in.set_device_id(device);
    return {};
  }

  status list_artifacts(call& c) {
    auto& out = *c.response.mutable_list_artifacts();
    const auto generation = next_names_generation();
    auto listed = engine.list();
    prune_names(listed, generation);
    convert::fill_list(out, std::move(listed), engine.assemblies());
    std::lock_guard lock(names_mutex);
    for (auto& a : *out.mutable_artifacts()) {
      if (auto it = artifact_names.find(a.artifact_id()); it != artifact_names.end()) a.set_name(it->second.first);
    }
    return {};
  }

  status get_stats(call& c) {
    auto& out = *c.response.mutable_get_stats();
    convert::fill_stats(out, engine.stats(), connections.load());
    out.set_uptime_seconds(uptime_seconds());
    out.set_hits(hits.value());
    out.set_misses(misses.value());
    out.set_requests(requests.value());
    out.set_request_errors(request_errors.value());
    out.set_bytes_registered(bytes_registered.value());
    out.set_bytes_hashed(metrics::process_counters().bytes_hashed.value());
    if (options.cluster != nullptr) {
      for (const auto& p : options.cluster->pulls()) {
        auto& pull = *out.add_pulls();
        pull.set_artifact_id(p.artifact_id);
        pull.set_total_bytes(p.total_bytes);
        pull.set_verified_bytes(p.verified_bytes);
        for (const auto& source : p.sources) pull.add_sources(source);
        pull.set_seconds(p.seconds);
      }
    }
    out.set_bytes_copied(metrics::process_counters().bytes_copied.value());
    return {};
  }

  // Ours (docs/wire-format.md §19, docs/cluster.md §5): ask the cluster's members to hold
  // replicas of an artifact held here and wait until they do. On the worker pool: it waits.
  status publish_artifact(call& c) {
    const auto& in = c.request.publish_artifact();
    if (options.cluster == nullptr) {
      return fail(errc::failed_precondition,
                  fmt::format("cannot publish {}: the daemon runs without --cluster", in.artifact_id()));
    }
    const std::chrono::milliseconds timeout(in.timeout_ms() == 0 ? 60'000 : in.timeout_ms());
    TENSORREG_TRY_ASSIGN(auto done, options.cluster->publish(in.artifact_id(), in.replicas(), in.all(), timeout));
    auto& out = *c.response.mutable_publish_artifact();
    for (const auto& h : done.holders) out.add_holders(h);
    for (const auto& h : done.asked) out.add_asked(h);
    out.set_reached(done.reached);
    out.set_target(done.target);
    out.set_members(done.members);
    for (const auto& d : done.declined) out.add_declined(fmt::format("{}: {}", d.host_id, d.reason));
    return {};
  }

  status route(call& c) {
    using R = wire::Request;
    switch (c.request.body_case()) {
      case R::kBeginRegisterArtifact: return begin(c);
      case R::kKeepAliveRegisterArtifact: return keep_alive(c);
      case R::kCommitRegisteredArtifact: return commit(c);
      case R::kAbortRegisteredArtifact: return abort(c);
      case R::kRevokeRegisteredArtifact: return revoke(c);
      case R::kRegisterRegion: return register_region(c);
      case R::kUnregisterRegion: return unregister_region(c);
      case R::kRegisterVramRegion: return register_vram_region(c);
      case R::kUnregisterVramRegion: return unregister_vram_region(c);
      case R::kGetServerConfig: return get_server_config(c);
      case R::kGetArtifactIndexById: return get_artifact_index(c);
      case R::kDeregisterArtifact: return deregister(c);
      case R::kStartPersistence:
      case R::kQueryPersistenceStatus:
      case R::kWaitPersistenceStatus: return persistence(c);
      case R::kActivateStableLocalBacking: return activate_stable_local_backing(c);
      case R::kListArtifacts: return list_artifacts(c);
      case R::kGetStats: return get_stats(c);
      case R::kGetArtifactMemfd: return get_artifact_memfd(c);
      case R::kOpenArtifactDevice: return open_artifact_device(c);
      case R::kWaitArtifactHash: return wait_artifact_hash(c);
      case R::kOpenPersistedArtifact: return open_persisted_artifact(c);
      case R::kPublishArtifact: return publish_artifact(c);
      case R::kRepublishLease: return republish_lease(c);
      case R::kFeedRegisterArtifactStream:
      case R::BODY_NOT_SET: break;
    }
    return tl::unexpected(convert::bodiless(c.request));
  }

  answer unary(connection& conn, wire::Request& request, std::vector<unique_fd> fds) {
    const auto body = request.body_case();
    call c{conn.peer(), request, fds, {}, {}};
    c.response.set_request_id(request.request_id());
    status done;
    if (request.end_of_stream()) {
      done = fail(errc::invalid_argument, fmt::format("cannot handle {} request {}: end_of_stream is only for Feed "
                                                      "streams",
                                                      convert::rpc_name(body), request.request_id()));
    } else if (!fds.empty() && body != wire::Request::kRegisterRegion &&
               body != wire::Request::kBeginRegisterArtifact) {
      done = tl::unexpected(
          fds_unused(fmt::format("handle {} request {}", convert::rpc_name(body), request.request_id()), fds.size()));
    } else {
      done = route(c);
      if (body == wire::Request::kGetArtifactIndexById || body == wire::Request::kGetArtifactMemfd ||
          body == wire::Request::kOpenArtifactDevice || body == wire::Request::kOpenPersistedArtifact) {
        count_lookup(done);
      }
    }
    if (!done) {
      convert::set_status(c.response, done.error());
      c.fds_out.clear();
    } else {
      c.response.mutable_status();
    }
    return answer{std::move(c.response), std::move(c.fds_out), {}};
  }

  // ---- Feed streams ----

  // Applies one feed frame of a stream; any error ends the stream.
  status feed_frame(const peer_credentials& peer, feed_stream& stream, bool first, wire::Request& request,
                    std::size_t fds) {
    auto& in = *request.mutable_feed_register_artifact_stream();
    const std::string verb = fmt::format("feed registration '{}'", in.registration_id());
    if (first) stream.registration_id = in.registration_id();
    if (in.registration_id() != stream.registration_id) {
      return fail(errc::invalid_argument, fmt::format("cannot {}: stream {} feeds registration '{}'", verb,
                                                      request.request_id(), stream.registration_id));
    }
    if (fds != 0) return tl::unexpected(fds_unused(verb, fds));
    TENSORREG_TRY(check_registration_owner(peer, in.registration_id(), "feed registration"));
    for (auto& entry : *in.mutable_storage_entries()) {
      if (auto resolved = resolve_device(entry); !resolved) {
        return tl::unexpected(with_context(std::move(resolved).error(),
                                           fmt::format("cannot {}: storage '{}'", verb, entry.storage_id())));
      }
    }
    return engine.feed(convert::to_feed(in));
  }

  std::optional<answer> feed(connection& conn, wire::Request& request, std::size_t fds) {
    const auto id = request.request_id();
    feed_stream* stream = nullptr;
    bool first = false;
    {
      std::lock_guard lock(conn.mutex());
      auto [it, inserted] = conn.streams().try_emplace(id);
      if (it->second.failed) return std::nullopt;  // answered already
      stream = &it->second;                        // stable: only stream frames erase, one at a time
      first = inserted;
    }
    auto applied = feed_frame(conn.peer(), *stream, first, request, fds);
    if (applied) return std::nullopt;
    std::lock_guard lock(conn.mutex());
    stream->failed = true;
    return error_answer(id, applied.error());
  }

  answer end_stream(connection& conn, std::uint64_t id) {
    std::lock_guard lock(conn.mutex());
    auto it = conn.streams().find(id);
    if (it == conn.streams().end()) {
      return error_answer(id, error{errc::invalid_argument, fmt::format("cannot end feed stream {}: missing feed "
                                                                        "payload (no feed frame came before "
                                                                        "end_of_stream)",
                                                                        id)});
    }
    answer out;
    out.subject = fmt::format("registration '{}'", it->second.registration_id);
    conn.streams().erase(it);
    out.response.set_request_id(id);
    out.response.mutable_status();
    out.response.mutable_feed_register_artifact_stream();
    return out;
  }

  // A frame of a Feed stream: a feed message, or the end-of-stream marker.
  std::optional<answer> stream_frame(connection& conn, wire::Request& request, std::vector<unique_fd> fds) {
    const auto id = request.request_id();
    {
      std::lock_guard lock(conn.mutex());
      if (conn.unary_in_flight().contains(id)) return id_in_use(request);
      auto it = conn.streams().find(id);
      if (it != conn.streams().end() && it->second.failed) {
        if (request.end_of_stream()) conn.streams().erase(it);  // its answer went out with the error
        return std::nullopt;
      }
    }
    if (!request.end_of_stream()) return feed(conn, request, fds.size());
    const bool has_body = request.has_feed_register_artifact_stream();
    if (has_body || !fds.empty()) {
      std::lock_guard lock(conn.mutex());
      conn.streams().erase(id);
      const auto why = has_body ? std::string("the end_of_stream frame carries a body")
                                : fd_count(fds.size()) + " arrived with the end_of_stream frame";
      return error_answer(id, error{errc::invalid_argument, fmt::format("cannot end feed stream {}: {}", id, why)});
    }
    return end_stream(conn, id);
  }

  // ---- One frame, start to end ----

  std::optional<answer> dispatch(connection& conn, wire::Request& request, frame_in frame) {
    if (!request.ParseFromString(frame.payload)) {
      return error_answer(0, error{errc::invalid_argument,
                                   fmt::format("cannot parse request: {} bytes are not a tensorreg.wire.v1.Request",
                                               frame.payload.size())});
    }
    std::string().swap(frame.payload);  // the request holds its own copy (view chunks are large)
    if (request.request_id() == 0) {
      return error_answer(0, error{errc::invalid_argument, "cannot handle request: request_id 0 is reserved"});
    }
    const auto id = request.request_id();
    if (request.has_feed_register_artifact_stream() || is_end_marker(request)) {
      return stream_frame(conn, request, std::move(frame.fds));
    }
    {
      std::lock_guard lock(conn.mutex());
      if (conn.streams().contains(id)) {
        // A connection-level error (docs/wire-format.md §4): the id is still outstanding.
        return error_answer(0, error{errc::invalid_argument,
                                     fmt::format("cannot handle {} request {}: request_id {} is in use by an open feed "
                                                 "stream",
                                                 convert::rpc_name(request.body_case()), id, id)});
      }
      if (!conn.unary_in_flight().insert(id).second) return id_in_use(request);
    }
    // Requests of one connection run concurrently (docs/wire-format.md §5): the id is taken
    // until this one is answered.
    struct release_id {
      connection& conn;
      std::uint64_t id;
      ~release_id() {
        std::lock_guard lock(conn.mutex());
        conn.unary_in_flight().erase(id);
      }
    } const release{conn, id};
    return unary(conn, request, std::move(frame.fds));
  }

  // A connection-level error (docs/wire-format.md §4): the id names a request still in flight.
  static answer id_in_use(const wire::Request& request) {
    return error_answer(0, dispatcher::id_in_use(request.request_id()));
  }

  static bool is_end_marker(const wire::Request& request) {
    return request.end_of_stream() && request.body_case() == wire::Request::BODY_NOT_SET;
  }

  // Each RPC at debug; each non-OK answer again at info, with its message, for whoever reads
  // the log to see what a client got wrong. A feed frame that is not answered (the stream goes
  // on) is a trace line.
  void log_rpc(const peer_credentials& peer, const wire::Request& request, const std::optional<answer>& out,
               std::chrono::steady_clock::time_point started) const {
    const bool rejected = out && out->response.status().code() != 0;
    const auto level = !out ? log_level::trace : log_level::debug;
    if (!log.enabled(level) && !(rejected && log.enabled(log_level::info))) return;
    const auto us =
        std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - started).count();
    const auto method = is_end_marker(request) ? std::string_view("FeedRegisterArtifactStream")
                                               : convert::rpc_name(request.body_case());
    std::string subject;
    if (out && !out->subject.empty()) {
      subject = ", " + out->subject;
    } else if (auto s = convert::subject_of(request, out ? out->response : wire::Response::default_instance());
               !s.empty()) {
      subject = ", " + s;
    }
    if (!out) {
      tensorreg::log(log, log_level::trace, "rpc {} request {} from pid {} uid {}{}: frame taken in {} us", method,
                     request.request_id(), peer.pid, peer.uid, subject, us);
      return;
    }
    const auto& status = out->response.status();
    const auto code = errc_name(static_cast<errc>(status.code()));
    tensorreg::log(log, log_level::debug, "rpc {} request {} from pid {} uid {}{}: {} in {} us", method,
                   request.request_id(), peer.pid, peer.uid, subject, code, us);
    if (rejected) {
      tensorreg::log(log, log_level::info, "rejected {} request {} from pid {} uid {}{}: {}: {}", method,
                     request.request_id(), peer.pid, peer.uid, subject, code, status.message());
    }
  }
};

// ---- dispatcher ------------------------------------------------------------------------------

dispatcher::dispatcher(registration::engine& engine, dispatcher_options options)
    : impl_(std::make_unique<impl>(engine, std::move(options))) {}

dispatcher::~dispatcher() = default;

void dispatcher::connection_deleter::operator()(connection* c) const noexcept { delete c; }

dispatcher::connection_ptr dispatcher::open_connection(const peer_credentials& peer) {
  return connection_ptr(new connection(peer, impl_->connections));
}

std::optional<frame_out> dispatcher::handle(connection& conn, frame_in frame) {
  const auto started = std::chrono::steady_clock::now();
  // On an arena: a Feed of thousands of storages parses into one block instead of an
  // allocation per message and field, and is freed at once.
  google::protobuf::Arena arena;
  auto& request = *google::protobuf::Arena::CreateMessage<wire::Request>(&arena);
  std::optional<answer> out;
  // The session boundary: whatever a handler throws is answered, never lost with the client
  // left waiting (an id-0 answer when the request could not even be read).
  try {
    out = impl_->dispatch(conn, request, std::move(frame));
  } catch (const std::bad_alloc&) {
    out = error_answer(request.request_id(), error{errc::resource_exhausted, "cannot handle request: out of memory"});
  } catch (const std::exception& e) {
    out = error_answer(request.request_id(), error{errc::internal, fmt::format("cannot handle request: {}", e.what())});
  }
  if (out && out->response.status().code() != 0) {
    // A stream answered with an error takes no more frames (as a handler's own error does).
    std::lock_guard lock(conn.mutex());
    if (auto it = conn.streams().find(request.request_id()); it != conn.streams().end()) it->second.failed = true;
  }
  impl_->log_rpc(conn.peer(), request, out, started);
  if (!out) return std::nullopt;
  impl_->count_answer(request, *out, started);
  return serialize(std::move(*out));
}

error dispatcher::id_in_use(std::uint64_t request_id) {
  return error{errc::invalid_argument, fmt::format("cannot handle request {}: request_id {} is in use by a request "
                                                   "still in flight",
                                                   request_id, request_id)};
}

std::pair<request_lane, std::uint64_t> dispatcher::lane_of(const frame_in& frame) noexcept {
  namespace io = google::protobuf::io;
  using wfl = google::protobuf::internal::WireFormatLite;
  using R = wire::Request;
  io::CodedInputStream in(reinterpret_cast<const std::uint8_t*>(frame.payload.data()),
                          static_cast<int>(std::min<std::size_t>(frame.payload.size(), INT32_MAX)));
  int body = 0;
  bool end_of_stream = false;
  std::uint64_t id = 0;
  while (const std::uint32_t tag = in.ReadTag()) {
    const int field = wfl::GetTagFieldNumber(tag);
    if (field == R::kEndOfStreamFieldNumber && wfl::GetTagWireType(tag) == wfl::WIRETYPE_VARINT) {
      std::uint64_t v = 0;
      if (!in.ReadVarint64(&v)) return {request_lane::work, 0};
      end_of_stream = v != 0;
      continue;
    }
    if (field == R::kRequestIdFieldNumber && wfl::GetTagWireType(tag) == wfl::WIRETYPE_VARINT) {
      if (!in.ReadVarint64(&id)) return {request_lane::work, 0};
      continue;
    }
    if (field != R::kRequestIdFieldNumber) body = field;  // the last body field wins, as in a parse
    if (!wfl::SkipField(&in, tag)) return {request_lane::work, 0};
  }
  if (!in.ConsumedEntireMessage()) return {request_lane::work, 0};
  switch (body) {
    case R::kFeedRegisterArtifactStreamFieldNumber: return {request_lane::stream, id};
    case 0: return {end_of_stream ? request_lane::stream : request_lane::work, id};
    case R::kGetStatsFieldNumber:
    case R::kGetServerConfigFieldNumber: return {request_lane::immediate, id};
    // A KeepAlive takes the engine mutex, which a worker's bookkeeping may hold for a while:
    // never on the I/O thread. Its TTL is seconds; a pool's thread hop is microseconds.
    case R::kKeepAliveRegisterArtifactFieldNumber:
    case R::kListArtifactsFieldNumber:
    case R::kGetArtifactIndexByIdFieldNumber:
    case R::kAbortRegisteredArtifactFieldNumber:
    case R::kRevokeRegisteredArtifactFieldNumber: return {request_lane::control, id};
    default: return {request_lane::work, id};
  }
}

frame_out dispatcher::reject(const error& e) const { return serialize(error_answer(0, e)); }

void dispatcher::close_connection(connection& conn) { conn.close(); }

}  // namespace tensorreg::daemon
