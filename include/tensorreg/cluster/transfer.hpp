// tensorreg/cluster/transfer.hpp — artifact transfers between daemons over UCX (ucp active
// messages; docs/cluster.md §3).
//
// Provides:
//   * `transfer_server`: listens on "IP:PORT" and serves the manifest (total size and leaf
//     digests) and the 4 MiB leaves (hash/tree_hash.hpp) of the artifacts published to it, and
//     nothing else. Every request is bounds-checked (id length, leaf index) before use. An
//     artifact this host is still pulling can be published as a `partial_artifact`: its
//     verified leaves are served while the rest arrive, and a leaf not verified yet is answered
//     "not yet" with the leaves it has (fan-out as a pipeline, docs/cluster.md §3.3).
//   * `pull_artifact`: fetches an mi2 artifact's canonical bytes from one or more servers. The
//     manifest is accepted only if its leaves fold to the id's data hash; leaves are then
//     requested from the sources in an order of the puller's own (so that pullers starting
//     together do not all ask the origin for the same leaves), land straight in the caller's
//     buffer and are checked against their digest on arrival, whoever served them. A wrong
//     leaf is fetched again from another source and its source is reported and dropped; a
//     source that fails or stops answering is dropped and its leaves go to the others; a
//     source that answers "not yet" is kept and asked for leaves it has. Sources that appear
//     during the pull (pull_options::find_sources) are added.
// UCX picks the transports (UCX_TLS as the environment says): TCP, shared memory, RDMA.
//
// Thread-safety: a transfer_server's member functions may be called from any thread; its UCX
// worker runs on one thread of its own. pull_artifact may run on many threads at once, each
// call with its own UCX worker; it checks leaves on threads of its own (at most sources ×
// leaves_in_flight_per_source at once), all joined before it returns; its callbacks run on the
// calling thread, except find_sources, which runs on a thread of its own (one call at a time). A partial_artifact may be read from any thread while its pull marks leaves.
// Ownership: the server owns its listener, worker and thread (joined by the destructor); it
// holds an artifact's bytes only while copying a leaf of it, and a partial_artifact (and so
// the memory its keep-alive holds) while it is published.
#pragma once

#include <atomic>
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

/// An artifact this host is still pulling, served while it arrives: its verified manifest, a
/// read-only view of the pull's destination and which of its leaves are verified there. A leaf
/// is marked only once its bytes matched their digest, and the pull never writes a verified
/// leaf again, so a marked leaf can be copied out at any time.
class partial_artifact {
 public:
  /// REQUIRES: bytes.size() > 0, leaves.size() == hash::leaf_count(bytes.size()), and `bytes`
  /// stays valid while `keep_alive` lives (the partial holds it).
  partial_artifact(std::vector<hash::digest> leaves, std::span<const std::byte> bytes,
                   std::shared_ptr<const void> keep_alive);

  [[nodiscard]] std::uint64_t total_size() const noexcept { return bytes_.size(); }
  [[nodiscard]] const std::vector<hash::digest>& leaves() const noexcept { return leaves_; }

  /// Marks a leaf verified: its bytes are final. Out-of-range leaves are ignored.
  void mark_verified(std::uint64_t leaf) noexcept;
  [[nodiscard]] bool verified(std::uint64_t leaf) const noexcept;
  [[nodiscard]] std::uint64_t verified_count() const noexcept;
  /// Which leaves are verified: bit (i % 8) of byte i / 8 is leaf i.
  [[nodiscard]] std::vector<std::byte> verified_bitmap() const;
  /// Marks a leaf as asked for by the pull (on its way here) or no longer.
  void mark_asked(std::uint64_t leaf, bool asked) noexcept;
  /// What a holdings answer carries (docs/cluster.md §3.2): verified_bitmap(), then the bitmap
  /// of leaves asked for and not verified yet.
  [[nodiscard]] std::vector<std::byte> holdings() const;
  /// The bytes of leaf `leaf`. REQUIRES: verified(leaf).
  [[nodiscard]] std::span<const std::byte> leaf_bytes(std::uint64_t leaf) const noexcept;

  /// Leaves served to other hosts from this partial (the transfer server counts them).
  void count_served() const noexcept { served_.fetch_add(1, std::memory_order_relaxed); }
  [[nodiscard]] std::uint64_t leaves_served() const noexcept { return served_.load(std::memory_order_relaxed); }

 private:
  std::vector<hash::digest> leaves_;
  std::span<const std::byte> bytes_;
  std::shared_ptr<const void> keep_alive_;
  std::unique_ptr<std::atomic<bool>[]> verified_;
  std::unique_ptr<std::atomic<bool>[]> asked_;
  std::atomic<std::uint64_t> verified_count_{0};
  mutable std::atomic<std::uint64_t> served_{0};
};

struct transfer_server_options {
  /// "IPv4:PORT" to listen on; port 0 picks one (address() tells which).
  std::string listen_address = "127.0.0.1:0";
  /// The bytes of a published artifact, opened for one leaf at a time (the daemon's
  /// engine::open_bytes). Must be callable from any thread (copy_leaf runs on the caller's).
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
  /// Serves the verified leaves of an artifact still being pulled (and its manifest); other
  /// leaves are answered "not yet" with the verified-leaf bitmap. It replaces what was published
  /// under the id (a host pulls only what it does not hold); a later publish() replaces it.
  void publish_partial(const std::string& artifact_id, std::shared_ptr<const partial_artifact> partial);
  /// Stops serving it (requests then answer NOT_FOUND). Once it returns, no leaf of it is
  /// being read and the server holds no reference to a partial of it.
  void withdraw(const std::string& artifact_id);
  [[nodiscard]] bool serves(const std::string& artifact_id) const;

