#include "dispatcher.hpp"

#include <fmt/format.h>
#include <google/protobuf/unknown_field_set.h>

#include <fcntl.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <atomic>
#include <chrono>
#include <string>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include "tensorcast/common/v1/common.pb.h"
#include "tensorcast/daemon/v2/store_daemon.pb.h"
#include "tensorreg/wire/v1/frame.pb.h"

// Layout: the anonymous namespace below holds every protobuf <-> library conversion, grouped by
// message (envelope, common types, Begin, Feed, Commit, regions, Deregister, catalogue); then
// the per-connection state; then dispatcher::impl with one short handler per RPC, the unary
// path and the Feed stream path.

namespace tensorreg::daemon {
namespace {

namespace wire = ::tensorreg::wire::v1;
namespace v2 = ::tensorcast::daemon::v2;
namespace common = ::tensorcast::common::v1;
namespace reg = ::tensorreg::registration;

// GetServerConfig's fixed values (registration.md §1.1; store_daemon.proto defaults).
constexpr std::uint64_t artifact_chunk_bytes = 256ull << 20;
constexpr std::uint64_t tx_slice_bytes = 32ull << 20;

// ---- Envelope ------------------------------------------------------------------------------

std::string fd_count(std::size_t n) {
  return n == 1 ? "1 file descriptor" : std::to_string(n) + " file descriptors";
}

error fds_unused(std::string_view verb, std::size_t n) {
  return error{errc::invalid_argument, fmt::format("cannot {}: {} arrived with a message that uses none", verb,
                                                   fd_count(n))};
}

void set_status(wire::Response& response, const error& e) {
  response.clear_body();
  auto* s = response.mutable_status();
  s->set_code(static_cast<std::int32_t>(e.code));
  s->set_message(e.message);
}

frame_out serialize(const wire::Response& response, std::vector<unique_fd> fds = {}) {
  return frame_out{response.SerializeAsString(), std::move(fds)};
}

frame_out error_frame(std::uint64_t request_id, const error& e) {
  wire::Response response;
  response.set_request_id(request_id);
  set_status(response, e);
  auto out = serialize(response);
  out.close_after = request_id == 0;  // docs/wire-format.md §4: id-0 answers end the connection
  return out;
}

// The RPC name of a body, for messages about requests that go no further than the envelope.
std::string_view rpc_name(wire::Request::BodyCase body) {
  switch (body) {
    case wire::Request::kBeginRegisterArtifact: return "BeginRegisterArtifact";
    case wire::Request::kFeedRegisterArtifactStream: return "FeedRegisterArtifactStream";
    case wire::Request::kKeepAliveRegisterArtifact: return "KeepAliveRegisterArtifact";
    case wire::Request::kCommitRegisteredArtifact: return "CommitRegisteredArtifact";
    case wire::Request::kAbortRegisteredArtifact: return "AbortRegisteredArtifact";
    case wire::Request::kRevokeRegisteredArtifact: return "RevokeRegisteredArtifact";
    case wire::Request::kRegisterRegion: return "RegisterRegion";
    case wire::Request::kUnregisterRegion: return "UnregisterRegion";
    case wire::Request::kRegisterVramRegion: return "RegisterVramRegion";
    case wire::Request::kUnregisterVramRegion: return "UnregisterVramRegion";
    case wire::Request::kGetServerConfig: return "GetServerConfig";
    case wire::Request::kGetArtifactIndexById: return "GetArtifactIndexById";
    case wire::Request::kDeregisterArtifact: return "DeregisterArtifact";
    case wire::Request::kStartPersistence: return "StartPersistence";
    case wire::Request::kQueryPersistenceStatus: return "QueryPersistenceStatus";
    case wire::Request::kWaitPersistenceStatus: return "WaitPersistenceStatus";
    case wire::Request::kActivateStableLocalBacking: return "ActivateStableLocalBacking";
    case wire::Request::kListArtifacts: return "ListArtifacts";
    case wire::Request::kGetStats: return "GetStats";
    case wire::Request::kGetArtifactMemfd: return "GetArtifactMemfd";
    case wire::Request::kOpenArtifactDevice: return "OpenArtifactDevice";
    case wire::Request::BODY_NOT_SET: break;
  }
  return "unknown";
}

// A request with no body we know: an unknown field number is a newer RPC (UNIMPLEMENTED), no
// field at all a malformed request (INVALID_ARGUMENT).
error bodiless(const wire::Request& request) {
  const auto& unknown = request.GetReflection()->GetUnknownFields(request);
  for (int i = 0; i < unknown.field_count(); ++i) {
    if (unknown.field(i).number() >= 10) {
      return error{errc::unimplemented, fmt::format("cannot handle request {}: body field {} is not a request this "
                                                    "daemon knows",
                                                    request.request_id(), unknown.field(i).number())};
    }
  }
  return error{errc::invalid_argument, fmt::format("cannot handle request {}: the request has no body",
                                                   request.request_id())};
}

// ---- Common types --------------------------------------------------------------------------

void fill_descriptor(common::ArtifactDescriptor& out, const reg::artifact_descriptor& in) {
  out.set_artifact_id(in.artifact_id);
  out.set_index_multihash(in.index_multihash);
  out.set_data_multihash(in.data_multihash);
  out.set_schema_version(in.schema_version);
  out.set_encoding(in.encoding);
  out.set_total_size(in.total_size);
  out.set_id_kind(static_cast<common::ArtifactIdKind>(in.id_kind));
}

policy::tier_spec to_tier_spec(const common::TierSpec& in) {
  policy::tier_spec out;
  out.tier = static_cast<policy::tier>(in.tier());
  out.scope = static_cast<policy::scope>(in.scope());
  out.min_replicas = in.min_replicas();
  out.retention = static_cast<policy::retention>(in.retention_policy());
  if (in.has_retention_ttl_ms()) out.retention_ttl_ms = in.retention_ttl_ms();
  return out;
}

std::vector<policy::tier_spec> to_tier_specs(const google::protobuf::RepeatedPtrField<common::TierSpec>& in) {
  std::vector<policy::tier_spec> out;
  out.reserve(static_cast<std::size_t>(in.size()));
  for (const auto& spec : in) out.push_back(to_tier_spec(spec));
  return out;
}

policy::store_policy to_policy(const common::StorePolicy& in) {
  policy::store_policy out;
  out.profile = static_cast<policy::profile>(in.profile());
  out.must = to_tier_specs(in.must());
  out.should = to_tier_specs(in.should());
  out.may = to_tier_specs(in.may());
  out.overflow = static_cast<policy::overflow>(in.overflow_policy());
  out.layout = static_cast<policy::layout>(in.layout());
  return out;
}

// RegisterRegionResponse.expires_at is wall-clock time; the registry keeps a steady deadline
// that lies ttl_ms after registration, which is now.
void fill_expiry(google::protobuf::Timestamp& out, std::uint32_t ttl_ms) {
  using namespace std::chrono;
  const auto at = system_clock::now() + milliseconds(ttl_ms);
  const auto ns = duration_cast<nanoseconds>(at.time_since_epoch()).count();
  out.set_seconds(ns / 1'000'000'000);
  out.set_nanos(static_cast<std::int32_t>(ns % 1'000'000'000));
}

// ---- Begin ---------------------------------------------------------------------------------

reg::plan_options to_plan(const v2::BeginRegisterArtifactRequest& in) {
  switch (in.plan_case()) {
    case v2::BeginRegisterArtifactRequest::kLease: {
      const auto& l = in.lease();
      return reg::lease_options{l.min_tensor_bytes(), l.max_tensor_count(), l.lease_bytes_limit(), l.in_place()};
    }
    case v2::BeginRegisterArtifactRequest::kStableDram:
      return reg::stable_dram_options{in.stable_dram().stage_on_gpu(), in.stable_dram().release_gpu_on_commit()};
    case v2::BeginRegisterArtifactRequest::kCoalesced:
      return reg::coalesced_options{in.coalesced().max_inflight_bytes(), in.coalesced().release_on_tensor_commit()};
    case v2::BeginRegisterArtifactRequest::PLAN_NOT_SET: break;
  }
  return reg::coalesced_options{};
}

reg::begin_request to_begin(v2::BeginRegisterArtifactRequest& in) {
  reg::begin_request out;
  out.device_id = in.device_id();
  out.total_size = in.total_size();
  if (in.has_ttl_ms()) out.ttl_ms = in.ttl_ms();
  out.owner_pid = in.owner_pid();
  if (in.has_tensor_index_key()) out.tensor_index_key = in.tensor_index_key();
  if (in.has_tensor_index_data()) {
    auto& d = *in.mutable_tensor_index_data();
    out.tensor_index_data = reg::index_data{std::move(*d.mutable_data()), d.schema_version(), d.encoding()};
  }
  out.plan = to_plan(in);
  if (in.has_policy()) out.policy = to_policy(in.policy());
  out.has_view = in.has_view();
  out.client_artifact_id = in.client_artifact_id();
  return out;
}

struct handshake_filler {
  v2::BeginRegisterArtifactResponse& out;
  void operator()(const reg::coalesced_handshake& h) const {
    out.mutable_coalesced()->set_daemon_ipc_handle(h.daemon_ipc_handle);
  }
  void operator()(const reg::lease_handshake&) const { out.mutable_lease(); }
  void operator()(const reg::stable_dram_handshake& h) const {
    auto* s = out.mutable_stable_dram();
    s->set_staging_cuda_ipc_handle(h.staging_cuda_ipc_handle);
    if (h.publish) {
      s->mutable_publish_cpu_memfd()->set_size_bytes(h.publish->size_bytes);
      s->mutable_publish_cpu_memfd()->set_offset_bytes(h.publish->offset_bytes);
    }
    s->set_publish_cpu_memfd_lease_token(h.publish_lease_token);
  }
};

void fill_begin(v2::BeginRegisterArtifactResponse& out, const reg::begin_response& in) {
  out.set_registration_id(in.registration_id);
  out.set_device_id(in.device_id);
  out.set_total_size(in.total_size);
  std::visit(handshake_filler{out}, in.handshake);
}

// ---- Feed ----------------------------------------------------------------------------------

reg::storage_source to_source(v2::StorageEntry& in) {
  switch (in.storage_source_case()) {
    case v2::StorageEntry::kCudaIpcHandle: return reg::cuda_ipc_source{std::move(*in.mutable_cuda_ipc_handle())};
    case v2::StorageEntry::kVramRegionId: return reg::vram_region_source{in.vram_region_id()};
    case v2::StorageEntry::kRegionRef: {
      const auto& r = in.region_ref();
      return reg::region_ref_source{r.region_id(), static_cast<regions::memory_kind>(r.memory_kind()), r.device_id(),
                                    r.size_bytes()};
    }
    case v2::StorageEntry::STORAGE_SOURCE_NOT_SET: break;
  }
  return std::monostate{};
}

reg::storage_entry to_storage(v2::StorageEntry& in) {
  return reg::storage_entry{in.storage_id(), in.device_id(), in.storage_length(), to_source(in),
                            in.mapping_base_offset()};
}

reg::tensor_alias to_alias(const v2::TensorAlias& in) {
  return reg::tensor_alias{in.name(),
                           in.storage_id(),
                           in.storage_offset(),
                           in.logical_length(),
                           {in.shape().begin(), in.shape().end()},
                           {in.stride().begin(), in.stride().end()},
                           in.dtype()};
}

reg::lease_segments to_segments(const v2::LeaseSegments& in) {
  reg::lease_segments out;
  out.segments.reserve(static_cast<std::size_t>(in.segments_size()));
  for (const auto& s : in.segments()) {
    out.segments.push_back({s.storage_id(), s.storage_offset(), s.artifact_offset(), s.length()});
  }
  return out;
}

reg::stable_write_progress to_progress(const v2::StableDramWriteProgress& in) {
  reg::stable_write_progress out;
  out.ranges.reserve(static_cast<std::size_t>(in.ranges_size()));
  for (const auto& r : in.ranges()) out.ranges.push_back({r.canonical_offset(), r.length()});
  out.upload_complete = in.upload_complete();
  return out;
}

reg::feed_request to_feed(v2::FeedRegisterArtifactStreamRequest& in) {
  reg::feed_request out;
  out.registration_id = in.registration_id();
  switch (in.feed_case()) {
    case v2::FeedRegisterArtifactStreamRequest::kLeaseSegments: out.payload = to_segments(in.lease_segments()); break;
    case v2::FeedRegisterArtifactStreamRequest::kViewChunk: {
      auto& c = *in.mutable_view_chunk();
      out.payload = reg::view_chunk{c.canonical_offset(), c.view_offset(), std::move(*c.mutable_data())};
      break;
    }
    case v2::FeedRegisterArtifactStreamRequest::kStableDramWriteProgress:
      out.payload = to_progress(in.stable_dram_write_progress());
      break;
    case v2::FeedRegisterArtifactStreamRequest::FEED_NOT_SET: break;
  }
  for (auto& e : *in.mutable_storage_entries()) out.storage_entries.push_back(to_storage(e));
  for (const auto& a : in.tensor_aliases()) out.tensor_aliases.push_back(to_alias(a));
  return out;
}

// ---- Commit --------------------------------------------------------------------------------

void fill_commit(v2::CommitRegisteredArtifactResponse& out, const reg::commit_response& in) {
  fill_descriptor(*out.mutable_artifact_descriptor(), in.descriptor);
  out.set_existed(in.existed);
  if (in.local_stable_tier) {
    auto* tier = out.mutable_local_stable_tier();
    tier->set_status(static_cast<v2::LocalStableTierStatus>(in.local_stable_tier->status));
    if (!in.local_stable_tier->message.empty()) tier->set_message(in.local_stable_tier->message);
  }
}

// ---- Regions -------------------------------------------------------------------------------

regions::register_request to_region_request(v2::RegisterRegionRequest& in) {
  regions::register_request out;
  out.kind = static_cast<regions::memory_kind>(in.memory_kind());
  out.owner_pid = in.owner_pid();
  out.size_bytes = in.size_bytes();
  out.ttl_ms = in.ttl_ms();
  out.name = in.region_name();
  if (out.kind == regions::memory_kind::vram) out.device_id = in.device_id();
  if (in.has_cuda_ipc_handle()) out.cuda_ipc_handle = std::move(*in.mutable_cuda_ipc_handle());
  if (in.has_host_shared()) {
    const auto& h = in.host_shared();
    out.host_shared = regions::host_shared_spec{h.attach_token(), h.daemon_managed(),
                                                static_cast<regions::host_shared_class>(h.region_class())};
  }
  return out;
}

// At most this many CUDA VMM chunks make one region: one frame's fds (docs/wire-format.md §7).
constexpr std::size_t max_vmm_chunks = 250;

// A client-provided HOST_SHARED region brings its memfd as fd #0; a VRAM region of CUDA VMM
// allocations one fd per chunk; nothing else uses fds.
std::size_t fds_used(const v2::RegisterRegionRequest& in) {
  if (in.memory_kind() == v2::REGION_MEMORY_KIND_VRAM && in.has_cuda_vmm()) {
    return static_cast<std::size_t>(in.cuda_vmm().chunk_bytes_size());
  }
  const bool client_memory = in.memory_kind() == v2::REGION_MEMORY_KIND_HOST_SHARED &&
                             !(in.has_host_shared() && in.host_shared().daemon_managed());
  return client_memory ? 1 : 0;
}

regions::register_request to_region_request(v2::RegisterVramRegionRequest& in) {
  regions::register_request out;
  out.kind = regions::memory_kind::vram;
  out.owner_pid = in.owner_pid();
  out.size_bytes = in.size_bytes();
  out.ttl_ms = in.ttl_ms();
  out.name = in.region_name();
  out.device_id = in.device_id();
  out.cuda_ipc_handle = std::move(*in.mutable_cuda_ipc_handle());
  return out;
}

void fill_region(v2::RegisterRegionResponse& out, const regions::region_info& in,
                 const std::optional<regions::host_shared_spec>& asked) {
  auto* ref = out.mutable_region();
  ref->set_region_id(in.id);
  ref->set_memory_kind(static_cast<v2::RegionMemoryKind>(in.kind));
  ref->set_device_id(in.device_id);
  ref->set_size_bytes(in.size_bytes);
  out.set_ttl_ms(in.ttl_ms);
  if (in.expires_at) fill_expiry(*out.mutable_expires_at(), in.ttl_ms);
  if (in.kind == regions::memory_kind::host_shared) {
    auto* h = out.mutable_host_shared();
    h->set_attach_token(in.attach_token);
    h->set_daemon_managed(asked && asked->daemon_managed);
    if (asked) h->set_region_class(static_cast<v2::HostSharedRegionClass>(asked->region_class));
  }
}

// ---- Deregister ----------------------------------------------------------------------------

reg::deregister_request to_deregister(const v2::DeregisterArtifactRequest& in) {
  reg::deregister_request out;
  out.artifact_id = in.artifact_id();
  // Unset means wait (upstream's default); an explicit false asks for no waiting.
  out.wait_for_drain = in.has_wait_for_drain() ? in.wait_for_drain() : true;
  out.drain_timeout_ms = in.drain_timeout_ms();  // 0 or unset: the engine's default (DECISIONS §5.16)
  out.owner_pid = in.owner_pid();
  return out;
}

void fill_deregister(v2::DeregisterArtifactResponse& out, const reg::deregister_response& in) {
  out.set_drained(in.drained);
  out.set_removed(in.removed);
  for (const auto& id : in.released_region_ids) out.add_released_region_ids(id);
  if (!in.message.empty()) out.set_message(in.message);
}

// ---- Catalogue -----------------------------------------------------------------------------

void fill_summary(wire::ArtifactSummary& out, const reg::artifact_summary& in) {
  out.set_artifact_id(in.descriptor.artifact_id);
  fill_descriptor(*out.mutable_artifact_descriptor(), in.descriptor);
  out.set_total_size(in.descriptor.total_size);
  if (in.leases > 0) out.add_tiers(wire::TIER_VRAM_LEASED);  // enum order
  if (in.stable_replica) out.add_tiers(wire::TIER_STABLE_DRAM);
  out.set_lease_count(static_cast<std::uint32_t>(in.leases + in.joined_refs));
}

void fill_list(wire::ListArtifactsResponse& out, std::vector<reg::artifact_summary> in) {
  std::sort(in.begin(), in.end(), [](const auto& a, const auto& b) {
    return a.descriptor.artifact_id < b.descriptor.artifact_id;
  });
  for (const auto& s : in) fill_summary(*out.add_artifacts(), s);
}

void add_tier(wire::GetStatsResponse& out, wire::Tier tier, std::uint64_t bytes, std::uint64_t artifacts) {
  if (bytes == 0 && artifacts == 0) return;
  auto* t = out.add_tiers();
  t->set_tier(tier);
  t->set_bytes(bytes);
  t->set_artifacts(artifacts);
}

void fill_stats(wire::GetStatsResponse& out, const reg::engine_stats& in,
                const std::vector<reg::artifact_summary>& artifacts, std::size_t connections) {
  std::uint64_t leased = 0, stable = 0, joins = 0;
  for (const auto& a : artifacts) {
    leased += a.leases > 0 ? 1 : 0;
    stable += a.stable_replica ? 1 : 0;
    joins += a.joined_refs;
  }
  out.set_artifacts(in.artifacts);
  add_tier(out, wire::TIER_VRAM_LEASED, in.leased_bytes, leased);  // enum order
  add_tier(out, wire::TIER_STABLE_DRAM, in.stable_bytes, stable);
  out.set_leases(in.leases + joins);
  out.set_regions(in.regions);
  out.set_open_mappings(in.open_mappings);
  out.set_vmm_reserved_bytes(in.vmm_reserved_bytes);
  out.set_pending_registrations(in.pending_registrations);
  out.set_connections(connections);
}

void fill_config(v2::GetServerConfigResponse& out, const dispatcher_options& options, const reg::engine_stats& stats) {
  out.set_mem_pool_size(static_cast<std::int64_t>(stats.stable_budget));
  out.set_artifact_chunk_bytes(artifact_chunk_bytes);
  out.set_tx_slice_bytes(tx_slice_bytes);
  out.set_local_handle_socket_path(options.socket_path);
  out.set_cpu_shared_memory_enabled(true);
  out.set_startup_phase(v2::DAEMON_STARTUP_PHASE_READY);
}

// ---- Connections -----------------------------------------------------------------------------

// One Feed stream of a connection, by request_id (DECISIONS §4: one answer per stream).
struct feed_stream {
  std::string registration_id;  // fixed by the first frame
  bool failed = false;          // answered early; later frames are ignored
};

}  // namespace

class dispatcher::connection {
 public:
  connection(const peer_credentials& peer, std::atomic<std::size_t>& open) : peer_(peer), open_(&open) { ++*open_; }
  ~connection() { close(); }
  connection(const connection&) = delete;
  connection& operator=(const connection&) = delete;

  void close() noexcept {
    streams_.clear();
    if (open_ != nullptr) --*std::exchange(open_, nullptr);
  }

  [[nodiscard]] const peer_credentials& peer() const noexcept { return peer_; }
  [[nodiscard]] std::unordered_map<std::uint64_t, feed_stream>& streams() noexcept { return streams_; }

 private:
  peer_credentials peer_;
  std::atomic<std::size_t>* open_;
  std::unordered_map<std::uint64_t, feed_stream> streams_;
};

// ---- The handlers --------------------------------------------------------------------------

namespace {

// One unary request on its way through: the request, the fds that came with it, and what goes
// back (the body is filled into `response`; fds to send into `fds_out`).
struct call {
  const peer_credentials& peer;
  wire::Request& request;
  std::vector<unique_fd>& fds_in;
  wire::Response response;
  std::vector<unique_fd> fds_out;
};

}  // namespace

struct dispatcher::impl {
  registration::engine& engine;
  dispatcher_options options;
  std::atomic<std::size_t> connections{0};

  // DECISIONS §4: owner_pid must be the peer's own pid, unless trusted. owner_pid <= 0 is left
  // to the engine, which rejects it with its own message.
  status check_owner(const peer_credentials& peer, std::int32_t owner_pid, std::string_view verb) const {
    if (owner_pid <= 0 || owner_pid == peer.pid) return {};
    if (options.trust_client_pids && (peer.uid == 0 || peer.uid == options.daemon_uid)) return {};
    return fail(errc::permission_denied, fmt::format("cannot {}: owner_pid {} is not the calling process {} (start "
                                                     "tensorregd with --trust-client-pids to allow it)",
                                                     verb, owner_pid, peer.pid));
  }

  status begin(call& c) {
    auto& in = *c.request.mutable_begin_register_artifact();
    TENSORREG_TRY(check_owner(c.peer, in.owner_pid(), "begin registration"));
    TENSORREG_TRY(resolve_device(in));
    TENSORREG_TRY_ASSIGN(auto begun, engine.begin(to_begin(in)));
    auto* hs = std::get_if<reg::stable_dram_handshake>(&begun.handshake);
    if (hs != nullptr && hs->publish && hs->publish->memory) {
      auto fd = hs->publish->memory->duplicate_fd();
      if (!fd) {
        (void)engine.abort(begun.registration_id);
        return tl::unexpected(with_context(std::move(fd).error(), "cannot begin registration"));
      }
      c.fds_out.push_back(std::move(*fd));
    }
    fill_begin(*c.response.mutable_begin_register_artifact(), begun);
    return {};
  }

  status keep_alive(call& c) {
    const auto& in = c.request.keep_alive_register_artifact();
    TENSORREG_TRY(check_owner(c.peer, in.owner_pid(),
                              fmt::format("keep registration '{}' alive", in.registration_id())));
    TENSORREG_TRY(engine.keep_alive({in.registration_id(), in.ttl_ms(), in.epoch(), in.owner_pid()}));
    c.response.mutable_keep_alive_register_artifact();
    return {};
  }

  status commit(call& c) {
    TENSORREG_TRY_ASSIGN(auto done, engine.commit(c.request.commit_registered_artifact().registration_id()));
    fill_commit(*c.response.mutable_commit_registered_artifact(), done);
    return {};
  }

  status abort(call& c) {
    TENSORREG_TRY(engine.abort(c.request.abort_registered_artifact().registration_id()));
    c.response.mutable_abort_registered_artifact();
    return {};
  }

  status revoke(call& c) {
    const auto& in = c.request.revoke_registered_artifact();
    engine.revoke(in.registration_id(), in.reason());
    c.response.mutable_revoke_registered_artifact();
    return {};
  }

  status register_region(call& c) {
    auto& in = *c.request.mutable_register_region();
    TENSORREG_TRY(check_owner(c.peer, in.owner_pid(), "register region"));
    const std::size_t used = fds_used(in);
    if (c.fds_in.size() > used) {
      return fail(errc::invalid_argument, fmt::format("cannot register region: {} arrived with a message that uses {}",
                                                      fd_count(c.fds_in.size()),
                                                      used == 0   ? std::string("none")
                                                      : used == 1 ? std::string("one")
                                                                  : std::to_string(used)));
    }
    TENSORREG_TRY(resolve_device(in));
    auto request = to_region_request(in);
    const auto asked = request.host_shared;
    if (in.has_cuda_vmm()) {
      TENSORREG_TRY(take_vmm_chunks(in, c.fds_in, request));
    } else if (used == 1 && !c.fds_in.empty()) {
      request.memfd = std::move(c.fds_in.front());
    }
    TENSORREG_TRY_ASSIGN(auto info, engine.register_region(std::move(request)));
    if (asked && asked->daemon_managed && info.memory) {
      // The client maps the daemon's slab through this fd (docs/wire-format.md §7).
      auto fd = info.memory->duplicate_fd();
      if (!fd) {
        (void)engine.unregister_region(info.id, info.owner_pid, true);
        return tl::unexpected(with_context(std::move(fd).error(), "cannot register region"));
      }
      c.fds_out.push_back(std::move(*fd));
    }
    fill_region(*c.response.mutable_register_region(), info, asked);
    return {};
  }

  status unregister_region(call& c) {
    const auto& in = c.request.unregister_region();
    TENSORREG_TRY(check_owner(c.peer, in.owner_pid(), fmt::format("unregister region '{}'", in.region_id())));
    TENSORREG_TRY_ASSIGN(bool released, engine.unregister_region(in.region_id(), in.owner_pid(), in.force()));
    c.response.mutable_unregister_region()->set_released(released);
    return {};
  }

  status register_vram_region(call& c) {
    auto& in = *c.request.mutable_register_vram_region();
    TENSORREG_TRY(check_owner(c.peer, in.owner_pid(), "register VRAM region"));
    TENSORREG_TRY(resolve_device(in));
    TENSORREG_TRY_ASSIGN(auto info, engine.register_region(to_region_request(in)));
    auto* out = c.response.mutable_register_vram_region();
    out->set_region_id(info.id);
    out->set_ttl_ms(info.ttl_ms);
    if (info.expires_at) fill_expiry(*out->mutable_expires_at(), info.ttl_ms);
    return {};
  }

  status unregister_vram_region(call& c) {
    const auto& in = c.request.unregister_vram_region();
    TENSORREG_TRY(check_owner(c.peer, in.owner_pid(), fmt::format("unregister VRAM region '{}'", in.region_id())));
    TENSORREG_TRY_ASSIGN(bool released, engine.unregister_region(in.region_id(), in.owner_pid(), in.force()));
    c.response.mutable_unregister_vram_region()->set_released(released);
    return {};
  }

  status get_server_config(call& c) {
    fill_config(*c.response.mutable_get_server_config(), options, engine.stats());
    return {};
  }

  status get_artifact_index(call& c) {
    const auto& id = c.request.get_artifact_index_by_id().artifact_id();
    TENSORREG_TRY_ASSIGN(auto index, engine.index_of(id));
    TENSORREG_TRY_ASSIGN(auto summary, engine.get(id));
    auto* out = c.response.mutable_get_artifact_index_by_id();
    out->set_tensor_index_data(index->json());
    fill_descriptor(*out->mutable_artifact_descriptor(), summary.descriptor);
    return {};
  }

  status deregister(call& c) {
    const auto& in = c.request.deregister_artifact();
    if (in.has_owner_pid()) {
      TENSORREG_TRY(check_owner(c.peer, in.owner_pid(), fmt::format("deregister {}", in.artifact_id())));
    }
    TENSORREG_TRY_ASSIGN(auto done, engine.deregister(to_deregister(in)));
    fill_deregister(*c.response.mutable_deregister_artifact(), done);
    return {};
  }

  status persistence(call& c) {
    std::string_view verb = "start persistence";
    if (c.request.has_query_persistence_status()) verb = "query persistence status";
    if (c.request.has_wait_persistence_status()) verb = "wait for persistence status";
    return fail(errc::unimplemented, fmt::format("cannot {}: persistence is not implemented yet", verb));
  }

  status activate_stable_local_backing(call& c) {
    const auto& in = c.request.activate_stable_local_backing();
    TENSORREG_TRY(check_owner(c.peer, in.owner_pid(), "activate stable local backing"));
    return fail(errc::unimplemented, "cannot activate stable local backing: it is not implemented yet");
  }

  // RPCs that hand another process an artifact's memory (GetArtifactMemfd, OpenArtifactDevice)
  // answer only peers of the daemon's own uid and root: any artifact held becomes readable.
  status check_reader(const peer_credentials& peer, const std::string& verb) const {
    if (peer.uid == 0 || peer.uid == options.daemon_uid) return {};
    return fail(errc::permission_denied, fmt::format("cannot {}: uid {} is neither root nor the daemon's uid {}", verb,
                                                     peer.uid, options.daemon_uid));
  }

  // Ours: the stable DRAM replica's memfd, read-only, for zero-copy readers. The bytes of every
  // artifact held are visible through it, so only the daemon's own uid and root may ask.
  status get_artifact_memfd(call& c) {
    const auto& id = c.request.get_artifact_memfd().artifact_id();
    TENSORREG_TRY(check_reader(c.peer, "open the stable replica of " + id));
    TENSORREG_TRY_ASSIGN(auto replica, engine.stable_replica_fd(id));
    TENSORREG_TRY_ASSIGN(auto summary, engine.get(id));
    auto* out = c.response.mutable_get_artifact_memfd();
    fill_descriptor(*out->mutable_artifact_descriptor(), summary.descriptor);
    out->set_tensor_index_data(replica.first->json());
    out->set_size_bytes(summary.descriptor.total_size);
    c.fds_out.push_back(std::move(replica.second));
    return {};
  }

  // Ours: the GPU memory behind an artifact, for a reader in another process to map zero-copy
  // (docs/wire-format.md §13). The reader can read and write the producer's memory through it,
  // so only the daemon's own uid and root may ask, as for GetArtifactMemfd.
  status open_artifact_device(call& c) {
    const auto& id = c.request.open_artifact_device().artifact_id();
    TENSORREG_TRY(check_reader(c.peer, "open the GPU memory of " + id));
    TENSORREG_TRY_ASSIGN(auto layout, engine.device_layout_of(id));
    auto* out = c.response.mutable_open_artifact_device();
    fill_descriptor(*out->mutable_artifact_descriptor(), layout.descriptor);
    out->set_tensor_index_data(layout.index->json());
    out->set_total_size(layout.descriptor.total_size);
    // Paging: this answer carries the VMM fds of allocations [first, end), at most
    // max_vmm_chunks of them (a region never has more, so every page makes progress).
    const std::size_t first = c.request.open_artifact_device().first_allocation();
    if (first > 0 && first >= layout.allocations.size()) {
      return fail(errc::invalid_argument, fmt::format("cannot open the GPU memory of {}: first_allocation {} is past its "
                                                      "{} allocations",
                                                      id, first, layout.allocations.size()));
    }
    std::size_t end = first, fds = 0;
    while (end < layout.allocations.size()) {
      const auto& vmm = layout.allocations[end].vmm;
      const std::size_t n = vmm ? vmm->fds.size() : 0;
      if (fds + n > max_vmm_chunks && end > first) break;
      fds += n;
      ++end;
    }
    out->set_end_allocation(static_cast<std::uint32_t>(end));
    constexpr std::uint32_t no_fd = 0xFFFFFFFFu;
    for (std::size_t k = 0; k < layout.allocations.size(); ++k) {
      const auto& a = layout.allocations[k];
      const bool carried = k >= first && k < end;
      auto* alloc = out->add_allocations();
      alloc->set_device_id(a.device_id);
      alloc->set_device_uuid(engine.device_uuid(a.device_id));
      alloc->set_size_bytes(a.size_bytes);
      if (!a.vmm) {
        alloc->set_cuda_ipc_handle(a.cuda_ipc_handle);
        continue;
      }
      auto* vmm = alloc->mutable_vmm();
      for (std::size_t i = 0; i < a.vmm->fds.size(); ++i) {
        if (!carried) {
          auto* chunk = vmm->add_chunks();
          chunk->set_fd_index(no_fd);
          chunk->set_size_bytes(a.vmm->chunk_bytes[i]);
          continue;
        }
        unique_fd dup(::fcntl(a.vmm->fds[i].get(), F_DUPFD_CLOEXEC, 0));
        if (!dup) {
          return fail(errc::resource_exhausted, fmt::format("cannot open the GPU memory of {}: cannot duplicate a CUDA "
                                                            "VMM fd: {}",
                                                            id, std::strerror(errno)));
        }
        auto* chunk = vmm->add_chunks();
        chunk->set_fd_index(static_cast<std::uint32_t>(c.fds_out.size()));
        chunk->set_size_bytes(a.vmm->chunk_bytes[i]);
        c.fds_out.push_back(std::move(dup));
      }
    }
    for (const auto& seg : layout.segments) {
      auto* s = out->add_segments();
      s->set_artifact_offset(seg.artifact_offset);
      s->set_length(seg.length);
      s->set_allocation(seg.allocation);
      s->set_allocation_offset(seg.allocation_offset);
    }
    return {};
  }

  // device_uuid (ours, docs/wire-format.md §12) names the device when set: the message's
  // device_id becomes this daemon's ordinal of it.
  template <class Message>
  status resolve_device(Message& in) {
    if (in.device_uuid().empty()) return {};
    TENSORREG_TRY_ASSIGN(auto device, engine.resolve_device(in.device_id(), in.device_uuid()));
    in.set_device_id(device);
    return {};
  }

  // The fds of a VRAM region of CUDA VMM allocations, one a chunk, in order. The chunk list
  // itself (empty, fewer fds than chunks, sizes) is the engine's to check; only the frame's
  // limit is the wire's.
  static status take_vmm_chunks(const v2::RegisterRegionRequest& in, std::vector<unique_fd>& fds,
                                regions::register_request& out) {
    const auto& sizes = in.cuda_vmm().chunk_bytes();
    if (static_cast<std::size_t>(sizes.size()) > max_vmm_chunks) {
      return fail(errc::invalid_argument, fmt::format("cannot register region: {} CUDA VMM chunks, more than the {} "
                                                      "one frame can carry fds for",
                                                      sizes.size(), max_vmm_chunks));
    }
    auto chunks = std::make_shared<regions::vmm_chunks>();
    chunks->fds = std::move(fds);
    chunks->chunk_bytes.assign(sizes.begin(), sizes.end());
    out.vmm = std::move(chunks);
    return {};
  }

  status list_artifacts(call& c) {
    fill_list(*c.response.mutable_list_artifacts(), engine.list());
    return {};
  }

  status get_stats(call& c) {
    fill_stats(*c.response.mutable_get_stats(), engine.stats(), engine.list(), connections.load());
    return {};
  }

  status route(call& c) {
    using R = wire::Request;
    switch (c.request.body_case()) {
      case R::kBeginRegisterArtifact: return begin(c);
      case R::kKeepAliveRegisterArtifact: return keep_alive(c);
      case R::kCommitRegisteredArtifact: return commit(c);
      case R::kAbortRegisteredArtifact: return abort(c);
      case R::kRevokeRegisteredArtifact: return revoke(c);
      case R::kRegisterRegion: return register_region(c);
      case R::kUnregisterRegion: return unregister_region(c);
      case R::kRegisterVramRegion: return register_vram_region(c);
      case R::kUnregisterVramRegion: return unregister_vram_region(c);
      case R::kGetServerConfig: return get_server_config(c);
      case R::kGetArtifactIndexById: return get_artifact_index(c);
      case R::kDeregisterArtifact: return deregister(c);
      case R::kStartPersistence:
      case R::kQueryPersistenceStatus:
      case R::kWaitPersistenceStatus: return persistence(c);
      case R::kActivateStableLocalBacking: return activate_stable_local_backing(c);
      case R::kListArtifacts: return list_artifacts(c);
      case R::kGetStats: return get_stats(c);
      case R::kGetArtifactMemfd: return get_artifact_memfd(c);
      case R::kOpenArtifactDevice: return open_artifact_device(c);
      case R::kFeedRegisterArtifactStream:
      case R::BODY_NOT_SET: break;
    }
    return tl::unexpected(bodiless(c.request));
  }

  frame_out unary(connection& conn, wire::Request& request, std::vector<unique_fd> fds) {
    const auto body = request.body_case();
    call c{conn.peer(), request, fds, {}, {}};
    c.response.set_request_id(request.request_id());
    status done;
    if (request.end_of_stream()) {
      done = fail(errc::invalid_argument, fmt::format("cannot handle {} request {}: end_of_stream is only for Feed "
                                                      "streams",
                                                      rpc_name(body), request.request_id()));
    } else if (!fds.empty() && body != wire::Request::kRegisterRegion) {
      done = tl::unexpected(fds_unused(fmt::format("handle {} request {}", rpc_name(body), request.request_id()),
                                       fds.size()));
    } else {
      done = route(c);
    }
    if (!done) {
      set_status(c.response, done.error());
      c.fds_out.clear();
    } else {
      c.response.mutable_status();
    }
    return serialize(c.response, std::move(c.fds_out));
  }

  // ---- Feed streams ----

  // Applies one feed frame of a stream; any error ends the stream.
  status feed_frame(feed_stream& stream, bool first, wire::Request& request, std::size_t fds) {
    auto& in = *request.mutable_feed_register_artifact_stream();
    const std::string verb = fmt::format("feed registration '{}'", in.registration_id());
    if (first) stream.registration_id = in.registration_id();
    if (in.registration_id() != stream.registration_id) {
      return fail(errc::invalid_argument, fmt::format("cannot {}: stream {} feeds registration '{}'", verb,
                                                      request.request_id(), stream.registration_id));
    }
    if (fds != 0) return tl::unexpected(fds_unused(verb, fds));
    for (auto& entry : *in.mutable_storage_entries()) {
      if (auto resolved = resolve_device(entry); !resolved) {
        return tl::unexpected(with_context(std::move(resolved).error(),
                                           fmt::format("cannot {}: storage '{}'", verb, entry.storage_id())));
      }
    }
    return engine.feed(to_feed(in));
  }

  std::optional<frame_out> feed(connection& conn, wire::Request& request, std::size_t fds) {
    const auto id = request.request_id();
    auto [it, first] = conn.streams().try_emplace(id);
    if (it->second.failed) return std::nullopt;  // answered already
    auto applied = feed_frame(it->second, first, request, fds);
    if (applied) return std::nullopt;
    it->second.failed = true;
    return error_frame(id, applied.error());
  }

  frame_out end_stream(connection& conn, std::uint64_t id) {
    wire::Response response;
    response.set_request_id(id);
    auto it = conn.streams().find(id);
    if (it == conn.streams().end()) {
      set_status(response, error{errc::invalid_argument, fmt::format("cannot end feed stream {}: missing feed payload "
                                                                     "(no feed frame came before end_of_stream)",
                                                                     id)});
      return serialize(response);
    }
    conn.streams().erase(it);
    response.mutable_status();
    response.mutable_feed_register_artifact_stream();
    return serialize(response);
  }

  // A frame of a Feed stream: a feed message, or the end-of-stream marker.
  std::optional<frame_out> stream_frame(connection& conn, wire::Request& request, std::vector<unique_fd> fds) {
    const auto id = request.request_id();
    auto it = conn.streams().find(id);
    if (it != conn.streams().end() && it->second.failed) {
      if (request.end_of_stream()) conn.streams().erase(it);  // its answer went out with the error
      return std::nullopt;
    }
    if (!request.end_of_stream()) return feed(conn, request, fds.size());
    const bool has_body = request.has_feed_register_artifact_stream();
    if (has_body || !fds.empty()) {
      if (it != conn.streams().end()) conn.streams().erase(it);
      const auto why = has_body ? std::string("the end_of_stream frame carries a body")
                                : fd_count(fds.size()) + " arrived with the end_of_stream frame";
      return error_frame(id, error{errc::invalid_argument, fmt::format("cannot end feed stream {}: {}", id, why)});
    }
    return end_stream(conn, id);
  }
};

// ---- dispatcher ------------------------------------------------------------------------------

dispatcher::dispatcher(registration::engine& engine, dispatcher_options options)
    : impl_(std::make_unique<impl>(engine, std::move(options))) {}

dispatcher::~dispatcher() = default;

void dispatcher::connection_deleter::operator()(connection* c) const noexcept { delete c; }

dispatcher::connection_ptr dispatcher::open_connection(const peer_credentials& peer) {
  return connection_ptr(new connection(peer, impl_->connections));
}

std::optional<frame_out> dispatcher::handle(connection& conn, frame_in frame) {
  wire::Request request;
  if (!request.ParseFromString(frame.payload)) {
    return error_frame(0, error{errc::invalid_argument,
                                fmt::format("cannot parse request: {} bytes are not a tensorreg.wire.v1.Request",
                                            frame.payload.size())});
  }
  std::string().swap(frame.payload);  // the request holds its own copy (view chunks are large)
  if (request.request_id() == 0) {
    return error_frame(0, error{errc::invalid_argument, "cannot handle request: request_id 0 is reserved"});
  }
  const auto id = request.request_id();
  const bool end_marker = request.end_of_stream() && request.body_case() == wire::Request::BODY_NOT_SET;
  if (request.has_feed_register_artifact_stream() || end_marker) {
    return impl_->stream_frame(conn, request, std::move(frame.fds));
  }
  if (conn.streams().contains(id)) {
    // A connection-level error (docs/wire-format.md §4): the id is still outstanding.
    return error_frame(0, error{errc::invalid_argument,
                                fmt::format("cannot handle {} request {}: request_id {} is in use by an open feed stream",
                                            rpc_name(request.body_case()), id, id)});
  }
  return impl_->unary(conn, request, std::move(frame.fds));
}

frame_out dispatcher::reject(const error& e) const { return error_frame(0, e); }

void dispatcher::close_connection(connection& conn) { conn.close(); }

}  // namespace tensorreg::daemon
