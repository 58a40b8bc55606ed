// tensorreg/stable/stable_dram_cache.hpp — the local stable-DRAM cache (registration.md §6.3).
//
// Provides `stable_dram_cache`: a byte-budgeted, LRU-ordered map from artifact id to a
// host-resident replica of the artifact's canonical bytes, with a per-entry policy
// (retention best_effort / ttl / pinned, overflow evict / spill / reject, `required`) that
// decides what may be evicted to make room, and whether a shortfall is an error or a skip.
// Admission follows upstream's StableDramCacheManager rule by rule; see `admit()`.
//
// Thread-safety: every member function may be called from any thread. One mutex guards all
// state; it is held for the whole of each call except while the eviction listener runs and
// while evicted replicas are released (both happen after the lock is dropped, so a listener may
// call back into the cache and a replica's destructor may be slow). The `has_durable_copy`
// predicate, by contrast, is called WITH the lock held and must not call back into the cache.
//
// Ownership: the cache shares ownership of each replica (`std::shared_ptr<const byte_source>`).
// Evicting or removing an entry drops only the cache's reference: a reader that got the pointer
// from `lookup()` keeps the bytes alive for as long as it holds it. The cache does not own the
// clock, which must outlive it.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tensorreg/common/clock.hpp"
#include "tensorreg/common/error.hpp"
#include "tensorreg/common/priority_inheriting_mutex.hpp"
#include "tensorreg/memory/byte_source.hpp"
#include "tensorreg/memory/unlocked_release.hpp"
#include "tensorreg/policy/store_policy.hpp"

namespace tensorreg::stable {

/// The admission policy of one artifact: usually `policy::derive_cache_policy()` of its
/// resolved StorePolicy. `retention` unspecified counts as best_effort, `overflow` unspecified
/// as evict; retention ttl needs `ttl_ms > 0`.
using admit_policy = policy::cache_policy;

/// Why an entry left the cache (reported to the eviction listener).
enum class eviction_reason {
  capacity,  ///< Evicted to admit another entry (overflow evict).
  spill,     ///< Evicted to admit another entry on the spill path (it has a durable copy).
  preempt,   ///< Evicted by preempt_for_export().
};

/// One entry that left the cache by eviction (not by remove()).
struct evicted_entry {
  std::string key;
  std::uint64_t size_bytes = 0;
  eviction_reason reason = eviction_reason::capacity;
};

/// The result of an admission that did not fail.
struct admit_outcome {
  bool admitted = false;             ///< The key is cached now (true for upgrades too).
  bool upgraded = false;             ///< The key was already cached; its policy was merged (nothing evicted).
  std::string skip_reason;           ///< Why the entry was not cached; non-empty iff !admitted.
  std::vector<std::string> evicted;  ///< Keys evicted to make room, least recently used first.
};

/// A snapshot of one entry's state.
struct entry_info {
  std::uint64_t size_bytes = 0;
  policy::retention retention = policy::retention::best_effort;
  std::optional<clock::time_point> deadline;  ///< The TTL deadline, for entries that ever had one.
  policy::overflow overflow = policy::overflow::evict;
  bool required = false;
  bool require_shared_disk_for_spill = false;
  bool require_remote_stable_for_spill = false;
};

/// Counters; a consistent snapshot taken under the lock.
struct cache_stats {
  std::uint64_t entries = 0;
  std::uint64_t bytes_used = 0;
  std::uint64_t budget_bytes = 0;  ///< 0 = unlimited.
  std::uint64_t evictions = 0;     ///< Entries evicted since construction (remove() not counted).
  std::uint64_t evicted_bytes = 0;
  std::uint64_t reserved_bytes = 0;  ///< Held by reservations (uploads not admitted yet).
  std::uint64_t changes = 0;         ///< Entries added, evicted or removed since construction.
};

/// Hooks; all optional.
struct cache_hooks {
  /// Whether a durable copy of the artifact exists (on the shared disk), so that its DRAM copy
  /// may be dropped on the spill path. Unset means no durable store is configured: every spill
  /// is blocked ("fails closed"). Called with the cache's lock held: must be quick and must not
  /// call back into the cache.
  std::function<bool(std::string_view artifact_id)> has_durable_copy;
  /// Called once per evicted entry, after the lock is released, on the evicting thread.
  std::function<void(const evicted_entry&)> on_evict;
};

class stable_dram_cache;

/// Bytes of a cache's budget held for an upload that is admitted later (reserve()). Gives them
/// back when destroyed, unless admit() turned them into the upload's entry first. Move-only;
/// empty (0 bytes) by default and with no budget. REQUIRES: the cache outlives it.
class budget_reservation {
 public:
  budget_reservation() noexcept = default;
  budget_reservation(budget_reservation&& other) noexcept;
  budget_reservation& operator=(budget_reservation&& other) noexcept;
  budget_reservation(const budget_reservation&) = delete;
  budget_reservation& operator=(const budget_reservation&) = delete;
  ~budget_reservation();

