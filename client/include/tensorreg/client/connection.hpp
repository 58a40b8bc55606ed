// tensorreg/client/connection.hpp — the C++ client of tensorregd, in library types.
//
// `connection` talks to the daemon over its Unix socket (docs/wire-format.md) and offers what
// the Python client does: put (stable DRAM through the memfd publish path: the bytes are
// written once, straight into the daemon's memory), lease-in-place of a safetensors bundle
// over a daemon-managed HOST_SHARED region, lease-in-place of CUDA tensors (register_cuda:
// one IPC handle or VRAM region per cudaMalloc allocation, VMM fds for cuMemCreate /
// expandable-segments memory), the next version over a lease's memory (republish), and the
// reads: index, get (the stable replica's memfd, mapped), open_device (the GPU layout a CUDA
// reader maps), list, stats; and revoke, abort, deregister;
// and views (registration.md §7): register_view, register_piece, view, get_view; and
// persistence to the daemon's --persist-dir (registration.md §1.6, DECISIONS §5.11):
// start_persistence, query_persistence, wait_persistence; and publish (replicas on the
// members of the daemon's cluster, docs/cluster.md §5).
// Every daemon error comes back as an `error` carrying the daemon's code and message.
//
// A `lease` keeps its registration alive from a thread that sends KeepAlive every
// max(1 s, ttl/2) ±10 %, and revokes it (and unregisters its regions, once no lease
// republished from it reads them) when released or destroyed.
//
// Thread-safety: a connection may be used from any thread; calls on one connection (and on
// its copies, and on the leases made through it, which share its socket) are serialised. Open
// several connections for parallel calls.
// Ownership: a connection shares its socket with its copies and its leases; the socket
// closes with the last of them. Memory given to register_cuda stays the caller's: keep it
// allocated while the lease lives.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tensorreg/client/types.hpp"
#include "tensorreg/common/error.hpp"
#include "tensorreg/index/safetensors_bundle.hpp"
#include "tensorreg/persistence/task_table.hpp"

namespace tensorreg::client {

namespace raw {
class connection;
}

/// A live lease-in-place registration. Move-only; a moved-from lease may only be destroyed,
/// assigned to or released (REQUIRES for the accessors: not moved from).
class lease {
 public:
  lease(lease&&) noexcept;
  lease& operator=(lease&&) noexcept;
  lease(const lease&) = delete;
  lease& operator=(const lease&) = delete;
  /// Releases it (see release()), ignoring errors.
  ~lease();

  [[nodiscard]] const registered& info() const noexcept;
  /// KeepAlive calls the daemon answered OK so far.
  [[nodiscard]] std::uint64_t keepalives_sent() const noexcept;
  /// The regions registered for it (HOST_SHARED or VRAM), unregistered on release.
  [[nodiscard]] const std::vector<std::string>& region_ids() const noexcept;

  /// Sends a KeepAlive now: whether the daemon still holds the lease.
  /// Errors: NOT_FOUND (revoked or expired), UNAVAILABLE (the daemon is gone),
  /// FAILED_PRECONDITION (released by this holder).
  [[nodiscard]] status check();

  /// Stops the keep-alive, revokes the registration and unregisters its regions (force) unless
  /// a lease republished from it still reads them (then the last of those does). Idempotent: a
  /// released lease does nothing, and neither does one a republish ended (revoke_previous).
  /// Errors: the daemon's status of the revoke (the regions are unregistered regardless).
  [[nodiscard]] status release();

 private:
  friend struct lease_access;
  struct state;
  explicit lease(std::unique_ptr<state> s) noexcept;
  std::unique_ptr<state> state_;
};

class connection {
 public:
  /// Connects to `socket_path` (empty: $XDG_RUNTIME_DIR/tensorreg/tensorregd.sock, else
  /// /tmp/tensorreg-$UID/tensorregd.sock).
  /// Errors: UNAVAILABLE naming the path (no daemon there), INVALID_ARGUMENT (path too long).
  [[nodiscard]] static result<connection> connect(std::string socket_path = {});

  [[nodiscard]] const std::string& socket_path() const noexcept;

