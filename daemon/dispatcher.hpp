// daemon/dispatcher.hpp — one request frame in, zero or one response frame out.
//
// The dispatcher is tensorregd's routing and policy layer: it parses a Request envelope,
// applies the owner_pid rule of DECISIONS §4 and the reader rule with the peer's credentials,
// picks the registration engine call, and maps its result to the answer's status. Every
// protobuf field it turns into a library value, or fills from one, goes through
// wire_convert.hpp. It has no asio and no sockets, so it is tested directly.
//
// Counting: every answer (requests, errors), hits and misses of the requests that name an
// artifact, the bytes of commits that created one, and the names given at Begin, shown by
// ListArtifacts (docs/wire-format.md §14); GetStats reports them with the uptime.
//
// Logging: each RPC is one debug line (method, peer pid and uid, the registration, artifact or
// region id, the answer's code, the time taken); each non-OK answer is also an info line with
// its code name and message.
//
// Feed streams: frames of one request_id accumulate in the connection's context; the
// end-of-stream frame gets the one answer. An error mid-stream is answered at once and later
// frames of that stream are ignored.
//
// Lanes (docs/wire-format.md §5): lane_of() tells the server where a frame may run. Immediate
// and control requests never hash, copy or wait, so the server answers them at once however
// busy the workers are; Feed stream frames keep their order; the rest is work.
//
// Thread-safety: handle() may run concurrently, also for frames of one connection, except that
// a connection's `stream` frames must be handled one at a time, in the order received (the
// server queues them per session). close_connection() only once nothing of that connection is
// being handled. Ownership: the dispatcher borrows the engine and the logger, which must outlive it.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tensorreg/cluster/publish_status.hpp"
#include "tensorreg/cluster/pull_status.hpp"
#include "tensorreg/common/logger.hpp"
#include "tensorreg/common/unique_fd.hpp"
#include "tensorreg/metrics/registry.hpp"
#include "tensorreg/registration/engine.hpp"
#include "unix_socket.hpp"

namespace tensorreg::daemon {

/// The cluster's side of the dispatcher (docs/cluster.md §5), given by tensorregd when it runs
/// with --cluster, so that the dispatcher itself never sees etcd or UCX.
class cluster_hooks {
 public:
  virtual ~cluster_hooks() = default;
  /// An artifact was committed here (advertise it). Must not block.
  virtual void committed(const std::string& artifact_id) = 0;
  /// Makes an artifact this host does not hold local, from the cluster.
  /// Errors: NOT_FOUND, UNAVAILABLE (the catalogue or every source), DATA_LOSS.
  [[nodiscard]] virtual status fetch(const std::string& artifact_id) = 0;
  /// The pulls under way. Must not block for long (GetStats answers it on the control lane).
  [[nodiscard]] virtual std::vector<cluster::pull_status> pulls() const = 0;
  /// Places replicas of an artifact held here on other members and waits for them, up to
  /// `timeout` (PublishArtifact, docs/cluster.md §5; cluster::node::publish).
  /// Errors: INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE.
  [[nodiscard]] virtual result<cluster::publish_status> publish(const std::string& artifact_id, std::uint32_t replicas,
                                                                bool all, std::chrono::milliseconds timeout) = 0;
};

struct dispatcher_options {
  /// DECISIONS §4: accept an owner_pid other than the peer's pid from root or the daemon's own
  /// uid (clients behind a PID-namespace boundary).
  bool trust_client_pids = false;
  uid_t daemon_uid = 0;
  std::string socket_path;  ///< reported by GetServerConfig
  std::uint32_t max_frame_bytes = 64u << 20;
  /// Where each RPC and each reject is logged; must outlive the dispatcher; null = none.
  logger* log = &null_logger();
  /// Where the daemon's metrics go (docs/architecture.md, "Metrics"): the dispatcher registers
  /// its counters and the engine's gauges there and times each RPC into
  /// tensorreg_rpc_duration_seconds{method,code}; must outlive the dispatcher; null = none.
  metrics::registry* metrics = nullptr;
  /// The cluster, with --cluster; must outlive the dispatcher; null = this host alone.
  cluster_hooks* cluster = nullptr;
  /// The --cluster URL, reported by GetServerConfig (`tensorreg cluster ls` reads that etcd);
  /// empty = this host alone.
  std::string cluster_url;
  /// How long a commit waits for the stable copies on other hosts its policy asks for (scope
  /// REMOTE or ANY with min_replicas, the HA profile: docs/cluster.md §5); tensorregd
  /// --replica-timeout-ms.
  std::chrono::milliseconds replica_timeout{60'000};
};

/// A frame's payload (one serialised envelope) and the fds that arrived with it.
struct frame_in {
  std::string payload;
  std::vector<unique_fd> fds;
};

/// Where the server runs a frame (docs/wire-format.md §5).
enum class request_lane {
  immediate,  ///< a few table reads that never wait for a worker's lock (GetStats, GetServerConfig)
  control,    ///< cheap and never blocking (KeepAlive, List, index, Abort, Revoke)
  work,       ///< may hash, copy, map or wait: the worker pool
  stream,     ///< a Feed stream's frame: in order with the connection's other stream frames
};

/// A serialised Response envelope and the fds to send with it.
struct frame_out {
  std::string payload;
  std::vector<unique_fd> fds;
  /// A connection-level error (request_id 0): the session closes after sending it.
  bool close_after = false;
};

class dispatcher {
 public:
  class connection;  ///< per-connection state (open feed streams); defined in dispatcher.cpp
  /// Deletes a connection where its type is complete (dispatcher.cpp), so that holders such as
  /// the server's sessions need not see it.
  struct connection_deleter {
    void operator()(connection* c) const noexcept;
  };
  using connection_ptr = std::unique_ptr<connection, connection_deleter>;

  dispatcher(registration::engine& engine, dispatcher_options options);
  ~dispatcher();
  dispatcher(const dispatcher&) = delete;
  dispatcher& operator=(const dispatcher&) = delete;

  [[nodiscard]] connection_ptr open_connection(const peer_credentials& peer);

  /// The lane of a frame and its request_id (0 when absent), from the envelope's top-level tags
  /// only (no copy, no full parse). A frame that does not parse is `work`: handle() answers it.
  [[nodiscard]] static std::pair<request_lane, std::uint64_t> lane_of(const frame_in& frame) noexcept;

  /// The connection-level error (request_id 0, docs/wire-format.md §4) for a request whose id
  /// is still in flight on its connection.
  [[nodiscard]] static error id_in_use(std::uint64_t request_id);

  /// Handles one request frame. Returns no response for a Feed frame that does not end its
  /// stream (and is not the first error of its stream).
  [[nodiscard]] std::optional<frame_out> handle(connection& conn, frame_in frame);

  /// A Response with request_id 0 and `e` as its status, for a frame that could not be read at
  /// all (too long: the session then closes the connection).
  [[nodiscard]] frame_out reject(const error& e) const;

  /// Tells the dispatcher the connection is gone (open streams are dropped; their
  /// registrations stay abortable and expire by TTL).
  void close_connection(connection& conn);

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace tensorreg::daemon
