#include "tensorreg/registration/engine.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <utility>

#include "registration/lip.hpp"
#include "registration/materialize.hpp"
#include "registration/owner_watch.hpp"
#include "registration/stable_upload.hpp"
#include "tensorreg/common/random.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/devices/device_identity.hpp"
#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/index/byte_range_map.hpp"
#include "tensorreg/memory/segmented_view.hpp"
#include "tensorreg/memory/shared_memory.hpp"
#include "tensorreg/stable/stable_dram_cache.hpp"

namespace tensorreg::registration {
namespace {

using time_point = clock::time_point;
using std::chrono::milliseconds;

// How long an expired registration's id keeps answering DEADLINE_EXCEEDED rather than NOT_FOUND.
constexpr milliseconds kTombstoneLife{10 * 60 * 1000};

std::optional<time_point> deadline(const clock& c, std::uint32_t ttl_ms) {
  if (ttl_ms == 0) return std::nullopt;
  return saturating_deadline(c.now(), milliseconds(ttl_ms));
}

std::string new_registration_id() {
  const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                      std::chrono::system_clock::now().time_since_epoch())
                      .count();
  return "reg_" + std::to_string(ns) + "_" + std::to_string(::getpid()) + "_" + std::to_string(random_u64());
}

plan_kind kind_of(const plan_options& plan) {
  if (std::holds_alternative<lease_options>(plan)) return plan_kind::lease;
  if (std::holds_alternative<stable_dram_options>(plan)) return plan_kind::stable_dram;
  return plan_kind::coalesced;
}

std::string_view plan_name(plan_kind k) {
  switch (k) {
    case plan_kind::lease: return "lease-in-place";
    case plan_kind::stable_dram: return "stable_dram";
    case plan_kind::coalesced: break;
  }
  return "coalesced";
}

// An open registration between Begin and Commit.
struct pending {
  std::string id;
  plan_kind kind = plan_kind::coalesced;
  std::int32_t owner_pid = 0;
  std::int32_t device_id = 0;
  std::uint64_t total_size = 0;
  std::uint32_t ttl_ms = 0;
  std::string cgid;
  policy::resolved_policy policy;

  // Guards everything below.
  std::mutex mutex;
  std::condition_variable idle;  // signalled when `feeding` drops to 0
  int feeding = 0;               // Feed calls working outside the lock (chunk copies)
  bool committing = false;
  // Set by a failed commit whose error the client can still fix by feeding more (missing
  // payloads, incomplete upload): the registration then stays open.
  bool commit_retryable = false;
  // Set once the registration is dropped or committed: Feed and Commit holding a pointer from
  // before then answer NOT_FOUND instead of touching released tables.
  bool closed = false;
  // Revoke, owner death or expiry came while a commit ran: the commit undoes what it made.
  bool drop_after_commit = false;
  std::optional<time_point> expires;
  std::uint64_t epoch = 0;
  std::shared_ptr<const index::canonical_index> index;  // coalesced / stable_dram
  detail::lip_tables lip;
  std::shared_ptr<detail::stable_upload> stable;
  std::optional<device_buffer> coalesced;
};

struct lease {
  std::string registration_id;
  std::int32_t owner_pid = 0;
  std::int32_t device_id = 0;
  std::optional<time_point> expires;
  std::uint64_t epoch = 0;
  detail::lip_view view;
  std::vector<std::string> region_ids;  // references held until the lease ends
};

struct join {
  std::string registration_id;
  std::int32_t owner_pid = 0;
  std::optional<time_point> expires;
};

struct artifact {
  artifact_descriptor descriptor;
  std::shared_ptr<const index::canonical_index> index;
  std::map<std::string, lease> leases;  // by registration id
  std::map<std::string, join> joins;    // by registration id
  std::map<std::int32_t, device_buffer> gpu_replicas;
  bool quiesced = false;
  // Every reader handed out by open_bytes() holds a copy; drain waits for it to be unique.
  std::shared_ptr<const char> readers = std::make_shared<const char>('r');
};

// A reader of an artifact's bytes: forwards to the source and pins the artifact's anchor.
class tracked_source final : public memory::byte_source {
 public:
  tracked_source(std::shared_ptr<const memory::byte_source> inner, std::shared_ptr<const char> anchor)
      : inner_(std::move(inner)), anchor_(std::move(anchor)) {}
  [[nodiscard]] std::uint64_t size() const noexcept override { return inner_->size(); }
  [[nodiscard]] status visit(std::uint64_t offset, std::uint64_t length, memory::piece_sink sink) const override {
    return inner_->visit(offset, length, sink);
  }

 private:
  std::shared_ptr<const memory::byte_source> inner_;
  std::shared_ptr<const char> anchor_;
};

// The normalized canonical buffer over `raw` (DECISIONS §5.1): the index's DATA ranges read
// from `raw` at the same offsets, PAD as zero. `raw` must outlive the view.
result<memory::segmented_view> normalized_view(const memory::byte_source& raw, const index::canonical_index& idx) {
  const auto map = index::byte_range_map::from_index(idx);
  std::vector<memory::segment> data_ranges;
  for (const auto& range : map.ranges()) {
    if (range.kind == index::range_kind::data) data_ranges.push_back({range.offset, range.length, &raw, range.offset});
  }
  return memory::segmented_view::create(idx.total_size(), std::move(data_ranges));
}

// normalized_view() that owns the raw buffer it reads.
class normalized_source final : public detail::view_source {
 public:
  static result<std::shared_ptr<const normalized_source>> create(std::shared_ptr<const memory::byte_source> raw,
                                                                 const index::canonical_index& idx) {
    TENSORREG_TRY_ASSIGN(auto view, normalized_view(*raw, idx));
    return std::make_shared<const normalized_source>(std::move(raw), std::move(view));
  }
  normalized_source(std::shared_ptr<const memory::byte_source> raw, memory::segmented_view view)
      : raw_(std::move(raw)), view_(std::move(view)) {}
  [[nodiscard]] std::uint64_t size() const noexcept override { return view_.size(); }
  [[nodiscard]] status visit(std::uint64_t offset, std::uint64_t length, memory::piece_sink sink) const override {
    return view_.visit(offset, length, sink);
  }
  [[nodiscard]] const memory::segmented_view& view() const noexcept override { return view_; }

 private:
  std::shared_ptr<const memory::byte_source> raw_;  // what view_ reads
  memory::segmented_view view_;
};

class no_device final : public device_memory {
 public:
  result<std::shared_ptr<const memory::byte_source>> open_ipc(std::int32_t, std::int32_t device_id, std::string_view,
                                                              std::uint64_t) override {
    return fail(errc::failed_precondition, "cannot open CUDA IPC memory on device " + std::to_string(device_id) +
                                               ": no GPU is available to this engine");
  }
  result<device_buffer> allocate(std::int32_t device_id, std::uint64_t) override {
    return fail(errc::failed_precondition, "cannot allocate device memory on device " + std::to_string(device_id) +
                                               ": no GPU is available to this engine");
  }
  std::size_t open_mappings() const override { return 0; }
};

}  // namespace

