// The engine's durable side (engine_state.hpp): persisted copies written, restored and
// verified (docs/architecture.md §14), and the resident memory handed to a successor (§14.2).
#include <algorithm>
#include <utility>

#include "registration/engine_state.hpp"
#include "tensorreg/memory/shared_memory.hpp"
#include "tensorreg/persistence/resident_state.hpp"

namespace tensorreg::registration {
namespace {

// What a durable write or a handed-on entry records of an artifact's descriptor (the cache
// policy is the caller's to add).
persistence::artifact_record record_of(const artifact_descriptor& d) {
  persistence::artifact_record r;
  r.artifact_id = d.artifact_id;
  r.id_kind = std::string(identity::id_kind_name(d.id_kind));
  r.index_multihash = d.index_multihash;
  r.data_multihash = d.data_multihash;
  r.schema_version = d.schema_version;
  r.encoding = d.encoding;
  r.total_size = d.total_size;
  return r;
}

}  // namespace

// ---- Persistence -----------------------------------------------------------------------------

artifact_summary engine::state::summary_of(const persistence::stored_artifact& a) {
  artifact_summary out;
  auto& d = out.descriptor;
  d.artifact_id = a.record.artifact_id;
  d.index_multihash = a.record.index_multihash;
  d.data_multihash = a.record.data_multihash;
  d.schema_version = a.record.schema_version;
  d.encoding = a.record.encoding;
  d.total_size = a.record.total_size;
  d.id_kind = a.record.id_kind == "MI2" ? identity::id_kind::mi2 : identity::id_kind::cgid;
  out.shared_disk = true;
  return out;
}

result<persistence::task_status> engine::start_persistence(const std::string& artifact_id,
                                                           std::optional<policy::cache_policy> cache) {
  return state_->start_persistence(artifact_id, std::move(cache));
}

result<persistence::task_status> engine::state::start_persistence(const std::string& id,
                                                                  std::optional<policy::cache_policy> cache) {
  const std::string what = "cannot start persistence of " + id;
  if (!options.durable) {
    return fail(errc::failed_precondition, what + ": the daemon has no persist directory (tensorregd --persist-dir)");
  }
  discover_persisted(id);  // persisted by another daemon sharing the directory: done already
  {
    const detail::engine_lock lock(mutex);
    const auto st = catalogue.state_of(id);
    if (st == detail::artifact_state::quiesced || st == detail::artifact_state::draining) {
      return fail(errc::failed_precondition, what + ": the artifact is being deregistered");
    }
    if (st == detail::artifact_state::gone) {
      if (options.durable->contains(id)) return tasks.record_done(id);
      return fail(errc::not_found, what + ": no such artifact");
    }
  }
  if (options.durable->contains(id)) return tasks.record_done(id);
  auto started = tasks.start(id);
  if (started.created) {
    const auto task_id = started.status.task_id;
    persist_pool->submit([this, task_id, id, cache] { run_persistence(task_id, id, cache); });
    tensorreg::log(log, log_level::info, "persistence task {} of artifact {} queued", task_id, id);
  }
  return started.status;
}

void engine::state::run_persistence(const std::string& task_id, const std::string& id,
                                    std::optional<policy::cache_policy> cache) {
  tasks.set_running(task_id);
  auto run = [&]() -> status {
    if (persist_cancel) return fail(errc::cancelled, "the daemon is stopping");
    std::shared_ptr<const memory::byte_source> bytes;
    std::shared_ptr<const index::canonical_index> idx;
    persistence::artifact_record record;
    {
      const detail::engine_lock lock(mutex);
      // The reader holds the artifact's gate: a deregister waits for this write to finish.
      TENSORREG_TRY_ASSIGN(bytes, catalogue.open_bytes(id));
      TENSORREG_TRY_ASSIGN(idx, catalogue.index_of(id));
      TENSORREG_TRY_ASSIGN(auto summary, catalogue.get(id));
      const auto& d = summary.descriptor;
      record = record_of(d);
      if (cache) {
        record.cache = *cache;
      } else if (auto info = catalogue.cache().info(id)) {
        record.cache.retention = info->retention;
        record.cache.overflow = info->overflow;
        record.cache.required = info->required;
        record.cache.require_shared_disk_for_spill = info->require_shared_disk_for_spill;
        record.cache.require_remote_stable_for_spill = info->require_remote_stable_for_spill;
        if (info->retention == policy::retention::ttl) record.cache.retention = policy::retention::best_effort;
      }
    }
    const double total = static_cast<double>(record.total_size);
    return options.durable->write(
        record, *idx, *bytes,
        [&](std::uint64_t done, std::uint64_t) { tasks.set_progress(task_id, static_cast<double>(done) / total); },
        &persist_cancel);
  };
  auto done = run();
  if (done) {
    tasks.finish(task_id, persistence::task_state::success);
    tensorreg::log(log, log_level::info, "persistence task {} of artifact {}: SUCCESS", task_id, id);
  } else {
    const auto reason = std::string(errc_name(done.error().code)) + ": " + done.error().message;
    tasks.finish(task_id, persistence::task_state::failed, reason);
    tensorreg::log(log, log_level::info, "persistence task {} of artifact {}: FAILED: {}", task_id, id, reason);
  }
}

// Loads a persisted artifact back into the stable DRAM cache (subject to its budget).
status engine::state::restore(const std::string& id) {
  struct running_restore {
    std::atomic<int>& count;
    explicit running_restore(std::atomic<int>& c) : count(c) { count.fetch_add(1); }
    ~running_restore() { count.fetch_sub(1); }
    running_restore(const running_restore&) = delete;
    running_restore& operator=(const running_restore&) = delete;
  } running(restores_running);
  std::lock_guard restoring(restore_mutex);
  const std::string what = "cannot load " + id + " back from the persist directory";
  {
    const detail::engine_lock lock(mutex);
    if (catalogue.cache().contains(id)) return {};  // another restore got there first
  }
  auto stored = options.durable->find(id);
  if (!stored) return fail(errc::not_found, what + ": it is not there");
  const auto size = stored->record.total_size;
  TENSORREG_TRY_ASSIGN(auto reservation, catalogue.cache().reserve(size));
  TENSORREG_TRY_ASSIGN(auto memory, memory::shared_memory::create(size, "tensorreg-restored"));
  const auto started = std::chrono::steady_clock::now();
  if (auto loaded = options.durable->load(id, memory.mutable_bytes()); !loaded) {
    tensorreg::log(log, log_level::warn, "{}", loaded.error().message);
    return loaded;
  }
  checked_by_restore.insert(id);
  TENSORREG_TRY(memory.seal_read_only());
  auto replica = std::make_shared<const memory::shared_memory>(std::move(memory));
  auto summary = summary_of(*stored);
  const detail::engine_lock lock(mutex);
  auto admitted = catalogue.cache().admit(id, size, replica, stored->record.cache, &reservation);
  if (!admitted) return tl::unexpected(with_context(std::move(admitted).error(), what));
  if (!admitted->admitted) {
    return fail(errc::resource_exhausted, what + ": the stable cache did not keep it: " + admitted->skip_reason);
  }
  catalogue.add(summary.descriptor, stored->index);
  const auto ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - started).count();
  tensorreg::log(log, log_level::info, "loaded artifact {} ({} bytes) back from the persist directory in {} ms", id,
                 size, ms);
  return {};
}

