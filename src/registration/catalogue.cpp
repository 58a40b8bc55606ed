#include "registration/catalogue.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>

#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/index/byte_range_map.hpp"
#include "tensorreg/memory/shared_memory.hpp"

namespace tensorreg::registration::detail {
namespace {

// A reader of an artifact's bytes: forwards to the source and holds the artifact's gate.
class tracked_source final : public memory::byte_source {
 public:
  tracked_source(std::shared_ptr<const memory::byte_source> inner, std::shared_ptr<reader_gate> gate)
      : inner_(std::move(inner)), gate_(std::move(gate)) {
    gate_->enter();
  }
  ~tracked_source() override { gate_->leave(); }
  tracked_source(const tracked_source&) = delete;
  tracked_source& operator=(const tracked_source&) = delete;

  [[nodiscard]] std::uint64_t size() const noexcept override { return inner_->size(); }
  [[nodiscard]] status visit(std::uint64_t offset, std::uint64_t length, memory::piece_sink sink) const override {
    return inner_->visit(offset, length, sink);
  }

 private:
  std::shared_ptr<const memory::byte_source> inner_;
  std::shared_ptr<reader_gate> gate_;
};

artifact_summary summarize(const artifact& a, bool stable_replica) {
  artifact_summary out;
  out.descriptor = a.descriptor;
  out.stable_replica = stable_replica;
  out.leases = a.leases.size();
  for (const auto& [id, l] : a.leases) {
    if (!l.snapshot) continue;
    ++out.snapshot_leases;
    if (l.view.on_device()) ++out.vram_snapshots;
  }
  out.joined_refs = a.joins.size();
  out.quiesced = a.quiesced;
  if (a.hash) {
    const auto st = a.hash->status();
    out.hash = st.state;
    if (st.state == hash_state::done) out.verified_id = st.mi2_id;
  }
  for (const auto& [id, v] : a.views) out.views.push_back(v.first);
  return out;
}

// Fills `out`'s allocations and segments with where `view` (a lease's canonical buffer) lies in
// the device mappings `known`, each mapping once (gaps are PAD). False when some byte is not
// such a mapping.
bool device_pieces(const memory::byte_source& view, const device_allocation_map& known, device_layout& out) {
  std::map<const memory::byte_source*, std::uint32_t> numbering;
  out.allocations.clear();
  out.segments.clear();
  return memory::for_each_leaf(
      view, 0, view.size(), 0,
      [&](const memory::byte_source& leaf, std::uint64_t offset, std::uint64_t length, std::uint64_t at) {
        auto it = known.find(&leaf);
        if (it == known.end()) return false;
        auto [slot, added] = numbering.emplace(&leaf, static_cast<std::uint32_t>(out.allocations.size()));
        if (added) out.allocations.push_back(it->second);
        out.segments.push_back({at, length, slot->second, offset});
        return true;
      });
}

}  // namespace

std::optional<clock::time_point> ttl_deadline(const clock& time, std::uint32_t ttl_ms) {
  if (ttl_ms == 0) return std::nullopt;
  return saturating_deadline(time.now(), std::chrono::milliseconds(ttl_ms));
}

std::string_view artifact_state_name(artifact_state state) noexcept {
  switch (state) {
    case artifact_state::held: return "held";
    case artifact_state::quiesced: return "quiesced";
    case artifact_state::draining: return "draining";
    case artifact_state::gone: break;
  }
  return "gone";
}

// ---- reader_gate -----------------------------------------------------------------------------

void reader_gate::enter() {
  std::lock_guard lock(mutex_);
  ++readers_;
}

void reader_gate::leave() noexcept {
  std::lock_guard lock(mutex_);
  TENSORREG_ASSERT(readers_ > 0);
  // Notify under the lock: a drain that sees 0 may return, and its caller drop the gate's
  // last owner other than this reader, but never while this reader still uses the gate.
  if (--readers_ == 0) left_.notify_all();
}

std::size_t reader_gate::readers() const {
  std::lock_guard lock(mutex_);
  return readers_;
}

bool reader_gate::draining() const {
  std::lock_guard lock(mutex_);
  return waiters_ > 0;
}

std::size_t reader_gate::wait_drained(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mutex_);
  if (readers_ == 0 || timeout.count() <= 0) return readers_;
  ++waiters_;
  left_.wait_for(lock, timeout, [&] { return readers_ == 0; });
  --waiters_;
  return readers_;
}