  [[nodiscard]] std::uint64_t bytes() const noexcept { return bytes_; }

 private:
  friend class stable_dram_cache;
  budget_reservation(stable_dram_cache* cache, std::uint64_t bytes) noexcept : cache_(cache), bytes_(bytes) {}
  void release() noexcept;

  stable_dram_cache* cache_ = nullptr;
  std::uint64_t bytes_ = 0;
};

class stable_dram_cache {
 public:
  /// A cache of at most `budget_bytes` bytes (0 = unlimited) that reads time from `clk`.
  /// REQUIRES: `clk` outlives the cache.
  stable_dram_cache(std::uint64_t budget_bytes, const clock& clk, cache_hooks hooks = {});

  stable_dram_cache(const stable_dram_cache&) = delete;
  stable_dram_cache& operator=(const stable_dram_cache&) = delete;
  ~stable_dram_cache();

  /// Caches `replica` (the artifact's `size_bytes` canonical bytes) under `key`, or upgrades
  /// the policy of an existing entry, or decides not to cache it. In order:
  ///  1. An existing entry is upgraded and reported admitted + upgraded: retention and
  ///     overflow take the higher rank, the flags are ORed, the later TTL deadline wins, and
  ///     the entry becomes most recently used. Its replica and size stay as they are.
  ///  2. With a budget, `size_bytes > budget`: RESOURCE_EXHAUSTED if required, else skipped.
  ///  3. If it does not fit and overflow is not reject: on spill, the spill guard must pass
  ///     (a durable store is configured), then entries are evicted in LRU order among the
  ///     eligible ones (not required, not pinned, ttl only after its deadline, and on spill
  ///     only entries with a durable copy and no demand for a remote stable copy). Victims are
  ///     chosen first and evicted only if they free enough, so a failed admission evicts
  ///     nothing. Still short on spill → RESOURCE_EXHAUSTED.
  ///  4. Still short: reject, required or spill → RESOURCE_EXHAUSTED; otherwise skipped.
  /// A ttl entry's deadline is now + ttl_ms (saturating).
  /// Errors: INVALID_ARGUMENT for an empty key, a null replica, size 0, a replica smaller than
  /// `size_bytes`, retention ttl without ttl_ms > 0, or an enum value outside its list;
  /// RESOURCE_EXHAUSTED as above, the message naming the key, the sizes and the rule
  /// ("stable cache spill blocked", "could not free enough bytes", "insufficient stable bytes").
  /// Reserved bytes (reserve()) count as used, except those of `reservation`, which is the
  /// admitted entry's own: admitting or upgrading consumes it (its bytes become the entry's, or
  /// go back when the entry existed); a failed or skipped admission leaves it as it was.
  [[nodiscard]] result<admit_outcome> admit(std::string_view key, std::uint64_t size_bytes,
                                            std::shared_ptr<const memory::byte_source> replica,
                                            const admit_policy& policy, budget_reservation* reservation = nullptr);