result<engine::persisted_copy> engine::open_persisted(const std::string& artifact_id, bool unless_in_memory) const {
  const std::string what = "cannot open the persisted copy of " + artifact_id;
  bool held = false, resident = false, quiesced = false;
  {
    std::lock_guard lock(state_->mutex);
    const auto st = state_->catalogue.state_of(artifact_id);
    held = st != detail::artifact_state::gone;
    quiesced = st == detail::artifact_state::quiesced || st == detail::artifact_state::draining;
    resident = state_->catalogue.cache().contains(artifact_id);
  }
  const auto& durable = state_->options.durable;
  if (quiesced) return fail(errc::failed_precondition, what + ": it is being deregistered");
  if (resident && unless_in_memory) {
    return fail(errc::failed_precondition, what + ": it has a stable DRAM replica (read it with GetArtifactMemfd)");
  }
  if (!durable) {
    if (held)
      return fail(errc::failed_precondition, what + ": the daemon has no persist directory (tensorregd --persist-dir)");
    return fail(errc::not_found, what + ": not held here");
  }
  state_->discover_persisted(artifact_id);
  auto opened = durable->open_data(artifact_id);
  if (!opened) {
    // The store's message names the copy already (quarantined: why; an I/O error: the file).
    if (opened.error().code != errc::not_found) return tl::unexpected(std::move(opened).error());
    if (held) {
      return fail(errc::failed_precondition,
                  what +
                      ": it is not on the shared disk (held in memory only: read it with GetArtifactMemfd or "
                      "OpenArtifactDevice)");
    }
    return fail(errc::not_found, what + ": not held here");
  }
  persisted_copy out;
  out.descriptor = state::summary_of(*opened->artifact).descriptor;
  out.opened = std::move(*opened);
  return out;
}