// ---- catalogue -------------------------------------------------------------------------------

catalogue::catalogue(regions::region_registry& regions, std::uint64_t stable_bytes, const clock& time,
                     stable::cache_hooks hooks, std::size_t stable_entries_per_uid)
    : regions_(regions), stable_entries_per_uid_(stable_entries_per_uid), cache_(stable_bytes, time, [&] {
        // An evicted entry no longer counts against the uid that created it.
        auto on_evict = std::move(hooks.on_evict);
        hooks.on_evict = [this, on_evict = std::move(on_evict)](const stable::evicted_entry& e) {
          forget_stable_entry(e.key);
          if (on_evict) on_evict(e);
        };
        return std::move(hooks);
      }()) {}

status catalogue::check_stable_share(std::optional<std::uint32_t> uid, const std::string& verb) const {
  if (!uid || stable_entries_per_uid_ == 0) return {};
  auto it = stable_entries_of_uid_.find(*uid);
  if (it == stable_entries_of_uid_.end() || it->second < stable_entries_per_uid_) return {};
  return fail(errc::resource_exhausted, verb + ": uid " + std::to_string(*uid) + " already keeps its maximum of " +
                                            std::to_string(stable_entries_per_uid_) +
                                            " artifacts in the stable DRAM cache");
}

void catalogue::note_stable_entry(const std::string& artifact_id, std::optional<std::uint32_t> uid) {
  if (!uid) return;
  if (stable_entry_uid_.emplace(artifact_id, *uid).second) ++stable_entries_of_uid_[*uid];
}

std::optional<std::uint32_t> catalogue::stable_entry_uid(const std::string& artifact_id) const {
  auto it = stable_entry_uid_.find(artifact_id);
  if (it == stable_entry_uid_.end()) return std::nullopt;
  return it->second;
}

void catalogue::forget_stable_entry(const std::string& artifact_id) {
  auto it = stable_entry_uid_.find(artifact_id);
  if (it == stable_entry_uid_.end()) return;
  auto count = stable_entries_of_uid_.find(it->second);
  if (count != stable_entries_of_uid_.end() && --count->second == 0) stable_entries_of_uid_.erase(count);
  stable_entry_uid_.erase(it);
}

namespace {

// No lease, join or GPU replica holds `a` (a stable replica may still).
bool no_holder_besides_cache(const artifact& a) {
  return a.leases.empty() && a.joins.empty() && a.gpu_replicas.empty();
}

}  // namespace

bool catalogue::is_empty(const std::string& id, const artifact& a) const {
  return no_holder_besides_cache(a) && !cache_.contains(id);
}

const artifact* catalogue::find_held(const std::string& id) const {
  auto it = artifacts_.find(id);
  if (it != artifacts_.end() && !is_empty(id, it->second)) return &it->second;
  // An mi2 id that a cgid artifact's background hash found (registration.md §4.8); an artifact
  // held under that id itself comes first.
  auto alias = aliases_.find(id);
  if (alias == aliases_.end()) return nullptr;
  const artifact* found = nullptr;
  std::erase_if(alias->second, [&](const std::string& cgid) {
    auto target = artifacts_.find(cgid);
    if (target == artifacts_.end() || is_empty(cgid, target->second) || !target->second.hash) return true;
    const auto st = target->second.hash->status();
    if (st.state != hash_state::done || st.mi2_id != id) return true;  // a later version's hash
    if (found == nullptr) found = &target->second;
    return false;
  });
  if (alias->second.empty()) aliases_.erase(alias);
  return found;
}

artifact* catalogue::find(const std::string& artifact_id) {
  auto it = artifacts_.find(artifact_id);
  return it == artifacts_.end() ? nullptr : &it->second;
}

