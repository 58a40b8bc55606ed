// tensorreg/client/types.hpp — the values tensorreg::client's calls take and return.
//
// Library-side views of the daemon's answers (docs/wire-format.md): what a registration gave
// back, what the daemon lists and counts, an artifact's stable DRAM replica and its device
// layout for CUDA readers, the description of CUDA tensors to register in place, and views
// and pieces (registration.md §7): their options, answers and records. Nothing
// here is a protobuf type; client/wire_convert.cpp is the one place that maps the two.
//
// Thread-safety: plain values. Ownership: values own their strings; a `stable_replica` owns
// its mapping of the daemon's memfd and a `device_chunk` owns its fd (both move-only).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tensorreg/common/unique_fd.hpp"
#include "tensorreg/memory/shared_memory.hpp"
#include "tensorreg/registration/types.hpp"
#include "tensorreg/views/view_plan.hpp"

namespace tensorreg::client {

using registration::artifact_descriptor;
using registration::hash_state;
using registration::hash_status;

/// The lease TTL the clients use when none is given (10 minutes, as the Python client).
inline constexpr std::uint32_t default_ttl_ms = 600'000;

/// What a put or a lease registration gave back.
struct registered {
  artifact_descriptor descriptor;
  bool existed = false;         ///< the daemon held the artifact already (a join)
  std::string registration_id;  ///< revoke() takes it
  /// Seconds the call took, from its start to the commit's answer: the time its caller waited,
  /// copies of the bytes included.
  double begin_to_commit_seconds = 0;
  /// Artifacts the daemon evicted from its stable DRAM cache to make room for this one.
  std::vector<std::string> evicted{};
  /// pending after a commit with hash_in_background (docs/registration.md §4.8), else none.
  hash_state hash = hash_state::none;
  /// The stable copies on other hosts the policy asked for (ready or degraded, with why);
  /// unset when it asked for none (docs/cluster.md §5).
  std::optional<registration::local_stable_tier_result> remote_stable_tier{};
};

/// Options of connection::register_lease().
struct lease_register_options {
  std::uint32_t ttl_ms = default_ttl_ms;  ///< 0: no expiry and no keep-alive
  /// A cgid (docs/registration.md §3.5); empty = an mi2 artifact.
  std::string client_artifact_id{};
  /// Answer once the artifact is usable by its cgid and hash it afterwards (needs a cgid);
  /// connection::wait_artifact_hash() then answers its mi2 id.
  bool hash_in_background = false;
  /// Called as the file's bytes are copied into the shared region (done, total), one call at a
  /// time; empty = none.
  std::function<void(std::uint64_t, std::uint64_t)> progress{};
};

/// Options of connection::republish(): the next version over a lease's memory and layout.
struct republish_options {
  std::uint32_t ttl_ms = default_ttl_ms;  ///< the new lease's; 0: no expiry and no keep-alive
  /// A cgid (docs/registration.md §3.5); empty = an mi2 artifact (the daemon hashes the bytes).
  std::string client_artifact_id{};
  /// Answer once the artifact is usable by its cgid and hash it afterwards (needs a cgid).
  bool hash_in_background = false;
  /// End the previous lease once the new one is committed, in the same call.
  bool revoke_previous = false;
  /// Policy, as put_options::profile (e.g. "warm" also copies the bytes into the daemon's
  /// stable DRAM cache); empty = the daemon's default.
  std::string profile{};
};

/// Options of connection::put().
struct put_options {
  /// Policy: a profile name ("cache", "warm", "pinned", "durable", ...) or explicit tiers
  /// (policy::parse_policy, e.g. "should:stable_dram:remote:2"); empty = the daemon's default.
  std::string profile;
  /// Called as bytes are written (done, total), from the writing threads one at a time.
  std::function<void(std::uint64_t, std::uint64_t)> progress;
  /// A name for people that `ls` shows (at most 256 bytes, no control characters); empty = none.
  std::string name{};
  /// When the daemon already holds a stable replica of the bundle's mi2 id, answer with it
  /// (`existed` true, `registration_id` empty) instead of uploading: the bytes are hashed here
  /// but never copied. They are hashed only when the daemon holds an artifact of the same index,
  /// so a put of a new layout costs nothing more. No join is registered (nothing to revoke), so
  /// only with the default profile, whose join would change nothing the daemon keeps.
  bool reuse_held = false;
  /// Hand the bundle's files to the daemon (read-only fds), which reads, copies and hashes them
  /// itself in one pass (wire-format.md §18); reuse_held is then the daemon's to do. False, or
  /// a bundle whose bytes are not all in files: the client copies into the daemon's memfd.
  bool hand_over_files = true;
  /// How long the commit waits for the stable copies on other hosts that the policy asks for
  /// (docs/cluster.md §5); 0 = the daemon's --replica-timeout-ms, which also caps it.
  std::uint32_t replica_timeout_ms = 0;
};

/// Where the daemon holds a copy of an artifact.
enum class tier { unspecified = 0, vram = 1, vram_leased = 2, stable_dram = 3, shared_disk = 4 };

/// "vram", "leased", "stable_dram", "shared_disk", or "?" (the CLI's and Python's names).
[[nodiscard]] std::string_view tier_name(tier t) noexcept;

/// A view registered on an artifact (wire-format.md §16 ArtifactView): connection::view(),
/// and artifact_info::views.
struct artifact_view {
  std::string view_id;
  views::registration_kind kind = views::registration_kind::unspecified;
  views::placement place = views::placement::unspecified;
  identity::view_spec spec;  ///< normalized: negative starts counted from the end, whole tensors with no ops
  std::string view_index_json;
  std::string view_data_hash;
  std::uint64_t view_size = 0;
  std::vector<views::byte_range> canonical_ranges;
};

/// One artifact of connection::list().
struct artifact_info {
  artifact_descriptor descriptor;
  std::vector<tier> tiers;               ///< each tier holding a copy, once, in enum order
  std::uint32_t lease_count = 0;         ///< active leases and joined references
  std::vector<std::int32_t> device_ids;  ///< CUDA devices holding a VRAM or leased copy
  std::string name{};                    ///< given by the registration that created it; may be empty
  std::string verified_id{};             ///< the mi2 id a background hash found; empty otherwise
  hash_state hash = hash_state::none;    ///< where its background hash stands
  std::vector<artifact_view> views{};    ///< the views registered on it (registration.md §7)
};

struct tier_usage {
  tier where = tier::unspecified;
  std::uint64_t bytes = 0;
  std::uint64_t artifacts = 0;
};

/// connection::stats().
/// A pull from the cluster under way on the daemon (docs/wire-format.md §14).
struct cluster_pull {
  std::string artifact_id;
  std::uint64_t total_bytes = 0;  ///< 0 until the manifest is verified
  std::uint64_t verified_bytes = 0;
  std::vector<std::string> sources;  ///< host ids it pulls from
  double seconds = 0;                ///< since the pull began
};

/// What a publish answered (PublishArtifact, docs/wire-format.md §19).
struct publish_result {
  std::vector<std::string> holders;   ///< host ids with a complete replica, the daemon's included
  std::vector<std::string> asked;     ///< host ids asked to pull it, in the order asked
  std::uint32_t target = 0;           ///< the replicas wanted (all: the members)
  bool reached = false;               ///< holders reached target before the timeout
  std::uint32_t members = 0;          ///< members at the end; it ends once they all hold it
  std::vector<std::string> declined;  ///< "HOST: reason" of asked members whose pull failed
};

struct daemon_stats {
  std::uint64_t artifacts = 0;
  std::uint64_t pending_registrations = 0;
  std::uint64_t leases = 0;
  std::uint64_t regions = 0;
  std::uint64_t open_mappings = 0;
  std::uint64_t connections = 0;
  std::uint64_t vmm_reserved_bytes = 0;
  std::vector<tier_usage> tiers;  ///< one per tier in use, in enum order
  // Since the daemon started (docs/wire-format.md §14).
  std::uint64_t stable_budget_bytes = 0;  ///< 0 = unlimited
  std::uint64_t stable_free_bytes = 0;    ///< 0 when unlimited
  std::uint64_t stable_reserved_bytes = 0;
  std::uint64_t populated_reserve_bytes = 0;  ///< faulted in for the next host put, ready now
  std::uint64_t hits = 0;
  std::uint64_t misses = 0;
  std::uint64_t evictions = 0;
  std::uint64_t evicted_bytes = 0;
  double uptime_seconds = 0;
  std::uint64_t requests = 0;
  std::uint64_t request_errors = 0;
  std::uint64_t bytes_registered = 0;
  std::uint64_t bytes_hashed = 0;
  std::uint64_t bytes_copied = 0;
  std::vector<cluster_pull> pulls;
};

enum class startup_phase { unspecified = 0, listening = 1, ready = 2, failed = 3 };

/// connection::config().
struct server_config {
  startup_phase phase = startup_phase::unspecified;
  std::uint64_t artifact_chunk_bytes = 0;
  std::int64_t stable_budget_bytes = 0;  ///< 0 = unlimited
  std::string socket_path;               ///< where the daemon hands out fds (its own socket)
  /// The cluster the daemon joined (`tensorregd --cluster`, "etcd://host:port/prefix");
  /// empty when it runs alone.
  std::string cluster_url;
};

/// connection::start_persistence().
struct persistence_options {
  /// Policy profile name ("durable", "cache", ...; empty = the daemon's default).
  std::string profile;
  /// Upstream's key hint; tensorregd names its copy by artifact id and ignores it.
  std::string key_hint;
};

/// connection::index(): the artifact's descriptor and canonical index JSON, as hashed.
struct artifact_index {
  artifact_descriptor descriptor;
  std::string index_json;
};

/// connection::deregister().
struct deregister_result {
  bool drained = false;
  bool removed = false;
};

/// connection::get(): the daemon's stable DRAM replica, mapped read-only in this process.
/// Canonical byte k of the artifact is memory.bytes()[k].
struct stable_replica {
  artifact_descriptor descriptor;
  std::string index_json;
  memory::shared_memory memory;
};

/// One VMM chunk of a device allocation: an exported cuMemCreate handle, mapped in order.
struct device_chunk {
  unique_fd fd;
  std::uint64_t size_bytes = 0;
};

/// One GPU allocation an artifact's bytes live in, as a reader opens it: an IPC handle
/// (cudaIpcOpenMemHandle) or VMM chunks (cuMemImportFromShareableHandle + cuMemMap, in order).
struct device_allocation {
  std::int32_t device_id = 0;  ///< the daemon's ordinal; find the device by uuid
  std::string device_uuid;     ///< "GPU-..."
  std::uint64_t size_bytes = 0;
  std::string cuda_ipc_handle;  ///< set for IPC memory, empty for VMM
  std::vector<device_chunk> vmm_chunks;
};

/// connection::open_device(): where an artifact's canonical bytes lie in GPU memory. Bytes no
/// segment covers are zero.
struct device_layout {
  artifact_descriptor descriptor;
  std::string index_json;
  std::uint64_t total_size = 0;
  std::vector<device_allocation> allocations;
  std::vector<registration::device_segment> segments;  ///< by artifact_offset, disjoint
};

/// One named CUDA tensor to register in place (a state dict entry), as torch describes it.
/// Tensors whose storages have equal (storage_ptr, storage_nbytes) share one storage.
struct cuda_tensor {
  std::string name;                  ///< UTF-8, unique in the dict
  std::uint64_t storage_ptr = 0;     ///< device address of the tensor's storage (its byte 0)
  std::uint64_t storage_nbytes = 0;  ///< bytes of the whole storage
  std::string dtype;                 ///< torch dtype string, e.g. "torch.bfloat16"
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> stride;  ///< in elements
  std::int64_t storage_offset = 0;   ///< in elements, >= 0
};

/// Where the time of one connection::register_cuda() went (milliseconds), and its shape.
struct cuda_register_report {
  double index_ms = 0;     ///< tensor descriptions, canonical layout, storage placement
  double driver_ms = 0;    ///< allocation lookups and exports, the region plan
  double messages_ms = 0;  ///< building and serialising the requests
  double rpc_regions_ms = 0;
  double rpc_begin_ms = 0;
  double rpc_feed_ms = 0;
  double commit_ms = 0;
  std::size_t storages = 0;       ///< storages registered (each one entry)
  std::size_t allocations = 0;    ///< allocations looked up
  std::size_t regions = 0;        ///< RegisterRegion calls
  std::size_t lone_handles = 0;   ///< storages sent with their allocation's own IPC handle
  std::size_t request_bytes = 0;  ///< serialised RegisterRegion + Begin requests
  std::size_t feed_bytes = 0;     ///< the serialised Feed frame
};

/// Options of connection::register_cuda().
struct cuda_register_options {
  std::uint32_t ttl_ms = default_ttl_ms;   ///< 0: no expiry and no keep-alive
  std::int32_t device = -1;                ///< CUDA ordinal of the tensors; -1 = the current device
  cuda_register_report* report = nullptr;  ///< filled in when set
  /// A cgid (docs/registration.md §3.5); empty = an mi2 artifact.
  std::string client_artifact_id{};
  /// Answer once the artifact is usable by its cgid and hash it afterwards (needs a cgid).
  bool hash_in_background = false;
};

// ---- views and pieces (registration.md §7) ---------------------------------------------------

/// Options of connection::register_view(): a CANONICAL view of an artifact.
struct view_options {
  identity::view_spec spec;  ///< tensor name → its ops (narrow once, or transposes)
  /// Canonical tensors taken whole. Empty: every tensor `spec` does not name (a CANONICAL
  /// view must cover every canonical byte).
  std::vector<std::string> tensor_names{};
  /// server: the view bytes go up in 4 MiB view_chunk messages; client: the canonical bytes
  /// go up through the stable_dram plan and the daemon records the view over them.
  views::placement place = views::placement::server;
  std::string view_id{};  ///< empty: computed by the daemon; else checked against the spec
};

/// Options of connection::register_piece(): a tensor-parallel rank's piece of a cgid artifact.
struct piece_options {
  std::string cgid;                         ///< the assembly's client artifact id
  std::string canonical_index_json;         ///< the whole artifact's canonical index
  identity::view_spec spec;                 ///< the narrow of each tensor this piece holds
  std::vector<std::string> tensor_names{};  ///< tensors this piece holds whole
  std::uint32_t ttl_ms = default_ttl_ms;    ///< the assembly expires this long after its last piece
  std::string view_id{};                    ///< empty: computed by the daemon
};

/// Where a piece's assembly stands: after its commit, and as connection::assemblies() lists it
/// (wire-format.md §16 AssemblyStatus).
struct assembly_status {
  std::string cgid;
  std::uint64_t canonical_size_bytes = 0;
  std::uint64_t covered_bytes = 0;
  std::uint32_t pieces = 0;
  bool sealed = false;
  std::string artifact_id;  ///< the mi2 id once sealed, else empty
  /// Until the daemon drops it, sealed or not; nullopt when it has no TTL.
  std::optional<std::chrono::milliseconds> expires_in{};
};

/// One ListArtifacts answer whole: what list() and assemblies() each give half of.
struct daemon_listing {
  std::vector<artifact_info> artifacts;     ///< sorted by artifact id
  std::vector<assembly_status> assemblies;  ///< by cgid
};

/// What register_view() and register_piece() gave back (the Commit's view answer).
struct view_registered {
  /// The artifact's descriptor; for a piece, the cgid's until the assembly seals, then the
  /// mi2 artifact's.
  artifact_descriptor descriptor;
  bool existed = false;
  std::string registration_id;  ///< what the daemon's messages name a piece by
  std::string view_id;
  std::string view_index_json;
  std::string view_data_hash;
  std::vector<views::byte_range> canonical_ranges;
  views::registration_kind kind = views::registration_kind::unspecified;
  std::optional<assembly_status> assembly;  ///< a piece's; none for a CANONICAL view
};

/// connection::get_view(): a view's record and its linearized bytes (PAD as zero).
struct view_bytes {
  artifact_view view;
  std::vector<std::byte> bytes;
};

}  // namespace tensorreg::client
