// src/registration/plans/plan.hpp — what every registration plan implements, and what they share.
//
// A plan (registration.md §4: lease-in-place, stable_dram, coalesced) owns the data of one
// pending registration between Begin and Commit and its rules: what Begin prepares and hands
// back, what each Feed message may carry, and how Commit turns it into a catalogue entry. A
// new plan is one new file implementing `plan`, plus its case in begin_plan() (plan.cpp).
//
// Thread-safety: a plan is never called concurrently with itself. The pending registration
// calls feed() under its own lock (work feed() returns runs outside it, counted, and Commit
// waits for it); commit() runs while the registration is `committing`, which excludes Feed and
// release; release() runs once the registration is closed and no Feed works on it.
//
// Ownership: each plan owns its staging memory, device buffers and region references until
// Commit hands them to the catalogue or release() gives them back.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

#include "memory/populated_reserve.hpp"
#include "registration/catalogue.hpp"
#include "registration/engine_lock.hpp"
#include "registration/layout_cache.hpp"
#include "registration/materialize.hpp"
#include "tensorreg/common/clock.hpp"
#include "tensorreg/common/error.hpp"
#include "tensorreg/common/priority_inheriting_mutex.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/memory/segmented_view.hpp"
#include "tensorreg/policy/store_policy.hpp"
#include "tensorreg/regions/region_registry.hpp"
#include "tensorreg/registration/device_memory.hpp"
#include "tensorreg/registration/types.hpp"

namespace tensorreg::registration::detail {

/// What a pending registration fixed at Begin.
struct registration_facts {
  std::string id;
  std::int32_t owner_pid = 0;
  std::int32_t device_id = 0;
  std::uint64_t total_size = 0;
  std::string cgid;  ///< empty: an mi2 id is computed
  policy::resolved_policy policy;
  std::optional<std::uint32_t> owner_uid{};  ///< for the per-uid share of the stable cache
};

/// The name of a host upload's memfd, as /proc/PID/fd shows it.
inline constexpr const char* publish_memfd_name = "tensorreg-publish";

/// What a plan's begin may use.
struct begin_context {
  std::string registration_id;       ///< the id the registration gets
  device_memory* devices = nullptr;  ///< null = no GPU
  thread_pool* pool = nullptr;       ///< the hashing threads; null = the feeding thread hashes
  std::uint64_t stable_budget = 0;   ///< 0 = unlimited
  /// The stable DRAM cache, whose budget an upload reserves at Begin; null = none (tests).
  stable::stable_dram_cache* stable_cache = nullptr;
  /// Where a host upload's memfd comes from before a fresh one is made; null = none.
  memory::populated_reserve* publish_reserve = nullptr;
  /// The index store's entry for this hex key (catalogue::find_index() under the engine
  /// mutex), null when no committed artifact has it; empty = none is known.
  std::function<std::shared_ptr<const index::canonical_index>(const std::string& hex_key)> find_index;
  /// The request's canonical index (inline or by key). Errors: as engine::begin.
  std::function<result<std::shared_ptr<const index::canonical_index>>(const begin_request&)> resolve_index;
  /// catalogue::assembly_for() under the engine mutex; empty = pieces stream nothing at Feed.
  std::function<result<std::shared_ptr<views::assembly>>(
      const std::string& cgid, std::shared_ptr<const index::canonical_index>, std::vector<views::byte_range> required)>
      assembly_for;
};

/// What a plan's commit may use. Commits hash and copy outside every lock and publish through
/// with_catalogue(), which holds the engine mutex.
struct commit_context {
  const registration_facts& facts;
  std::function<std::uint32_t()> ttl_ms;  ///< the registration's TTL now (KeepAlive may change it)
  catalogue& cat;
  priority_inheriting_mutex& catalogue_mutex;  ///< the engine mutex
  thread_pool& pool;
  device_memory* devices;  ///< null = no GPU
  const clock& time;
  /// Set by commit() when its error is one the client can fix by feeding more (missing
  /// payloads, incomplete upload): the registration then stays open.
  bool retryable = false;
  /// Set while the commit runs when the registration is revoked or its owner exits: hashing
  /// and copying stop (CANCELLED) at the next leaf or chunk. Null = never.
  cancel_flag cancelled = nullptr;
  /// The engine's regions, for a plan that gives its region references back at commit (a
  /// snapshot lease, once its copy is made). Null: references stay with what commit publishes.
  regions::region_registry* regions = nullptr;
  /// Layouts committed before (layout_cache.hpp), for a plan that rebuilds an index from fed
  /// tables. Null: every commit rebuilds.
  layout_cache* layouts = nullptr;
  /// commit_options::verified_leaf_digests. Null: hash the bytes.
  const std::vector<hash::digest>* verified_leaf_digests = nullptr;