artifact& catalogue::add(const artifact_descriptor& d, std::shared_ptr<const index::canonical_index> idx) {
  // The key is the index digest describe() already computed: hashing a large index twice
  // showed in the metadata path's profile.
  auto digest = hash::decode_multihash(d.index_multihash);
  TENSORREG_ASSERT(digest.has_value());
  auto& known = index_store_[hash::to_hex(*digest)];
  auto [it, inserted] = artifacts_.try_emplace(d.artifact_id);
  if (inserted) {
    it->second.descriptor = d;
    // Artifacts with equal indexes share one: the store's entry lives as long as any of them.
    auto live = known.lock();
    it->second.index = live ? std::move(live) : std::move(idx);
  }
  if (known.expired()) known = it->second.index;
  if (index_store_.size() >= 2 * index_store_pruned_at_ + 16) {
    // Amortized: a full pass only after the store doubled since the last one.
    std::erase_if(index_store_, [](const auto& kv) { return kv.second.expired(); });
    index_store_pruned_at_ = index_store_.size();
  }
  return it->second;
}

void catalogue::add_lease(artifact& a, lease l) {
  ++lease_changes_;
  artifact_of_registration_[l.registration_id] = a.descriptor.artifact_id;
  auto id = l.registration_id;
  a.leases.emplace(std::move(id), std::move(l));
}

void catalogue::add_join(artifact& a, join j) {
  artifact_of_registration_[j.registration_id] = a.descriptor.artifact_id;
  auto id = j.registration_id;
  a.joins[std::move(id)] = std::move(j);
}

std::shared_ptr<const index::canonical_index> catalogue::find_index(const std::string& hex_key) const {
  auto it = index_store_.find(hex_key);
  if (it == index_store_.end()) return nullptr;
  auto idx = it->second.lock();
  if (!idx) index_store_.erase(it);
  return idx;
}

void catalogue::erase_if_empty(const std::string& artifact_id) {
  auto it = artifacts_.find(artifact_id);
  if (it != artifacts_.end() && is_empty(artifact_id, it->second)) artifacts_.erase(it);
}

void catalogue::end_lease(lease& l) {
  ++lease_changes_;
  (void)regions_.release_all(l.region_ids);  // one registry lock for the lease's regions
  l.region_ids.clear();
}

bool catalogue::holds_registration(const std::string& registration_id) const {
  return artifact_of_registration_.contains(registration_id);
}

lease* catalogue::find_lease(const std::string& registration_id) {
  auto owner = artifact_of_registration_.find(registration_id);
  if (owner == artifact_of_registration_.end()) return nullptr;
  auto a = artifacts_.find(owner->second);
  if (a == artifacts_.end()) return nullptr;
  auto l = a->second.leases.find(registration_id);
  return l == a->second.leases.end() ? nullptr : &l->second;
}

const artifact* catalogue::artifact_of(const std::string& registration_id) const {
  auto owner = artifact_of_registration_.find(registration_id);
  if (owner == artifact_of_registration_.end()) return nullptr;
  auto a = artifacts_.find(owner->second);
  return a == artifacts_.end() ? nullptr : &a->second;
}

join* catalogue::find_join(const std::string& registration_id) {
  auto owner = artifact_of_registration_.find(registration_id);
  if (owner == artifact_of_registration_.end()) return nullptr;
  auto a = artifacts_.find(owner->second);
  if (a == artifacts_.end()) return nullptr;
  auto j = a->second.joins.find(registration_id);
  return j == a->second.joins.end() ? nullptr : &j->second;
}

std::optional<released_holder> catalogue::revoke(const std::string& registration_id, const std::string& why) {
  auto owner = artifact_of_registration_.find(registration_id);
  if (owner == artifact_of_registration_.end()) return std::nullopt;
  released_holder out;
  out.registration_id = registration_id;
  out.artifact_id = owner->second;
  artifact_of_registration_.erase(owner);
  auto a = artifacts_.find(out.artifact_id);
  if (a == artifacts_.end()) return out;
  if (auto l = a->second.leases.find(registration_id); l != a->second.leases.end()) {
    out.is_lease = true;
    out.owner_pid = l->second.owner_pid;
    out.region_ids = l->second.region_ids;
    cancel_hash(a->second, "lease " + registration_id + " " + why);
    end_lease(l->second);
    a->second.leases.erase(l);
  }
  if (auto j = a->second.joins.find(registration_id); j != a->second.joins.end()) {
    out.owner_pid = j->second.owner_pid;
    a->second.joins.erase(j);
  }
  erase_if_empty(out.artifact_id);
  return out;
}

