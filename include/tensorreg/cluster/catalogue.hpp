// tensorreg/cluster/catalogue.hpp — the cluster catalogue on etcd (docs/cluster.md §2).
//
// Provides `catalogue`: one daemon's membership of a cluster. Under the URL's prefix:
//   <prefix>/hosts/<host_id>                    → {"host_name", "transfer_address", "capacity_bytes"}
//   <prefix>/replicas/<artifact_id>/<host_id>   → {"total_size"}, and "partial": true while the
//                                                 host is still pulling it (a partial source)
//   <prefix>/index/<index hash hex>             → the canonical index bytes, stored once
//   <prefix>/wanted/<host_id>/<artifact_id>     → {"total_size", "by"}: a publish asks that host
//                                                 to hold a replica (under the asker's lease)
//   <prefix>/disk/<artifact_id>/<volume>        → {"total_size", "by"}: a persisted copy on a shared
//                                                 persist volume (docs/cluster.md §8; no lease)
// The host key and every replica key hang on one etcd lease that the catalogue keeps alive, so
// a dead host's replicas vanish with it. When the lease is lost (etcd restarted empty, a pause
// longer than the TTL) the next refresh grants a new one and writes the host and every replica
// it still advertises again. Index keys have no lease: they are content-addressed and any
// holder may need them after their first writer is gone.
//
// Every call that needs etcd answers UNAVAILABLE, naming the endpoint, while etcd is
// unreachable; what the catalogue advertises is remembered locally and written when etcd
// returns.
//
// Thread-safety: every member function may be called from any thread. Ownership: the catalogue
// owns its etcd client and, after start(), one keep-alive thread, joined by the destructor
// (which also revokes the lease, best effort, so the host leaves at once).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tensorreg/cluster/etcd_client.hpp"
#include "tensorreg/common/error.hpp"
#include "tensorreg/common/logger.hpp"

namespace tensorreg::cluster {

struct host_record {
  /// Unique in the cluster; [A-Za-z0-9-._] only.
  std::string host_id;
  std::string host_name;
  /// "IP:PORT" of its transfer server.
  std::string transfer_address;
  /// Bytes of stable DRAM it offers (0 = not said).
  std::uint64_t capacity_bytes = 0;
  /// The shared persist volume it reads and writes (tensorregd --persist-volume); "" = none.
  /// [A-Za-z0-9-._] only.
  std::string persist_volume;
  /// Bytes of its stable DRAM budget not in use when it last said (nullopt = not said: no
  /// budget, or an older member). Placement asks hosts with room first (docs/cluster.md §5).
  std::optional<std::uint64_t> free_bytes;

  friend bool operator==(const host_record&, const host_record&) = default;
};

/// What a replica key says of its host's copy.
enum class replica_state {
  /// The host holds the whole artifact.
  complete,
  /// The host is pulling it and serves the leaves it has verified (docs/cluster.md §3.3).
  pulling,
};

/// A replica key of one artifact, as read: whose, and what it says.
struct replica_holder {
  std::string host_id;
  std::uint64_t total_size = 0;
  replica_state state = replica_state::complete;

  friend bool operator==(const replica_holder&, const replica_holder&) = default;
};

/// An ask addressed to this host (a wanted key): hold a replica of `artifact_id`. The value is
/// a member's word, read as replica values are (docs/cluster.md §2.5): a total_size that is not
/// an unsigned integer reads as 0, a "by" that is not a string as "".
struct wanted_replica {
  std::string artifact_id;
  std::uint64_t total_size = 0;
  /// The host id of the asker.
  std::string by;
  /// Set by the host asked when its pull failed: why (it goes on trying; the asker may ask
  /// another host meanwhile).
  std::string declined;

  friend bool operator==(const wanted_replica&, const wanted_replica&) = default;
};

/// A persisted copy on a shared persist volume, as its key says (docs/cluster.md §8). A
/// member's word, read as replica values are: a total_size that is not an unsigned integer reads
/// as 0, a "by" that is not a string as "".
struct disk_copy {
  std::string volume;
  std::uint64_t total_size = 0;
  /// The host id of the member that listed it.
  std::string by;

  friend bool operator==(const disk_copy&, const disk_copy&) = default;
};

struct catalogue_options {
  cluster_url url;
  host_record self;
  /// The lease's TTL; the keep-alive thread renews it every third of it.
  std::chrono::seconds lease_ttl{10};
  /// The host's free stable bytes now (host_record::free_bytes); each refresh writes the host
  /// record again when the answer moved by more than free_bytes_step. Empty: never said.
  std::function<std::optional<std::uint64_t>()> free_bytes;
  std::uint64_t free_bytes_step = std::uint64_t{64} << 20;
  std::chrono::milliseconds connect_timeout{1000};
  std::chrono::milliseconds request_timeout{3000};
  /// Must outlive the catalogue.
  logger* log = &null_logger();
};

class catalogue {
 public:
  /// Errors: INVALID_ARGUMENT (a host id or persist volume outside [A-Za-z0-9-._], empty
  /// transfer address, lease_ttl below 2 s), as etcd_client::create. Does not contact etcd.
  [[nodiscard]] static result<std::unique_ptr<catalogue>> create(catalogue_options options);