std::shared_ptr<device_memory> no_device_memory() { return std::make_shared<no_device>(); }

struct engine::state {
  engine_options options;
  const clock& time;
  thread_pool pool;
  regions::region_registry regions;
  stable::stable_dram_cache cache;
  std::shared_ptr<device_memory> devices;  // null = no GPU

  mutable std::mutex mutex;  // guards the tables below; never held while hashing or copying
  std::unordered_map<std::string, std::shared_ptr<pending>> pending_by_id;
  std::unordered_map<std::string, time_point> tombstones;  // expired registration ids
  std::map<std::string, artifact> artifacts;               // by artifact id
  std::unordered_map<std::string, std::string> artifact_of_registration;  // leases and joins
  std::unordered_map<std::string, std::shared_ptr<const index::canonical_index>> index_store;  // by hex key

  std::unique_ptr<detail::owner_watch> owners;
  std::mutex sweeper_mutex;
  std::condition_variable sweeper_wake;
  bool stopping = false;
  std::thread sweeper;

  explicit state(engine_options o)
      : options(std::move(o)),
        time(*options.time),
        pool(options.hash_threads != 0 ? options.hash_threads - 1 : std::max(1u, std::thread::hardware_concurrency()) - 1),
        regions(time, regions::registry_options{options.region_capacity, std::chrono::minutes(10)}),
        cache(options.stable_bytes, time),
        devices(options.devices) {}

  // ---- helpers (the caller holds `mutex` where a name ends in _locked) ----

  status watch_owner(std::int32_t pid) {
    if (!owners) return {};
    return owners->watch(pid);
  }

  // Releases what a pending registration holds (region refs, buffers).
  void release_pending_resources(pending& p) {
    for (const auto& id : p.lip.region_ids()) (void)regions.release(id);
    p.lip = detail::lip_tables{};
    p.stable.reset();
    p.coalesced.reset();
  }

  void end_lease(lease& l) {
    for (const auto& id : l.region_ids) (void)regions.release(id);
    l.region_ids.clear();
  }

  bool artifact_is_empty_locked(const std::string& id, const artifact& a) const {
    return a.leases.empty() && a.joins.empty() && a.gpu_replicas.empty() && !cache.contains(id);
  }

  void erase_if_empty_locked(const std::string& id) {
    auto it = artifacts.find(id);
    if (it != artifacts.end() && artifact_is_empty_locked(id, it->second)) artifacts.erase(it);
  }

  // Looks up an open registration for Feed/Commit, applying lazy expiry (§4.3.1, §4.5).
  result<std::shared_ptr<pending>> find_open(const std::string& id, std::string_view verb) {
    std::shared_ptr<pending> p;
    {
      std::lock_guard lock(mutex);
      if (auto t = tombstones.find(id); t != tombstones.end()) {
        tombstones.erase(t);  // the client has been told; the metadata is gone
        return fail(errc::deadline_exceeded, "cannot " + std::string(verb) + " registration '" + id + "': its TTL expired");
      }
      auto it = pending_by_id.find(id);
      if (it == pending_by_id.end()) {
        return fail(errc::not_found, "cannot " + std::string(verb) + " registration '" + id + "': no such registration");
      }
      p = it->second;
    }
    bool expired = false;
    {
      std::lock_guard plock(p->mutex);
      expired = p->expires && *p->expires <= time.now() && !p->committing;
    }
    if (expired) {
      (void)drop_pending(p);
      return fail(errc::deadline_exceeded, "cannot " + std::string(verb) + " registration '" + id + "': its TTL expired");
    }
    return p;
  }

  // Removes a pending registration and releases what it holds; returns whether it did. A
  // registration being committed is left to its commit, which is told to undo what it makes
  // (a lease or join) once done: releasing its tables under it raced with the commit reading
  // them (revoke, owner death and the sweep all came here without that check holding).
  bool drop_pending(const std::shared_ptr<pending>& p) {
    {
      std::lock_guard plock(p->mutex);
      if (p->closed) return false;
      if (p->committing) {
        p->drop_after_commit = true;
        return false;
      }
      p->closed = true;
    }
    {
      std::lock_guard lock(mutex);
      pending_by_id.erase(p->id);
    }
    std::unique_lock plock(p->mutex);
    p->idle.wait(plock, [&] { return p->feeding == 0; });
    release_pending_resources(*p);
    return true;
  }

  result<std::shared_ptr<const index::canonical_index>> resolve_index(const begin_request& r) {
    if (!r.tensor_index_key && !r.tensor_index_data) {
      return fail(errc::invalid_argument,
                  "cannot begin registration: no tensor index: set tensor_index_key or tensor_index_data");
    }
    if (r.tensor_index_key && r.tensor_index_data) {
      return fail(errc::invalid_argument,
                  "cannot begin registration: set only one of tensor_index_key and tensor_index_data");
    }
    if (r.tensor_index_data) {
      const auto& d = *r.tensor_index_data;
      if (!d.schema_version.empty() && d.schema_version != "v3") {
        return fail(errc::invalid_argument, "cannot begin registration: schema_version '" + d.schema_version +
                                                "' is not supported (only \"v3\")");
      }
      if (!d.encoding.empty() && d.encoding != "json") {
        return fail(errc::invalid_argument, "cannot begin registration: index encoding '" + d.encoding +
                                                "' is not supported (only \"json\")");
      }
      TENSORREG_TRY_ASSIGN(auto parsed, index::canonical_index::parse(d.bytes, r.total_size));
      return std::make_shared<const index::canonical_index>(std::move(parsed));
    }
    auto key = hash::digest_from_hex(*r.tensor_index_key);
    if (!key) return fail(errc::invalid_argument, "cannot begin registration: tensor_index_key must be a 32-byte sha256 hex string");
    std::shared_ptr<const index::canonical_index> known;
    {
      std::lock_guard lock(mutex);
      if (auto it = index_store.find(hash::to_hex(*key)); it != index_store.end()) known = it->second;
    }
    if (!known) {
      return fail(errc::not_found, "cannot begin registration: unknown tensor_index_key " + hash::to_hex(*key));
    }
    if (known->total_size() == r.total_size) return known;
    // The same index under another total_size: validate its entries against this one.
    TENSORREG_TRY_ASSIGN(auto resized, index::canonical_index::from_entries(known->entries(), r.total_size));
    return std::make_shared<const index::canonical_index>(std::move(resized));
  }

