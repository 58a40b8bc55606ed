// tensorreg/cluster/node.hpp — one daemon's part in the cluster (docs/cluster.md §5): the
// catalogue membership, the transfer server, and pulls into the local engine.
//
// Provides `node`:
//   * committed(id): an mi2 artifact committed here is published to the transfer server (its
//     leaf digests hashed once), its index stored in the catalogue once, and its replica
//     advertised — on the node's own thread, so that a commit's answer never waits for it.
//   * fetch(id): an mi2 id this host does not hold is looked up in the catalogue; its index is
//     fetched and checked against the id; its bytes are pulled from the hosts that advertise it
//     straight into the publish memfd of a stable DRAM registration, which is then committed
//     (the engine hashes it again: the id is its own proof) and advertised in turn.
//   * every withdraw_check_every, what it advertises but the engine no longer lists (removed,
//     evicted or expired) is withdrawn from the catalogue and the transfer server; and the asks
//     addressed to this host (catalogue wanted keys) are served: an id not held here and not
//     being pulled is fetched, on a thread of its own, one ask at a time; the ask is deleted once
//     the replica is held; a failed pull is logged and tried again after a backoff.
//   * publish(id): asks other members to hold replicas of an artifact held here, and waits
//     until they do (or a timeout).
//   * with a shared persist volume (docs/cluster.md §8): every copy persisted on it that this
//     host knows of is listed in the catalogue (a disk key, no lease), and one it no longer
//     holds is unlisted; an ask for an id held here on disk only loads it and advertises it.
//     A fetch of an id no member holds in memory but some volume lists asks a member on that
//     volume to load it, then pulls it from that member.
// Without etcd, fetch() answers UNAVAILABLE and local work goes on; the catalogue registers
// again when etcd returns.
//
// Thread-safety: every member function may be called from any thread; fetches of one id are
// serialised (the second finds the artifact local). Ownership: the node borrows the engine
// (which must outlive it) and owns its catalogue, transfer server and thread.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "tensorreg/cluster/catalogue.hpp"
#include "tensorreg/cluster/publish_status.hpp"
#include "tensorreg/cluster/pull_status.hpp"
#include "tensorreg/cluster/transfer.hpp"
#include "tensorreg/common/error.hpp"
#include "tensorreg/common/logger.hpp"
#include "tensorreg/registration/engine.hpp"

namespace tensorreg::cluster {

struct node_options {
  /// --cluster etcd://host:port/prefix
  cluster_url url;
  /// host_id, host_name, capacity; transfer_address is the address to listen on ("IP:PORT").
  host_record self;
  std::chrono::seconds lease_ttl{10};
  /// How often the node withdraws what it advertises but no longer holds (removed, evicted or
  /// expired here).
  std::chrono::milliseconds withdraw_check_every{1000};
  pull_options pull;
  /// The first wait before a failed pull that an ask started is tried again; it doubles with
  /// each failure of that id, up to 32 times this.
  std::chrono::milliseconds wanted_retry_after{2000};
  /// How often publish() reads which members hold the artifact while it waits.
  std::chrono::milliseconds publish_poll_every{200};
  /// How long fetch() waits for a member on a shared persist volume to load an artifact that
  /// only the volume holds and advertise it.
  std::chrono::milliseconds disk_load_wait{60000};
  /// Test switch of the transfer server (netns harness): flip a byte of every leaf served.
  bool corrupt_leaves = false;
  /// Must outlive the node.
  logger* log = &null_logger();
};

class node {
 public:
  /// Starts the transfer server and the catalogue's keep-alive (etcd need not be up).
  /// Errors: as transfer_server::create and catalogue::create.
  [[nodiscard]] static result<std::unique_ptr<node>> create(registration::engine& engine, node_options options);

  ~node();
  node(const node&) = delete;
  node& operator=(const node&) = delete;

  /// Queues the advertisement of an artifact committed here (mi2 ids only; others ignored).
  void committed(const std::string& artifact_id);

  /// Makes `artifact_id` local by pulling it from the cluster: from the members that hold it,
  /// or, when none does but a shared persist volume lists it, from a member on that volume
  /// asked to load it (waiting up to disk_load_wait).
  /// Errors: NOT_FOUND (not an mi2 id, or no member holds it), UNAVAILABLE (etcd unreachable,
  /// every source failed, no member of a listing volume is up or loaded it in time), DATA_LOSS
  /// (the catalogue's index is not the id's), and the engine's errors (RESOURCE_EXHAUSTED: the
  /// stable budget).
  [[nodiscard]] status fetch(const std::string& artifact_id);

  /// Places replicas of `artifact_id`, held here, on other members (docs/cluster.md §5): with
  /// `all`, on every member; otherwise until `replicas` members (this one counted) hold it.
  /// Members that hold no complete replica are asked (a wanted key under this host's lease),
  /// those whose free_bytes has room first, then those that did not say, then the others (more
  /// free bytes, larger capacity_bytes, then host id within each), until the asked and the
  /// holders make the target; then the catalogue is read when a replica key of the artifact
  /// changes (an etcd watch) and every publish_poll_every until that many members hold
  /// a complete replica, or `timeout` passed. A target above the members asks them all and is
  /// not reached. The members are read again at each poll: with `all` a member that joins is
  /// asked and one that leaves is not waited for; an asked member that leaves before it holds
  /// a replica is replaced by another. Asks stay (and their pulls go on) after a timeout, until
  /// this host leaves.
  /// Errors: INVALID_ARGUMENT (a cgid: only mi2 ids are pulled; replicas 0 without `all`),
  /// NOT_FOUND (not held here), UNAVAILABLE (etcd unreachable, with the catalogue's message).
  [[nodiscard]] result<publish_status> publish(const std::string& artifact_id, std::uint32_t replicas, bool all,
                                               std::chrono::milliseconds timeout);

  /// Waits until every queued advertisement is done (tests, the harness).
  void drain();

  /// The pulls under way here (fetch() calls that have not returned).
  [[nodiscard]] std::vector<pull_status> pulls() const;

  [[nodiscard]] catalogue& members() noexcept;
  [[nodiscard]] transfer_server& server() noexcept;

 private:
  struct state;
  explicit node(std::unique_ptr<state> s) noexcept;
  std::unique_ptr<state> state_;
};

}  // namespace tensorreg::cluster