  /// GetServerConfig. Errors: UNAVAILABLE (connection lost).
  [[nodiscard]] result<server_config> config();

  /// Registers `bundle` as a stable_dram artifact. By default its files' read-only fds go to
  /// the daemon with the Begin and the daemon reads, copies and hashes them itself in one pass
  /// (wire-format.md §18). Otherwise (options.hand_over_files false, bytes not all in files, or
  /// a daemon that takes no files) through the memfd publish path (written with pwrite and
  /// through a shared mapping, unmapped before Commit, so the daemon keeps it without a second
  /// copy). Aborts the registration on failure. With options.reuse_held on the memfd path,
  /// content the daemon holds already is answered from its list and a local hash, with nothing
  /// sent (put_options).
  /// Errors: the daemon's (RESOURCE_EXHAUSTED over its budget; FAILED_PRECONDITION for a file
  /// that changed size or was cut short during the put, ...); INVALID_ARGUMENT (unknown profile
  /// name); DATA_LOSS (the daemon sent no memfd, or one shorter than the artifact; a file that
  /// became shorter or unreadable while the client copied it).
  [[nodiscard]] result<registered> put(const index::safetensors_bundle& bundle, const put_options& options = {});

  /// Leases `bundle` in place: a daemon-managed HOST_SHARED region of its canonical bytes,
  /// one storage per distinct (offset, size). ttl_ms 0 means no expiry (no keep-alive).
  /// Errors: the daemon's; DATA_LOSS (the daemon sent no memfd for the region).
  [[nodiscard]] result<lease> register_lease(const index::safetensors_bundle& bundle,
                                             std::uint32_t ttl_ms = default_ttl_ms);
  /// register_lease() with a cgid and hash_in_background (lease_register_options).
  /// Errors: as above; INVALID_ARGUMENT (a bad cgid; hash_in_background without one).
  [[nodiscard]] result<lease> register_lease(const index::safetensors_bundle& bundle,
                                             const lease_register_options& options);

  /// RepublishLease (docs/wire-format.md §20): the next version over the memory and layout of
  /// `previous`, a lease-in-place lease this process holds (register_lease, register_cuda or an
  /// earlier republish), in one call: the daemon takes the previous lease's tables and
  /// mappings as they are, so the caller must have written the new bytes where the old ones
  /// were and changed no tensor's place, shape or dtype. The new lease shares `previous`'s
  /// regions (they are unregistered when the last lease reading them is released). With
  /// options.revoke_previous the daemon ends `previous` in the same call; `previous` is then
  /// released here too, with no Revoke of its own.
  /// Errors: NOT_FOUND (previous revoked or expired: register again), FAILED_PRECONDITION
  /// (`previous` released by this holder; a snapshot lease; a region of it poisoned or
  /// force-unregistered), ALREADY_EXISTS (the cgid, or for an mi2 id the same bytes, already
  /// leased on that device), INVALID_ARGUMENT (a bad cgid or profile; hash_in_background
  /// without a cgid), the daemon's others. `previous` is as it was after any error.
  [[nodiscard]] result<lease> republish(lease& previous, const republish_options& options = {});

  /// WaitArtifactHash (docs/registration.md §4.8): where the background hash of a cgid artifact
  /// (named by its cgid or the mi2 id it found) stands, after waiting up to `timeout` for it to
  /// end (0 = no limit). pending after a timeout; failed (with the reason) when its lease was
  /// revoked or expired, its owner exited or it was deregistered; none for a cgid artifact
  /// without one; done with its own id for an mi2 artifact.
  /// Errors: NOT_FOUND (unknown artifact), UNAVAILABLE (connection lost).
  [[nodiscard]] result<hash_status> wait_artifact_hash(std::string_view artifact_id,
                                                       std::chrono::milliseconds timeout = {});

  /// True when this client was built with CUDA (register_cuda can work if a device is there).
  [[nodiscard]] static bool cuda_supported() noexcept;