  // The descriptor of freshly hashed bytes.
  static artifact_descriptor describe(const pending& p, const index::canonical_index& idx,
                                      const std::optional<hash::digest>& data) {
    artifact_descriptor d;
    d.index_multihash = hash::encode_multihash(hash::sha256(idx.json()));
    d.total_size = p.total_size;
    if (!p.cgid.empty()) {
      d.artifact_id = p.cgid;
      d.id_kind = identity::id_kind::cgid;
    } else {
      d.data_multihash = hash::encode_multihash(*data);
      d.artifact_id = "mi2:" + d.index_multihash + ":" + d.data_multihash;
      d.id_kind = identity::id_kind::mi2;
    }
    return d;
  }

  artifact& artifact_for_locked(const artifact_descriptor& d, std::shared_ptr<const index::canonical_index> idx) {
    auto [it, inserted] = artifacts.try_emplace(d.artifact_id);
    if (inserted) {
      it->second.descriptor = d;
      it->second.index = idx;
    }
    // The key is the index digest describe() already computed: hashing a large index twice
    // showed in the metadata path's profile.
    auto digest = hash::decode_multihash(d.index_multihash);
    TENSORREG_ASSERT(digest.has_value());
    index_store.try_emplace(hash::to_hex(*digest), std::move(idx));
    return it->second;
  }

  static stable::admit_policy admit_policy_of(const policy::resolved_policy& r) {
    return r.cache.value_or(stable::admit_policy{});
  }

  // The data hash of a canonical buffer: the device provider hashes it on the GPU when its
  // bytes are device memory and that is faster; otherwise all host cores do (DECISIONS §6).
  result<hash::digest> hash_canonical(const memory::segmented_view& canonical) {
    if (devices) {
      if (auto on_device = devices->tree_hash_on_device(canonical)) return std::move(*on_device);
    }
    return hash::tree_hash(canonical, &pool);
  }

  result<commit_response> commit_lease(const std::shared_ptr<pending>& p);
  result<commit_response> commit_stable(const std::shared_ptr<pending>& p);
  result<commit_response> commit_coalesced(const std::shared_ptr<pending>& p);
  local_stable_tier_result apply_local_stable_tier(const std::string& artifact_id, const policy::resolved_policy& policy,
                                                   status* must_failure);
  void record_join_locked(artifact& a, const pending& p);
  void revoke_locked(const std::string& registration_id);
  void sweep();
  void release_owner(std::int32_t pid);
};

// ---- Begin ---------------------------------------------------------------------------------

result<std::unique_ptr<engine>> engine::create(engine_options options) {
  if (options.time == nullptr) options.time = &system_clock();
  auto s = std::make_unique<state>(std::move(options));
  auto* raw = s.get();
  if (s->options.watch_owners) {
    TENSORREG_TRY_ASSIGN(s->owners, detail::owner_watch::create([raw](std::int32_t pid) { raw->release_owner(pid); }));
  }
  if (s->options.sweep_interval.count() > 0) {
    s->sweeper = std::thread([raw] {
      std::unique_lock lock(raw->sweeper_mutex);
      while (!raw->stopping) {
        raw->sweeper_wake.wait_for(lock, raw->options.sweep_interval);
        if (raw->stopping) break;
        lock.unlock();
        raw->sweep();
        lock.lock();
      }
    });
  }
  return std::unique_ptr<engine>(new engine(std::move(s)));
}

engine::engine(std::unique_ptr<state> s) noexcept : state_(std::move(s)) {}

engine::~engine() {
  {
    std::lock_guard lock(state_->sweeper_mutex);
    state_->stopping = true;
  }
  state_->sweeper_wake.notify_all();
  if (state_->sweeper.joinable()) state_->sweeper.join();
  state_->owners.reset();  // no owner callback after this point
}

result<begin_response> engine::begin(begin_request r) {
  auto& s = *state_;
  if (r.owner_pid <= 0) return fail(errc::invalid_argument, "cannot begin registration: owner_pid is required (>0)");
  const plan_kind kind = kind_of(r.plan);
  auto resolved = policy::resolve(r.policy);
  if (!resolved) return tl::unexpected(with_context(std::move(resolved).error(), "cannot begin registration"));
  if (!r.client_artifact_id.empty()) {
    auto valid = identity::validate_cgid(r.client_artifact_id);
    if (!valid) return tl::unexpected(with_context(std::move(valid).error(), "cannot begin registration"));
  }
  if (r.has_view) {
    return fail(errc::unimplemented, "cannot begin registration: view registration is not implemented yet");
  }
  if (r.total_size == 0) return fail(errc::invalid_argument, "cannot begin registration: total_size must be > 0");

  auto p = std::make_shared<pending>();
  p->id = new_registration_id();
  p->kind = kind;
  p->owner_pid = r.owner_pid;
  p->device_id = r.device_id;
  p->total_size = r.total_size;
  p->ttl_ms = r.ttl_ms.value_or(0);
  p->expires = deadline(s.time, p->ttl_ms);
  p->cgid = r.client_artifact_id;
  p->policy = std::move(*resolved);

  begin_response response;
  response.registration_id = p->id;
  response.device_id = r.device_id;
  response.total_size = r.total_size;

  if (kind == plan_kind::lease) {
    // §4.2.7: the lease plan checks neither index nor device at Begin; the index is rebuilt
    // from the fed metadata at Commit.
    if (!std::get<lease_options>(r.plan).in_place) {
      return fail(errc::unimplemented, "vram_leased (in_place=false) is not implemented; set lease_in_place=true");
    }
    response.handshake = lease_handshake{};
  } else {
    if (r.device_id < 0) {
      return fail(errc::invalid_argument, "cannot begin registration: device_id must be >= 0, got " +
                                              std::to_string(r.device_id));
    }
    TENSORREG_TRY_ASSIGN(p->index, s.resolve_index(r));
    if (kind == plan_kind::coalesced) {
      if (!s.devices) {
        return fail(errc::failed_precondition, "cannot begin coalesced registration: the coalesced plan needs GPU " +
                                                   std::to_string(r.device_id) + " and this engine has no GPU");
      }
      TENSORREG_TRY_ASSIGN(auto buffer, s.devices->allocate(r.device_id, r.total_size));
      response.handshake = coalesced_handshake{buffer.ipc_handle};
      p->coalesced = std::move(buffer);
    } else {
      const auto& opts = std::get<stable_dram_options>(r.plan);
      if (opts.stage_on_gpu && !s.devices) {
        return fail(errc::failed_precondition, "cannot begin stable_dram registration: stage_on_gpu needs GPU " +
                                                   std::to_string(r.device_id) + " and this engine has no GPU");
      }
      const auto budget = s.cache.budget_bytes();
      if (budget != 0 && r.total_size > budget) {
        return fail(errc::resource_exhausted, "cannot begin stable_dram registration: total_size " +
                                                  std::to_string(r.total_size) + " exceeds the stable budget of " +
                                                  std::to_string(budget) + " bytes");
      }
      stable_dram_handshake hs;
      if (opts.stage_on_gpu) {
        // The client writes its GPU tensors into a daemon-owned device buffer (by its IPC
        // handle); Commit copies it to host memory while hashing (commit_stable).
        TENSORREG_TRY_ASSIGN(auto buffer, s.devices->allocate(r.device_id, r.total_size));
        hs.staging_cuda_ipc_handle = buffer.ipc_handle;
        p->coalesced = std::move(buffer);
      } else {
        TENSORREG_TRY_ASSIGN(auto staging, memory::shared_memory::create(r.total_size, "tensorreg-publish"));
        auto shared = std::make_shared<memory::shared_memory>(std::move(staging));
        p->stable = std::make_shared<detail::stable_upload>(shared);
        hs.publish = publish_memfd{shared, r.total_size, 0};
        hs.publish_lease_token = "publish:" + random_hex(16);
      }
      response.handshake = std::move(hs);
    }
  }
  // Insert first, then watch: an owner that dies in between is then released by the watcher
  // (watching first could run release_owner before the registration was there to release).
  {
    std::lock_guard lock(s.mutex);
    s.pending_by_id.emplace(p->id, p);
  }
  if (auto watched = s.watch_owner(r.owner_pid); !watched) {
    (void)s.drop_pending(p);
    return tl::unexpected(std::move(watched).error());
  }
  return response;
}