std::vector<released_holder> catalogue::expire(clock::time_point now) {
  std::vector<released_holder> out;
  for (auto& [id, a] : artifacts_) {
    for (auto it = a.leases.begin(); it != a.leases.end();) {
      auto& l = it->second;
      if (!l.expires || *l.expires > now) {
        ++it;
        continue;
      }
      out.push_back({l.registration_id, id, l.owner_pid, true, l.region_ids});
      cancel_hash(a, "lease " + l.registration_id + " expired: its TTL passed");
      end_lease(l);
      artifact_of_registration_.erase(it->first);
      it = a.leases.erase(it);
    }
    for (auto it = a.joins.begin(); it != a.joins.end();) {
      if (!it->second.expires || *it->second.expires > now) {
        ++it;
        continue;
      }
      out.push_back({it->first, id, it->second.owner_pid, false, {}});
      artifact_of_registration_.erase(it->first);
      it = a.joins.erase(it);
    }
  }
  std::erase_if(artifacts_, [&](const auto& kv) { return is_empty(kv.first, kv.second); });
  return out;
}

result<std::shared_ptr<views::assembly>> catalogue::assembly_for(const std::string& cgid,
                                                                 std::shared_ptr<const index::canonical_index> idx,
                                                                 std::vector<views::byte_range> required) {
  if (auto it = assemblies_.find(cgid); it != assemblies_.end()) return it->second;
  TENSORREG_TRY_ASSIGN(auto made, views::assembly::create(cgid, std::move(idx), std::move(required)));
  assemblies_.emplace(cgid, made);
  return made;
}

std::vector<std::string> catalogue::expire_assemblies(clock::time_point now) {
  std::vector<std::string> out;
  for (auto it = assemblies_.begin(); it != assemblies_.end();) {
    if (it->second->expired(now)) {
      out.push_back(it->first);
      it = assemblies_.erase(it);
    } else {
      ++it;
    }
  }
  return out;
}

assembly_status status_of(const views::assembly_snapshot& s, clock::time_point now) {
  assembly_status out{s.cgid, s.canonical_size, s.covered_bytes, s.pieces, s.sealed, s.artifact_id, std::nullopt};
  if (s.deadline) {
    out.expires_in =
        std::max(std::chrono::milliseconds(0), std::chrono::ceil<std::chrono::milliseconds>(*s.deadline - now));
  }
  return out;
}

std::vector<assembly_status> catalogue::assembly_statuses(clock::time_point now) const {
  std::vector<assembly_status> out;
  for (const auto& [cgid, a] : assemblies_) out.push_back(status_of(a->snapshot(), now));
  return out;
}

std::vector<released_holder> catalogue::release_owner(std::int32_t owner_pid) {
  std::vector<std::string> registrations;
  for (const auto& [id, a] : artifacts_) {
    for (const auto& [rid, l] : a.leases) {
      if (l.owner_pid == owner_pid) registrations.push_back(rid);
    }
    for (const auto& [rid, j] : a.joins) {
      if (j.owner_pid == owner_pid) registrations.push_back(rid);
    }
  }
  std::vector<released_holder> out;
  for (const auto& rid : registrations) {
    if (auto gone = revoke(rid, "ended: its owner (pid " + std::to_string(owner_pid) + ") exited")) {
      out.push_back(std::move(*gone));
    }
  }
  return out;
}

status catalogue::check_sole_holder(const std::string& artifact_id, std::int32_t caller_pid) const {
  auto it = artifacts_.find(artifact_id);
  if (it == artifacts_.end()) return {};
  std::set<std::int32_t> others;
  for (const auto& [id, l] : it->second.leases) {
    if (l.owner_pid != caller_pid) others.insert(l.owner_pid);
  }
  for (const auto& [id, j] : it->second.joins) {
    if (j.owner_pid != caller_pid) others.insert(j.owner_pid);
  }
  if (others.empty()) return {};
  std::string pids;
  for (const auto pid : others) pids += (pids.empty() ? "" : ", ") + std::to_string(pid);
  return fail(errc::permission_denied, "cannot deregister " + artifact_id + ": it is also held (leases or joins) by " +
                                           (others.size() == 1 ? "pid " : "pids ") + pids +
                                           ", not only by the calling process " + std::to_string(caller_pid));
}