void engine::state::verify_persisted() {
  const auto all = options.durable->list();
  tensorreg::log(log, log_level::info, "verifying {} persisted artifacts in {}", all.size(), options.durable->root());
  std::size_t ok = 0, bad = 0;
  for (std::size_t i = 0; i < all.size(); ++i) {
    if (persist_cancel) return;
    const auto& id = all[i].record.artifact_id;
    {
      std::lock_guard restoring(restore_mutex);
      if (checked_by_restore.contains(id)) {
        ++ok;
        continue;
      }
    }
    const auto yield_to_restores = [this](std::uint64_t, std::uint64_t) {
      while (restores_running.load() > 0 && !persist_cancel) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    };
    if (auto checked = options.durable->verify(id, yield_to_restores); checked) {
      ++ok;
    } else if (checked.error().code != errc::not_found) {
      ++bad;
      tensorreg::log(log, log_level::warn, "persisted artifact {} failed verification ({}): {}", id,
                     errc_name(checked.error().code), checked.error().message);
    }
    tensorreg::log(log, log_level::info, "verified {} of {} persisted artifacts ({} damaged)", i + 1, all.size(), bad);
  }
  tensorreg::log(log, log_level::info, "verification of the persist directory done: {} good, {} damaged", ok, bad);
}

result<persistence::task_status> engine::persistence_status(const std::string& task_id,
                                                            const std::string& artifact_id) const {
  if (!task_id.empty()) return state_->tasks.find(task_id);
  if (artifact_id.empty()) {
    return fail(errc::invalid_argument, "cannot query persistence status: neither task_id nor artifact_id given");
  }
  auto newest = state_->tasks.newest_of(artifact_id);
  if (!newest) state_->discover_persisted(artifact_id);
  // Persisted before this daemon started: a task that is SUCCESS already.
  if (!newest && state_->options.durable && state_->options.durable->contains(artifact_id)) {
    return state_->tasks.record_done(artifact_id);
  }
  return newest;
}

result<persistence::task_status> engine::wait_persistence(const std::string& task_id,
                                                          std::chrono::milliseconds timeout) const {
  return state_->tasks.wait(task_id, timeout);
}
void engine::release_owner(std::int32_t owner_pid) { state_->release_owner(owner_pid); }

// ---- Resident memory across restarts (docs/architecture.md §14.2) ----------------------------

result<persistence::resident_export> engine::export_resident() const {
  auto& s = *state_;
  struct item {
    persistence::resident_entry entry;
    std::shared_ptr<const memory::byte_source> replica;
  };
  std::vector<item> items;
  {
    const detail::engine_lock lock(s.mutex);
    const auto now = s.time.now();
    for (auto& [id, replica] : s.catalogue.cache().entries()) {
      // An artifact being deregistered is not handed on: its deregister ends with this daemon.
      if (s.catalogue.state_of(id) != detail::artifact_state::held) continue;
      auto summary = s.catalogue.get(id);
      auto idx = s.catalogue.index_of(id);
      auto info = s.catalogue.cache().info(id);
      if (!summary || !idx || !info) continue;
      item it;
      auto& r = it.entry.record;
      const auto& d = summary->descriptor;
      r = record_of(d);
      r.cache.retention = info->retention;
      r.cache.overflow = info->overflow;
      r.cache.required = info->required;
      r.cache.require_shared_disk_for_spill = info->require_shared_disk_for_spill;
      r.cache.require_remote_stable_for_spill = info->require_remote_stable_for_spill;
      if (info->retention == policy::retention::ttl) {
        // What is left of the TTL travels; a TTL already past makes the entry best effort.
        const auto left =
            info->deadline ? std::chrono::duration_cast<std::chrono::milliseconds>(*info->deadline - now).count() : 0;
        if (left > 0) {
          r.cache.ttl_ms = static_cast<std::uint64_t>(left);
        } else {
          r.cache.retention = policy::retention::best_effort;
        }
      }
      it.entry.index = std::move(*idx);
      it.entry.owner_uid = s.catalogue.stable_entry_uid(id);
      it.entry.fd_name = persistence::fd_name_of(id);
      it.replica = std::move(replica);
      items.push_back(std::move(it));
    }
  }
  persistence::resident_state resident;
  persistence::resident_export out;
  TENSORREG_TRY(export_leases(resident, out.fds));
  for (auto& it : items) {
    auto fd = detail::export_replica_fd(it.replica, "cannot hand on " + it.entry.record.artifact_id);
    if (!fd) {
      if (fd.error().code == errc::resource_exhausted) return tl::unexpected(std::move(fd).error());
      tensorreg::log(s.log, log_level::warn, "{}", fd.error().message);
      continue;
    }
    it.entry.persisted = s.options.durable && s.options.durable->contains(it.entry.record.artifact_id);
    out.fds.push_back(persistence::named_fd{it.entry.fd_name, std::move(*fd)});
    resident.entries.push_back(std::move(it.entry));
  }
  out.state = persistence::encode_resident_state(resident);
  return out;
}

