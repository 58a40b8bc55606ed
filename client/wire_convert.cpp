#include "client/wire_convert.hpp"

#include <algorithm>
#include <limits>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>

namespace tensorreg::client::wire_convert {

namespace common = ::tensorcast::common::v1;

namespace {

template <typename... Ts>
struct overloaded : Ts... {
  using Ts::operator()...;
};
template <typename... Ts>
overloaded(Ts...) -> overloaded<Ts...>;

void set_spec(const identity::view_spec& spec, common::ViewSpec& out) {
  for (const auto& [name, ops] : spec) {
    auto& entry = (*out.mutable_tensors())[name];
    for (const auto& op : ops) {
      auto* o = entry.add_ops();
      std::visit(overloaded{[&](const identity::narrow_op& n) {
                              o->mutable_narrow()->set_dim(n.dim);
                              o->mutable_narrow()->set_start(n.start);
                              o->mutable_narrow()->set_length(n.length);
                            },
                            [&](const identity::transpose_op& t) {
                              o->mutable_transpose()->set_dim0(t.dim0);
                              o->mutable_transpose()->set_dim1(t.dim1);
                            }},
                 op);
    }
  }
}

void set_view(const views::view_request& v, v2::ViewRegistrationOptions& out) {
  if (!v.view_id.empty()) out.set_view_id(v.view_id);
  set_spec(v.spec, *out.mutable_spec());
  out.set_placement(static_cast<v2::TransformPlacement>(v.place));
  out.set_canonical_size_bytes(v.canonical_size_bytes);
  for (const auto& r : v.ranges) {
    auto* range = out.add_ranges();
    range->set_offset(r.offset);
    range->set_length(r.length);
  }
  out.set_registration_kind(static_cast<v2::ViewRegistrationKind>(v.kind));
  for (const auto& name : v.tensor_names) out.add_tensor_names(name);
  out.set_staging_memfd(v.staging_memfd);
}

void set_policy(const policy::store_policy& in, common::StorePolicy& out) {
  if (in.profile != policy::profile::unspecified) out.set_profile(static_cast<common::PolicyProfile>(in.profile));
  const std::pair<const std::vector<policy::tier_spec>*, google::protobuf::RepeatedPtrField<common::TierSpec>*>
      lists[] = {{&in.must, out.mutable_must()}, {&in.should, out.mutable_should()}, {&in.may, out.mutable_may()}};
  for (const auto& [from, to] : lists) {
    for (const auto& t : *from) {
      auto* spec = to->Add();
      spec->set_tier(static_cast<common::PolicyTier>(t.tier));
      spec->set_scope(static_cast<common::PolicyScope>(t.scope));
      spec->set_min_replicas(t.min_replicas);
    }
  }
}

std::vector<views::byte_range> ranges_of(const google::protobuf::RepeatedPtrField<v2::CanonicalRange>& ranges) {
  std::vector<views::byte_range> out;
  out.reserve(static_cast<std::size_t>(ranges.size()));
  for (const auto& r : ranges) out.push_back({r.offset(), r.length()});
  return out;
}

}  // namespace

std::optional<error> status_error(const wire::Status& s) {
  if (s.code() == 0) return std::nullopt;
  const auto code = s.code() > 0 && s.code() <= 16 ? static_cast<errc>(s.code()) : errc::unknown;
  return error{code, s.message()};
}

wire::Request begin_request(const begin_args& args) {
  wire::Request r;
  auto* b = r.mutable_begin_register_artifact();
  b->set_device_id(args.device_id);
  if (!args.device_uuid.empty()) b->set_device_uuid(args.device_uuid);
  b->set_total_size(args.total_size);
  b->set_ttl_ms(args.ttl_ms);
  b->set_owner_pid(args.owner_pid);
  if (!args.index_json.empty()) {
    auto* data = b->mutable_tensor_index_data();
    data->set_data(args.index_json);
    data->set_schema_version("v3");
    data->set_encoding("json");
  }
  if (args.plan == begin_plan::stable_dram) {
    auto* s = b->mutable_stable_dram();
    for (const auto& f : args.file_segments) {
      auto* out = s->add_file_segments();
      out->set_fd_index(f.file);
      out->set_file_offset(f.file_offset);
      out->set_canonical_offset(f.canonical_offset);
      out->set_length(f.length);
    }
  } else {
    b->mutable_lease()->set_in_place(true);
  }
  if (args.policy) set_policy(*args.policy, *b->mutable_policy());
  if (!args.display_name.empty()) b->set_display_name(args.display_name);
  if (!args.client_artifact_id.empty()) b->set_client_artifact_id(args.client_artifact_id);
  if (args.view != nullptr) set_view(*args.view, *b->mutable_view());
  return r;
}

wire::Request register_region_request(const region_args& args) {
  wire::Request r;
  auto* rr = r.mutable_register_region();
  rr->set_owner_pid(args.owner_pid);
  rr->set_size_bytes(args.size_bytes);
  if (args.host_shared) {
    rr->set_memory_kind(v2::REGION_MEMORY_KIND_HOST_SHARED);
    rr->mutable_host_shared()->set_daemon_managed(true);
    return r;
  }
  rr->set_memory_kind(v2::REGION_MEMORY_KIND_VRAM);
  rr->set_device_id(args.device_id);
  rr->set_device_uuid(args.device_uuid);
  if (!args.cuda_ipc_handle.empty()) {
    rr->set_cuda_ipc_handle(args.cuda_ipc_handle);
  } else {
    rr->mutable_cuda_vmm()->mutable_chunk_bytes()->Add(args.vmm_chunk_bytes.begin(), args.vmm_chunk_bytes.end());
  }
  return r;
}

registration::feed_request whole_region_lease_feed(std::string registration_id, const index::canonical_index& idx,
                                                   const registration::region_ref_source& region) {
  registration::feed_request feed;
  feed.registration_id = std::move(registration_id);
  registration::lease_segments segments;
  std::map<std::pair<std::uint64_t, std::uint64_t>, std::string> storages;
  for (const auto& e : idx.entries()) {
    auto [it, inserted] = storages.try_emplace({e.offset, e.size}, "s" + std::to_string(storages.size()));
    if (inserted) {
      feed.storage_entries.push_back({it->second, -1, e.size, region, e.offset});
      segments.segments.push_back({it->second, 0, e.offset, e.size});
    }
    feed.tensor_aliases.push_back(
        {e.name, it->second, static_cast<std::uint64_t>(e.storage_offset), e.size, e.shape, e.stride, e.dtype});
  }
  feed.payload = std::move(segments);
  return feed;
}

v2::FeedRegisterArtifactStreamRequest feed_frame(const registration::feed_request& feed, std::string_view device_uuid) {
  v2::FeedRegisterArtifactStreamRequest f;
  f.set_registration_id(feed.registration_id);
  std::visit(overloaded{[](std::monostate) {},
                        [&](const registration::lease_segments& l) {
                          auto* segments = f.mutable_lease_segments()->mutable_segments();
                          segments->Reserve(static_cast<int>(l.segments.size()));
                          for (const auto& s : l.segments) {
                            auto* seg = segments->Add();
                            seg->set_storage_id(s.storage_id);
                            seg->set_storage_offset(s.storage_offset);
                            seg->set_artifact_offset(s.artifact_offset);
                            seg->set_length(s.length);
                          }
                        },
                        [&](const registration::view_chunk& c) {
                          auto* u = f.mutable_view_chunk();
                          u->set_canonical_offset(c.canonical_offset);
                          u->set_view_offset(c.view_offset);
                          u->set_data(c.data);
                        },
                        [&](const registration::stable_write_progress& p) {
                          auto* w = f.mutable_stable_dram_write_progress();
                          for (const auto& range : p.ranges) {
                            auto* out = w->add_ranges();
                            out->set_canonical_offset(range.canonical_offset);
                            out->set_length(range.length);
                          }
                          w->set_upload_complete(p.upload_complete);
                        }},
             feed.payload);
  auto* entries = f.mutable_storage_entries();
  entries->Reserve(static_cast<int>(feed.storage_entries.size()));
  for (const auto& s : feed.storage_entries) {
    auto* e = entries->Add();
    e->set_storage_id(s.storage_id);
    e->set_device_id(s.device_id);
    if (!device_uuid.empty()) e->set_device_uuid(std::string(device_uuid));
    e->set_storage_length(s.storage_length);
    std::visit(overloaded{[](std::monostate) {}, [](const registration::host_storage_source&) {},
                          [&](const registration::cuda_ipc_source& src) { e->set_cuda_ipc_handle(src.handle); },
                          [&](const registration::vram_region_source& src) { e->set_vram_region_id(src.region_id); },
                          [&](const registration::region_ref_source& src) {
                            auto* ref = e->mutable_region_ref();
                            ref->set_region_id(src.region_id);
                            ref->set_memory_kind(static_cast<v2::RegionMemoryKind>(src.kind));
                            ref->set_device_id(src.device_id);
                            ref->set_size_bytes(src.size_bytes);
                          }},
               s.source);
    e->set_mapping_base_offset(s.mapping_base_offset);
  }
  auto* aliases = f.mutable_tensor_aliases();
  aliases->Reserve(static_cast<int>(feed.tensor_aliases.size()));
  for (const auto& t : feed.tensor_aliases) {
    auto* a = aliases->Add();
    a->set_name(t.name);
    a->set_storage_id(t.storage_id);
    a->set_storage_offset(t.storage_offset);
    a->set_logical_length(t.logical_length);
    a->mutable_shape()->Add(t.shape.begin(), t.shape.end());
    a->mutable_stride()->Add(t.stride.begin(), t.stride.end());
    a->set_dtype(t.dtype);
  }
  return f;
}

wire::Request commit_request(std::string_view registration_id, bool hash_in_background,
                             std::uint32_t replica_timeout_ms) {
  wire::Request r;
  r.mutable_commit_registered_artifact()->set_registration_id(std::string(registration_id));
  if (hash_in_background) r.mutable_commit_registered_artifact()->set_hash_in_background(true);
  if (replica_timeout_ms != 0) r.mutable_commit_registered_artifact()->set_replica_timeout_ms(replica_timeout_ms);
  return r;
}

wire::Request republish_request(const republish_args& args) {
  wire::Request r;
  auto* q = r.mutable_republish_lease();
  q->set_registration_id(args.previous_registration_id);
  if (!args.client_artifact_id.empty()) q->set_client_artifact_id(args.client_artifact_id);
  q->set_owner_pid(args.owner_pid);
  q->set_ttl_ms(args.ttl_ms);
  if (args.policy) set_policy(*args.policy, *q->mutable_policy());
  q->set_hash_in_background(args.hash_in_background);
  q->set_revoke_previous(args.revoke_previous);
  return r;
}

wire::Request wait_hash_request(std::string_view artifact_id, std::uint32_t timeout_ms) {
  wire::Request r;
  auto* w = r.mutable_wait_artifact_hash();
  w->set_artifact_id(std::string(artifact_id));
  w->set_timeout_ms(timeout_ms);
  return r;
}

wire::Request start_persistence_request(std::string_view artifact_id, std::optional<policy::profile> profile,
                                        std::string_view key_hint) {
  wire::Request r;
  auto* p = r.mutable_start_persistence();
  p->set_artifact_id(std::string(artifact_id));
  if (profile) p->mutable_policy()->set_profile(static_cast<common::PolicyProfile>(*profile));
  if (!key_hint.empty()) p->set_key_hint(std::string(key_hint));
  return r;
}

wire::Request query_persistence_request(std::string_view task_id, std::string_view artifact_id) {
  wire::Request r;
  auto* q = r.mutable_query_persistence_status();
  if (!task_id.empty()) {
    q->set_task_id(std::string(task_id));
  } else {
    q->set_artifact_id(std::string(artifact_id));
  }
  return r;
}

wire::Request wait_persistence_request(std::string_view task_id, std::uint32_t timeout_ms) {
  wire::Request r;
  auto* w = r.mutable_wait_persistence_status();
  w->set_task_id(std::string(task_id));
  w->set_timeout_ms(timeout_ms);
  return r;
}

wire::Request abort_request(std::string_view registration_id) {
  wire::Request r;
  r.mutable_abort_registered_artifact()->set_registration_id(std::string(registration_id));
  return r;
}

wire::Request revoke_request(std::string_view registration_id, std::string_view reason) {
  wire::Request r;
  auto* v = r.mutable_revoke_registered_artifact();
  v->set_registration_id(std::string(registration_id));
  if (!reason.empty()) v->set_reason(std::string(reason));
  return r;
}

wire::Request keep_alive_request(const registration::keep_alive_request& k) {
  wire::Request r;
  auto* out = r.mutable_keep_alive_register_artifact();
  out->set_registration_id(k.registration_id);
  out->set_ttl_ms(k.ttl_ms);
  out->set_epoch(k.epoch);
  out->set_owner_pid(k.owner_pid);
  return r;
}

wire::Request unregister_region_request(std::string_view region_id, std::int32_t owner_pid) {
  wire::Request r;
  auto* u = r.mutable_unregister_region();
  u->set_region_id(std::string(region_id));
  u->set_owner_pid(owner_pid);
  u->set_force(true);
  return r;
}

wire::Request deregister_request(std::string_view artifact_id, bool wait_for_drain, std::int32_t owner_pid) {
  wire::Request r;
  auto* d = r.mutable_deregister_artifact();
  d->set_artifact_id(std::string(artifact_id));
  d->set_wait_for_drain(wait_for_drain);
  d->set_owner_pid(owner_pid);
  return r;
}

wire::Request config_request() {
  wire::Request r;
  r.mutable_get_server_config();
  return r;
}

wire::Request index_request(std::string_view artifact_id) {
  wire::Request r;
  r.mutable_get_artifact_index_by_id()->set_artifact_id(std::string(artifact_id));
  return r;
}

wire::Request view_request(std::string_view artifact_id, std::string_view view_id) {
  auto r = index_request(artifact_id);
  r.mutable_get_artifact_index_by_id()->set_view_id(std::string(view_id));
  return r;
}

wire::Request memfd_request(std::string_view artifact_id) {
  wire::Request r;
  r.mutable_get_artifact_memfd()->set_artifact_id(std::string(artifact_id));
  return r;
}

wire::Request open_device_request(std::string_view artifact_id, std::uint32_t first_allocation) {
  wire::Request r;
  auto* o = r.mutable_open_artifact_device();
  o->set_artifact_id(std::string(artifact_id));
  o->set_first_allocation(first_allocation);
  return r;
}

wire::Request list_request() {
  wire::Request r;
  r.mutable_list_artifacts();
  return r;
}

wire::Request stats_request() {
  wire::Request r;
  r.mutable_get_stats();
  return r;
}

std::size_t wire_size(const wire::Request& r) { return r.ByteSizeLong(); }
std::size_t wire_size(const v2::FeedRegisterArtifactStreamRequest& f) { return f.ByteSizeLong(); }

// ---- answers --------------------------------------------------------------------------------

artifact_descriptor descriptor_of(const common::ArtifactDescriptor& d) {
  artifact_descriptor out;
  out.artifact_id = d.artifact_id();
  out.index_multihash = d.index_multihash();
  out.data_multihash = d.data_multihash();
  out.schema_version = d.schema_version();
  out.encoding = d.encoding();
  out.total_size = d.total_size();
  out.id_kind = static_cast<identity::id_kind>(d.id_kind());
  return out;
}

std::string registration_id_of(const wire::Response& begun) {
  return begun.begin_register_artifact().registration_id();
}

registration::commit_response commit_of(const wire::Response& committed) {
  return commit_of(committed.commit_registered_artifact());
}

registration::commit_response commit_of(const v2::CommitRegisteredArtifactResponse& c) {
  registration::commit_response out;
  out.descriptor = descriptor_of(c.artifact_descriptor());
  out.existed = c.existed();
  out.evicted.assign(c.evicted_artifact_ids().begin(), c.evicted_artifact_ids().end());
  out.hash = static_cast<registration::hash_state>(c.hash_state());
  if (c.has_remote_stable_tier()) {
    out.remote_stable_tier = registration::local_stable_tier_result{
        static_cast<registration::local_stable_status>(c.remote_stable_tier().status()),
        c.remote_stable_tier().message()};
  }
  return out;
}

registration::republish_response republish_of(const wire::Response& r) {
  const auto& a = r.republish_lease();
  registration::republish_response out;
  out.registration_id = a.registration_id();
  out.commit = commit_of(a.commit());
  out.revoked_previous = a.revoked_previous();
  return out;
}

registration::hash_status hash_status_of(const wire::Response& r) {
  const auto& w = r.wait_artifact_hash();
  registration::hash_status out;
  out.state = static_cast<registration::hash_state>(w.hash_state());
  out.mi2_id = w.mi2_id();
  out.data_multihash = w.data_multihash();
  out.message = w.message();
  return out;
}

registration::region_ref_source region_of(const wire::Response& registered_region) {
  const auto& ref = registered_region.register_region().region();
  return {ref.region_id(), static_cast<regions::memory_kind>(ref.memory_kind()), ref.device_id(), ref.size_bytes()};
}

persistence::task_status persistence_of(const wire::Response& r, std::string_view artifact_id) {
  persistence::task_status out;
  const auto from_status = [&](const v2::QueryPersistenceStatusResponse& q) {
    out.task_id = q.task_id();
    out.artifact_id = q.artifact_id();
    out.plan_id = q.plan_id();
    out.state = static_cast<persistence::task_state>(q.state());
    out.progress = q.progress();
    out.degraded_reason = q.degraded_reason();
    out.last_error = q.last_error();
  };
  if (r.has_start_persistence()) {
    const auto& s = r.start_persistence();
    out.task_id = s.task_id();
    out.artifact_id = std::string(artifact_id);
    out.plan_id = s.plan_id();
    out.state = static_cast<persistence::task_state>(s.state());
    out.progress = s.progress();
    out.degraded_reason = s.degraded_reason();
  } else if (r.has_query_persistence_status()) {
    from_status(r.query_persistence_status());
  } else {
    from_status(r.wait_persistence_status().status());
  }
  return out;
}

server_config config_of(const wire::Response& r) {
  const auto& c = r.get_server_config();
  server_config out;
  out.phase = static_cast<startup_phase>(c.startup_phase());
  out.artifact_chunk_bytes = c.artifact_chunk_bytes();
  out.stable_budget_bytes = c.mem_pool_size();
  out.socket_path = c.local_handle_socket_path();
  out.cluster_url = c.cluster_url();
  return out;
}

artifact_index index_of(const wire::Response& r) {
  const auto& i = r.get_artifact_index_by_id();
  return {descriptor_of(i.artifact_descriptor()), i.tensor_index_data()};
}

assembly_status assembly_of(const v2::AssemblyStatus& a) {
  assembly_status out{a.cgid(), a.canonical_size_bytes(), a.covered_bytes(), a.pieces(), a.sealed(), a.artifact_id()};
  if (a.has_expires_in_ms()) {
    out.expires_in = std::chrono::milliseconds(static_cast<std::int64_t>(
        std::min<std::uint64_t>(a.expires_in_ms(), std::numeric_limits<std::int64_t>::max())));
  }
  return out;
}

std::vector<assembly_status> assemblies_of(const wire::Response& r) {
  std::vector<assembly_status> out;
  for (const auto& a : r.list_artifacts().assemblies()) out.push_back(assembly_of(a));
  return out;
}

std::vector<artifact_info> list_of(const wire::Response& r) {
  std::vector<artifact_info> out;
  for (const auto& a : r.list_artifacts().artifacts()) {
    artifact_info info;
    info.descriptor = descriptor_of(a.artifact_descriptor());
    for (const auto t : a.tiers()) info.tiers.push_back(static_cast<tier>(t));
    info.lease_count = a.lease_count();
    info.device_ids.assign(a.device_ids().begin(), a.device_ids().end());
    info.name = a.name();
    info.verified_id = a.verified_id();
    info.hash = static_cast<registration::hash_state>(a.hash_state());
    for (const auto& v : a.views()) info.views.push_back(view_of(v));
    out.push_back(std::move(info));
  }
  return out;
}

artifact_view view_of(const v2::ArtifactView& v) {
  artifact_view out;
  out.view_id = v.view_id();
  out.kind = static_cast<views::registration_kind>(v.registration_kind());
  out.place = static_cast<views::placement>(v.placement());
  for (const auto& [name, ops] : v.spec().tensors()) {
    auto& entry = out.spec[name];
    for (const auto& op : ops.ops()) {
      if (op.has_narrow()) {
        entry.push_back(identity::narrow_op{op.narrow().dim(), op.narrow().start(), op.narrow().length()});
      } else if (op.has_transpose()) {
        entry.push_back(identity::transpose_op{op.transpose().dim0(), op.transpose().dim1()});
      }
    }
  }
  out.view_index_json = v.view_index_json();
  out.view_data_hash = v.view_data_hash();
  out.view_size = v.view_size();
  out.canonical_ranges = ranges_of(v.canonical_ranges());
  return out;
}

view_registered view_commit_of(const wire::Response& committed, std::string registration_id) {
  const auto& c = committed.commit_registered_artifact();
  view_registered out;
  out.descriptor = descriptor_of(c.artifact_descriptor());
  out.existed = c.existed();
  out.registration_id = std::move(registration_id);
  out.view_id = c.view_id();
  out.view_index_json = c.view_index_json();
  out.view_data_hash = c.view_data_hash();
  out.canonical_ranges = ranges_of(c.canonical_ranges());
  out.kind = static_cast<views::registration_kind>(c.registration_kind());
  if (c.has_assembly()) out.assembly = assembly_of(c.assembly());
  return out;
}

wire::Request publish_request(std::string_view artifact_id, std::uint32_t replicas, bool all,
                              std::uint32_t timeout_ms) {
  wire::Request r;
  auto* p = r.mutable_publish_artifact();
  p->set_artifact_id(std::string(artifact_id));
  p->set_replicas(replicas);
  p->set_all(all);
  p->set_timeout_ms(timeout_ms);
  return r;
}

publish_result publish_of(const wire::Response& r) {
  const auto& p = r.publish_artifact();
  publish_result out;
  out.holders.assign(p.holders().begin(), p.holders().end());
  out.asked.assign(p.asked().begin(), p.asked().end());
  out.target = p.target();
  out.reached = p.reached();
  out.members = p.members();
  out.declined.assign(p.declined().begin(), p.declined().end());
  return out;
}

daemon_stats stats_of(const wire::Response& r) {
  const auto& s = r.get_stats();
  daemon_stats out;
  out.artifacts = s.artifacts();
  out.pending_registrations = s.pending_registrations();
  out.leases = s.leases();
  out.regions = s.regions();
  out.open_mappings = s.open_mappings();
  out.connections = s.connections();
  out.vmm_reserved_bytes = s.vmm_reserved_bytes();
  for (const auto& t : s.tiers()) out.tiers.push_back({static_cast<tier>(t.tier()), t.bytes(), t.artifacts()});
  out.stable_budget_bytes = s.stable_budget_bytes();
  out.stable_free_bytes = s.stable_free_bytes();
  out.stable_reserved_bytes = s.stable_reserved_bytes();
  out.populated_reserve_bytes = s.populated_reserve_bytes();
  out.hits = s.hits();
  out.misses = s.misses();
  out.evictions = s.evictions();
  out.evicted_bytes = s.evicted_bytes();
  out.uptime_seconds = s.uptime_seconds();
  out.requests = s.requests();
  out.request_errors = s.request_errors();
  out.bytes_registered = s.bytes_registered();
  out.bytes_hashed = s.bytes_hashed();
  out.bytes_copied = s.bytes_copied();
  for (const auto& p : s.pulls()) {
    out.pulls.push_back({p.artifact_id(), p.total_bytes(), p.verified_bytes(),
                         std::vector<std::string>(p.sources().begin(), p.sources().end()), p.seconds()});
  }
  return out;
}

deregister_result deregister_of(const wire::Response& r) {
  return {r.deregister_artifact().drained(), r.deregister_artifact().removed()};
}

memfd_answer memfd_of(const wire::Response& r) {
  const auto& m = r.get_artifact_memfd();
  return {descriptor_of(m.artifact_descriptor()), m.tensor_index_data(), m.size_bytes()};
}

result<device_page> device_page_of(const wire::Response& r, std::string_view what) {
  const auto& o = r.open_artifact_device();
  device_page page;
  page.layout.descriptor = descriptor_of(o.artifact_descriptor());
  page.layout.index_json = o.tensor_index_data();
  page.layout.total_size = o.total_size();
  page.end_allocation = o.end_allocation();
  for (int k = 0; k < o.allocations_size(); ++k) {
    const auto& a = o.allocations(k);
    device_allocation out;
    out.device_id = a.device_id();
    out.device_uuid = a.device_uuid();
    out.size_bytes = a.size_bytes();
    std::vector<std::uint32_t> fd_index;
    switch (a.source_case()) {
      case wire::DeviceAllocation::kCudaIpcHandle: out.cuda_ipc_handle = a.cuda_ipc_handle(); break;
      case wire::DeviceAllocation::kVmm:
        for (const auto& c : a.vmm().chunks()) {
          out.vmm_chunks.push_back({unique_fd(), c.size_bytes()});
          fd_index.push_back(c.fd_index());
        }
        break;
      default:
        return fail(errc::data_loss, "cannot " + std::string(what) + ": allocation " + std::to_string(k) +
                                         " has neither an IPC handle nor VMM chunks");
    }
    page.is_vmm.push_back(a.source_case() == wire::DeviceAllocation::kVmm);
    page.chunk_fd_index.push_back(std::move(fd_index));
    page.layout.allocations.push_back(std::move(out));
  }
  for (const auto& s : o.segments()) {
    page.layout.segments.push_back({s.artifact_offset(), s.length(), s.allocation(), s.allocation_offset()});
  }
  return page;
}

}  // namespace tensorreg::client::wire_convert