// ---- Feed ----------------------------------------------------------------------------------

status engine::feed(feed_request r) {
  auto& s = *state_;
  TENSORREG_TRY_ASSIGN(auto p, s.find_open(r.registration_id, "feed"));
  const bool has_payload = !std::holds_alternative<std::monostate>(r.payload);
  if (!has_payload && r.storage_entries.empty() && r.tensor_aliases.empty()) {
    return fail(errc::invalid_argument, "cannot feed registration '" + p->id + "': missing feed payload");
  }
  const std::string what = "cannot feed registration '" + p->id + "'";

  std::unique_lock plock(p->mutex);
  if (p->closed) return fail(errc::not_found, what + ": no such registration");
  if (p->committing) return fail(errc::failed_precondition, what + ": it is being committed");
  if (p->ttl_ms != 0) p->expires = deadline(s.time, p->ttl_ms);  // every message is a keep-alive

  const bool lease_plan = p->kind == plan_kind::lease;
  if ((!r.storage_entries.empty() || !r.tensor_aliases.empty() ||
       std::holds_alternative<lease_segments>(r.payload)) && !lease_plan) {
    return fail(errc::failed_precondition, what + ": storage tables and lease segments need a lease-in-place "
                                                  "registration, not " + std::string(plan_name(p->kind)));
  }
  if (std::holds_alternative<view_chunk>(r.payload) || std::holds_alternative<stable_write_progress>(r.payload)) {
    if (p->kind != plan_kind::stable_dram || !p->stable) {
      return fail(errc::failed_precondition, what + ": view_chunk and stable_dram_write_progress need a stable_dram "
                                                    "registration with stage_on_gpu=false, not " +
                                                    std::string(plan_name(p->kind)));
    }
  }

  if (lease_plan) {
    // Check the segments before taking the storages, so a rejected message records nothing
    // (a storage kept from a failed message made the client's retry a duplicate storage_id).
    auto* segs = std::get_if<lease_segments>(&r.payload);
    if (segs != nullptr) TENSORREG_TRY(detail::lip_tables::check_segments(segs->segments));
    TENSORREG_TRY(p->lip.add_storages(std::move(r.storage_entries), s.regions, p->owner_pid));
    if (segs != nullptr) TENSORREG_TRY(p->lip.add_segments(std::move(segs->segments)));
    p->lip.add_aliases(std::move(r.tensor_aliases));
    return {};
  }
  if (auto* progress = std::get_if<stable_write_progress>(&r.payload)) {
    for (const auto& range : progress->ranges) {
      TENSORREG_TRY(p->stable->record_written(range.canonical_offset, range.length));
    }
    if (progress->upload_complete) p->stable->mark_complete();
    return {};
  }
  auto& chunk = std::get<view_chunk>(r.payload);
  // Copy outside the registration's lock so concurrent chunks land in parallel; Commit waits
  // for `feeding` to drop to zero.
  auto upload = p->stable;
  ++p->feeding;
  plock.unlock();
  auto written = upload->write_chunk(chunk.canonical_offset, chunk.data);
  plock.lock();
  if (--p->feeding == 0) p->idle.notify_all();
  return written;
}

// ---- KeepAlive -----------------------------------------------------------------------------

status engine::keep_alive(const keep_alive_request& r) {
  auto& s = *state_;
  bool open = false;
  {
    std::lock_guard lock(s.mutex);
    open = s.pending_by_id.contains(r.registration_id) || s.tombstones.contains(r.registration_id);
  }
  const std::string what = "cannot keep registration '" + r.registration_id + "' alive";
  if (open) {
    // An expired registration is not revived: DEADLINE_EXCEEDED, as Feed and Commit answer.
    TENSORREG_TRY_ASSIGN(auto p, s.find_open(r.registration_id, "keep alive"));
    std::lock_guard plock(p->mutex);
    if (r.owner_pid != p->owner_pid) {
      return fail(errc::permission_denied, what + ": owner_pid " + std::to_string(r.owner_pid) +
                                               " is not the registration's owner " + std::to_string(p->owner_pid));
    }
    p->epoch = r.epoch;
    if (r.ttl_ms > 0) {
      p->ttl_ms = r.ttl_ms;
      p->expires = deadline(s.time, r.ttl_ms);
    }
    return {};
  }
  std::lock_guard lock(s.mutex);
  auto owner = s.artifact_of_registration.find(r.registration_id);
  if (owner == s.artifact_of_registration.end()) return fail(errc::not_found, what + ": no such registration or lease");
  auto& a = s.artifacts.at(owner->second);
  auto check_owner = [&](std::int32_t holder) -> status {
    if (r.owner_pid != holder) {
      return fail(errc::permission_denied, what + ": owner_pid " + std::to_string(r.owner_pid) +
                                               " is not the lease's owner " + std::to_string(holder));
    }
    return {};
  };
  if (auto l = a.leases.find(r.registration_id); l != a.leases.end()) {
    TENSORREG_TRY(check_owner(l->second.owner_pid));
    l->second.epoch = r.epoch;
    l->second.expires = deadline(s.time, r.ttl_ms);  // ttl 0 clears the expiry (§4.4)
    return {};
  }
  auto& j = a.joins.at(r.registration_id);
  TENSORREG_TRY(check_owner(j.owner_pid));
  j.expires = deadline(s.time, r.ttl_ms);
  return {};
}

// ---- Commit --------------------------------------------------------------------------------