engine::adopt_report engine::adopt_resident(const persistence::resident_state& resident,
                                            std::vector<persistence::named_fd> fds) {
  auto& s = *state_;
  adopt_report report;
  std::map<std::string, unique_fd> by_name;
  for (auto& f : fds) by_name.try_emplace(f.name, std::move(f.fd));  // a second fd of a name is closed
  struct adopted {
    persistence::resident_entry entry;
    std::shared_ptr<const memory::shared_memory> bytes;
  };
  std::vector<adopted> to_verify;
  const auto refuse = [&](const std::string& id, const std::string& why) {
    report.refused.push_back(id + ": " + why);
    tensorreg::log(s.log, log_level::warn, "did not adopt artifact {}: {}", id, why);
  };
  // Least recently used first, so that the most recently used ends most recently used here too.
  for (auto e = resident.entries.rbegin(); e != resident.entries.rend(); ++e) {
    const auto& id = e->record.artifact_id;
    unique_fd fd;
    if (auto f = by_name.find(e->fd_name); f != by_name.end()) {
      fd = std::move(f->second);
      by_name.erase(f);
    }
    auto mapped = persistence::map_handed_memfd(*e, std::move(fd));
    if (!mapped) {
      refuse(id, mapped.error().message);
      continue;
    }
    artifact_descriptor d;
    d.artifact_id = id;
    d.index_multihash = e->record.index_multihash;
    d.data_multihash = e->record.data_multihash;
    d.schema_version = e->record.schema_version;
    d.encoding = e->record.encoding;
    d.total_size = e->record.total_size;
    d.id_kind = e->record.id_kind == "MI2" ? identity::id_kind::mi2 : identity::id_kind::cgid;
    {
      const detail::engine_lock lock(s.mutex);
      if (s.catalogue.cache().contains(id)) {
        refuse(id, "this daemon holds it already");
        continue;
      }
      auto admitted = s.catalogue.cache().admit(id, d.total_size, *mapped, e->record.cache);
      if (!admitted || !admitted->admitted) {
        refuse(id, admitted ? admitted->skip_reason : admitted.error().message);
        continue;
      }
      s.catalogue.add(d, e->index);
      s.catalogue.note_stable_entry(id, e->owner_uid);
    }
    ++report.adopted;
    report.adopted_bytes += d.total_size;
    to_verify.push_back(adopted{*e, std::move(*mapped)});
  }
  adopt_leases(resident, by_name, report);
  for (const auto& [name, fd] : by_name) {
    tensorreg::log(s.log, log_level::debug, "closed handed-over fd '{}': no entry names it", name);
  }
  tensorreg::log(s.log, log_level::info,
                 "adopted {} stable DRAM entries ({} bytes) and {} leases without a copy; refused {}", report.adopted,
                 report.adopted_bytes, report.leases, report.refused.size());
  if (to_verify.empty()) return report;
  if (!s.adopt_pool) s.adopt_pool = std::make_unique<thread_pool>(1u);
  s.adopted_unverified += to_verify.size();
  s.adopt_pool->submit([&s, items = std::move(to_verify)] {
    std::size_t bad = 0;
    for (const auto& a : items) {
      auto checked = persistence::verify_resident_bytes(a.entry, *a.bytes, &s.persist_cancel);
      --s.adopted_unverified;
      if (checked || checked.error().code == errc::cancelled) continue;
      ++bad;
      const auto& id = a.entry.record.artifact_id;
      {
        const detail::engine_lock lock(s.mutex);
        // Only the adopted replica goes: a later put of the same id holds bytes checked at commit.
        if (s.catalogue.cache().lookup(id) == a.bytes) {
          s.catalogue.cache().remove(id);
          s.catalogue.erase_if_empty(id);
        }
      }
      tensorreg::log(s.log, log_level::error, "dropped adopted artifact {}: {}: {}", id,
                     errc_name(checked.error().code), checked.error().message);
    }
    tensorreg::log(s.log, log_level::info, "re-hashed {} adopted artifacts: {} dropped", items.size(), bad);
  });
  return report;
}

