// tensorreg/registration/types.hpp — the requests and answers of the registration engine.
//
// Library-side mirrors of the wire messages of registration.md §1 (BeginRegisterArtifact,
// FeedRegisterArtifactStream, KeepAlive, Commit, Abort, Revoke, regions, Deregister), with
// the same field meanings and units. The daemon's dispatcher is the only place that converts
// between these and protobuf. Embedded users build them directly.
//
// Thread-safety: plain values. Ownership: values own their strings; `host_storage` and the
// shared_memory handles are shared_ptrs, so memory handed to the engine stays alive for as
// long as any registration or lease uses it.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "tensorreg/common/unique_fd.hpp"
#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/identity/artifact_id.hpp"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/memory/byte_source.hpp"
#include "tensorreg/memory/shared_memory.hpp"
#include "tensorreg/policy/store_policy.hpp"
#include "tensorreg/regions/region_registry.hpp"
#include "tensorreg/views/view_plan.hpp"

namespace tensorreg::registration {

// ---- Begin -------------------------------------------------------------------------------

struct coalesced_options {
  std::uint64_t max_inflight_bytes = 0;
  bool release_on_tensor_commit = false;
};
struct lease_options {
  std::uint64_t min_tensor_bytes = 0;
  std::uint32_t max_tensor_count = 0;
  std::uint64_t lease_bytes_limit = 0;
  bool in_place = true;
  /// With in_place false: the copy made at Commit becomes the artifact's GPU replica, as a
  /// coalesced put's buffer does, and no lease is left (registration.md §5.5).
  bool publish_copy = false;
  /// Not on the wire's LeaseOptions: set by engine::republish(). The registration id of a
  /// committed lease of the same owner whose memory and layout this lease takes at Commit; it
  /// takes no Feed.
  std::string repeat_of{};
};
/// Canonical bytes [canonical_offset, +length) are bytes [file_offset, +length) of
/// stable_dram_options::files[file] (StableDramFileSegment).
struct file_segment {
  std::uint32_t file = 0;
  std::uint64_t file_offset = 0;
  std::uint64_t canonical_offset = 0;
  std::uint64_t length = 0;
};
struct stable_dram_options {
  bool stage_on_gpu = false;
  bool release_gpu_on_commit = false;
  /// A put from files (wire-format.md §18): the engine reads the canonical bytes from `files`
  /// (read-only regular files a client handed over) by `file_segments`, sorted by
  /// canonical_offset, instead of handing out a publish memfd; bytes no segment covers are
  /// zero. Empty = the client writes the publish memfd. Shared so that options stay copyable;
  /// the plan keeps them until the registration ends.
  std::vector<file_segment> file_segments{};
  std::vector<std::shared_ptr<const unique_fd>> files{};
};
/// BeginRegisterArtifactRequest.plan; coalesced when unset on the wire.
using plan_options = std::variant<coalesced_options, lease_options, stable_dram_options>;

/// TensorIndexData.
struct index_data {
  std::string bytes;
  std::string schema_version;  ///< "" or "v3"
  std::string encoding;        ///< "" or "json" (DECISIONS §5.1)
};

struct begin_request {
  std::int32_t device_id = 0;
  std::uint64_t total_size = 0;
  std::optional<std::uint32_t> ttl_ms;
  std::int32_t owner_pid = 0;
  /// The `index` oneof: a key (hex SHA-256 of canonical index bytes) or inline data.
  std::optional<std::string> tensor_index_key;
  std::optional<index_data> tensor_index_data;
  plan_options plan = coalesced_options{};
  std::optional<policy::store_policy> policy;
  /// View registration (registration.md §7): the ViewRegistrationOptions. `has_view` without
  /// `view` is an empty ViewRegistrationOptions (refused: no registration_kind).
  bool has_view = false;
  std::optional<views::view_request> view;
  std::string client_artifact_id;  ///< "" = MI2 artifact, else a cgid
  /// The uid of the process that asks (the daemon sets its peer's), for the per-uid share of
  /// the stable DRAM cache; unset = not counted against any uid.
  std::optional<std::uint32_t> owner_uid;
};

/// The stable-DRAM publish buffer: a memfd the client maps and writes, then reports ranges.
struct publish_memfd {
  std::shared_ptr<memory::shared_memory> memory;
  std::uint64_t size_bytes = 0;
  std::uint64_t offset_bytes = 0;
};

struct coalesced_handshake {
  std::string daemon_ipc_handle;
};
struct lease_handshake {};
struct stable_dram_handshake {
  std::string staging_cuda_ipc_handle;
  std::optional<publish_memfd> publish;
  std::string publish_lease_token;
};

struct begin_response {
  std::string registration_id;
  std::int32_t device_id = 0;
  std::uint64_t total_size = 0;
  std::variant<coalesced_handshake, lease_handshake, stable_dram_handshake> handshake;
};

// ---- Feed --------------------------------------------------------------------------------

/// LeasedSegment: `length` bytes of storage `storage_id` from `storage_offset` go to
/// `artifact_offset` in the canonical buffer.
struct leased_segment {
  std::string storage_id;
  std::uint64_t storage_offset = 0;
  std::uint64_t artifact_offset = 0;
  std::uint64_t length = 0;
};

struct cuda_ipc_source {
  std::string handle;  ///< cudaIpcMemHandle_t bytes
};
struct vram_region_source {
  std::string region_id;
};
struct region_ref_source {
  std::string region_id;
  regions::memory_kind kind = regions::memory_kind::unspecified;
  std::int32_t device_id = -1;
  std::uint64_t size_bytes = 0;
};
/// Embedded use only: storage bytes the caller already holds in this process.
struct host_storage_source {
  std::shared_ptr<const memory::byte_source> bytes;
};
/// StorageEntry.storage_source; monostate = none given (INVALID_ARGUMENT).
using storage_source =
    std::variant<std::monostate, cuda_ipc_source, vram_region_source, region_ref_source, host_storage_source>;

struct storage_entry {
  std::string storage_id;
  std::int32_t device_id = 0;
  std::uint64_t storage_length = 0;
  storage_source source;
  std::uint64_t mapping_base_offset = 0;
};

/// TensorAlias: storage_offset in elements (DECISIONS §5.2).
struct tensor_alias {
  std::string name;
  std::string storage_id;
  std::uint64_t storage_offset = 0;
  std::uint64_t logical_length = 0;
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> stride;
  std::string dtype;
};

/// ViewUploadChunk: for a non-view stable_dram registration, `data` lands at canonical_offset;
/// for a SERVER-placement view registration, at view_offset of the linearized view
/// (canonical_offset is not used: the daemon knows where each view byte goes).
struct view_chunk {
  std::uint64_t canonical_offset = 0;
  std::uint64_t view_offset = 0;
  std::string data;
};

struct written_range {
  std::uint64_t canonical_offset = 0;
  std::uint64_t length = 0;
};
/// StableDramWriteProgress: ranges the client wrote into the publish memfd.
struct stable_write_progress {
  std::vector<written_range> ranges;
  bool upload_complete = false;
};

struct lease_segments {
  std::vector<leased_segment> segments;
};

struct feed_request {
  std::string registration_id;
  std::variant<std::monostate, lease_segments, view_chunk, stable_write_progress> payload;
  std::vector<storage_entry> storage_entries;
  std::vector<tensor_alias> tensor_aliases;
};

// ---- Commit ------------------------------------------------------------------------------

enum class local_stable_status : std::int32_t { unspecified = 0, ready = 1, degraded = 2, skipped = 3 };

struct local_stable_tier_result {
  local_stable_status status = local_stable_status::unspecified;
  std::string message;
};

/// ArtifactDescriptor (common v1).
struct artifact_descriptor {
  std::string artifact_id;
  std::string index_multihash;
  std::string data_multihash;  ///< empty for a cgid artifact
  std::string schema_version = "v3";
  std::string encoding = "json";
  std::uint64_t total_size = 0;
  identity::id_kind id_kind = identity::id_kind::unspecified;
};

/// Where the background data hash of a CGID artifact stands (registration.md §4.8); the numbers
/// are the wire's HashState.
enum class hash_state : std::int32_t { none = 0, pending = 1, done = 2, failed = 3 };

/// How Commit runs (CommitRegisteredArtifactRequest).
struct commit_options {
  /// Answer once the artifact is committed and usable, and compute its data hash afterwards on
  /// the hash pool (registration.md §4.8). Only for a registration with a cgid.
  bool hash_in_background = false;
  /// The leaf digests (hash/tree_hash.hpp) the staged bytes were checked against by the caller.
  /// A stable_dram commit that keeps its memfd as the replica (sealed: the bytes cannot change
  /// any more) then folds them into the data hash instead of hashing the bytes again; other
  /// plans, a copied upload and a count that does not match total_size hash as usual. Not on
  /// the wire. REQUIRES: every leaf of the memfd, as it is when the commit starts, matches its
  /// digest (the cluster's pulls verify each leaf as it lands: docs/cluster.md §3.1).
  std::shared_ptr<const std::vector<hash::digest>> verified_leaf_digests;
};

/// What WaitArtifactHash answers.
struct hash_status {
  hash_state state = hash_state::none;
  std::string mi2_id;          ///< set when done: "mi2:<index>:<data>" of the bytes hashed
  std::string data_multihash;  ///< set when done
  std::string message;         ///< why, when failed
};

/// A view registered on an artifact (registration.md §7): what a commit answers and what a
/// reader asks for to read the view back.
struct view_record {
  std::string view_id;
  views::registration_kind kind = views::registration_kind::unspecified;
  views::placement place = views::placement::unspecified;
  identity::view_spec spec;  ///< normalized (registration.md §7)
  std::string index_json;    ///< the view tensors' own v3 index
  std::string data_hash;     ///< multihash of the view bytes' tree hash (§3.6)
  std::uint64_t view_size = 0;
  std::vector<views::byte_range> canonical_ranges;  ///< merged coverage
};

/// Where a PIECE's assembly stands after its commit (registration.md §7).
struct assembly_status {
  std::string cgid;
  std::uint64_t canonical_size = 0;
  std::uint64_t covered_bytes = 0;  ///< of the canonical tensors' bytes, by all pieces so far
  std::uint32_t pieces = 0;
  bool sealed = false;
  std::string artifact_id;  ///< the mi2 id once sealed
  /// Until the daemon drops it, sealed or not (the TTL of its pieces' Begin and Commit, §7);
  /// nullopt when it has no TTL.
  std::optional<std::chrono::milliseconds> expires_in;
};

struct commit_response {
  artifact_descriptor descriptor;
  /// Set for a view registration.
  std::optional<view_record> view;
  /// Set for a PIECE.
  std::optional<assembly_status> assembly;
  /// pending when the commit asked for hash_in_background (done when that artifact's hash was
  /// already done), else none.
  hash_state hash = hash_state::none;
  bool existed = false;
  std::optional<local_stable_tier_result> local_stable_tier;
  /// Stable DRAM cache entries evicted to make room for this commit, least recently used first.
  std::vector<std::string> evicted;
  /// The persistence task the policy started (shared_disk asked for, a persist directory
  /// configured); empty otherwise.
  std::string persistence_task_id;
  /// Stable copies on other hosts the registration's policy asks for (policy::resolved_policy's
  /// replica_level, replica_hosts, replica_hosts_must; docs/cluster.md §5): the engine only
  /// says so, the daemon places them through its cluster and fills remote_stable_tier.
  policy::requirement replica_level = policy::requirement::none;
  std::uint32_t replica_hosts = 1;
  std::uint32_t replica_hosts_must = 1;
  std::optional<local_stable_tier_result> remote_stable_tier;
};

/// A new lease over the memory and layout of a committed lease (RepublishLease): Begin, the
/// same tables and Commit in one step, the tables not sent or checked again.
struct republish_request {
  std::string previous_registration_id;
  std::string client_artifact_id;  ///< "" = MI2 artifact (hashed at commit), else a cgid
  std::int32_t owner_pid = 0;
  std::optional<std::uint32_t> ttl_ms;
  std::optional<policy::store_policy> policy;
  bool hash_in_background = false;
  bool revoke_previous = false;  ///< end the previous lease once the new one is committed
  std::optional<std::uint32_t> owner_uid;
};

struct republish_response {
  std::string registration_id;  ///< of the new lease
  commit_response commit;
  bool revoked_previous = false;
};

// ---- Keep-alive, regions, deregister ------------------------------------------------------

struct keep_alive_request {
  std::string registration_id;
  std::uint32_t ttl_ms = 0;
  std::uint64_t epoch = 0;
  std::int32_t owner_pid = 0;
};

struct deregister_request {
  std::string artifact_id;
  bool wait_for_drain = true;
  std::uint32_t drain_timeout_ms = 0;  ///< 0 = the engine's default (DECISIONS §5.16)
  std::int32_t owner_pid = 0;
  /// The caller's uid (the daemon sets the peer's): copies the daemon keeps for another uid's
  /// commits may not be removed by it (DECISIONS §8). Unset or 0 (root): not checked.
  std::optional<std::uint32_t> owner_uid{};
};

struct deregister_response {
  bool drained = false;
  bool removed = false;
  std::vector<std::string> released_region_ids;
  std::string message;
};

// ---- Catalogue -------------------------------------------------------------------------------

/// What the engine holds of one artifact.
struct artifact_summary {
  artifact_descriptor descriptor;
  bool stable_replica = false;      ///< a host copy in the stable DRAM cache
  std::size_t leases = 0;           ///< active LIP leases
  std::size_t snapshot_leases = 0;  ///< of them, snapshot leases (the daemon's copy)
  std::size_t vram_snapshots = 0;   ///< of those, copies in daemon-owned device memory
  std::size_t joined_refs = 0;      ///< idempotent joins still held
  bool quiesced = false;
  bool shared_disk = false;  ///< a verified-at-open copy in the persist directory
  /// A cgid artifact's mi2 id once its background hash is done (registration.md §4.8), else "".
  std::string verified_id;
  hash_state hash = hash_state::none;
  /// The views registered on it, by view_id.
  std::vector<view_record> views;
};

struct engine_stats {
  std::size_t artifacts = 0;
  std::size_t pending_registrations = 0;
  std::size_t leases = 0;
  std::size_t regions = 0;
  std::size_t open_mappings = 0;
  std::uint64_t vmm_reserved_bytes = 0;  ///< address space reserved for CUDA VMM imports
  std::uint64_t stable_bytes = 0;        ///< bytes held in the stable DRAM cache
  std::uint64_t stable_budget = 0;       ///< 0 = unlimited
  std::uint64_t leased_bytes = 0;        ///< bytes of artifacts held in place by leases
  std::uint64_t stable_evictions = 0;
  std::uint64_t stable_reserved_bytes = 0;  ///< stable budget held by uploads not committed yet
  std::uint64_t stable_evicted_bytes = 0;
  std::uint64_t ipc_opens = 0;    ///< CUDA IPC handles opened by the driver since start (cumulative)
  std::uint64_t vmm_imports = 0;  ///< CUDA VMM imports since start (cumulative)
  // Per-tier counts, so GetStats needs no list of artifacts.
  std::size_t leased_artifacts = 0;       ///< artifacts with at least one lease
  std::size_t stable_artifacts = 0;       ///< artifacts with a stable DRAM replica
  std::size_t joined_refs = 0;            ///< idempotent-join references, over all artifacts
  std::size_t shared_disk_artifacts = 0;  ///< artifacts persisted under --persist-dir
  std::uint64_t shared_disk_bytes = 0;
  std::uint64_t populated_reserve_bytes = 0;  ///< shared memory faulted in for the next host put
  std::uint64_t populated_reserve_taken = 0;  ///< host puts that took it (cumulative)
};

/// One GPU allocation an artifact's bytes live in, as a reader in another process opens it
/// (OpenArtifactDevice, docs/wire-format.md §13).
struct device_allocation {
  std::int32_t device_id = 0;                      ///< this engine's ordinal
  std::uint64_t size_bytes = 0;                    ///< bytes readable from the base
  std::string cuda_ipc_handle;                     ///< set for IPC memory; empty for VMM chunks
  std::shared_ptr<const regions::vmm_chunks> vmm;  ///< set for CUDA VMM memory
};

/// Canonical [artifact_offset, artifact_offset + length) lies at allocation_offset of
/// allocations[allocation].
struct device_segment {
  std::uint64_t artifact_offset = 0;
  std::uint64_t length = 0;
  std::uint32_t allocation = 0;
  std::uint64_t allocation_offset = 0;
};

/// Where an artifact's canonical DATA bytes lie in GPU memory; bytes no segment covers are zero.
struct device_layout {
  artifact_descriptor descriptor;
  std::shared_ptr<const index::canonical_index> index;
  std::vector<device_allocation> allocations;  ///< each distinct handle or region once
  std::vector<device_segment> segments;        ///< by artifact_offset, disjoint
  /// Equal tokens describe the same allocations, segments and index (a lease and the leases
  /// republished from it); 0: never reused.
  std::uint64_t layout_token = 0;
  /// The token asked about is this layout's: allocations and segments are left empty.
  bool unchanged = false;
};

}  // namespace tensorreg::registration