status catalogue::check_copy_owner(const std::string& artifact_id, std::optional<std::uint32_t> caller_uid) const {
  if (!caller_uid || *caller_uid == 0) return {};
  const auto it = artifacts_.find(artifact_id);
  if (it == artifacts_.end()) return {};
  const auto refuse = [&](const std::string& copy, std::uint32_t uid) {
    return fail(errc::permission_denied, "cannot deregister " + artifact_id + ": its " + copy + " was put by uid " +
                                             std::to_string(uid) + ", not by the calling uid " +
                                             std::to_string(*caller_uid) + " (only that uid or root may remove it)");
  };
  if (const auto owner = stable_entry_uid_.find(artifact_id);
      owner != stable_entry_uid_.end() && owner->second != *caller_uid && cache_.contains(artifact_id)) {
    return refuse("stable DRAM copy", owner->second);
  }
  for (const auto& [device, uid] : it->second.gpu_replica_uids) {
    if (uid != *caller_uid && it->second.gpu_replicas.contains(device)) {
      return refuse("GPU replica on device " + std::to_string(device), uid);
    }
  }
  return {};
}

result<std::shared_ptr<reader_gate>> catalogue::quiesce(const std::string& artifact_id) {
  auto it = artifacts_.find(artifact_id);
  if (it == artifacts_.end() || is_empty(artifact_id, it->second)) {
    return fail(errc::not_found, "cannot deregister " + artifact_id + ": not held here");
  }
  it->second.quiesced = true;
  // Deregistering: the hash must not read the bytes while they are drained and released.
  cancel_hash(it->second, artifact_id + " is being deregistered");
  return it->second.gate;
}

status catalogue::drain(const std::string& artifact_id, reader_gate& gate, bool wait,
                        std::chrono::milliseconds timeout) {
  const std::size_t left = gate.wait_drained(wait ? timeout : std::chrono::milliseconds(0));
  if (left == 0) return {};
  return fail(errc::deadline_exceeded, "cannot deregister " + artifact_id + ": " + std::to_string(left) +
                                           " readers still hold it after " +
                                           std::to_string(wait ? timeout.count() : 0) + " ms; it stays quiesced");
}

std::optional<removed_artifact> catalogue::remove(const std::string& artifact_id) {
  auto it = artifacts_.find(artifact_id);
  if (it == artifacts_.end()) return std::nullopt;
  removed_artifact out;
  for (auto& [id, l] : it->second.leases) {
    for (const auto& region : l.region_ids) {
      // One lease may hold several references on one region: report each region once.
      if (std::find(out.released_region_ids.begin(), out.released_region_ids.end(), region) ==
          out.released_region_ids.end()) {
        out.released_region_ids.push_back(region);
      }
    }
    end_lease(l);
    artifact_of_registration_.erase(id);
  }
  for (const auto& [id, j] : it->second.joins) artifact_of_registration_.erase(id);
  out.leases = it->second.leases.size();
  out.joins = it->second.joins.size();
  cache_.remove(artifact_id);
  forget_stable_entry(artifact_id);
  artifacts_.erase(it);
  return out;
}

artifact_state catalogue::state_of(const std::string& artifact_id) const {
  const artifact* a = find_held(artifact_id);
  if (a == nullptr) return artifact_state::gone;
  if (!a->quiesced) return artifact_state::held;
  return a->gate->draining() ? artifact_state::draining : artifact_state::quiesced;
}

result<artifact_summary> catalogue::get(const std::string& artifact_id) const {
  const artifact* a = find_held(artifact_id);
  if (a == nullptr) return fail(errc::not_found, "cannot find artifact " + artifact_id + ": not held here");
  return summarize(*a, cache_.contains(a->descriptor.artifact_id));
}

std::vector<artifact_summary> catalogue::list() const {
  std::vector<artifact_summary> out;
  for (const auto& [id, a] : artifacts_) {
    if (!is_empty(id, a)) out.push_back(summarize(a, cache_.contains(id)));
  }
  return out;
}

