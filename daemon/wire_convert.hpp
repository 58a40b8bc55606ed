// daemon/wire_convert.hpp — the wire messages (protobuf) to and from the library's types.
//
// Provides one function per message that crosses the boundary: `to_*` builds the engine's
// request from a request message, `fill_*` writes an engine result into a response message.
// Besides the framing of raw bytes, this is the only place in tensorregd that maps protobuf
// fields to library types, so a field's meaning (defaults, units, which oneof member) is
// decided here once; docs/wire-format.md is its specification. The dispatcher decides what to
// do with a request (owner checks, which engine call, which status); it reads only the
// envelope and the few scalars its rules need (owner_pid, ids), and rewrites a message's
// device_uuid into this daemon's device ordinal before the message is converted.
//
// Thread-safety: every function is pure over its arguments (fill_region and fill_vram_region
// read the wall clock); calls on distinct messages may run concurrently.
// Ownership: `to_*` functions that take a mutable message move its large fields (index bytes,
// view chunks, CUDA IPC handles) into the result, leaving those fields empty.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tensorcast/common/v1/common.pb.h"
#include "tensorcast/daemon/v2/store_daemon.pb.h"
#include "tensorreg/common/error.hpp"
#include "tensorreg/common/unique_fd.hpp"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/registration/engine.hpp"
#include "tensorreg/wire/v1/frame.pb.h"

