// client/wire_convert.hpp — the client's one mapping between protobuf and library types
// (private).
//
// Every request the client sends is built here from library values, and every answer it reads
// is turned here into library values; the rest of client/ handles wire::Request / Response
// only as opaque values passed to raw::connection. Mirrors daemon/'s conversion file, in the
// other direction.
//
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tensorreg/client/types.hpp"
#include "tensorreg/common/error.hpp"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/persistence/task_table.hpp"
#include "tensorreg/policy/store_policy.hpp"
#include "tensorreg/registration/types.hpp"
#include "tensorreg/views/view_plan.hpp"
#include "tensorreg/wire/v1/frame.pb.h"

namespace tensorreg::client::wire_convert {

namespace wire = ::tensorreg::wire::v1;
namespace v2 = ::tensorcast::daemon::v2;

/// A daemon status as an error (OK → nullopt); codes outside gRPC's become UNKNOWN.
[[nodiscard]] std::optional<error> status_error(const wire::Status& s);

enum class begin_plan { lease_in_place, stable_dram };

/// BeginRegisterArtifact.
struct begin_args {
  begin_plan plan = begin_plan::lease_in_place;
  std::int32_t device_id = 0;
  std::string device_uuid;  ///< empty: none
  std::uint64_t total_size = 0;
  std::uint32_t ttl_ms = 0;
  std::int32_t owner_pid = 0;
  std::string index_json;                      ///< empty: no inline index
  std::optional<policy::store_policy> policy;  ///< unset: none (the daemon's default)
  std::string display_name{};                  ///< empty: none
  std::string client_artifact_id{};            ///< a cgid; empty: an mi2 artifact
  const views::view_request* view = nullptr;   ///< ViewRegistrationOptions; null: none
  /// stable_dram from files (wire-format.md §18); their fds ride with the request.
  std::vector<registration::file_segment> file_segments{};
};
[[nodiscard]] wire::Request begin_request(const begin_args& args);

/// RegisterRegion: a daemon-managed HOST_SHARED region (host_shared), or VRAM from an IPC
/// handle or from VMM chunks (their fds ride with the request).
struct region_args {
  bool host_shared = false;
  std::int32_t owner_pid = 0;
  std::uint64_t size_bytes = 0;
  std::int32_t device_id = -1;
  std::string device_uuid;
  std::string cuda_ipc_handle;
  std::vector<std::uint64_t> vmm_chunk_bytes;
};
[[nodiscard]] wire::Request register_region_request(const region_args& args);

/// The Feed of a lease of `idx`'s canonical buffer written whole into `region` (each byte at its
/// canonical offset): one storage per distinct (offset, size), every tensor an alias of its
/// storage, and the segments that place the storages.
[[nodiscard]] registration::feed_request whole_region_lease_feed(std::string registration_id,
                                                                 const index::canonical_index& idx,
                                                                 const registration::region_ref_source& region);

/// One Feed frame; `device_uuid` (when not empty) goes into every storage entry.
[[nodiscard]] v2::FeedRegisterArtifactStreamRequest feed_frame(const registration::feed_request& feed,
                                                               std::string_view device_uuid = {});

[[nodiscard]] wire::Request commit_request(std::string_view registration_id, bool hash_in_background = false,
                                           std::uint32_t replica_timeout_ms = 0);
/// RepublishLease (wire-format.md §20): a new lease over the memory and layout of a lease.
struct republish_args {
  std::string previous_registration_id;
  std::string client_artifact_id;  ///< a cgid; empty: an mi2 artifact
  std::int32_t owner_pid = 0;
  std::uint32_t ttl_ms = 0;                    ///< 0: no expiry
  std::optional<policy::store_policy> policy;  ///< unset: none (the daemon's default)
  bool hash_in_background = false;
  bool revoke_previous = false;
};
[[nodiscard]] wire::Request republish_request(const republish_args& args);
/// WaitArtifactHash (registration.md §4.8); timeout_ms 0 = until the hash ends.
[[nodiscard]] wire::Request wait_hash_request(std::string_view artifact_id, std::uint32_t timeout_ms);
[[nodiscard]] wire::Request abort_request(std::string_view registration_id);
[[nodiscard]] wire::Request revoke_request(std::string_view registration_id, std::string_view reason);
[[nodiscard]] wire::Request keep_alive_request(const registration::keep_alive_request& k);
[[nodiscard]] wire::Request unregister_region_request(std::string_view region_id, std::int32_t owner_pid);
[[nodiscard]] wire::Request deregister_request(std::string_view artifact_id, bool wait_for_drain,
                                               std::int32_t owner_pid);
[[nodiscard]] wire::Request config_request();
[[nodiscard]] wire::Request index_request(std::string_view artifact_id);
/// StartPersistence; `profile` unset: no policy (the daemon's default).
[[nodiscard]] wire::Request start_persistence_request(std::string_view artifact_id,
                                                      std::optional<policy::profile> profile,
                                                      std::string_view key_hint);
/// QueryPersistenceStatus by task id, or (task_id empty) by artifact id.
[[nodiscard]] wire::Request query_persistence_request(std::string_view task_id, std::string_view artifact_id);
/// WaitPersistenceStatus; timeout_ms 0 = until the task is terminal.
[[nodiscard]] wire::Request wait_persistence_request(std::string_view task_id, std::uint32_t timeout_ms);
/// GetArtifactIndexById asking for a view too (wire-format.md §16).
[[nodiscard]] wire::Request view_request(std::string_view artifact_id, std::string_view view_id);
[[nodiscard]] wire::Request memfd_request(std::string_view artifact_id);
[[nodiscard]] wire::Request open_device_request(std::string_view artifact_id, std::uint32_t first_allocation);
[[nodiscard]] wire::Request list_request();
[[nodiscard]] wire::Request stats_request();
[[nodiscard]] wire::Request publish_request(std::string_view artifact_id, std::uint32_t replicas, bool all,
                                            std::uint32_t timeout_ms);

/// Serialised size of a request (what the benchmark reports as request bytes).
[[nodiscard]] std::size_t wire_size(const wire::Request& r);
[[nodiscard]] std::size_t wire_size(const v2::FeedRegisterArtifactStreamRequest& f);

// ---- answers --------------------------------------------------------------------------------

[[nodiscard]] artifact_descriptor descriptor_of(const tensorcast::common::v1::ArtifactDescriptor& d);

[[nodiscard]] std::string registration_id_of(const wire::Response& begun);
[[nodiscard]] registration::commit_response commit_of(const wire::Response& committed);
[[nodiscard]] registration::commit_response commit_of(const v2::CommitRegisteredArtifactResponse& c);
[[nodiscard]] registration::republish_response republish_of(const wire::Response& r);
[[nodiscard]] registration::hash_status hash_status_of(const wire::Response& r);
[[nodiscard]] registration::region_ref_source region_of(const wire::Response& registered_region);
[[nodiscard]] server_config config_of(const wire::Response& r);
/// The task of a StartPersistence, QueryPersistenceStatus or WaitPersistenceStatus answer
/// (StartPersistence's carries no artifact id: `artifact_id` fills it).
[[nodiscard]] persistence::task_status persistence_of(const wire::Response& r, std::string_view artifact_id = {});
[[nodiscard]] artifact_index index_of(const wire::Response& r);
[[nodiscard]] std::vector<artifact_info> list_of(const wire::Response& r);
[[nodiscard]] std::vector<assembly_status> assemblies_of(const wire::Response& r);
[[nodiscard]] assembly_status assembly_of(const v2::AssemblyStatus& a);
[[nodiscard]] artifact_view view_of(const v2::ArtifactView& v);
/// The view answer of a Commit (registration.md §7.10; `assembly` for a PIECE).
[[nodiscard]] view_registered view_commit_of(const wire::Response& committed, std::string registration_id);
[[nodiscard]] daemon_stats stats_of(const wire::Response& r);
[[nodiscard]] publish_result publish_of(const wire::Response& r);
[[nodiscard]] deregister_result deregister_of(const wire::Response& r);

/// GetArtifactMemfd's answer without its fd.
struct memfd_answer {
  artifact_descriptor descriptor;
  std::string index_json;
  std::uint64_t size_bytes = 0;
};
[[nodiscard]] memfd_answer memfd_of(const wire::Response& r);

/// One page of OpenArtifactDevice: the layout (without fds) and, for allocations
/// [first, end_allocation), the fd index of each VMM chunk.
struct device_page {
  device_layout layout;                                    ///< vmm_chunks carry sizes; their fds are still closed
  std::vector<std::vector<std::uint32_t>> chunk_fd_index;  ///< per allocation; empty for IPC
  std::vector<bool> is_vmm;                                ///< per allocation
  std::uint32_t end_allocation = 0;
};
/// Errors: DATA_LOSS (an allocation with neither an IPC handle nor VMM chunks).
[[nodiscard]] result<device_page> device_page_of(const wire::Response& r, std::string_view what);

}  // namespace tensorreg::client::wire_convert