  template <typename F>
  decltype(auto) with_catalogue(F&& f) {
    const engine_lock lock(catalogue_mutex);
    return std::forward<F>(f)(cat);
  }
};

/// Work a Feed message leaves to do outside the registration's lock (a chunk copy); empty when
/// the message is done.
using feed_work = std::function<status()>;

class plan {
 public:
  virtual ~plan() = default;
  plan(const plan&) = delete;
  plan& operator=(const plan&) = delete;

  /// "lease-in-place" (", republished"), "stable_dram", "coalesced".
  [[nodiscard]] virtual std::string_view name() const noexcept = 0;

  /// Applies one Feed message (§4.3) under the registration's lock; `what` opens error messages
  /// ("cannot feed registration '<id>'"). A rejected message records nothing.
  [[nodiscard]] virtual result<feed_work> feed(feed_request& request, const registration_facts& facts,
                                               regions::region_registry& regions, const std::string& what) = 0;

  /// Validates, hashes and publishes (§4.5).
  [[nodiscard]] virtual result<commit_response> commit(commit_context& ctx) = 0;

  /// Gives back what the registration still holds (region references, buffers). Idempotent.
  virtual void release(regions::region_registry& regions) noexcept = 0;

 protected:
  plan() = default;
};

/// The plan `request.plan` names, begun (§4.2): checks its request, prepares its memory and sets
/// `response.handshake`. Errors: as engine::begin.
[[nodiscard]] result<std::unique_ptr<plan>> begin_plan(const begin_request& request, const begin_context& ctx,
                                                       begin_response& response);

/// begin_plan() for the plan the `plan` oneof names, ignoring `view` (a CLIENT-placement view
/// wraps it). Errors: as engine::begin.
[[nodiscard]] result<std::unique_ptr<plan>> begin_ordinary_plan(const begin_request& request, const begin_context& ctx,
                                                                begin_response& response);

// ---- shared by the plans ----

/// What the plans that take a canonical index at Begin check first: device_id ≥ 0, then the
/// index (ctx.resolve_index). Errors: INVALID_ARGUMENT, NOT_FOUND, as engine::begin.
[[nodiscard]] result<std::shared_ptr<const index::canonical_index>> begin_indexed(const begin_request& request,
                                                                                  const begin_context& ctx);

/// The canonical index of a Begin: parsed from the inline data, or the index store's entry for
/// the key (`lookup`, by hex key; null when unknown), re-validated for another total_size.
/// Errors: INVALID_ARGUMENT (none or both given, bad schema/encoding, bad key or index),
/// NOT_FOUND (unknown key).
[[nodiscard]] result<std::shared_ptr<const index::canonical_index>> resolve_index(
    const begin_request& request,
    const std::function<std::shared_ptr<const index::canonical_index>(const std::string& hex_key)>& lookup);

/// What no plan but `plan_name` accepts: storage tables or lease segments (only LIP takes
/// them) and streamed chunks or written ranges (only a memfd stable_dram upload takes them).
[[nodiscard]] status check_feed_shape(const feed_request& request, const std::string& what, std::string_view plan_name,
                                      bool takes_tables, bool takes_chunks);

/// The normalized canonical buffer over `raw` (DECISIONS §5.1): the index's DATA ranges read
/// from `raw` at the same offsets, PAD as zero. `raw` must outlive the view.
[[nodiscard]] result<memory::segmented_view> normalized_view(const memory::byte_source& raw,
                                                             const index::canonical_index& idx);

/// normalized_view() that owns the raw buffer it reads.
class normalized_source final : public view_source {
 public:
  [[nodiscard]] static result<std::shared_ptr<const normalized_source>> create(
      std::shared_ptr<const memory::byte_source> raw, const index::canonical_index& idx);
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

/// The descriptor of freshly hashed bytes: the cgid when the client chose one, else the mi2 id
/// of the index and `data`. `index_multihash`: the index's, computed before (null: computed here).
[[nodiscard]] artifact_descriptor describe(const registration_facts& facts, const index::canonical_index& idx,
                                           const std::optional<hash::digest>& data,
                                           const std::string* index_multihash = nullptr);

/// The data hash of a canonical buffer: on the GPU when its bytes are device memory and that is
/// faster, otherwise on all host cores (DECISIONS §6). Errors: CANCELLED (`cancel` set: checked
/// per leaf on the host, before and after the GPU), the reads'.
[[nodiscard]] result<hash::digest> hash_canonical(const memory::segmented_view& canonical, thread_pool& pool,
                                                  device_memory* devices, cancel_flag cancel = nullptr);

[[nodiscard]] stable::admit_policy admit_policy_of(const policy::resolved_policy& r);

/// §6.2: after a commit, makes sure a host copy of `artifact_id` exists when the policy asks for
/// one. A "must" tier that cannot be met sets `*must_failure`.
[[nodiscard]] local_stable_tier_result apply_local_stable_tier(commit_context& ctx, const std::string& artifact_id,
                                                               status* must_failure);

}  // namespace tensorreg::registration::detail