namespace tensorreg::daemon::convert {

namespace wire = ::tensorreg::wire::v1;
namespace v2 = ::tensorcast::daemon::v2;

/// At most this many CUDA VMM chunks make one region: one frame's fds (docs/wire-format.md §7).
inline constexpr std::size_t max_vmm_chunks = 250;

// ---- Envelope ------------------------------------------------------------------------------

/// The RPC name of a body ("BeginRegisterArtifact"); "unknown" for none.
[[nodiscard]] std::string_view rpc_name(wire::Request::BodyCase body) noexcept;

/// The error for a request with no body this daemon knows: UNIMPLEMENTED for an unknown body
/// field (a newer RPC), INVALID_ARGUMENT for no body at all.
[[nodiscard]] error bodiless(const wire::Request& request);

/// Replaces the response's body with `e` as its status.
void set_status(wire::Response& response, const error& e);

/// A response to `request_id` carrying only `e` as its status.
[[nodiscard]] wire::Response error_response(std::uint64_t request_id, const error& e);

/// What a request is about, for log lines: "registration 'r'", "artifact 'a'", "region 'g'",
/// with the id an OK answer created or published ("registration 'r' -> artifact 'a'");
/// empty when neither names one.
[[nodiscard]] std::string subject_of(const wire::Request& request, const wire::Response& response);

// ---- Registration --------------------------------------------------------------------------

/// Moves the tensor index bytes out of `in`.
[[nodiscard]] registration::begin_request to_begin(v2::BeginRegisterArtifactRequest& in);
void fill_begin(v2::BeginRegisterArtifactResponse& out, const registration::begin_response& in);

[[nodiscard]] registration::keep_alive_request to_keep_alive(const v2::KeepAliveRegisterArtifactRequest& in);

/// Moves view chunk bytes and CUDA IPC handles out of `in`.
[[nodiscard]] registration::feed_request to_feed(v2::FeedRegisterArtifactStreamRequest& in);

void fill_commit(v2::CommitRegisteredArtifactResponse& out, const registration::commit_response& in);
[[nodiscard]] registration::republish_request to_republish(const wire::RepublishLeaseRequest& in);
/// A view record as GetArtifactIndexById and ListArtifacts answer it (docs/wire-format.md §16).
void fill_view(v2::ArtifactView& out, const registration::view_record& in);
/// INVALID_ARGUMENT for a Begin whose view spec has an Op that sets neither narrow nor
/// transpose (the library's spec cannot hold one); nullopt otherwise.
[[nodiscard]] std::optional<error> malformed_view(const v2::BeginRegisterArtifactRequest& in);
[[nodiscard]] registration::commit_options to_commit_options(const v2::CommitRegisteredArtifactRequest& in);
/// WaitArtifactHash's answer (registration.md §4.8).
void fill_hash_status(wire::WaitArtifactHashResponse& out, const registration::hash_status& in);

// ---- Persistence (registration.md §1.6) ------------------------------------------------------

/// The stable-cache policy StartPersistence's policy asks for (nullopt when it names none).
/// Errors: INVALID_ARGUMENT as policy::resolve.
[[nodiscard]] result<std::optional<policy::cache_policy>> to_persist_cache_policy(
    const v2::StartPersistenceRequest& in);
void fill_persistence(v2::QueryPersistenceStatusResponse& out, const persistence::task_status& in);
void fill_persistence(v2::StartPersistenceResponse& out, const persistence::task_status& in);

[[nodiscard]] registration::deregister_request to_deregister(const v2::DeregisterArtifactRequest& in);
void fill_deregister(v2::DeregisterArtifactResponse& out, const registration::deregister_response& in);

/// How many fds a Begin uses: one per file a put from files names (wire-format.md §18), else
/// none.
[[nodiscard]] std::size_t fds_used(const v2::BeginRegisterArtifactRequest& in);

/// Hands the Begin frame's `fds` to `out`'s stable_dram options as the files its segments name.
/// Errors: INVALID_ARGUMENT when the frame carries another number of fds than the message uses.
/// REQUIRES: `out` = to_begin(in).
[[nodiscard]] status take_begin_files(const v2::BeginRegisterArtifactRequest& in, std::vector<unique_fd>& fds,
                                      registration::begin_request& out);

// ---- Regions -------------------------------------------------------------------------------

/// How many fds a RegisterRegion message uses: its memfd (a client-provided HOST_SHARED region)
/// or one per CUDA VMM chunk (a VRAM region of VMM allocations); none otherwise.
[[nodiscard]] std::size_t fds_used(const v2::RegisterRegionRequest& in);

/// Moves the CUDA IPC handle out of `in`; the fds (memfd, VMM chunks) are the caller's to add.
[[nodiscard]] regions::register_request to_region_request(v2::RegisterRegionRequest& in);

/// Hands `fds` to `out` as the CUDA VMM chunks `in` lists, one fd a chunk, in order.
/// Errors: INVALID_ARGUMENT for more chunks than one frame carries fds for (max_vmm_chunks);
/// the chunk list itself is the engine's to check.
[[nodiscard]] status take_vmm_chunks(const v2::RegisterRegionRequest& in, std::vector<unique_fd>& fds,
                                     regions::register_request& out);

/// `asked` is the request's HOST_SHARED spec, echoed back (daemon_managed, region class).
void fill_region(v2::RegisterRegionResponse& out, const regions::region_info& in,
                 const std::optional<regions::host_shared_spec>& asked);

/// Moves the CUDA IPC handle out of `in`.
[[nodiscard]] regions::register_request to_region_request(v2::RegisterVramRegionRequest& in);
void fill_vram_region(v2::RegisterVramRegionResponse& out, const regions::region_info& in);

/// `released`: the registry dropped the region (no artifact still used it).
void fill_unregister(v2::UnregisterRegionResponse& out, bool released);
void fill_unregister(v2::UnregisterVramRegionResponse& out, bool released);

// ---- Catalogue -----------------------------------------------------------------------------

void fill_index(v2::GetArtifactIndexByIdResponse& out, const index::canonical_index& index,
                const registration::artifact_descriptor& descriptor);

void fill_memfd(wire::GetArtifactMemfdResponse& out, const index::canonical_index& index,
                const registration::artifact_descriptor& descriptor);

/// The persisted copy's index, size and per-leaf XXH3-128 (canonical form, 16 bytes a leaf).
void fill_persisted(wire::OpenPersistedArtifactResponse& out, const persistence::stored_artifact& stored,
                    const registration::artifact_descriptor& descriptor);

/// Describes every allocation of `layout`; those in [first, end) carry their VMM chunks' fds,
/// numbered from 0 in allocation then chunk order (the order the caller sends them in), the
/// others mark each chunk "no fd". `device_uuids` holds each allocation's device UUID.
void fill_device_layout(wire::OpenArtifactDeviceResponse& out, const registration::device_layout& layout,
                        std::size_t first, std::size_t end, const std::vector<std::string>& device_uuids);

/// `assemblies` as engine::assemblies() gives them (by cgid).
void fill_list(wire::ListArtifactsResponse& out, std::vector<registration::artifact_summary> in,
               const std::vector<registration::assembly_status>& assemblies);
void fill_assembly(v2::AssemblyStatus& out, const registration::assembly_status& in);

void fill_stats(wire::GetStatsResponse& out, const registration::engine_stats& in, std::size_t connections);

void fill_config(v2::GetServerConfigResponse& out, const std::string& socket_path,
                 const registration::engine_stats& stats);

}  // namespace tensorreg::daemon::convert