  /// Leases CUDA tensors in place (the Python client's register() of a CUDA state dict): the
  /// canonical layout of `tensors`, each allocation behind them found once, one IPC handle per
  /// cudaMalloc allocation (a VRAM region where it backs several storages), VMM regions of at
  /// most 250 pages for cuMemCreate memory; then Begin → Feed → Commit. On failure, whatever
  /// was registered is released.
  /// Errors: FAILED_PRECONDITION (no CUDA support in this build, no device, memory that can be
  /// neither IPC- nor fd-exported); INVALID_ARGUMENT (bad tensor descriptions: the canonical
  /// index's rules); UNIMPLEMENTED (one storage over more than 250 VMM pages); DATA_LOSS
  /// (a storage that runs past its allocation); the daemon's.
  [[nodiscard]] result<lease> register_cuda(std::span<const cuda_tensor> tensors,
                                            const cuda_register_options& options = {});

  /// GetArtifactIndexById. Errors: NOT_FOUND.
  [[nodiscard]] result<artifact_index> index(std::string_view artifact_id);

  /// The stable DRAM replica (GetArtifactMemfd), mapped read-only.
  /// Errors: NOT_FOUND; FAILED_PRECONDITION (no stable replica, e.g. a lease only);
  /// DATA_LOSS (no memfd in the answer, or one shorter than the artifact).
  [[nodiscard]] result<stable_replica> get(std::string_view artifact_id);

  /// The artifact's GPU layout for a CUDA reader (OpenArtifactDevice, page after page: an
  /// answer carries at most 250 fds).
  /// Errors: NOT_FOUND; FAILED_PRECONDITION (no GPU copy); ABORTED (its memory changed between
  /// pages); DATA_LOSS (answers that do not add up).
  [[nodiscard]] result<device_layout> open_device(std::string_view artifact_id);

  /// ListArtifacts, sorted by artifact id.
  [[nodiscard]] result<std::vector<artifact_info>> list();
  /// The PIECE assemblies the daemon holds, open or sealed until they expire, by cgid (an open
  /// one has no artifact yet, so list() cannot show it).
  [[nodiscard]] result<std::vector<assembly_status>> assemblies();
  /// Both of the above from one ListArtifacts call.
  [[nodiscard]] result<daemon_listing> listing();

  /// GetStats.
  [[nodiscard]] result<daemon_stats> stats();

  /// PublishArtifact (docs/cluster.md §5): the daemon asks members of its cluster to hold
  /// replicas of `artifact_id`, which it holds, until `replicas` of them (itself counted) do, or
  /// every member with `all`, and waits for them up to `timeout` (0: the daemon's 60 s).
  /// Not reached in time is no error: `reached` says it.
  /// Errors: FAILED_PRECONDITION (the daemon runs without --cluster), NOT_FOUND (not held there),
  /// INVALID_ARGUMENT (a cgid; replicas 0 without all), UNAVAILABLE (etcd unreachable).
  [[nodiscard]] result<publish_result> publish(std::string_view artifact_id, std::uint32_t replicas, bool all = false,
                                               std::chrono::milliseconds timeout = std::chrono::milliseconds(0));

  /// RevokeRegisteredArtifact; idempotent (an unknown or revoked registration is OK).
  /// Errors: UNAVAILABLE (connection lost).
  [[nodiscard]] status revoke(std::string_view registration_id, std::string_view reason = {});
  /// RevokeRegisteredArtifact, reporting whether the id named a pending registration, lease or
  /// join that the call dropped (false: unknown or already revoked).
  /// Errors: UNAVAILABLE (connection lost).
  [[nodiscard]] result<bool> revoke_if_held(std::string_view registration_id, std::string_view reason = {});

  /// AbortRegisteredArtifact of a registration not yet committed. Errors: NOT_FOUND.
  [[nodiscard]] status abort(std::string_view registration_id);