result<commit_response> engine::commit(const std::string& registration_id) {
  auto& s = *state_;
  TENSORREG_TRY_ASSIGN(auto p, s.find_open(registration_id, "commit"));
  {
    std::unique_lock plock(p->mutex);
    if (p->closed) return fail(errc::not_found, "cannot commit registration '" + p->id + "': no such registration");
    if (p->committing) {
      return fail(errc::failed_precondition, "cannot commit registration '" + p->id + "': a commit is already running");
    }
    p->committing = true;
    p->commit_retryable = false;
    p->idle.wait(plock, [&] { return p->feeding == 0; });
  }
  result<commit_response> out = p->kind == plan_kind::lease         ? s.commit_lease(p)
                                : p->kind == plan_kind::stable_dram ? s.commit_stable(p)
                                                                    : s.commit_coalesced(p);
  // Only errors the client can fix by feeding more keep the registration open; other
  // FAILED_PRECONDITIONs (no GPU for a CUDA storage, a quiesced artifact, a "must" stable tier
  // with nothing to copy) would otherwise leave it, and its region refs, held until its TTL or
  // forever with TTL 0.
  if (!out && p->commit_retryable) {
    // Something is missing that the client can still feed: keep the registration open.
    bool drop = false;
    {
      std::lock_guard plock(p->mutex);
      p->committing = false;
      drop = std::exchange(p->drop_after_commit, false);
    }
    if (drop) (void)s.drop_pending(p);  // revoked or its owner died meanwhile
    return out;
  }
  bool drop = false;
  {
    std::lock_guard plock(p->mutex);
    p->closed = true;
    drop = p->drop_after_commit;
  }
  {
    std::lock_guard lock(s.mutex);
    s.pending_by_id.erase(p->id);
    if (drop) s.revoke_locked(p->id);  // revoked or its owner died meanwhile: undo the lease or join
  }
  if (!out) {
    std::lock_guard plock(p->mutex);
    s.release_pending_resources(*p);
  }
  return out;
}

void engine::state::record_join_locked(artifact& a, const pending& p) {
  a.joins[p.id] = join{p.id, p.owner_pid, deadline(time, p.ttl_ms)};
  artifact_of_registration[p.id] = a.descriptor.artifact_id;
}

result<commit_response> engine::state::commit_lease(const std::shared_ptr<pending>& p) {
  // Steps 3–6: payloads, index rebuild, segment rules — all before any mapping is opened.
  auto rebuilt = p->lip.rebuild_index(p->total_size);
  if (!rebuilt) {
    // rebuild_index answers FAILED_PRECONDITION only for payloads not fed yet (step 3).
    p->commit_retryable = rebuilt.error().code == errc::failed_precondition;
    return tl::unexpected(std::move(rebuilt).error());
  }
  auto idx = std::make_shared<const index::canonical_index>(std::move(*rebuilt));
  // Step 7: open the storages' memory, once per handle or region.
  TENSORREG_TRY_ASSIGN(auto view, p->lip.open_view(p->total_size, p->owner_pid, devices.get()));
  {
    // DECISIONS §5.1: the data hash is over the normalized canonical buffer, DATA ranges of the
    // rebuilt index as read from the segments and PAD as zero. A segment of a storage that no
    // alias names is not in the index, so it is PAD: its bytes must reach neither the hash nor
    // the lease's readers (the local stable tier re-hashes what it copies from the lease).
    TENSORREG_TRY_ASSIGN(auto normalized, normalized_view(*view.bytes, *idx));
    view.keep_alive.push_back(view.bytes);  // the normalized view reads through it
    view.bytes = std::make_shared<const memory::segmented_view>(std::move(normalized));
  }
  // Step 8: hash, outside every lock: on the GPU when the bytes live there and it is faster.
  std::optional<hash::digest> data;
  if (p->cgid.empty()) {
    TENSORREG_TRY_ASSIGN(data, hash_canonical(*view.bytes));
  }
  auto descriptor = describe(*p, *idx, data);

  {
    std::lock_guard lock(mutex);
    auto existing = artifacts.find(descriptor.artifact_id);
    if (existing != artifacts.end()) {
      if (existing->second.quiesced) {
        return fail(errc::failed_precondition, "cannot commit lease of " + descriptor.artifact_id +
                                                   ": the artifact is being deregistered");
      }
      for (const auto& [id, l] : existing->second.leases) {
        if (l.device_id == p->device_id) {
          return fail(errc::already_exists, "cannot commit lease of " + descriptor.artifact_id +
                                                ": lease already exists for artifact on device " +
                                                std::to_string(p->device_id));
        }
      }
    }
    // Step 10: the lease takes over the registration's region references and mappings.
    auto& a = artifact_for_locked(descriptor, idx);
    lease l;
    l.registration_id = p->id;
    l.owner_pid = p->owner_pid;
    l.device_id = p->device_id;
    l.expires = deadline(time, p->ttl_ms);
    l.view = std::move(view);
    l.region_ids = p->lip.region_ids();
    a.leases.emplace(p->id, std::move(l));
    artifact_of_registration[p->id] = descriptor.artifact_id;
    std::lock_guard plock(p->mutex);
    p->lip = detail::lip_tables{};  // references now belong to the lease
  }

  commit_response response;
  response.descriptor = descriptor;
  status must_failure;
  response.local_stable_tier = apply_local_stable_tier(descriptor.artifact_id, p->policy, &must_failure);
  if (!must_failure) {
    std::lock_guard lock(mutex);
    revoke_locked(p->id);
    return tl::unexpected(must_failure.error());
  }
  return response;
}

result<commit_response> engine::state::commit_stable(const std::shared_ptr<pending>& p) {
  // The normalized canonical buffer: DATA as uploaded, PAD as zero (DECISIONS §5.1).
  std::shared_ptr<const memory::byte_source> normalized;
  if (p->stable) {
    const auto map = index::byte_range_map::from_index(*p->index);
    if (auto covered = p->stable->check_covers(map); !covered) {
      p->commit_retryable = true;  // the client can still send the missing bytes
      return tl::unexpected(std::move(covered).error());
    }
    TENSORREG_TRY_ASSIGN(normalized, normalized_source::create(p->stable->staging(), *p->index));
  } else {
    // stage_on_gpu: the client wrote the device staging buffer through its own mapping.
    TENSORREG_TRY_ASSIGN(normalized, normalized_source::create(p->coalesced->bytes, *p->index));
  }
  // Keep a private host copy, hashed as it is made: the client still maps the staging memory
  // and could change it.
  TENSORREG_TRY_ASSIGN(auto copy, detail::materialize(*normalized, p->cgid.empty(), pool, devices.get()));
  auto descriptor = describe(*p, *p->index, copy.data_digest);

  commit_response response;
  response.descriptor = descriptor;
  const auto admit = admit_policy_of(p->policy);
  std::lock_guard lock(mutex);
  auto existing = artifacts.find(descriptor.artifact_id);
  if (existing != artifacts.end() && existing->second.quiesced) {
    return fail(errc::failed_precondition, "cannot commit " + descriptor.artifact_id + ": the artifact is being deregistered");
  }
  const bool had_replica = cache.contains(descriptor.artifact_id);
  auto admitted = cache.admit(descriptor.artifact_id, p->total_size, copy.replica, admit);
  if (!admitted) return tl::unexpected(with_context(std::move(admitted).error(), "cannot commit " + descriptor.artifact_id));
  if (!admitted->admitted) {
    return fail(errc::resource_exhausted, "cannot commit " + descriptor.artifact_id + ": the stable cache did not keep it: " +
                                              admitted->skip_reason);
  }
  auto& a = artifact_for_locked(descriptor, p->index);
  if (had_replica) {
    // Idempotent join (§4.5): the new copy is dropped; the join is remembered so that Revoke
    // or the TTL sweep can drop it.
    response.existed = true;
    record_join_locked(a, *p);
  }
  const bool asked = p->policy.local_stable >= policy::requirement::should;
  response.local_stable_tier = asked ? local_stable_tier_result{local_stable_status::ready, ""}
                                     : local_stable_tier_result{local_stable_status::skipped,
                                                                "the policy does not ask for the local stable tier"};
  return response;
}