  /// Whether an artifact published here whole (not a partial) has a leaf with digest `leaf`.
  [[nodiscard]] bool holds_leaf(const hash::digest& leaf) const;
  /// Copies such a leaf into `into` (its exact length) and returns true; false when no published
  /// artifact has it, or it could not be read. The bytes are what the artifact holds: the
  /// caller checks them against the digest (pull_artifact does).
  [[nodiscard]] bool copy_leaf(const hash::digest& leaf, std::span<std::byte> into) const;

  struct counters {
    std::uint64_t leaves_served = 0;
    std::uint64_t bytes_served = 0;
    std::uint64_t manifests_served = 0;
    std::uint64_t requests_refused = 0;
    std::uint64_t requests_dropped = 0;       ///< by stall_after_leaves
    std::uint64_t partial_leaves_served = 0;  ///< of those in leaves_served, from a partial artifact
    std::uint64_t not_yet_answers = 0;        ///< leaves asked of a partial artifact before it had them
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
  /// Leaf requests outstanding at once per source; partial sources share this many between
  /// them, at least one each (docs/cluster.md §3.3).
  unsigned leaves_in_flight_per_source = 4;
  /// The same for a source not known to be partial (the origin) while other pullers may share
  /// it: until the first find_sources answer, while a source has not shown whether it is
  /// partial, and once one said "not yet". Pullers sharing an origin then ask it for fewer
  /// leaves ahead, so fewer of their requests to it are for a leaf another puller is being
  /// sent at the same time.
  unsigned complete_source_leaves_in_flight_with_peers = 1;
  /// A source that said "not yet" (a partial source) is asked for the leaves it says it has
  /// only, and this often which leaves those are.
  std::chrono::milliseconds partial_refresh_every{100};
  /// Seeds the order in which this pull asks for leaves (a permutation of them); 0 = random.
  std::uint64_t order_seed = 0;
  /// Called once the manifest is verified and the destination handed out, before any leaf is
  /// asked for: the pulling host may publish a partial_artifact of it from then on.
  std::function<void(std::span<const hash::digest> leaves)> manifest_verified;
  /// Called for each leaf once its bytes in the destination match its digest; they are not
  /// written again by this pull.
  std::function<void(std::uint64_t leaf)> leaf_verified;
  /// Called when a leaf is asked of a source (true) and when it is wanted again after a failed
  /// or "not yet" answer (false).
  std::function<void(std::uint64_t leaf, bool asked)> leaf_asked;
  /// Asked every `find_sources_every` (on a thread of its own) for the sources that hold the
  /// artifact now; those not known to the pull yet are added (a source dropped stays dropped).
  std::function<result<std::vector<pull_source>>()> find_sources;
  std::chrono::milliseconds find_sources_every{500};
  /// Leaves this host already holds under other artifacts (transfer_server::holds_leaf and
  /// copy_leaf): each leaf for which holds_local_leaf says yes is copied with copy_local_leaf
  /// (on threads of the pull's own, a few at once) instead of fetched, and checked against its
  /// digest like any other; a leaf that cannot be copied or does not match is fetched.
  std::function<bool(const hash::digest& leaf)> holds_local_leaf;
  std::function<bool(const hash::digest& leaf, std::span<std::byte> into)> copy_local_leaf;
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
  /// "Not yet" answers (a partial source asked for a leaf it did not have yet).
  std::uint64_t leaves_not_yet = 0;
  /// Sources that find_sources added during the pull, by name.
  std::vector<std::string> sources_added;
  /// Leaves copied from this host's own artifacts (pull_options::copy_local_leaf) and verified.
  std::uint64_t leaves_local = 0;
  /// Local copies that failed or did not match their digest (then fetched from a source).
  std::uint64_t leaves_local_failed = 0;
};

/// Where the bytes go, asked once the manifest is verified: a writable buffer of exactly
/// `total_size` bytes that stays valid until pull_artifact returns.
using pull_destination = function_ref<result<std::span<std::byte>>(std::uint64_t total_size)>;

/// Pulls the canonical bytes of `artifact_id` (an mi2 id) from `sources` into the buffer
/// `destination` hands out. On success every leaf in it is verified and its tree hash is the
/// id's data hash. On failure the buffer holds unverified bytes and must not be used.
/// Errors: INVALID_ARGUMENT (not an mi2 id, no sources, a source address not IPv4:PORT);
/// UNAVAILABLE (every source failed or was corrupt before all leaves arrived, or for
/// request_timeout no live source had a leaf still missing; the message names each source and
/// why); whatever `destination` returns; INTERNAL (UCX cannot start).
[[nodiscard]] result<pull_report> pull_artifact(const std::string& artifact_id, std::span<const pull_source> sources,
                                                pull_destination destination, const pull_options& options = {});

}  // namespace tensorreg::cluster
