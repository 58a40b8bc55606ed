#include "wire_convert.hpp"

#include <fmt/format.h>
#include <google/protobuf/unknown_field_set.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <utility>
#include <variant>

#include "tensorreg/hash/tree_hash.hpp"

// Layout: the private helpers (common types, then those of Begin, Feed and the catalogue) in
// the anonymous namespace; then the public functions in the header's order.

namespace tensorreg::daemon::convert {
namespace {

namespace common = ::tensorcast::common::v1;
namespace reg = ::tensorreg::registration;

// GetServerConfig's fixed values (registration.md §1.1; store_daemon.proto defaults).
constexpr std::uint64_t artifact_chunk_bytes = 256ull << 20;
constexpr std::uint64_t tx_slice_bytes = 32ull << 20;

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

// ---- Begin helpers -------------------------------------------------------------------------

reg::plan_options to_plan(const v2::BeginRegisterArtifactRequest& in) {
  switch (in.plan_case()) {
    case v2::BeginRegisterArtifactRequest::kLease: {
      const auto& l = in.lease();
      return reg::lease_options{l.min_tensor_bytes(), l.max_tensor_count(), l.lease_bytes_limit(), l.in_place(),
                                l.publish_copy()};
    }
    case v2::BeginRegisterArtifactRequest::kStableDram: {
      const auto& s = in.stable_dram();
      reg::stable_dram_options out{s.stage_on_gpu(), s.release_gpu_on_commit()};
      out.file_segments.reserve(static_cast<std::size_t>(s.file_segments_size()));
      for (const auto& f : s.file_segments()) {
        out.file_segments.push_back({f.fd_index(), f.file_offset(), f.canonical_offset(), f.length()});
      }
      return out;
    }
    case v2::BeginRegisterArtifactRequest::kCoalesced:
      return reg::coalesced_options{in.coalesced().max_inflight_bytes(), in.coalesced().release_on_tensor_commit()};
    case v2::BeginRegisterArtifactRequest::PLAN_NOT_SET: break;
  }
  return reg::coalesced_options{};
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

// ---- Feed helpers --------------------------------------------------------------------------

reg::storage_source to_source(v2::StorageEntry& in) {
  switch (in.storage_source_case()) {
    case v2::StorageEntry::kCudaIpcHandle: return reg::cuda_ipc_source{std::move(*in.mutable_cuda_ipc_handle())};
    case v2::StorageEntry::kVramRegionId: return reg::vram_region_source{in.vram_region_id()};
    case v2::StorageEntry::kRegionRef: {
      auto& r = *in.mutable_region_ref();
      return reg::region_ref_source{std::move(*r.mutable_region_id()),
                                    static_cast<regions::memory_kind>(r.memory_kind()), r.device_id(), r.size_bytes()};
    }
    case v2::StorageEntry::STORAGE_SOURCE_NOT_SET: break;
  }
  return std::monostate{};
}

// The Feed's strings are moved out, not copied: the request is not read again.
reg::storage_entry to_storage(v2::StorageEntry& in) {
  return reg::storage_entry{std::move(*in.mutable_storage_id()), in.device_id(), in.storage_length(), to_source(in),
                            in.mapping_base_offset()};
}

reg::tensor_alias to_alias(v2::TensorAlias& in) {
  return reg::tensor_alias{
      std::move(*in.mutable_name()), std::move(*in.mutable_storage_id()),    in.storage_offset(),
      in.logical_length(),           {in.shape().begin(), in.shape().end()}, {in.stride().begin(), in.stride().end()},
      std::move(*in.mutable_dtype())};
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

// ---- Views (registration.md §7) ----------------------------------------------------------------

views::view_request to_view(const v2::ViewRegistrationOptions& in) {
  views::view_request out;
  out.view_id = in.view_id();
  for (const auto& [name, ops] : in.spec().tensors()) {
    auto& mine = out.spec[name];
    for (const auto& op : ops.ops()) {
      if (op.has_narrow()) {
        mine.push_back(identity::narrow_op{op.narrow().dim(), op.narrow().start(), op.narrow().length()});
      } else if (op.has_transpose()) {
        mine.push_back(identity::transpose_op{op.transpose().dim0(), op.transpose().dim1()});
      }
      // An Op with neither is refused by the dispatcher before conversion.
    }
  }
  out.tensor_names.assign(in.tensor_names().begin(), in.tensor_names().end());
  out.place = static_cast<views::placement>(in.placement());
  out.canonical_size_bytes = in.canonical_size_bytes();
  for (const auto& r : in.ranges()) out.ranges.push_back({r.offset(), r.length()});
  out.kind = static_cast<views::registration_kind>(in.registration_kind());
  out.staging_memfd = in.staging_memfd();
  return out;
}

void fill_spec(tensorcast::common::v1::ViewSpec& out, const identity::view_spec& in) {
  for (const auto& [name, ops] : in) {
    auto& mine = (*out.mutable_tensors())[name];
    for (const auto& op : ops) {
      auto* o = mine.add_ops();
      if (const auto* n = std::get_if<identity::narrow_op>(&op)) {
        o->mutable_narrow()->set_dim(n->dim);
        o->mutable_narrow()->set_start(n->start);
        o->mutable_narrow()->set_length(n->length);
      } else {
        const auto& t = std::get<identity::transpose_op>(op);
        o->mutable_transpose()->set_dim0(t.dim0);
        o->mutable_transpose()->set_dim1(t.dim1);
      }
    }
  }
}

void fill_ranges(google::protobuf::RepeatedPtrField<v2::CanonicalRange>& out,
                 const std::vector<views::byte_range>& in) {
  out.Reserve(static_cast<int>(in.size()));
  for (const auto& r : in) {
    auto* c = out.Add();
    c->set_offset(r.offset);
    c->set_length(r.length);
  }
}

// ---- Catalogue helpers ---------------------------------------------------------------------

void fill_summary(wire::ArtifactSummary& out, const reg::artifact_summary& in) {
  out.set_artifact_id(in.descriptor.artifact_id);
  fill_descriptor(*out.mutable_artifact_descriptor(), in.descriptor);
  out.set_total_size(in.descriptor.total_size);
  if (in.vram_snapshots > 0) out.add_tiers(wire::TIER_VRAM);  // enum order
  if (in.leases > in.snapshot_leases) out.add_tiers(wire::TIER_VRAM_LEASED);
  if (in.stable_replica) out.add_tiers(wire::TIER_STABLE_DRAM);
  if (in.shared_disk) out.add_tiers(wire::TIER_SHARED_DISK);
  out.set_lease_count(static_cast<std::uint32_t>(in.leases + in.joined_refs));
  out.set_verified_id(in.verified_id);
  out.set_hash_state(static_cast<v2::HashState>(in.hash));
  for (const auto& v : in.views) fill_view(*out.add_views(), v);
}

void add_tier(wire::GetStatsResponse& out, wire::Tier tier, std::uint64_t bytes, std::uint64_t artifacts) {
  if (bytes == 0 && artifacts == 0) return;
  auto* t = out.add_tiers();
  t->set_tier(tier);
  t->set_bytes(bytes);
  t->set_artifacts(artifacts);
}

}  // namespace

// ---- Envelope ------------------------------------------------------------------------------

std::string_view rpc_name(wire::Request::BodyCase body) noexcept {
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
    case wire::Request::kWaitArtifactHash: return "WaitArtifactHash";
    case wire::Request::kOpenPersistedArtifact: return "OpenPersistedArtifact";
    case wire::Request::kPublishArtifact: return "PublishArtifact";
    case wire::Request::kRepublishLease: return "RepublishLease";
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
  return error{errc::invalid_argument,
               fmt::format("cannot handle request {}: the request has no body", request.request_id())};
}

void set_status(wire::Response& response, const error& e) {
  response.clear_body();
  auto* s = response.mutable_status();
  s->set_code(static_cast<std::int32_t>(e.code));
  s->set_message(e.message);
}

wire::Response error_response(std::uint64_t request_id, const error& e) {
  wire::Response response;
  response.set_request_id(request_id);
  set_status(response, e);
  return response;
}

std::string subject_of(const wire::Request& request, const wire::Response& response) {
  using R = wire::Request;
  const bool ok = response.status().code() == 0;
  const auto named = [](std::string_view kind, const std::string& id) {
    return id.empty() ? std::string() : fmt::format("{} '{}'", kind, id);
  };
  switch (request.body_case()) {
    case R::kBeginRegisterArtifact:
      return ok ? named("registration", response.begin_register_artifact().registration_id()) : std::string();
    case R::kFeedRegisterArtifactStream:
      return named("registration", request.feed_register_artifact_stream().registration_id());
    case R::kKeepAliveRegisterArtifact:
      return named("registration", request.keep_alive_register_artifact().registration_id());
    case R::kCommitRegisteredArtifact: {
      auto subject = named("registration", request.commit_registered_artifact().registration_id());
      if (ok && response.has_commit_registered_artifact()) {
        subject +=
            fmt::format(" -> artifact '{}'", response.commit_registered_artifact().artifact_descriptor().artifact_id());
      }
      return subject;
    }
    case R::kAbortRegisteredArtifact:
      return named("registration", request.abort_registered_artifact().registration_id());
    case R::kRevokeRegisteredArtifact:
      return named("registration", request.revoke_registered_artifact().registration_id());
    case R::kRegisterRegion:
      return ok ? named("region", response.register_region().region().region_id()) : std::string();
    case R::kUnregisterRegion: return named("region", request.unregister_region().region_id());
    case R::kRegisterVramRegion:
      return ok ? named("region", response.register_vram_region().region_id()) : std::string();
    case R::kUnregisterVramRegion: return named("region", request.unregister_vram_region().region_id());
    case R::kGetArtifactIndexById: return named("artifact", request.get_artifact_index_by_id().artifact_id());
    case R::kDeregisterArtifact: return named("artifact", request.deregister_artifact().artifact_id());
    case R::kStartPersistence: return named("artifact", request.start_persistence().artifact_id());
    case R::kQueryPersistenceStatus: return named("artifact", request.query_persistence_status().artifact_id());
    case R::kActivateStableLocalBacking: return named("region", request.activate_stable_local_backing().region_id());
    case R::kGetArtifactMemfd: return named("artifact", request.get_artifact_memfd().artifact_id());
    case R::kOpenArtifactDevice: return named("artifact", request.open_artifact_device().artifact_id());
    case R::kWaitArtifactHash: return named("artifact", request.wait_artifact_hash().artifact_id());
    case R::kOpenPersistedArtifact: return named("artifact", request.open_persisted_artifact().artifact_id());
    case R::kPublishArtifact: return named("artifact", request.publish_artifact().artifact_id());
    case R::kRepublishLease: {
      auto subject = named("lease", request.republish_lease().registration_id());
      if (ok && response.has_republish_lease()) {
        subject += fmt::format(" -> lease '{}', artifact '{}'", response.republish_lease().registration_id(),
                               response.republish_lease().commit().artifact_descriptor().artifact_id());
      }
      return subject;
    }
    case R::kWaitPersistenceStatus:
    case R::kGetServerConfig:
    case R::kListArtifacts:
    case R::kGetStats:
    case R::BODY_NOT_SET: break;
  }
  return {};
}
// ---- Registration --------------------------------------------------------------------------

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
  if (in.has_view()) out.view = to_view(in.view());
  out.client_artifact_id = in.client_artifact_id();
  return out;
}

reg::republish_request to_republish(const wire::RepublishLeaseRequest& in) {
  reg::republish_request out;
  out.previous_registration_id = in.registration_id();
  out.client_artifact_id = in.client_artifact_id();
  out.owner_pid = in.owner_pid();
  if (in.has_ttl_ms()) out.ttl_ms = in.ttl_ms();
  if (in.has_policy()) out.policy = to_policy(in.policy());
  out.hash_in_background = in.hash_in_background();
  out.revoke_previous = in.revoke_previous();
  return out;
}

void fill_begin(v2::BeginRegisterArtifactResponse& out, const reg::begin_response& in) {
  out.set_registration_id(in.registration_id);
  out.set_device_id(in.device_id);
  out.set_total_size(in.total_size);
  std::visit(handshake_filler{out}, in.handshake);
}

reg::keep_alive_request to_keep_alive(const v2::KeepAliveRegisterArtifactRequest& in) {
  return {in.registration_id(), in.ttl_ms(), in.epoch(), in.owner_pid()};
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
  out.storage_entries.reserve(static_cast<std::size_t>(in.storage_entries_size()));
  for (auto& e : *in.mutable_storage_entries()) out.storage_entries.push_back(to_storage(e));
  out.tensor_aliases.reserve(static_cast<std::size_t>(in.tensor_aliases_size()));
  for (auto& a : *in.mutable_tensor_aliases()) out.tensor_aliases.push_back(to_alias(a));
  return out;
}

void fill_commit(v2::CommitRegisteredArtifactResponse& out, const reg::commit_response& in) {
  fill_descriptor(*out.mutable_artifact_descriptor(), in.descriptor);
  out.set_existed(in.existed);
  if (in.local_stable_tier) {
    auto* tier = out.mutable_local_stable_tier();
    tier->set_status(static_cast<v2::LocalStableTierStatus>(in.local_stable_tier->status));
    if (!in.local_stable_tier->message.empty()) tier->set_message(in.local_stable_tier->message);
  }
  if (in.remote_stable_tier) {
    auto* tier = out.mutable_remote_stable_tier();
    tier->set_status(static_cast<v2::LocalStableTierStatus>(in.remote_stable_tier->status));
    if (!in.remote_stable_tier->message.empty()) tier->set_message(in.remote_stable_tier->message);
  }
  for (const auto& id : in.evicted) out.add_evicted_artifact_ids(id);
  if (!in.persistence_task_id.empty()) out.set_persistence_task_id(in.persistence_task_id);
  out.set_hash_state(static_cast<v2::HashState>(in.hash));
  if (in.view) {
    out.set_view_id(in.view->view_id);
    out.set_view_index_json(in.view->index_json);
    out.set_view_data_hash(in.view->data_hash);
    fill_ranges(*out.mutable_canonical_ranges(), in.view->canonical_ranges);
    out.set_registration_kind(static_cast<v2::ViewRegistrationKind>(in.view->kind));
  }
  if (in.assembly) fill_assembly(*out.mutable_assembly(), *in.assembly);
}

void fill_assembly(v2::AssemblyStatus& out, const reg::assembly_status& in) {
  out.set_cgid(in.cgid);
  out.set_canonical_size_bytes(in.canonical_size);
  out.set_covered_bytes(in.covered_bytes);
  out.set_pieces(in.pieces);
  out.set_sealed(in.sealed);
  out.set_artifact_id(in.artifact_id);
  if (in.expires_in) out.set_expires_in_ms(static_cast<std::uint64_t>(in.expires_in->count()));
}

void fill_view(v2::ArtifactView& out, const reg::view_record& in) {
  out.set_view_id(in.view_id);
  out.set_registration_kind(static_cast<v2::ViewRegistrationKind>(in.kind));
  out.set_placement(static_cast<v2::TransformPlacement>(in.place));
  fill_spec(*out.mutable_spec(), in.spec);
  out.set_view_index_json(in.index_json);
  out.set_view_data_hash(in.data_hash);
  out.set_view_size(in.view_size);
  fill_ranges(*out.mutable_canonical_ranges(), in.canonical_ranges);
}

std::optional<error> malformed_view(const v2::BeginRegisterArtifactRequest& in) {
  if (!in.has_view()) return std::nullopt;
  for (const auto& [name, ops] : in.view().spec().tensors()) {
    for (int i = 0; i < ops.ops_size(); ++i) {
      if (ops.ops(i).kind_case() == tensorcast::common::v1::Op::KIND_NOT_SET) {
        return error{errc::invalid_argument, "cannot register view: tensor '" + name + "': op " + std::to_string(i) +
                                                 " sets neither narrow nor transpose"};
      }
    }
  }
  return std::nullopt;
}

reg::commit_options to_commit_options(const v2::CommitRegisteredArtifactRequest& in) {
  reg::commit_options out;
  out.hash_in_background = in.hash_in_background();
  return out;
}

void fill_hash_status(wire::WaitArtifactHashResponse& out, const reg::hash_status& in) {
  out.set_hash_state(static_cast<v2::HashState>(in.state));
  out.set_mi2_id(in.mi2_id);
  out.set_data_multihash(in.data_multihash);
  out.set_message(in.message);
}

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

// A put from files names its fds by fd_index (§18); the highest one sets how many it uses.
std::size_t fds_used(const v2::BeginRegisterArtifactRequest& in) {
  if (!in.has_stable_dram()) return 0;
  std::size_t used = 0;
  for (const auto& f : in.stable_dram().file_segments())
    used = std::max<std::size_t>(used, f.fd_index() + std::size_t{1});
  return used;
}

status take_begin_files(const v2::BeginRegisterArtifactRequest& in, std::vector<unique_fd>& fds,
                        reg::begin_request& out) {
  const std::size_t used = fds_used(in);
  if (fds.size() != used) {
    return fail(errc::invalid_argument, fmt::format("cannot begin registration: {} arrived with a message that uses {}",
                                                    fds.size() == 1 ? std::string("1 file descriptor")
                                                                    : fmt::format("{} file descriptors", fds.size()),
                                                    used == 0 ? std::string("none") : std::to_string(used)));
  }
  if (used == 0) return {};
  auto* options = std::get_if<reg::stable_dram_options>(&out.plan);
  TENSORREG_ASSERT(options != nullptr);
  options->files.reserve(used);
  for (auto& fd : fds) options->files.push_back(std::make_shared<const unique_fd>(std::move(fd)));
  fds.clear();
  return {};
}

// ---- Regions -------------------------------------------------------------------------------

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

// The chunk list itself (empty, fewer fds than chunks, sizes) is the engine's to check; only
// the frame's limit is the wire's.
status take_vmm_chunks(const v2::RegisterRegionRequest& in, std::vector<unique_fd>& fds,
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

void fill_vram_region(v2::RegisterVramRegionResponse& out, const regions::region_info& in) {
  out.set_region_id(in.id);
  out.set_ttl_ms(in.ttl_ms);
  if (in.expires_at) fill_expiry(*out.mutable_expires_at(), in.ttl_ms);
}

void fill_unregister(v2::UnregisterRegionResponse& out, bool released) { out.set_released(released); }

void fill_unregister(v2::UnregisterVramRegionResponse& out, bool released) { out.set_released(released); }

// ---- Catalogue -----------------------------------------------------------------------------

void fill_index(v2::GetArtifactIndexByIdResponse& out, const index::canonical_index& index,
                const reg::artifact_descriptor& descriptor) {
  out.set_tensor_index_data(index.json());
  fill_descriptor(*out.mutable_artifact_descriptor(), descriptor);
}

void fill_memfd(wire::GetArtifactMemfdResponse& out, const index::canonical_index& index,
                const reg::artifact_descriptor& descriptor) {
  fill_descriptor(*out.mutable_artifact_descriptor(), descriptor);
  out.set_tensor_index_data(index.json());
  out.set_size_bytes(descriptor.total_size);
}

void fill_persisted(wire::OpenPersistedArtifactResponse& out, const persistence::stored_artifact& stored,
                    const reg::artifact_descriptor& descriptor) {
  fill_descriptor(*out.mutable_artifact_descriptor(), descriptor);
  out.set_tensor_index_data(stored.index->json());
  out.set_size_bytes(stored.record.total_size);
  out.set_leaf_bytes(hash::leaf_bytes);
  // XXH3's canonical form: high64 then low64, each big-endian (the MANIFEST's hex, as bytes).
  std::string& leaves = *out.mutable_leaf_xxh3();
  leaves.resize(stored.leaves.size() * 16);
  for (std::size_t i = 0; i < stored.leaves.size(); ++i) {
    const auto& f = stored.leaves[i].xxh3;
    for (int b = 0; b < 8; ++b) {
      leaves[i * 16 + static_cast<std::size_t>(b)] = static_cast<char>(f.high >> (56 - 8 * b));
      leaves[i * 16 + 8 + static_cast<std::size_t>(b)] = static_cast<char>(f.low >> (56 - 8 * b));
    }
  }
}

void fill_device_layout(wire::OpenArtifactDeviceResponse& out, const reg::device_layout& layout, std::size_t first,
                        std::size_t end, const std::vector<std::string>& device_uuids) {
  fill_descriptor(*out.mutable_artifact_descriptor(), layout.descriptor);
  out.set_layout_token(layout.layout_token);
  if (layout.unchanged) {
    out.set_layout_unchanged(true);
    return;
  }
  out.set_tensor_index_data(layout.index->json());
  out.set_total_size(layout.descriptor.total_size);
  out.set_end_allocation(static_cast<std::uint32_t>(end));
  constexpr std::uint32_t no_fd = 0xFFFFFFFFu;
  std::uint32_t next_fd = 0;
  for (std::size_t k = 0; k < layout.allocations.size(); ++k) {
    const auto& a = layout.allocations[k];
    const bool carried = k >= first && k < end;
    auto* alloc = out.add_allocations();
    alloc->set_device_id(a.device_id);
    alloc->set_device_uuid(device_uuids[k]);
    alloc->set_size_bytes(a.size_bytes);
    if (!a.vmm) {
      alloc->set_cuda_ipc_handle(a.cuda_ipc_handle);
      continue;
    }
    auto* vmm = alloc->mutable_vmm();
    for (std::size_t i = 0; i < a.vmm->fds.size(); ++i) {
      auto* chunk = vmm->add_chunks();
      chunk->set_fd_index(carried ? next_fd++ : no_fd);
      chunk->set_size_bytes(a.vmm->chunk_bytes[i]);
    }
  }
  for (const auto& seg : layout.segments) {
    auto* s = out.add_segments();
    s->set_artifact_offset(seg.artifact_offset);
    s->set_length(seg.length);
    s->set_allocation(seg.allocation);
    s->set_allocation_offset(seg.allocation_offset);
  }
}
void fill_list(wire::ListArtifactsResponse& out, std::vector<reg::artifact_summary> in,
               const std::vector<reg::assembly_status>& assemblies) {
  std::sort(in.begin(), in.end(),
            [](const auto& a, const auto& b) { return a.descriptor.artifact_id < b.descriptor.artifact_id; });
  for (const auto& s : in) fill_summary(*out.add_artifacts(), s);
  for (const auto& a : assemblies) fill_assembly(*out.add_assemblies(), a);
}

void fill_stats(wire::GetStatsResponse& out, const reg::engine_stats& in, std::size_t connections) {
  out.set_artifacts(in.artifacts);
  add_tier(out, wire::TIER_VRAM_LEASED, in.leased_bytes, in.leased_artifacts);  // enum order
  add_tier(out, wire::TIER_STABLE_DRAM, in.stable_bytes, in.stable_artifacts);
  add_tier(out, wire::TIER_SHARED_DISK, in.shared_disk_bytes, in.shared_disk_artifacts);
  out.set_leases(in.leases + in.joined_refs);
  out.set_regions(in.regions);
  out.set_open_mappings(in.open_mappings);
  out.set_vmm_reserved_bytes(in.vmm_reserved_bytes);
  out.set_ipc_opens(in.ipc_opens);
  out.set_vmm_imports(in.vmm_imports);
  out.set_pending_registrations(in.pending_registrations);
  out.set_connections(connections);
  out.set_stable_budget_bytes(in.stable_budget);
  const auto held = in.stable_bytes + in.stable_reserved_bytes;
  out.set_stable_free_bytes(in.stable_budget > held ? in.stable_budget - held : 0);
  out.set_stable_reserved_bytes(in.stable_reserved_bytes);
  out.set_evictions(in.stable_evictions);
  out.set_evicted_bytes(in.stable_evicted_bytes);
  out.set_populated_reserve_bytes(in.populated_reserve_bytes);
}

result<std::optional<policy::cache_policy>> to_persist_cache_policy(const v2::StartPersistenceRequest& in) {
  if (!in.has_policy()) return std::optional<policy::cache_policy>{};
  auto resolved = policy::resolve(to_policy(in.policy()));
  if (!resolved) return tl::unexpected(with_context(std::move(resolved).error(), "cannot start persistence"));
  return resolved->cache;
}

void fill_persistence(v2::QueryPersistenceStatusResponse& out, const persistence::task_status& in) {
  out.set_task_id(in.task_id);
  out.set_artifact_id(in.artifact_id);
  out.set_plan_id(in.plan_id);
  out.set_state(static_cast<common::PersistenceState>(in.state));
  out.set_progress(in.progress);
  if (!in.degraded_reason.empty()) out.set_degraded_reason(in.degraded_reason);
  if (!in.last_error.empty()) out.set_last_error(in.last_error);
}

void fill_persistence(v2::StartPersistenceResponse& out, const persistence::task_status& in) {
  out.set_task_id(in.task_id);
  out.set_plan_id(in.plan_id);
  out.set_state(static_cast<common::PersistenceState>(in.state));
  out.set_progress(in.progress);
  if (!in.degraded_reason.empty()) out.set_degraded_reason(in.degraded_reason);
}

void fill_config(v2::GetServerConfigResponse& out, const std::string& socket_path, const reg::engine_stats& stats) {
  out.set_mem_pool_size(static_cast<std::int64_t>(stats.stable_budget));
  out.set_artifact_chunk_bytes(artifact_chunk_bytes);
  out.set_tx_slice_bytes(tx_slice_bytes);
  out.set_local_handle_socket_path(socket_path);
  out.set_cpu_shared_memory_enabled(true);
  out.set_startup_phase(v2::DAEMON_STARTUP_PHASE_READY);
}

}  // namespace tensorreg::daemon::convert