result<commit_response> engine::state::commit_coalesced(const std::shared_ptr<pending>& p) {
  // Hash, and keep as the replica, the normalized buffer rather than the raw device buffer:
  // PAD the client left dirty must reach neither the id (DECISIONS §5.1) nor readers, and the
  // local stable tier re-hashes what it copies from the replica against the id (a raw replica
  // with dirty PAD failed that check with DATA_LOSS).
  TENSORREG_TRY_ASSIGN(auto normalized, normalized_source::create(p->coalesced->bytes, *p->index));
  std::optional<hash::digest> data;
  if (p->cgid.empty()) {
    TENSORREG_TRY_ASSIGN(data, hash_canonical(normalized->view()));
  }
  auto descriptor = describe(*p, *p->index, data);
  commit_response response;
  response.descriptor = descriptor;
  {
    std::lock_guard lock(mutex);
    if (auto existing = artifacts.find(descriptor.artifact_id); existing != artifacts.end() && existing->second.quiesced) {
      return fail(errc::failed_precondition, "cannot commit " + descriptor.artifact_id + ": the artifact is being deregistered");
    }
    auto& a = artifact_for_locked(descriptor, p->index);
    if (a.gpu_replicas.contains(p->device_id)) {
      response.existed = true;
      record_join_locked(a, *p);
    } else {
      std::lock_guard plock(p->mutex);
      a.gpu_replicas.emplace(p->device_id, device_buffer{std::move(normalized), p->coalesced->ipc_handle});
      p->coalesced.reset();
    }
  }
  status must_failure;
  response.local_stable_tier = apply_local_stable_tier(descriptor.artifact_id, p->policy, &must_failure);
  if (!must_failure) {
    // §6.2: a "must" tier that cannot be satisfied fails the commit and cleans up, so undo what
    // this commit added (its replica or its join), as commit_lease revokes its lease.
    std::lock_guard lock(mutex);
    if (auto it = artifacts.find(descriptor.artifact_id); it != artifacts.end()) {
      if (response.existed) {
        it->second.joins.erase(p->id);
        artifact_of_registration.erase(p->id);
      } else {
        it->second.gpu_replicas.erase(p->device_id);
      }
      erase_if_empty_locked(descriptor.artifact_id);
    }
    return tl::unexpected(must_failure.error());
  }
  return response;
}

// §6.2: after a commit, make sure a host copy exists when the policy asks for one.
local_stable_tier_result engine::state::apply_local_stable_tier(const std::string& artifact_id,
                                                                const policy::resolved_policy& policy,
                                                                status* must_failure) {
  *must_failure = {};
  if (policy.local_stable < policy::requirement::should) {
    return {local_stable_status::skipped, "the policy does not ask for the local stable tier"};
  }
  const auto admit = admit_policy_of(policy);
  auto attempt = [&]() -> status {
    std::shared_ptr<const memory::byte_source> source;
    std::uint64_t size = 0;
    std::optional<std::string> expected;
    {
      std::lock_guard lock(mutex);
      auto& a = artifacts.at(artifact_id);
      size = a.descriptor.total_size;
      if (!a.descriptor.data_multihash.empty()) expected = a.descriptor.data_multihash;
      if (cache.contains(artifact_id)) {
        // 1. A host replica exists: upgrade its policy.
        auto admitted = cache.admit(artifact_id, size, cache.lookup(artifact_id), admit);
        if (!admitted) return tl::unexpected(std::move(admitted).error());
        return {};
      }
      if (!a.gpu_replicas.empty()) {
        source = a.gpu_replicas.begin()->second.bytes;  // 2. a GPU replica
      } else if (!a.leases.empty()) {
        source = a.leases.begin()->second.view.bytes;  // 3. a live lease
      } else {
        return fail(errc::failed_precondition, "no replica or lease to copy from");
      }
    }
    TENSORREG_TRY_ASSIGN(auto copy, detail::materialize(*source, expected.has_value(), pool, devices.get()));
    if (expected && hash::encode_multihash(*copy.data_digest) != *expected) {
      return fail(errc::data_loss, "the bytes changed while they were copied (data hash " +
                                       hash::encode_multihash(*copy.data_digest) + ")");
    }
    std::lock_guard lock(mutex);
    auto admitted = cache.admit(artifact_id, size, copy.replica, admit);
    if (!admitted) return tl::unexpected(std::move(admitted).error());
    if (!admitted->admitted) return fail(errc::resource_exhausted, admitted->skip_reason);
    return {};
  };
  auto done = attempt();
  if (done) return {local_stable_status::ready, ""};
  auto message = "cannot keep a local stable copy of " + artifact_id + ": " + done.error().message;
  if (policy.local_stable == policy::requirement::must) {
    *must_failure = tl::unexpected(error{done.error().code, message});
    return {local_stable_status::unspecified, message};
  }
  return {local_stable_status::degraded, message};
}

// ---- Abort / Revoke --------------------------------------------------------------------------

status engine::abort(const std::string& registration_id) {
  auto& s = *state_;
  std::shared_ptr<pending> p;
  {
    std::lock_guard lock(s.mutex);
    auto it = s.pending_by_id.find(registration_id);
    if (it == s.pending_by_id.end()) {
      if (s.tombstones.erase(registration_id) > 0) return {};  // expired: already released
      return fail(errc::not_found, "cannot abort registration '" + registration_id + "': no such registration");
    }
    p = it->second;
    {
      std::lock_guard plock(p->mutex);
      if (p->committing) {
        return fail(errc::failed_precondition, "cannot abort registration '" + registration_id + "': it is being committed");
      }
    }
  }
  (void)s.drop_pending(p);
  return {};
}

