// The engine's committed artifacts (engine_state.hpp): regions, reads of the catalogue, GPU
// copies, deregistration (registration.md §5), stats and views (§7).
#include <algorithm>
#include <utility>

#include "registration/engine_state.hpp"
#include "tensorreg/devices/device_identity.hpp"
#include "tensorreg/views/scatter.hpp"

namespace tensorreg::registration {

// ---- Regions -------------------------------------------------------------------------------

namespace {

// A VRAM region of CUDA VMM allocations: imports and maps them on the region's device, so the
// registry holds a ready mapping (docs/wire-format.md §12). What the registry checks for every
// region (owner, size, device ≥ 0) is checked first, so a bad request imports nothing.
status import_vmm_region(regions::register_request& request, device_memory* devices) {
  if (!request.vmm || request.device_mapping) return {};
  const auto& chunks = *request.vmm;
  if (request.owner_pid <= 0 || request.size_bytes == 0 || request.device_id < 0) return {};  // the registry's errors
  TENSORREG_TRY_ASSIGN(const std::uint64_t sum,
                       devices::vmm_chunks_total(chunks.fds.size(), chunks.chunk_bytes, "cannot register region"));
  if (sum != request.size_bytes) {
    return fail(errc::invalid_argument, "cannot register region: its CUDA VMM chunks hold " + std::to_string(sum) +
                                            " bytes, not size_bytes " + std::to_string(request.size_bytes));
  }
  if (devices == nullptr) {
    return fail(errc::failed_precondition, "cannot register region: CUDA VMM memory on device " +
                                               std::to_string(request.device_id) +
                                               " needs a GPU and this engine has none");
  }
  std::vector<int> fds;
  fds.reserve(chunks.fds.size());
  for (const auto& fd : chunks.fds) fds.push_back(fd.get());
  auto mapped = devices->import_vmm(request.owner_pid, request.device_id, fds, chunks.chunk_bytes);
  if (!mapped) return tl::unexpected(with_context(std::move(mapped).error(), "cannot register region"));
  request.device_mapping = std::move(*mapped);
  return {};
}

}  // namespace

result<regions::region_info> engine::register_region(regions::register_request request) {
  TENSORREG_TRY(import_vmm_region(request, state_->devices.get()));
  // Register first, then watch, for the same reason as in begin().
  const auto owner = request.owner_pid;
  TENSORREG_TRY_ASSIGN(auto info, state_->regions.register_region(std::move(request)));
  if (auto watched = state_->watch_owner(owner); !watched) {
    (void)state_->regions.unregister(info.id, owner, true);
    return tl::unexpected(std::move(watched).error());
  }
  return info;
}

result<bool> engine::unregister_region(const std::string& region_id, std::int32_t owner_pid, bool force) {
  return state_->regions.unregister(region_id, owner_pid, force);
}

// ---- Catalogue -----------------------------------------------------------------------------

result<artifact_summary> engine::get(const std::string& artifact_id) const {
  const auto& durable = state_->options.durable;
  result<artifact_summary> out;
  {
    const detail::engine_lock lock(state_->mutex);
    out = state_->catalogue.get(artifact_id);
  }
  if (durable) {
    if (out) {
      out->shared_disk = durable->contains(artifact_id);
    } else if (out.error().code == errc::not_found) {
      state_->discover_persisted(artifact_id);
      if (auto a = durable->find(artifact_id)) return state::summary_of(*a);
    }
  }
  return out;
}

std::vector<artifact_summary> engine::list() const {
  std::vector<artifact_summary> out;
  {
    const detail::engine_lock lock(state_->mutex);
    out = state_->catalogue.list();
  }
  const auto& durable = state_->options.durable;
  if (!durable) return out;
  // A shared directory: what the other daemons persisted or removed since.
  if (auto rescanned = durable->rescan(); !rescanned) {
    tensorreg::log(state_->log, log_level::warn, "{}", rescanned.error().message);
  }
  std::map<std::string, std::size_t> held;
  for (std::size_t i = 0; i < out.size(); ++i) held[out[i].descriptor.artifact_id] = i;
  for (const auto& a : durable->list()) {
    auto it = held.find(a.record.artifact_id);
    if (it != held.end()) {
      out[it->second].shared_disk = true;
    } else {
      out.push_back(state::summary_of(a));
    }
  }
  std::sort(out.begin(), out.end(),
            [](const auto& x, const auto& y) { return x.descriptor.artifact_id < y.descriptor.artifact_id; });
  return out;
}

result<std::shared_ptr<const index::canonical_index>> engine::index_of(const std::string& artifact_id) const {
  result<std::shared_ptr<const index::canonical_index>> out;
  {
    const detail::engine_lock lock(state_->mutex);
    out = state_->catalogue.index_of(artifact_id);
  }
  if (!out && out.error().code == errc::not_found && state_->options.durable) {
    state_->discover_persisted(artifact_id);
    if (auto a = state_->options.durable->find(artifact_id)) return a->index;
  }
  return out;
}

result<std::shared_ptr<const memory::byte_source>> engine::open_bytes(const std::string& artifact_id) {
  result<std::shared_ptr<const memory::byte_source>> out;
  {
    const detail::engine_lock lock(state_->mutex);
    out = state_->catalogue.open_bytes(artifact_id);
  }
  // Not held in memory but persisted: load it back into the stable cache and read that.
  if (!out) state_->discover_persisted(artifact_id);
  if (!out && state_->options.durable && state_->options.durable->contains(artifact_id)) {
    bool quiesced = false;
    {
      const detail::engine_lock lock(state_->mutex);
      const auto st = state_->catalogue.state_of(artifact_id);
      quiesced = st == detail::artifact_state::quiesced || st == detail::artifact_state::draining;
    }
    if (quiesced) return out;
    TENSORREG_TRY(state_->restore(artifact_id));
    const detail::engine_lock lock(state_->mutex);
    return state_->catalogue.open_bytes(artifact_id);
  }
  return out;
}

result<std::pair<std::shared_ptr<const index::canonical_index>, unique_fd>> engine::stable_replica_fd(
    const std::string& artifact_id) {
  const std::string verb = "cannot open the stable replica of " + artifact_id;
  std::shared_ptr<const memory::byte_source> replica;
  std::shared_ptr<const index::canonical_index> idx;
  const auto look = [&]() -> status {
    const detail::engine_lock lock(state_->mutex);
    TENSORREG_TRY_ASSIGN(std::tie(replica, idx), state_->catalogue.stable_replica(artifact_id, verb));
    return {};
  };
  auto found = look();
  // No stable replica, or no artifact, in memory, but a persisted copy: load it back (docs/architecture.md §14).
  if ((!found && found.error().code == errc::not_found) || (found && !replica)) {
    state_->discover_persisted(artifact_id);
    if (state_->options.durable && state_->options.durable->contains(artifact_id)) {
      TENSORREG_TRY(state_->restore(artifact_id));
      found = look();
    }
  }
  TENSORREG_TRY(std::move(found));
  TENSORREG_TRY_ASSIGN(auto fd, detail::export_replica_fd(replica, verb));
  return std::pair{std::move(idx), std::move(fd)};
}

result<bool> engine::place_on_device(const std::string& artifact_id, std::int32_t device_id) {
  const std::string verb = "cannot copy " + artifact_id + " to CUDA device " + std::to_string(device_id);
  if (!state_->devices) return fail(errc::failed_precondition, verb + ": no GPU is available to this engine");
  {
    const detail::engine_lock lock(state_->mutex);
    const auto* a = state_->catalogue.find(artifact_id);
    if (a != nullptr && a->gpu_replicas.contains(device_id)) return false;
  }
  // Its host bytes (the stable replica, loaded back from disk when only there; or a host
  // lease's): the source holds them, and a deregister waits for it, while the copy reads.
  auto bytes = open_bytes(artifact_id);
  if (!bytes) return tl::unexpected(with_context(std::move(bytes).error(), verb));
  TENSORREG_TRY_ASSIGN(auto copy, state_->devices->copy_from_host(device_id, **bytes));
  bytes->reset();
  const detail::engine_lock lock(state_->mutex);
  auto* a = state_->catalogue.find(artifact_id);
  if (a == nullptr) return fail(errc::not_found, verb + ": it was removed during the copy");
  if (a->quiesced) return fail(errc::failed_precondition, verb + ": it is being deregistered");
  if (a->gpu_replicas.contains(device_id)) return false;  // another copy landed first
  copy.device_id = device_id;
  a->gpu_replicas.emplace(device_id, std::move(copy));
  return true;
}

result<device_layout> engine::device_layout_of(const std::string& artifact_id, std::uint64_t known_layout) const {
  const detail::engine_lock lock(state_->mutex);
  return state_->catalogue.device_layout_of(artifact_id, known_layout);
}

result<std::int32_t> engine::resolve_device(std::int32_t device_id, std::string_view device_uuid) const {
  if (device_uuid.empty()) return device_id;
  if (!state_->devices) {
    return fail(errc::failed_precondition,
                "cannot find CUDA device " + std::string(device_uuid) + ": no GPU is available to this engine");
  }
  return state_->devices->device_by_uuid(device_uuid);
}

std::string engine::device_uuid(std::int32_t device_id) const {
  return state_->devices ? state_->devices->uuid_of(device_id) : std::string();
}

result<deregister_response> engine::deregister(const deregister_request& request) {
  return state_->rejected(state_->deregister(request), "deregister", "artifact " + request.artifact_id,
                          request.owner_pid);
}

result<deregister_response> engine::state::deregister(const deregister_request& r) {
  std::shared_ptr<detail::reader_gate> gate;
  std::vector<std::shared_ptr<detail::background_hash>> cancelled;
  discover_persisted(r.artifact_id);  // a shared directory's copy is removed as well
  {
    const detail::engine_lock lock(mutex);
    // 0. DECISIONS §8, under the same lock as quiesce: no other holder slips in between.
    if (r.owner_pid > 0) TENSORREG_TRY(catalogue.check_sole_holder(r.artifact_id, r.owner_pid));
    TENSORREG_TRY(catalogue.check_copy_owner(r.artifact_id, r.owner_uid));  // the daemon's copies
    auto quiesced = catalogue.quiesce(r.artifact_id);                       // 1. no new readers, leases or joins
    if (!quiesced && quiesced.error().code == errc::not_found && options.durable &&
        options.durable->contains(r.artifact_id)) {
      // Only the persisted copy is left (DECISIONS §5.11). Its putter is not recorded on disk,
      // so it is the daemon's own uid's, or root's, to remove (DECISIONS §8).
      if (r.owner_uid && *r.owner_uid != 0 && *r.owner_uid != ::geteuid()) {
        return fail(errc::permission_denied, "cannot deregister " + r.artifact_id +
                                                 ": only its persisted copy is left, which only uid " +
                                                 std::to_string(::geteuid()) + " (the daemon's) or root may remove");
      }
      gate = nullptr;
    } else {
      TENSORREG_TRY_ASSIGN(gate, std::move(quiesced));
    }
    cancelled = catalogue.take_cancelled();  // quiesce stops its background hash
  }
  wait_stopped(cancelled);
  if (!gate) {
    TENSORREG_TRY(options.durable->remove(r.artifact_id));
    tensorreg::log(log, log_level::info, "deregistered artifact {} (owner_pid {}): removed its persisted copy",
                   r.artifact_id, r.owner_pid);
    deregister_response response;
    response.drained = true;
    response.removed = true;
    return response;
  }
  // 2. drain: wait, with no lock held, for the readers to let go.
  const auto timeout =
      r.drain_timeout_ms != 0 ? std::chrono::milliseconds(r.drain_timeout_ms) : options.default_drain_timeout;
  TENSORREG_TRY(detail::catalogue::drain(r.artifact_id, *gate, r.wait_for_drain, timeout));
  deregister_response response;
  response.drained = true;
  // 3. revoke leases and joins, drop replicas.
  std::optional<detail::removed_artifact> removed;
  {
    const detail::engine_lock lock(mutex);
    removed = catalogue.remove(r.artifact_id);
  }
  if (!removed) return response;  // a concurrent deregister removed it
  if (options.durable && options.durable->contains(r.artifact_id)) {
    if (auto gone = options.durable->remove(r.artifact_id); !gone) {
      tensorreg::log(log, log_level::warn, "deregistered artifact {} but kept its persisted copy: {}", r.artifact_id,
                     gone.error().message);
    }
  }
  response.released_region_ids = std::move(removed->released_region_ids);
  response.removed = true;
  tensorreg::log(log, log_level::info,
                 "deregistered artifact {} (owner_pid {}): revoked {} leases and {} joins; released regions {}",
                 r.artifact_id, r.owner_pid, removed->leases, removed->joins,
                 detail::joined(response.released_region_ids));
  return response;
}

status engine::check_owner(const std::string& registration_id, std::int32_t caller_pid, std::string_view verb) const {
  const std::int32_t owner = state_->owner_of(registration_id);
  if (owner == 0 || owner == caller_pid) return {};
  return fail(errc::permission_denied, "cannot " + std::string(verb) + " '" + registration_id +
                                           "': it belongs to pid " + std::to_string(owner) +
                                           ", not to the calling process " + std::to_string(caller_pid));
}

std::optional<std::uint64_t> engine::stable_room() const {
  const detail::engine_lock lock(state_->mutex);
  const auto& cache = state_->catalogue.cache();
  const auto st = cache.stats();
  if (st.budget_bytes == 0) return std::nullopt;
  const auto used = st.bytes_used + st.reserved_bytes;
  const auto free = st.budget_bytes > used ? st.budget_bytes - used : 0;
  return std::min(st.budget_bytes, free + cache.evictable_bytes());
}

engine_stats engine::stats() const {
  auto& s = *state_;
  engine_stats out;
  {
    // The engine's own tables, read under its mutex when it comes free within detail::stats_patience;
    // a worker holding it longer (a commit's bookkeeping, an owner's release) leaves this call
    // the tables the last one read, so GetStats on the I/O thread never waits behind it. The
    // first call waits: there is nothing earlier to answer.
    std::unique_lock tables(s.mutex, std::defer_lock);
    const bool read_before = s.tables_read.load(std::memory_order_acquire);
    if (read_before ? tables.try_lock_for(detail::stats_patience) : (tables.lock(), true)) {
      s.catalogue.add_stats(out);
      out.pending_registrations = s.pending.size();
      tables.unlock();
      std::lock_guard last(s.last_tables_mutex);
      s.last_tables = out;
      s.tables_read.store(true, std::memory_order_release);
    } else {
      std::lock_guard last(s.last_tables_mutex);
      out = s.last_tables;
    }
  }
  out.regions = s.regions.size();
  out.open_mappings = s.devices ? s.devices->open_mappings() : 0;
  out.vmm_reserved_bytes = s.devices ? s.devices->vmm_reserved_bytes() : 0;
  out.ipc_opens = s.devices ? s.devices->ipc_opens() : 0;
  out.vmm_imports = s.devices ? s.devices->vmm_imports() : 0;
  if (s.options.durable) {
    const auto disk = s.options.durable->totals();
    out.shared_disk_artifacts = disk.artifacts;
    out.shared_disk_bytes = disk.bytes;
  }
  if (s.publish_reserve) {
    out.populated_reserve_bytes = s.publish_reserve->ready_bytes();
    out.populated_reserve_taken = s.publish_reserve->taken();
  }
  return out;
}

// ---- Views (registration.md §7) ------------------------------------------------------------

result<view_record> engine::view_of(const std::string& artifact_id, const std::string& view_id) const {
  const detail::engine_lock lock(state_->mutex);
  auto* a = state_->catalogue.find(artifact_id);
  if (a == nullptr || !state_->catalogue.get(artifact_id)) {
    return fail(errc::not_found, "cannot find view " + view_id + " of " + artifact_id + ": no such artifact");
  }
  auto it = a->views.find(view_id);
  if (it == a->views.end()) {
    return fail(errc::not_found, "cannot find view " + view_id + " of " + artifact_id + ": no such view");
  }
  return it->second.first;
}

result<std::shared_ptr<const memory::byte_source>> engine::open_view(const std::string& artifact_id,
                                                                     const std::string& view_id) {
  std::shared_ptr<const views::view_plan> plan;
  {
    const detail::engine_lock lock(state_->mutex);
    auto* a = state_->catalogue.find(artifact_id);
    if (a == nullptr || !state_->catalogue.get(artifact_id)) {
      return fail(errc::not_found, "cannot open view " + view_id + " of " + artifact_id + ": no such artifact");
    }
    auto it = a->views.find(view_id);
    if (it == a->views.end()) {
      return fail(errc::not_found, "cannot open view " + view_id + " of " + artifact_id + ": no such view");
    }
    plan = it->second.second;
    auto replica = state_->catalogue.stable_replica(artifact_id, "cannot open view " + view_id + " of " + artifact_id);
    if (replica && replica->first) {
      if (const auto* shared = dynamic_cast<const memory::shared_memory*>(replica->first.get())) {
        return std::shared_ptr<const memory::byte_source>(
            std::make_shared<views::gathered_view>(plan, shared->bytes(), replica->first));
      }
    }
  }
  TENSORREG_TRY_ASSIGN(auto bytes, open_bytes(artifact_id));
  // The view is gathered from host memory: a stable replica (what every SERVER view makes) or
  // a lease of host memory; other bytes are copied to the host first.
  std::vector<std::byte> copy(bytes->size());
  TENSORREG_TRY(bytes->read(0, copy));
  auto owned = std::make_shared<std::vector<std::byte>>(std::move(copy));
  return std::shared_ptr<const memory::byte_source>(
      std::make_shared<views::gathered_view>(plan, std::span<const std::byte>(*owned), owned));
}

result<assembly_status> engine::assembly_of(const std::string& cgid) const {
  const detail::engine_lock lock(state_->mutex);
  auto it = state_->catalogue.assemblies().find(cgid);
  if (it == state_->catalogue.assemblies().end()) {
    return fail(errc::not_found, "cannot find assembly " + cgid + ": no piece of it is held here");
  }
  return detail::status_of(it->second->snapshot(), state_->time.now());
}

std::vector<assembly_status> engine::assemblies() const {
  const detail::engine_lock lock(state_->mutex);
  return state_->catalogue.assembly_statuses(state_->time.now());
}

}  // namespace tensorreg::registration