result<std::shared_ptr<const index::canonical_index>> catalogue::index_of(const std::string& artifact_id) const {
  const artifact* a = find_held(artifact_id);
  if (a == nullptr) return fail(errc::not_found, "cannot find the index of " + artifact_id + ": not held here");
  return a->index;
}

result<std::shared_ptr<const memory::byte_source>> catalogue::open_bytes(const std::string& artifact_id) {
  const artifact* a = find_held(artifact_id);
  if (a == nullptr) return fail(errc::not_found, "cannot open " + artifact_id + ": not held here");
  if (a->quiesced) return fail(errc::failed_precondition, "cannot open " + artifact_id + ": it is being deregistered");
  std::shared_ptr<const memory::byte_source> inner = cache_.lookup(a->descriptor.artifact_id);
  if (!inner && !a->leases.empty()) inner = a->leases.begin()->second.view.bytes;
  if (!inner && !a->gpu_replicas.empty()) inner = a->gpu_replicas.begin()->second.bytes;
  if (!inner) return fail(errc::failed_precondition, "cannot open " + artifact_id + ": no readable copy is held");
  return std::shared_ptr<const memory::byte_source>(std::make_shared<tracked_source>(std::move(inner), a->gate));
}

result<std::pair<std::shared_ptr<const memory::byte_source>, std::shared_ptr<const index::canonical_index>>>
catalogue::stable_replica(const std::string& artifact_id, const std::string& verb) {
  const artifact* a = find_held(artifact_id);
  if (a == nullptr) return fail(errc::not_found, verb + ": not held here");
  if (a->quiesced) return fail(errc::failed_precondition, verb + ": it is being deregistered");
  return std::pair{cache_.lookup(a->descriptor.artifact_id), a->index};
}

result<device_layout> catalogue::device_layout_of(const std::string& artifact_id, std::uint64_t known_layout) const {
  const std::string verb = "cannot open the GPU memory of " + artifact_id;
  const artifact* a = find_held(artifact_id);
  if (a == nullptr) return fail(errc::not_found, verb + ": not held here");
  if (a->quiesced) return fail(errc::failed_precondition, verb + ": it is being deregistered");
  device_layout out;
  out.descriptor = a->descriptor;
  out.index = a->index;
  // A live lease first: the producer's memory, opened once per allocation.
  for (const auto& [id, l] : a->leases) {
    if (!l.view.bytes || !l.view.on_device()) continue;
    if (known_layout != 0 && l.layout_token == known_layout) {
      out.layout_token = known_layout;
      out.unchanged = true;
      return out;
    }
  }
  for (const auto& [id, l] : a->leases) {
    if (!l.view.bytes || !l.view.on_device()) continue;
    if (device_pieces(*l.view.bytes, *l.view.device_allocations, out)) {
      out.layout_token = l.layout_token;
      return out;
    }
  }
  // Else a daemon-owned GPU copy: its DATA ranges lie at their canonical offsets.
  for (const auto& [device, replica] : a->gpu_replicas) {
    out.allocations = {device_allocation{device, replica.bytes->size(), replica.ipc_handle, {}}};
    out.segments.clear();
    const auto map = index::byte_range_map::from_index(*a->index);
    for (const auto& range : map.ranges()) {
      if (range.kind == index::range_kind::data) out.segments.push_back({range.offset, range.length, 0, range.offset});
    }
    return out;
  }
  return fail(errc::failed_precondition, verb +
                                             ": it has no copy in GPU memory (read its stable DRAM replica with "
                                             "GetArtifactMemfd)");
}

void catalogue::add_stats(engine_stats& out) const {
  for (const auto& [id, a] : artifacts_) {
    const bool stable = cache_.contains(id);
    if (!stable && no_holder_besides_cache(a)) continue;  // is_empty, asking the cache once
    ++out.artifacts;
    out.leases += a.leases.size();
    out.joined_refs += a.joins.size();
    out.stable_artifacts += stable ? 1 : 0;
    if (!a.leases.empty()) {
      ++out.leased_artifacts;
      out.leased_bytes += a.descriptor.total_size;
    }
  }
  const auto cache_stats = cache_.stats();
  out.stable_bytes = cache_stats.bytes_used;
  out.stable_budget = cache_stats.budget_bytes;
  out.stable_evictions = cache_stats.evictions;
  out.stable_reserved_bytes = cache_stats.reserved_bytes;
  out.stable_evicted_bytes = cache_stats.evicted_bytes;
}