// `seg` as segments whose sources are not segmented_views: a lease's view reads through the
// view of its storages (normalized: PAD as zero), which reads the memory. Gaps read as zero at
// every level, so the pieces that cover nothing are simply left out. False when nested deeper
// than a lease's views ever are.
static bool flatten_segment(const memory::segment& seg, std::vector<memory::segment>& out, int depth = 0) {
  const auto* inner = dynamic_cast<const memory::segmented_view*>(seg.source);
  if (inner == nullptr) {
    out.push_back(seg);
    return true;
  }
  if (depth > 4) return false;
  const std::uint64_t begin = seg.source_offset, end = seg.source_offset + seg.length;
  for (const auto& s : inner->segments()) {
    const auto lo = std::max(begin, s.offset), hi = std::min(end, s.offset + s.length);
    if (lo >= hi) continue;
    const memory::segment part{seg.offset + (lo - begin), hi - lo, s.source, s.source_offset + (lo - s.offset)};
    if (!flatten_segment(part, out, depth + 1)) return false;
  }
  return true;
}

// Leases of client memfds (HOST_SHARED regions) travel with the stable entries: the lease's
// segments, and a duplicate fd of each memfd they read. A lease over any other memory (device
// memory, a client's mapped file) is left out, and its artifact goes with the old daemon.
status engine::export_leases(persistence::resident_state& resident, std::vector<persistence::named_fd>& fds) const {
  auto& s = *state_;
  const detail::engine_lock lock(s.mutex);
  const auto now = s.time.now();
  for (const auto& summary : s.catalogue.list()) {
    if (summary.leases == 0) continue;
    const auto& id = summary.descriptor.artifact_id;
    auto* a = s.catalogue.find(id);
    if (a == nullptr || a->quiesced) continue;
    for (const auto& [registration_id, l] : a->leases) {
      if (!l.view.bytes || l.view.on_device()) continue;
      if (l.expires && *l.expires <= now) continue;
      persistence::resident_lease out;
      std::map<const memory::byte_source*, std::uint32_t> source_index;
      std::vector<const memory::shared_memory*> memfds;
      std::vector<memory::segment> flat;
      bool carried = true;
      for (const auto& seg : l.view.bytes->segments()) carried = carried && flatten_segment(seg, flat);
      for (const auto& seg : flat) {
        if (!carried) break;
        const auto* memfd = dynamic_cast<const memory::shared_memory*>(seg.source);
        if (memfd == nullptr) {
          carried = false;
          break;
        }
        auto [at, added] = source_index.emplace(seg.source, static_cast<std::uint32_t>(memfds.size()));
        if (added) memfds.push_back(memfd);
        out.segments.push_back({seg.offset, seg.length, at->second, seg.source_offset});
      }
      if (!carried) {
        tensorreg::log(s.log, log_level::info, "lease {} of artifact {} is not handed on: its memory is not a memfd",
                       registration_id, id);
        continue;
      }
      std::vector<persistence::named_fd> lease_fds;
      for (std::size_t k = 0; k < memfds.size(); ++k) {
        auto fd = memfds[k]->duplicate_fd();
        if (!fd) return tl::unexpected(std::move(fd).error());
        const auto name = persistence::lease_source_name(registration_id, k);
        out.sources.push_back({name, memfds[k]->size()});
        lease_fds.push_back(persistence::named_fd{name, std::move(*fd)});
      }
      auto& r = out.artifact.record;
      const auto& d = a->descriptor;
      r = record_of(d);
      out.artifact.index = a->index;
      out.artifact.fd_name = persistence::fd_name_of(id);
      out.registration_id = registration_id;
      out.owner_pid = l.owner_pid;
      out.device_id = l.device_id;
      out.epoch = l.epoch;
      if (l.expires) {
        out.ttl_left_ms = static_cast<std::uint64_t>(
            std::max<std::int64_t>(1, std::chrono::duration_cast<std::chrono::milliseconds>(*l.expires - now).count()));
      }
      resident.leases.push_back(std::move(out));
      for (auto& f : lease_fds) fds.push_back(std::move(f));
    }
  }
  return {};
}