  ~catalogue();
  catalogue(const catalogue&) = delete;
  catalogue& operator=(const catalogue&) = delete;

  /// The host as configured (free_bytes is left unset: it is asked at each write).
  [[nodiscard]] const host_record& self() const noexcept;
  [[nodiscard]] const cluster_url& url() const noexcept;

  /// Renews the lease, or — with none, or one that expired — grants a new one and writes the
  /// host key and every advertised replica under it (re-registration). Writes the host key
  /// again when its free bytes moved (catalogue_options::free_bytes).
  /// Errors: UNAVAILABLE (etcd unreachable), INTERNAL.
  [[nodiscard]] status refresh();

  /// Starts the keep-alive thread (refresh() every lease_ttl / 3; failures are logged once per
  /// change of state). Idempotent.
  void start();

  /// Whether the last refresh succeeded (the host is listed).
  [[nodiscard]] bool registered() const;

  /// Advertises a replica this host holds (`progress` complete), or one it is still pulling
  /// (`progress` pulling: a partial source, docs/cluster.md §3.3; the value gains "partial":
  /// true). Advertising an id again rewrites its value: a pull that commits advertises it
  /// complete. Remembered; written now when registered.
  /// Errors: INVALID_ARGUMENT (an id with '/' or empty), UNAVAILABLE (remembered, written on
  /// the next successful refresh).
  [[nodiscard]] status advertise(std::string_view artifact_id, std::uint64_t total_size,
                                 replica_state progress = replica_state::complete);

  /// Stops advertising a replica. Errors: UNAVAILABLE (forgotten locally all the same).
  [[nodiscard]] status withdraw(std::string_view artifact_id);

  /// Stores an index under its hash unless present; returns whether this call wrote it.
  /// Errors: INVALID_ARGUMENT (hash not 64 lower-case hex digits), UNAVAILABLE (remembered,
  /// written on the next successful refresh).
  [[nodiscard]] result<bool> put_index(std::string_view index_hash_hex, std::string_view index_bytes);

  /// The index stored under `index_hash_hex`, or nullopt. The caller verifies it against the
  /// hash: the catalogue is not trusted for content (docs/cluster.md §4).
  /// Errors: INVALID_ARGUMENT, UNAVAILABLE.
  [[nodiscard]] result<std::optional<std::string>> get_index(std::string_view index_hash_hex);

  /// Every listed host (self included), by host id.
  /// Errors: UNAVAILABLE, INTERNAL (a host record that is not ours).
  [[nodiscard]] result<std::vector<host_record>> hosts();

  /// The hosts other than self that advertise a replica of `artifact_id`, and its total size
  /// as advertised (0 when none). Errors: INVALID_ARGUMENT, UNAVAILABLE, INTERNAL.
  struct holders_answer {
    std::vector<host_record> hosts;
    std::uint64_t total_size = 0;
  };
  [[nodiscard]] result<holders_answer> holders(std::string_view artifact_id);

  /// The artifact ids this host advertises.
  [[nodiscard]] std::vector<std::string> advertised() const;

  /// Every replica key of `artifact_id` (self included), by host id, complete and pulling.
  /// Host ids without a host record are listed too: the caller matches them against hosts().
  /// Errors: INVALID_ARGUMENT (a bad id), UNAVAILABLE.
  [[nodiscard]] result<std::vector<replica_holder>> replicas_of(std::string_view artifact_id);

  /// Asks `host_id` to hold a replica of `artifact_id` (docs/cluster.md §5, publish): writes
  /// <prefix>/wanted/<host_id>/<artifact_id> = {"total_size", "by": self} under this host's
  /// lease, so that the ask goes when this host does. Not remembered: an ask lost with the lease
  /// is not written again. Errors: INVALID_ARGUMENT (a bad host or artifact id), UNAVAILABLE
  /// (etcd unreachable, or not registered: no lease to write it under).
  [[nodiscard]] status ask(std::string_view host_id, std::string_view artifact_id, std::uint64_t total_size);

  /// The asks addressed to this host, by artifact id. Keys whose artifact id is not one key
  /// segment are skipped; values are read defensively (wanted_replica). Errors: UNAVAILABLE.
  [[nodiscard]] result<std::vector<wanted_replica>> wanted();