  /// Registers a CANONICAL view of an artifact the daemon holds, from its stable DRAM replica.
  /// SERVER placement: Begin (the daemon checks every rule of registration.md §7 there), then
  /// the view bytes gathered from the replica in 4 MiB view_chunk messages; CLIENT placement:
  /// the canonical bytes through the stable_dram plan with the view in the Begin. Aborts the
  /// registration on failure.
  /// Errors: the daemon's (INVALID_ARGUMENT for the §7 rules, NOT_FOUND for an unknown
  /// artifact, FAILED_PRECONDITION without a stable replica); DATA_LOSS (no memfd).
  [[nodiscard]] result<view_registered> register_view(std::string_view artifact_id, const view_options& options);

  /// Registers `view_bytes` (the linearized view of options.spec and tensor_names over
  /// options.canonical_index_json: tensors in name order at 8-aligned offsets, row-major) as a
  /// PIECE of the assembly options.cgid (SERVER placement, 4 MiB view_chunk messages). The
  /// answer's `assembly` says whether it sealed (and the mi2 id then). A piece whose bytes
  /// another piece is still sending (registration.md §7.11) commits once that one has: the
  /// call waits for it, up to the registration's TTL.
  /// Errors: the daemon's (INVALID_ARGUMENT for the §7 rules, e.g. a view_bytes size that is
  /// not the view size; ABORTED when bytes shared with an earlier piece differ;
  /// FAILED_PRECONDITION once sealed); INVALID_ARGUMENT (a canonical index that does not parse).
  [[nodiscard]] result<view_registered> register_piece(const piece_options& options,
                                                       std::span<const std::byte> view_bytes);

  /// GetArtifactIndexById with a view_id: the view's record. Errors: NOT_FOUND (no such
  /// artifact, or no such view on it).
  [[nodiscard]] result<artifact_view> view(std::string_view artifact_id, std::string_view view_id);

  /// The view's bytes, gathered from the artifact's stable DRAM replica (as torch's
  /// narrow/transpose of the canonical tensors, linearized).
  /// Errors: as view() and get(); DATA_LOSS (a record that does not fit the artifact).
  [[nodiscard]] result<view_bytes> get_view(std::string_view artifact_id, std::string_view view_id);

  /// StartPersistence (registration.md §1.6): the daemon writes one copy of the artifact to its
  /// --persist-dir on its persistence threads. Answers the artifact's live task when it has one,
  /// a task already SUCCESS when the artifact was persisted before, else a new PENDING task.
  /// options.profile (empty: the daemon's default) names a policy whose cache rules apply to
  /// the copy.
  /// Errors: FAILED_PRECONDITION (the daemon has no --persist-dir; the artifact is being
  /// deregistered), NOT_FOUND (no such artifact), INVALID_ARGUMENT (unknown profile name).
  [[nodiscard]] result<persistence::task_status> start_persistence(std::string_view artifact_id,
                                                                   const persistence_options& options = {});

  /// QueryPersistenceStatus of one task, answered at once.
  /// Errors: NOT_FOUND (no such task: unknown, or forgotten after many newer ones).
  [[nodiscard]] result<persistence::task_status> query_persistence(std::string_view task_id);

  /// QueryPersistenceStatus by artifact: its newest task.
  /// Errors: NOT_FOUND (the artifact has had no task).
  [[nodiscard]] result<persistence::task_status> query_persistence_of(std::string_view artifact_id);

  /// WaitPersistenceStatus: the task's status once it is terminal (SUCCESS, DEGRADED, FAILED),
  /// or as it stands when `timeout` passes (0 = no limit; the call then blocks until the end).
  /// A FAILED or DEGRADED task is an answer, not an error: see its state and reasons.
  /// Errors: NOT_FOUND (no such task), UNAVAILABLE (connection lost).
  [[nodiscard]] result<persistence::task_status> wait_persistence(std::string_view task_id,
                                                                  std::chrono::milliseconds timeout = {});

  /// DeregisterArtifact: drains (when asked) and removes it.
  /// Errors: NOT_FOUND; DEADLINE_EXCEEDED (readers did not drain in time).
  [[nodiscard]] result<deregister_result> deregister(std::string_view artifact_id, bool wait_for_drain = true);

 private:
  friend struct connection_access;
  explicit connection(std::shared_ptr<raw::connection> raw) noexcept;
  std::shared_ptr<raw::connection> raw_;
};

}  // namespace tensorreg::client