void engine::adopt_leases(const persistence::resident_state& resident, std::map<std::string, unique_fd>& by_name,
                          adopt_report& report) {
  auto& s = *state_;
  for (const auto& l : resident.leases) {
    const auto& id = l.artifact.record.artifact_id;
    const auto refuse = [&](const std::string& why) {
      report.refused.push_back("lease " + l.registration_id + " of " + id + ": " + why);
      tensorreg::log(s.log, log_level::warn, "did not adopt lease {} of artifact {}: {}", l.registration_id, id, why);
    };
    std::vector<std::shared_ptr<const memory::byte_source>> sources;
    std::string problem;
    for (const auto& src : l.sources) {
      unique_fd fd;
      if (auto f = by_name.find(src.fd_name); f != by_name.end()) {
        fd = std::move(f->second);
        by_name.erase(f);
      }
      if (!fd) {
        problem = "no fd arrived for its source " + src.fd_name;
        break;
      }
      // Client memory: sealed against shrinking (as a region must be), not against writes.
      auto mapped = memory::shared_memory::adopt_sealed(std::move(fd), src.size);
      if (!mapped) {
        problem = mapped.error().message;
        break;
      }
      sources.push_back(std::make_shared<const memory::shared_memory>(std::move(*mapped)));
    }
    if (!problem.empty()) {
      refuse(problem);
      continue;
    }
    std::vector<memory::segment> segments;
    for (const auto& seg : l.segments) {
      segments.push_back({seg.offset, seg.length, sources[seg.source].get(), seg.source_offset});
    }
    auto view = memory::segmented_view::create(l.artifact.record.total_size, std::move(segments));
    if (!view) {
      refuse(view.error().message);
      continue;
    }
    artifact_descriptor d;
    d.artifact_id = id;
    d.index_multihash = l.artifact.record.index_multihash;
    d.data_multihash = l.artifact.record.data_multihash;
    d.schema_version = l.artifact.record.schema_version;
    d.encoding = l.artifact.record.encoding;
    d.total_size = l.artifact.record.total_size;
    d.id_kind = l.artifact.record.id_kind == "MI2" ? identity::id_kind::mi2 : identity::id_kind::cgid;
    {
      const detail::engine_lock lock(s.mutex);
      if (s.catalogue.holds_registration(l.registration_id)) {
        refuse("this daemon holds that registration already");
        continue;
      }
      auto* held = s.catalogue.find(id);
      if (held != nullptr && held->quiesced) {
        refuse("the artifact is being deregistered");
        continue;
      }
      auto& a = held != nullptr ? *held : s.catalogue.add(d, l.artifact.index);
      detail::lease lease;
      lease.registration_id = l.registration_id;
      lease.owner_pid = l.owner_pid;
      lease.device_id = l.device_id;
      lease.epoch = l.epoch;
      if (l.ttl_left_ms) lease.expires = s.time.now() + std::chrono::milliseconds(*l.ttl_left_ms);
      lease.view.bytes = std::make_shared<const memory::segmented_view>(std::move(*view));
      lease.view.keep_alive = std::move(sources);
      s.catalogue.add_lease(a, std::move(lease));
    }
    // Its owner's exit releases it here too; an owner already gone is released now.
    if (auto watched = s.watch_owner(l.owner_pid); !watched) {
      {
        const detail::engine_lock lock(s.mutex);
        (void)s.catalogue.revoke(l.registration_id);
        s.catalogue.erase_if_empty(id);
      }
      refuse("its owner pid " + std::to_string(l.owner_pid) + " cannot be watched: " + watched.error().message);
      continue;
    }
    ++report.leases;
  }
}

std::size_t engine::adopted_unverified() const { return state_->adopted_unverified.load(); }

std::uint64_t engine::resident_generation() const {
  const detail::engine_lock lock(state_->mutex);
  return state_->catalogue.cache().stats().changes + state_->catalogue.lease_changes();
}

}  // namespace tensorreg::registration