void catalogue::cancel_hash(artifact& a, const std::string& why) {
  if (!a.hash || a.hash->status().state != hash_state::pending) return;
  a.hash->request_cancel("cannot hash " + a.descriptor.artifact_id + ": cancelled: " + why);
  cancelled_.push_back(a.hash);
  // Kept for waiters that ask after the artifact is gone.
  if (hash_tombstones_.insert_or_assign(a.descriptor.artifact_id, a.hash).second) {
    hash_tombstone_order_.push_back(a.descriptor.artifact_id);
  }
  if (hash_tombstone_order_.size() > kept_hash_tombstones) {
    hash_tombstones_.erase(hash_tombstone_order_.front());
    hash_tombstone_order_.erase(hash_tombstone_order_.begin());
  }
}

std::vector<std::shared_ptr<background_hash>> catalogue::take_cancelled() { return std::exchange(cancelled_, {}); }

std::vector<std::shared_ptr<background_hash>> catalogue::cancel_all_hashes(const std::string& why) {
  for (auto& [id, a] : artifacts_) cancel_hash(a, why);
  return take_cancelled();
}

result<hash_input> catalogue::hash_input_of(const std::string& artifact_id) {
  const std::string verb = "cannot hash " + artifact_id;
  auto it = artifacts_.find(artifact_id);
  if (it == artifacts_.end() || is_empty(artifact_id, it->second))
    return fail(errc::not_found, verb + ": not held here");
  const artifact& a = it->second;
  if (a.quiesced) return fail(errc::failed_precondition, verb + ": it is being deregistered");
  hash_input out;
  for (const auto& [id, l] : a.leases) {
    if (!l.view.bytes) continue;
    out.view = l.view.bytes;
    out.keep_alive = l.view.keep_alive;
    return out;
  }
  std::shared_ptr<const memory::byte_source> whole;
  if (!a.gpu_replicas.empty()) whole = a.gpu_replicas.begin()->second.bytes;
  if (!whole) whole = cache_.lookup(artifact_id);
  if (!whole) return fail(errc::failed_precondition, verb + ": no readable copy is held");
  // Replicas hold the normalized canonical buffer already (PAD as zero): one segment over all.
  auto view = memory::segmented_view::create(whole->size(), {memory::segment{0, whole->size(), whole.get(), 0}});
  if (!view) return tl::unexpected(with_context(std::move(view).error(), verb));
  out.view = std::make_shared<const memory::segmented_view>(std::move(*view));
  out.keep_alive.push_back(std::move(whole));
  return out;
}

void catalogue::add_alias(const std::string& mi2, const std::string& cgid) {
  auto& cgids = aliases_[mi2];
  if (std::find(cgids.begin(), cgids.end(), cgid) == cgids.end()) cgids.push_back(cgid);
}

result<std::pair<std::shared_ptr<background_hash>, artifact_descriptor>> catalogue::hash_of(
    const std::string& artifact_id) const {
  if (const artifact* a = find_held(artifact_id)) return std::pair{a->hash, a->descriptor};
  if (auto t = hash_tombstones_.find(artifact_id); t != hash_tombstones_.end()) {
    artifact_descriptor d;
    d.artifact_id = artifact_id;
    d.id_kind = identity::id_kind::cgid;
    return std::pair{t->second, d};
  }
  return fail(errc::not_found, "cannot wait for the hash of " + artifact_id + ": no such artifact");
}

result<unique_fd> export_replica_fd(const std::shared_ptr<const memory::byte_source>& replica,
                                    const std::string& verb) {
  // Replicas are made by detail::materialize, always in a memfd; anything else has no fd to share.
  auto memory = std::dynamic_pointer_cast<const memory::shared_memory>(replica);
  if (!memory) return fail(errc::failed_precondition, verb + ": no stable DRAM replica is held");
  // Sealed replicas only (a recycled GPU replica included): marks it exported, never recycled.
  auto fd = memory->export_read_only();
  if (!fd) return tl::unexpected(with_context(std::move(fd).error(), verb));
  return fd;
}

}  // namespace tensorreg::registration::detail