  /// Holds `bytes` of the budget for an upload still in progress, so that the uploads in flight
  /// never hold more than the budget together. Evicts nothing: it fits when `bytes` is at most
  /// the budget less what other reservations hold and what entries that cannot be evicted now
  /// (required, pinned, unexpired ttl) hold; admissions then evict to honour it. With no budget
  /// the reservation is empty.
  /// Errors: RESOURCE_EXHAUSTED "cannot reserve N bytes of the stable budget: F of B bytes free
  /// (R reserved by uploads in progress, P held by entries that cannot be evicted)".
  [[nodiscard]] result<budget_reservation> reserve(std::uint64_t bytes);

  /// The replica cached under `key`, or null; a hit becomes the most recently used entry.
  [[nodiscard]] std::shared_ptr<const memory::byte_source> lookup(std::string_view key);

  /// Every entry's key and replica, most recently used first (does not touch the LRU order):
  /// what a daemon hands to its successor (persistence/resident_state.hpp).
  [[nodiscard]] std::vector<std::pair<std::string, std::shared_ptr<const memory::byte_source>>> entries() const;

  /// Whether `key` is cached (does not touch the LRU order).
  [[nodiscard]] bool contains(std::string_view key) const;

  /// A snapshot of the entry under `key`, or nullopt.
  [[nodiscard]] std::optional<entry_info> info(std::string_view key) const;

  /// Whether the entry under `key` could be evicted now to make room for an evict-policy
  /// admission (not required, not pinned, ttl past its deadline); false if absent.
  [[nodiscard]] bool is_evictable(std::string_view key) const;

  /// Drops the entry under `key` whatever its policy (not reported as an eviction); returns
  /// whether there was one.
  bool remove(std::string_view key);

  /// Makes at least `bytes` of the budget free for an export that is charged to it, evicting
  /// entries in LRU order regardless of retention (pinned and unexpired ttl entries go too)
  /// but never a required one. Returns the bytes evicted (0 with no budget or when enough is
  /// already free). Nothing is evicted if not enough can be.
  /// Errors: RESOURCE_EXHAUSTED naming the bytes asked for, free and evictable.
  [[nodiscard]] result<std::uint64_t> preempt_for_export(std::uint64_t bytes);

  [[nodiscard]] cache_stats stats() const;
  /// The bytes of the entries an evict-policy admission could evict now (is_evictable()): the
  /// room the cache can make beyond its free bytes. Walks every entry.
  [[nodiscard]] std::uint64_t evictable_bytes() const;
  [[nodiscard]] std::uint64_t bytes_used() const;
  [[nodiscard]] std::uint64_t budget_bytes() const noexcept { return budget_; }

 private:
  struct entry {
    std::string key;
    std::shared_ptr<const memory::byte_source> replica;
    entry_info info;
  };
  using lru_list = std::list<entry>;  // front = most recently used

  struct key_hash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
  };

  enum class eviction_path { evict, spill, preempt };

  // All private helpers below REQUIRE mutex_ held.
  [[nodiscard]] bool eligible_locked(const entry& e, eviction_path path, clock::time_point now) const;
  // LRU-first victims of `path` that together free at least `need` bytes; nullopt if they can't.
  [[nodiscard]] std::optional<std::vector<lru_list::iterator>> plan_victims_locked(std::uint64_t need,
                                                                                   eviction_path path,
                                                                                   clock::time_point now,
                                                                                   std::uint64_t* evictable);
  void evict_locked(const std::vector<lru_list::iterator>& victims, eviction_reason reason,
                    std::vector<evicted_entry>& report, memory::deferred_release& drop);
  void notify(const std::vector<evicted_entry>& report) const;
  friend class budget_reservation;
  void unreserve(std::uint64_t bytes) noexcept;

  const std::uint64_t budget_;
  const clock& clock_;
  const cache_hooks hooks_;

  mutable priority_inheriting_mutex mutex_;  // guards everything below; the I/O thread takes it
  lru_list lru_;
  std::unordered_map<std::string, lru_list::iterator, key_hash, std::equal_to<>> index_;
  std::uint64_t bytes_used_ = 0;
  std::uint64_t reserved_ = 0;  // held by live budget_reservations
  std::uint64_t evictions_ = 0;
  std::uint64_t evicted_bytes_ = 0;
  std::uint64_t changes_ = 0;
};

}  // namespace tensorreg::stable