void engine::state::revoke_locked(const std::string& registration_id) {
  auto owner = artifact_of_registration.find(registration_id);
  if (owner == artifact_of_registration.end()) return;
  const std::string artifact_id = owner->second;
  artifact_of_registration.erase(owner);
  auto a = artifacts.find(artifact_id);
  if (a == artifacts.end()) return;
  if (auto l = a->second.leases.find(registration_id); l != a->second.leases.end()) {
    end_lease(l->second);
    a->second.leases.erase(l);
  }
  a->second.joins.erase(registration_id);
  erase_if_empty_locked(artifact_id);
}

void engine::revoke(const std::string& registration_id, const std::string& /*reason*/) {
  auto& s = *state_;
  std::shared_ptr<pending> p;
  {
    std::lock_guard lock(s.mutex);
    s.tombstones.erase(registration_id);
    if (auto it = s.pending_by_id.find(registration_id); it != s.pending_by_id.end()) p = it->second;
    s.revoke_locked(registration_id);
  }
  if (p) (void)s.drop_pending(p);
}

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
                                               std::to_string(request.device_id) + " needs a GPU and this engine has none");
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

namespace {

artifact_summary summarize(const artifact& a, bool stable_replica) {
  artifact_summary out;
  out.descriptor = a.descriptor;
  out.stable_replica = stable_replica;
  out.leases = a.leases.size();
  out.joined_refs = a.joins.size();
  out.quiesced = a.quiesced;
  return out;
}

}  // namespace

result<artifact_summary> engine::get(const std::string& artifact_id) const {
  auto& s = *state_;
  std::lock_guard lock(s.mutex);
  auto it = s.artifacts.find(artifact_id);
  if (it == s.artifacts.end() || s.artifact_is_empty_locked(artifact_id, it->second)) {
    return fail(errc::not_found, "cannot find artifact " + artifact_id + ": not held here");
  }
  return summarize(it->second, s.cache.contains(artifact_id));
}

std::vector<artifact_summary> engine::list() const {
  auto& s = *state_;
  std::lock_guard lock(s.mutex);
  std::vector<artifact_summary> out;
  for (const auto& [id, a] : s.artifacts) {
    if (!s.artifact_is_empty_locked(id, a)) out.push_back(summarize(a, s.cache.contains(id)));
  }
  return out;
}

result<std::shared_ptr<const index::canonical_index>> engine::index_of(const std::string& artifact_id) const {
  auto& s = *state_;
  std::lock_guard lock(s.mutex);
  auto it = s.artifacts.find(artifact_id);
  if (it == s.artifacts.end() || s.artifact_is_empty_locked(artifact_id, it->second)) {
    return fail(errc::not_found, "cannot find the index of " + artifact_id + ": not held here");
  }
  return it->second.index;
}

result<std::shared_ptr<const memory::byte_source>> engine::open_bytes(const std::string& artifact_id) {
  auto& s = *state_;
  std::lock_guard lock(s.mutex);
  auto it = s.artifacts.find(artifact_id);
  if (it == s.artifacts.end() || s.artifact_is_empty_locked(artifact_id, it->second)) {
    return fail(errc::not_found, "cannot open " + artifact_id + ": not held here");
  }
  auto& a = it->second;
  if (a.quiesced) return fail(errc::failed_precondition, "cannot open " + artifact_id + ": it is being deregistered");
  std::shared_ptr<const memory::byte_source> inner = s.cache.lookup(artifact_id);
  if (!inner && !a.leases.empty()) inner = a.leases.begin()->second.view.bytes;
  if (!inner && !a.gpu_replicas.empty()) inner = a.gpu_replicas.begin()->second.bytes;
  if (!inner) return fail(errc::failed_precondition, "cannot open " + artifact_id + ": no readable copy is held");
  return std::shared_ptr<const memory::byte_source>(std::make_shared<tracked_source>(std::move(inner), a.readers));
}

result<std::pair<std::shared_ptr<const index::canonical_index>, unique_fd>> engine::stable_replica_fd(
    const std::string& artifact_id) {
  auto& s = *state_;
  const std::string verb = "cannot open the stable replica of " + artifact_id;
  std::shared_ptr<const memory::byte_source> replica;
  std::shared_ptr<const index::canonical_index> idx;
  {
    std::lock_guard lock(s.mutex);
    auto it = s.artifacts.find(artifact_id);
    if (it == s.artifacts.end() || s.artifact_is_empty_locked(artifact_id, it->second)) {
      return fail(errc::not_found, verb + ": not held here");
    }
    if (it->second.quiesced) return fail(errc::failed_precondition, verb + ": it is being deregistered");
    replica = s.cache.lookup(artifact_id);
    idx = it->second.index;
  }
  // Replicas are made by detail::materialize, always in a memfd; anything else has no fd to share.
  auto memory = std::dynamic_pointer_cast<const memory::shared_memory>(replica);
  if (!memory) return fail(errc::failed_precondition, verb + ": no stable DRAM replica is held");
  // A fresh read-only open file description, so the reader can map it but never write to it.
  const std::string path = "/proc/self/fd/" + std::to_string(memory->fd());
  // The reader may map it for as long as it likes: it must never be recycled for other bytes
  // (the CUDA provider's replica pool checks this mark).
  memory->mark_exported();
  unique_fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return fail(errc::internal, verb + ": cannot reopen its memfd read-only: " + std::strerror(errno));
  return std::pair{std::move(idx), std::move(fd)};
}