  /// A watch of the asks addressed to this host (the keys wanted() lists), on a connection of
  /// its own. Errors: INTERNAL (libcurl).
  [[nodiscard]] result<std::unique_ptr<etcd_watch>> watch_wanted() const;

  /// A watch of the replica keys of `artifact_id` (what replicas_of() lists), on a connection
  /// of its own. Errors: INVALID_ARGUMENT (an id that is not one key segment), INTERNAL.
  [[nodiscard]] result<std::unique_ptr<etcd_watch>> watch_replicas(std::string_view artifact_id) const;

  /// Marks the ask addressed to this host for `artifact_id` as declined, with `reason` (its
  /// pull failed), under the asker's lease as before; returns whether there was one (an ask
  /// whose asker's lease went meanwhile is gone). Errors: INVALID_ARGUMENT, UNAVAILABLE.
  [[nodiscard]] result<bool> decline_wanted(std::string_view artifact_id, std::string_view reason);

  /// The asks addressed to `host_ids` for `artifact_id`, as the asker reads them back (whether
  /// each host declined), in one request per 128 hosts: one answer per host, in order, nullopt
  /// where there is none. Errors: INVALID_ARGUMENT (a bad host or artifact id), UNAVAILABLE.
  [[nodiscard]] result<std::vector<std::optional<wanted_replica>>> asks_of(std::span<const std::string> host_ids,
                                                                           std::string_view artifact_id);

  /// Deletes the ask addressed to this host for `artifact_id` (it holds the replica now);
  /// returns whether there was one. Errors: INVALID_ARGUMENT, UNAVAILABLE.
  [[nodiscard]] result<bool> drop_wanted(std::string_view artifact_id);

  /// Lists a copy of `artifact_id` persisted on this host's persist volume: writes
  /// <prefix>/disk/<artifact_id>/<volume> = {"total_size", "by": self} with no lease, for the
  /// copy outlives the host. Not remembered: the caller writes it again after a failure.
  /// Errors: INVALID_ARGUMENT (no persist volume, a bad id), UNAVAILABLE.
  [[nodiscard]] status list_disk_copy(std::string_view artifact_id, std::uint64_t total_size);
  /// Deletes that key (the copy was removed); returns whether there was one.
  /// Errors: INVALID_ARGUMENT, UNAVAILABLE.
  [[nodiscard]] result<bool> unlist_disk_copy(std::string_view artifact_id);
  /// The persisted copies of `artifact_id` on every volume, by volume.
  /// Errors: INVALID_ARGUMENT (a bad id), UNAVAILABLE.
  [[nodiscard]] result<std::vector<disk_copy>> disk_copies(std::string_view artifact_id);

 private:
  struct state;
  explicit catalogue(std::unique_ptr<state> s) noexcept;
  std::unique_ptr<state> state_;
};

/// A replica key as an observer reads it. The value is a member's word, read defensively: a
/// total_size that is not an unsigned integer reads as 0, and only "partial": true (the JSON
/// literal) reads as pulling; no "partial", or one of any other value, reads as complete.
struct listed_replica {
  std::string artifact_id;
  std::uint64_t total_size = 0;
  replica_state state = replica_state::complete;

  friend bool operator==(const listed_replica&, const listed_replica&) = default;
};

/// A host of the cluster as an observer sees it (`tensorreg cluster ls`).
struct listed_host {
  host_record host;
  /// The etcd lease its keys hang on (0: none).
  std::int64_t lease = 0;
  /// Seconds its lease has left; nullopt when it expired or was revoked (its keys are about to
  /// go, or the record was written without a lease).
  std::optional<std::chrono::seconds> lease_left;
  /// The replicas it advertises, by id.
  std::vector<listed_replica> replicas;
};

/// Everything the catalogue under `url` lists, read without joining it: the hosts by host id,
/// and the replica keys of host ids with no host record (listed under a host of that id with an
/// empty transfer address and no lease). Reads only: nothing is written, no lease renewed.
/// Errors: UNAVAILABLE (etcd unreachable), INTERNAL (a host record that is not ours).
[[nodiscard]] result<std::vector<listed_host>> list_cluster(etcd_client& etcd, const cluster_url& url);

/// A persisted copy on a shared volume, as an observer reads it.
struct listed_disk_copy {
  std::string artifact_id;
  disk_copy copy;

  friend bool operator==(const listed_disk_copy&, const listed_disk_copy&) = default;
};

/// Every persisted copy the catalogue under `url` lists, by artifact id then volume. Reads only.
/// Errors: UNAVAILABLE (etcd unreachable).
[[nodiscard]] result<std::vector<listed_disk_copy>> list_disk_copies(etcd_client& etcd, const cluster_url& url);

}  // namespace tensorreg::cluster
