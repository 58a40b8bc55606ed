// tensorreg/cluster/transfer.hpp — artifact transfers between daemons over UCX (ucp active
// messages; docs/cluster.md §3).
//
// Provides:
//   * `transfer_server`: listens on "IP:PORT" and serves the manifest (total size and leaf
//     digests) and the 4 MiB leaves (hash/tree_hash.hpp) of the artifacts published to it, and
//     nothing else. Every request is bounds-checked (id length, leaf index) before use.
//   * `pull_artifact`: fetches an mi2 artifact's canonical bytes from one or more servers. The
//     manifest is accepted only if its leaves fold to the id's data hash; leaves are then
//     striped across the sources, land straight in the caller's buffer and are checked against
//     their digest on arrival. A wrong leaf is fetched again from another source and its source
//     is reported and dropped; a source that fails or stops answering is dropped and its leaves
//     go to the others.
// UCX picks the transports (UCX_TLS as the environment says): TCP, shared memory, RDMA.
//
// Thread-safety: a transfer_server's member functions may be called from any thread; its UCX
// worker runs on one thread of its own. pull_artifact may run on many threads at once, each
// call with its own UCX worker; it checks leaves on threads of its own (at most sources ×
// leaves_in_flight_per_source at once), all joined before it returns. Ownership: the server owns its listener, worker and thread
// (joined by the destructor); it holds an artifact's bytes only while sending a leaf of it.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "tensorreg/common/error.hpp"
#include "tensorreg/common/function_ref.hpp"
#include "tensorreg/common/logger.hpp"
#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/memory/byte_source.hpp"

namespace tensorreg::cluster {

struct transfer_server_options {
  /// "IPv4:PORT" to listen on; port 0 picks one (address() tells which).
  std::string listen_address = "127.0.0.1:0";
  /// The bytes of a published artifact, opened for one leaf at a time (the daemon's
  /// engine::open_bytes). Must be callable from the server's thread.
  std::function<result<std::shared_ptr<const memory::byte_source>>(const std::string& artifact_id)> open_bytes;
  /// Must outlive the server.
  logger* log = &null_logger();

  // ---- test switches (tests/cluster, the netns harness) ----
  /// Flip one byte of every leaf served (a corrupt member).
  bool corrupt_leaves = false;
  /// After this many leaves, answer nothing more (a hung member); 0 = never.
  std::uint64_t stall_after_leaves = 0;
};

class transfer_server {
 public:
  /// Binds, then starts the worker thread.
  /// Errors: INVALID_ARGUMENT (address not IPv4:PORT, no open_bytes), UNAVAILABLE (UCX cannot
  /// start or listen there; the message has UCX's status).
  [[nodiscard]] static result<std::unique_ptr<transfer_server>> create(transfer_server_options options);

  ~transfer_server();
  transfer_server(const transfer_server&) = delete;
  transfer_server& operator=(const transfer_server&) = delete;

  /// "IP:PORT" actually listened on.
  [[nodiscard]] const std::string& address() const noexcept;

  /// Serves `artifact_id` from now on, with the leaf digests of its canonical bytes (the
  /// caller has them or hashes them: hash::leaf_digests).
  /// Errors: INVALID_ARGUMENT (leaves.size() != leaf_count(total_size), total_size 0).
  [[nodiscard]] status publish(const std::string& artifact_id, std::uint64_t total_size,
                               std::vector<hash::digest> leaves);
  /// Stops serving it (requests then answer NOT_FOUND).
  void withdraw(const std::string& artifact_id);
  [[nodiscard]] bool serves(const std::string& artifact_id) const;

  struct counters {
    std::uint64_t leaves_served = 0;
    std::uint64_t bytes_served = 0;
    std::uint64_t manifests_served = 0;
    std::uint64_t requests_refused = 0;
    std::uint64_t requests_dropped = 0;  ///< by stall_after_leaves
  };
  [[nodiscard]] counters stats() const;

 private:
  struct state;
  explicit transfer_server(std::unique_ptr<state> s) noexcept;
  std::unique_ptr<state> state_;
};

/// One server that holds the artifact.
struct pull_source {
  /// For reports and logs.
  std::string name;
  /// "IP:PORT" of its transfer server.
  std::string address;
};

struct pull_options {
  /// A request (manifest or leaf) not answered within this drops its source.
  std::chrono::milliseconds request_timeout{30'000};
  /// Leaf requests outstanding at once per source.
  unsigned leaves_in_flight_per_source = 4;
  /// Must outlive the call.
  logger* log = &null_logger();
};

struct pull_report {
  std::uint64_t total_size = 0;
  /// Leaves received and verified, by source name.
  std::map<std::string, std::uint64_t> leaves_by_source;
  /// Sources that served a leaf or manifest that failed verification, with what was wrong.
  std::vector<std::string> corrupt_sources;
  /// Sources dropped because they failed or stopped answering, with the reason.
  std::vector<std::string> failed_sources;
  /// Leaves requested again after a corrupt answer or a dropped source.
  std::uint64_t leaves_refetched = 0;
};

/// Where the bytes go, asked once the manifest is verified: a writable buffer of exactly
/// `total_size` bytes that stays valid until pull_artifact returns.
using pull_destination = function_ref<result<std::span<std::byte>>(std::uint64_t total_size)>;

/// Pulls the canonical bytes of `artifact_id` (an mi2 id) from `sources` into the buffer
/// `destination` hands out. On success every leaf in it is verified and its tree hash is the
/// id's data hash. On failure the buffer holds unverified bytes and must not be used.
/// Errors: INVALID_ARGUMENT (not an mi2 id, no sources, a source address not IPv4:PORT);
/// UNAVAILABLE (every source failed or was corrupt before all leaves arrived; the message
/// names each source and why); whatever `destination` returns; INTERNAL (UCX cannot start).
[[nodiscard]] result<pull_report> pull_artifact(const std::string& artifact_id, std::span<const pull_source> sources,
                                                pull_destination destination, const pull_options& options = {});

}  // namespace tensorreg::cluster