namespace {

// Fills `out`'s allocations and segments with where `view` (a lease's canonical buffer) lies in
// the device mappings `known`, each mapping once (gaps are PAD). False when some byte is not
// such a mapping.
bool device_pieces(const memory::byte_source& view, const std::map<const memory::byte_source*, device_allocation>& known,
                   device_layout& out) {
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

result<device_layout> engine::device_layout_of(const std::string& artifact_id) const {
  auto& s = *state_;
  const std::string verb = "cannot open the GPU memory of " + artifact_id;
  std::lock_guard lock(s.mutex);
  auto it = s.artifacts.find(artifact_id);
  if (it == s.artifacts.end() || s.artifact_is_empty_locked(artifact_id, it->second)) {
    return fail(errc::not_found, verb + ": not held here");
  }
  const auto& a = it->second;
  if (a.quiesced) return fail(errc::failed_precondition, verb + ": it is being deregistered");
  device_layout out;
  out.descriptor = a.descriptor;
  out.index = a.index;
  // A live lease first: the producer's memory, opened once per allocation.
  for (const auto& [id, l] : a.leases) {
    if (!l.view.bytes || l.view.device_allocations.empty()) continue;
    if (device_pieces(*l.view.bytes, l.view.device_allocations, out)) return out;
  }
  // Else a daemon-owned GPU copy: its DATA ranges lie at their canonical offsets.
  for (const auto& [device, replica] : a.gpu_replicas) {
    out.allocations = {device_allocation{device, replica.bytes->size(), replica.ipc_handle, {}}};
    out.segments.clear();
    const auto map = index::byte_range_map::from_index(*a.index);
    for (const auto& range : map.ranges()) {
      if (range.kind == index::range_kind::data) out.segments.push_back({range.offset, range.length, 0, range.offset});
    }
    return out;
  }
  return fail(errc::failed_precondition, verb + ": it has no copy in GPU memory (read its stable DRAM replica with "
                                                "GetArtifactMemfd)");
}

result<std::int32_t> engine::resolve_device(std::int32_t device_id, std::string_view device_uuid) const {
  if (device_uuid.empty()) return device_id;
  if (!state_->devices) {
    return fail(errc::failed_precondition, "cannot find CUDA device " + std::string(device_uuid) +
                                               ": no GPU is available to this engine");
  }
  return state_->devices->device_by_uuid(device_uuid);
}

std::string engine::device_uuid(std::int32_t device_id) const {
  return state_->devices ? state_->devices->uuid_of(device_id) : std::string();
}

result<deregister_response> engine::deregister(const deregister_request& r) {
  auto& s = *state_;
  // Watched, not held: a held copy counted as a reader in every other deregister of the same
  // artifact running at once, so concurrent deregisters never drained and all timed out.
  std::weak_ptr<const char> readers;
  {
    std::lock_guard lock(s.mutex);
    auto it = s.artifacts.find(r.artifact_id);
    if (it == s.artifacts.end() || s.artifact_is_empty_locked(r.artifact_id, it->second)) {
      return fail(errc::not_found, "cannot deregister " + r.artifact_id + ": not held here");
    }
    it->second.quiesced = true;  // 1. quiesce: no new readers, leases or joins
    readers = it->second.readers;
  }
  // 2. drain: wait for readers to let go.
  const auto timeout = r.drain_timeout_ms != 0 ? milliseconds(r.drain_timeout_ms) : s.options.default_drain_timeout;
  const auto give_up = std::chrono::steady_clock::now() + timeout;
  deregister_response response;
  while (readers.use_count() > 1) {  // the artifact's own, plus one per reader
    if (!r.wait_for_drain || std::chrono::steady_clock::now() >= give_up) {
      return fail(errc::deadline_exceeded, "cannot deregister " + r.artifact_id + ": " +
                                               std::to_string(readers.use_count() - 1) + " readers still hold it after " +
                                               std::to_string(r.wait_for_drain ? timeout.count() : 0) +
                                               " ms; it stays quiesced");
    }
    std::this_thread::sleep_for(milliseconds(2));
  }
  response.drained = true;
  // 3. revoke leases and joins, drop replicas.
  std::lock_guard lock(s.mutex);
  auto it = s.artifacts.find(r.artifact_id);
  if (it == s.artifacts.end()) return response;
  for (auto& [id, l] : it->second.leases) {
    for (const auto& region : l.region_ids) {
      // One lease may hold several references on one region: report each region once.
      if (std::find(response.released_region_ids.begin(), response.released_region_ids.end(), region) ==
          response.released_region_ids.end()) {
        response.released_region_ids.push_back(region);
      }
    }
    s.end_lease(l);
    s.artifact_of_registration.erase(id);
  }
  for (const auto& [id, j] : it->second.joins) s.artifact_of_registration.erase(id);
  s.cache.remove(r.artifact_id);
  s.artifacts.erase(it);
  response.removed = true;
  return response;
}

engine_stats engine::stats() const {
  auto& s = *state_;
  engine_stats out;
  std::lock_guard lock(s.mutex);
  for (const auto& [id, a] : s.artifacts) {
    if (s.artifact_is_empty_locked(id, a)) continue;
    ++out.artifacts;
    out.leases += a.leases.size();
    if (!a.leases.empty()) out.leased_bytes += a.descriptor.total_size;
  }
  out.pending_registrations = s.pending_by_id.size();
  out.regions = s.regions.size();
  out.open_mappings = s.devices ? s.devices->open_mappings() : 0;
  out.vmm_reserved_bytes = s.devices ? s.devices->vmm_reserved_bytes() : 0;
  const auto cache_stats = s.cache.stats();
  out.stable_bytes = cache_stats.bytes_used;
  out.stable_budget = cache_stats.budget_bytes;
  out.stable_evictions = cache_stats.evictions;
  return out;
}

// ---- Housekeeping --------------------------------------------------------------------------

void engine::state::sweep() {
  const auto now = time.now();
  std::vector<std::shared_ptr<pending>> expired;
  {
    std::lock_guard lock(mutex);
    for (const auto& [id, p] : pending_by_id) {
      std::lock_guard plock(p->mutex);
      if (p->expires && *p->expires <= now && !p->committing) expired.push_back(p);
    }
    for (auto& [id, a] : artifacts) {
      std::vector<std::string> gone;
      for (auto& [rid, l] : a.leases) {
        if (l.expires && *l.expires <= now) gone.push_back(rid);
      }
      for (auto& [rid, j] : a.joins) {
        if (j.expires && *j.expires <= now) gone.push_back(rid);
      }
      for (const auto& rid : gone) {
        if (auto l = a.leases.find(rid); l != a.leases.end()) {
          end_lease(l->second);
          a.leases.erase(l);
        }
        a.joins.erase(rid);
        artifact_of_registration.erase(rid);
      }
    }
    std::erase_if(artifacts, [&](const auto& kv) { return artifact_is_empty_locked(kv.first, kv.second); });
    std::erase_if(tombstones, [&](const auto& kv) { return kv.second + kTombstoneLife <= now; });
  }
  for (const auto& p : expired) {
    if (!drop_pending(p)) continue;  // a commit started meanwhile, or someone else dropped it
    std::lock_guard lock(mutex);
    tombstones.emplace(p->id, now);  // Feed/Commit still answer DEADLINE_EXCEEDED
  }
  (void)regions.sweep();
}

void engine::state::release_owner(std::int32_t pid) {
  std::vector<std::shared_ptr<pending>> owned;
  {
    std::lock_guard lock(mutex);
    for (const auto& [id, p] : pending_by_id) {
      if (p->owner_pid == pid) owned.push_back(p);
    }
    std::vector<std::string> registrations;
    for (const auto& [id, a] : artifacts) {
      for (const auto& [rid, l] : a.leases) {
        if (l.owner_pid == pid) registrations.push_back(rid);
      }
      for (const auto& [rid, j] : a.joins) {
        if (j.owner_pid == pid) registrations.push_back(rid);
      }
    }
    for (const auto& rid : registrations) revoke_locked(rid);
  }
  for (const auto& p : owned) (void)drop_pending(p);
  (void)regions.release_owner(pid);
}

void engine::sweep() { state_->sweep(); }
void engine::release_owner(std::int32_t owner_pid) { state_->release_owner(owner_pid); }

}  // namespace tensorreg::registration
