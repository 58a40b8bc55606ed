#include "tensorreg/stable/stable_dram_cache.hpp"

#include <algorithm>
#include <limits>
#include <utility>

#include "common/text.hpp"

namespace tensorreg::stable {
namespace {

using policy::overflow;
using policy::retention;

retention normalized(retention r) noexcept { return r == retention::unspecified ? retention::best_effort : r; }
overflow normalized(overflow o) noexcept { return o == overflow::unspecified ? overflow::evict : o; }

// Enum numbers are the proto's, which are also the merge ranks (best_effort < ttl < pinned,
// evict < spill < reject).
template <typename Enum>
Enum max_rank(Enum a, Enum b) noexcept {
  return static_cast<std::int32_t>(a) >= static_cast<std::int32_t>(b) ? a : b;
}

using text::quoted;

std::string admit_prefix(std::string_view key, std::uint64_t size_bytes) {
  return "cannot admit " + quoted(key) + " (" + std::to_string(size_bytes) + " bytes) to the stable dram cache: ";
}

std::chrono::milliseconds ttl_of(std::uint64_t ttl_ms) noexcept {
  constexpr auto kMax = static_cast<std::uint64_t>(std::numeric_limits<std::chrono::milliseconds::rep>::max());
  return std::chrono::milliseconds(static_cast<std::chrono::milliseconds::rep>(std::min(ttl_ms, kMax)));
}

}  // namespace

stable_dram_cache::stable_dram_cache(std::uint64_t budget_bytes, const clock& clk, cache_hooks hooks)
    : budget_(budget_bytes), clock_(clk), hooks_(std::move(hooks)) {}

stable_dram_cache::~stable_dram_cache() = default;

bool stable_dram_cache::eligible_locked(const entry& e, eviction_path path, clock::time_point now) const {
  if (e.info.required) return false;
  if (path == eviction_path::preempt) return true;  // preemption ignores retention
  switch (e.info.retention) {
    case retention::pinned: return false;
    case retention::ttl:
      if (!e.info.deadline || now < *e.info.deadline) return false;
      break;
    default: break;
  }
  if (path == eviction_path::spill) {
    // No remote stable tier exists in a standalone daemon, so an entry whose policy demands a
    // remote copy before its local one may go is never spilled.
    if (e.info.require_remote_stable_for_spill) return false;
    if (!hooks_.has_durable_copy || !hooks_.has_durable_copy(e.key)) return false;
  }
  return true;
}

std::optional<std::vector<stable_dram_cache::lru_list::iterator>> stable_dram_cache::plan_victims_locked(
    std::uint64_t need, eviction_path path, clock::time_point now, std::uint64_t* evictable) {
  std::vector<lru_list::iterator> victims;
  std::uint64_t freed = 0;
  for (auto it = lru_.end(); it != lru_.begin() && freed < need;) {
    --it;
    if (!eligible_locked(*it, path, now)) continue;
    victims.push_back(it);
    freed += it->info.size_bytes;
  }
  if (evictable != nullptr) *evictable = freed;
  if (freed < need) return std::nullopt;
  return victims;
}

void stable_dram_cache::evict_locked(const std::vector<lru_list::iterator>& victims, eviction_reason reason,
                                     std::vector<evicted_entry>& report, memory::deferred_release& drop) {
  for (const auto it : victims) {
    report.push_back(evicted_entry{it->key, it->info.size_bytes, reason});
    drop.push_back(std::move(it->replica));
    bytes_used_ -= it->info.size_bytes;
    ++changes_;
    evicted_bytes_ += it->info.size_bytes;
    ++evictions_;
    index_.erase(index_.find(std::string_view(it->key)));
    lru_.erase(it);
  }
}

void stable_dram_cache::notify(const std::vector<evicted_entry>& report) const {
  if (!hooks_.on_evict) return;
  for (const auto& e : report) hooks_.on_evict(e);
}

result<admit_outcome> stable_dram_cache::admit(std::string_view key, std::uint64_t size_bytes,
                                               std::shared_ptr<const memory::byte_source> replica,
                                               const admit_policy& policy, budget_reservation* reservation) {
  if (key.empty()) {
    return fail(errc::invalid_argument, "cannot admit an entry to the stable dram cache: the key is empty");
  }
  const std::string prefix = admit_prefix(key, size_bytes);
  if (!replica) return fail(errc::invalid_argument, prefix + "no replica was given");
  if (size_bytes == 0) return fail(errc::invalid_argument, prefix + "size must be > 0");
  if (replica->size() < size_bytes) {
    return fail(errc::invalid_argument,
                prefix + "the replica holds only " + std::to_string(replica->size()) + " bytes");
  }
  if (static_cast<std::int32_t>(policy.retention) < 0 || policy.retention > retention::pinned) {
    return fail(errc::invalid_argument,
                prefix + "unknown retention " + std::to_string(static_cast<std::int32_t>(policy.retention)));
  }
  if (static_cast<std::int32_t>(policy.overflow) < 0 || policy.overflow > overflow::reject) {
    return fail(errc::invalid_argument,
                prefix + "unknown overflow " + std::to_string(static_cast<std::int32_t>(policy.overflow)));
  }
  const retention ret = normalized(policy.retention);
  const overflow ovf = normalized(policy.overflow);
  if (ret == retention::ttl && (!policy.ttl_ms || *policy.ttl_ms == 0)) {
    return fail(errc::invalid_argument, prefix + "retention ttl requires ttl_ms > 0, got " +
                                            (policy.ttl_ms ? std::string("0") : std::string("none")));
  }

  std::vector<evicted_entry> report;
  memory::deferred_release drop;  // released after this lock and the caller's
  admit_outcome outcome;
  {
    std::lock_guard lock(mutex_);
    const clock::time_point now = clock_.now();
    // The entry's own reservation is the room it was promised; everyone else's is taken.
    const std::uint64_t own = reservation != nullptr && reservation->cache_ == this ? reservation->bytes_ : 0;
    const auto consume_reservation = [&] {
      if (own == 0) return;
      reserved_ -= own;
      reservation->cache_ = nullptr;
      reservation->bytes_ = 0;
    };
    const auto held = [&] { return bytes_used_ + (reserved_ - own); };
    std::optional<clock::time_point> deadline;
    if (ret == retention::ttl) deadline = saturating_deadline(now, ttl_of(*policy.ttl_ms));

    // 1. Upgrade an existing entry.
    if (const auto found = index_.find(key); found != index_.end()) {
      entry_info& info = found->second->info;
      info.retention = max_rank(info.retention, ret);
      info.overflow = max_rank(info.overflow, ovf);
      info.required = info.required || policy.required;
      info.require_shared_disk_for_spill = info.require_shared_disk_for_spill || policy.require_shared_disk_for_spill;
      info.require_remote_stable_for_spill =
          info.require_remote_stable_for_spill || policy.require_remote_stable_for_spill;
      if (deadline && (!info.deadline || *deadline > *info.deadline)) info.deadline = deadline;
      lru_.splice(lru_.begin(), lru_, found->second);
      consume_reservation();  // the new copy is not kept
      outcome.admitted = true;
      outcome.upgraded = true;
      return outcome;
    }

    const bool spilling = ovf == overflow::spill;
    // 2. Larger than the whole budget.
    if (budget_ > 0 && size_bytes > budget_) {
      std::string reason =
          std::to_string(size_bytes) + " bytes exceed the stable budget of " + std::to_string(budget_) + " bytes";
      if (policy.required) return fail(errc::resource_exhausted, prefix + reason);
      outcome.skip_reason = std::move(reason);
      return outcome;
    }

    const std::uint64_t free_bytes = held() >= budget_ ? 0 : budget_ - held();
    const bool fits = budget_ == 0 || size_bytes <= free_bytes;
    if (!fits) {
      const std::uint64_t need = size_bytes - free_bytes;
      // 3. Make room, unless the entry's policy is reject.
      if (ovf != overflow::reject) {
        if (spilling && !hooks_.has_durable_copy) {
          return fail(errc::resource_exhausted,
                      prefix +
                          "stable cache spill blocked: no durable store is configured, so no entry has a "
                          "durable copy to fall back on");
        }
        const eviction_path path = spilling ? eviction_path::spill : eviction_path::evict;
        std::uint64_t evictable = 0;
        auto victims = plan_victims_locked(need, path, now, &evictable);
        if (victims) {
          evict_locked(*victims, spilling ? eviction_reason::spill : eviction_reason::capacity, report, drop);
          for (const auto& e : report) outcome.evicted.push_back(e.key);
        } else if (spilling) {
          return fail(errc::resource_exhausted, prefix + "could not free enough bytes: need " + std::to_string(need) +
                                                    " more, " + std::to_string(evictable) +
                                                    " held by entries with a durable copy that may be spilled");
        }
      }
      // 4. Still short.
      if (held() + size_bytes > budget_) {
        const std::uint64_t left = held() >= budget_ ? 0 : budget_ - held();
        std::string reason =
            "insufficient stable bytes: " + std::to_string(left) + " of " + std::to_string(budget_) + " free" +
            (reserved_ - own > 0 ? " (" + std::to_string(reserved_ - own) + " reserved by uploads in progress)"
                                 : std::string()) +
            ", overflow " + std::string(policy::to_string(ovf)) + (policy.required ? ", required" : "");
        if (ovf == overflow::reject || policy.required || spilling) {
          return fail(errc::resource_exhausted, prefix + reason);
        }
        outcome.skip_reason = std::move(reason);
        return outcome;
      }
    }

    entry e;
    e.key = std::string(key);
    e.replica = std::move(replica);
    e.info.size_bytes = size_bytes;
    e.info.retention = ret;
    e.info.deadline = deadline;
    e.info.overflow = ovf;
    e.info.required = policy.required;
    e.info.require_shared_disk_for_spill = policy.require_shared_disk_for_spill;
    e.info.require_remote_stable_for_spill = policy.require_remote_stable_for_spill;
    lru_.push_front(std::move(e));
    index_.emplace(lru_.front().key, lru_.begin());
    bytes_used_ += size_bytes;
    ++changes_;
    consume_reservation();
    outcome.admitted = true;
  }
  notify(report);
  return outcome;
}

std::shared_ptr<const memory::byte_source> stable_dram_cache::lookup(std::string_view key) {
  std::lock_guard lock(mutex_);
  const auto found = index_.find(key);
  if (found == index_.end()) return nullptr;
  lru_.splice(lru_.begin(), lru_, found->second);
  return found->second->replica;
}

std::vector<std::pair<std::string, std::shared_ptr<const memory::byte_source>>> stable_dram_cache::entries() const {
  std::lock_guard lock(mutex_);
  std::vector<std::pair<std::string, std::shared_ptr<const memory::byte_source>>> out;
  out.reserve(lru_.size());
  for (const auto& e : lru_) out.emplace_back(e.key, e.replica);
  return out;
}

bool stable_dram_cache::contains(std::string_view key) const {
  std::lock_guard lock(mutex_);
  return index_.find(key) != index_.end();
}

std::optional<entry_info> stable_dram_cache::info(std::string_view key) const {
  std::lock_guard lock(mutex_);
  const auto found = index_.find(key);
  if (found == index_.end()) return std::nullopt;
  return found->second->info;
}

bool stable_dram_cache::is_evictable(std::string_view key) const {
  std::lock_guard lock(mutex_);
  const auto found = index_.find(key);
  return found != index_.end() && eligible_locked(*found->second, eviction_path::evict, clock_.now());
}

bool stable_dram_cache::remove(std::string_view key) {
  memory::deferred_release drop;  // released after this lock and the caller's
  std::lock_guard lock(mutex_);
  const auto found = index_.find(key);
  if (found == index_.end()) return false;
  const auto it = found->second;
  drop.push_back(std::move(it->replica));
  bytes_used_ -= it->info.size_bytes;
  ++changes_;
  index_.erase(found);
  lru_.erase(it);
  return true;
}

result<std::uint64_t> stable_dram_cache::preempt_for_export(std::uint64_t bytes) {
  std::vector<evicted_entry> report;
  memory::deferred_release drop;
  std::uint64_t freed = 0;
  {
    std::lock_guard lock(mutex_);
    if (budget_ == 0) return std::uint64_t{0};
    const std::uint64_t free_bytes = budget_ - bytes_used_;
    if (bytes <= free_bytes) return std::uint64_t{0};
    const std::uint64_t need = bytes - free_bytes;
    std::uint64_t evictable = 0;
    const auto victims = plan_victims_locked(need, eviction_path::preempt, clock_.now(), &evictable);
    if (!victims) {
      return fail(errc::resource_exhausted, "cannot preempt the stable dram cache for an export of " +
                                                std::to_string(bytes) + " bytes: " + std::to_string(free_bytes) +
                                                " of " + std::to_string(budget_) + " free and " +
                                                std::to_string(evictable) + " held by entries that are not required");
    }
    evict_locked(*victims, eviction_reason::preempt, report, drop);
    for (const auto& e : report) freed += e.size_bytes;
  }
  notify(report);
  return freed;
}

result<budget_reservation> stable_dram_cache::reserve(std::uint64_t bytes) {
  if (budget_ == 0 || bytes == 0) return budget_reservation{};
  std::lock_guard lock(mutex_);
  const clock::time_point now = clock_.now();
  std::uint64_t pinned = 0;
  for (const auto& e : lru_) {
    if (!eligible_locked(e, eviction_path::evict, now)) pinned += e.info.size_bytes;
  }
  const std::uint64_t taken = reserved_ + pinned;
  const std::uint64_t free_bytes = taken >= budget_ ? 0 : budget_ - taken;
  if (bytes > free_bytes) {
    return fail(errc::resource_exhausted, "cannot reserve " + std::to_string(bytes) +
                                              " bytes of the stable budget: " + std::to_string(free_bytes) + " of " +
                                              std::to_string(budget_) + " bytes free (" + std::to_string(reserved_) +
                                              " reserved by uploads in progress, " + std::to_string(pinned) +
                                              " held by entries that cannot be evicted)");
  }
  reserved_ += bytes;
  return budget_reservation(this, bytes);
}

void stable_dram_cache::unreserve(std::uint64_t bytes) noexcept {
  std::lock_guard lock(mutex_);
  reserved_ -= bytes;
}

std::uint64_t stable_dram_cache::evictable_bytes() const {
  std::lock_guard lock(mutex_);
  const auto now = clock_.now();
  std::uint64_t out = 0;
  for (const auto& e : lru_) {
    if (eligible_locked(e, eviction_path::evict, now)) out += e.info.size_bytes;
  }
  return out;
}

cache_stats stable_dram_cache::stats() const {
  std::lock_guard lock(mutex_);
  return cache_stats{index_.size(), bytes_used_, budget_, evictions_, evicted_bytes_, reserved_, changes_};
}

// ---- budget_reservation ----------------------------------------------------------------------

budget_reservation::budget_reservation(budget_reservation&& other) noexcept
    : cache_(std::exchange(other.cache_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

budget_reservation& budget_reservation::operator=(budget_reservation&& other) noexcept {
  if (this != &other) {
    release();
    cache_ = std::exchange(other.cache_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

budget_reservation::~budget_reservation() { release(); }

void budget_reservation::release() noexcept {
  if (cache_ != nullptr && bytes_ != 0) cache_->unreserve(bytes_);
  cache_ = nullptr;
  bytes_ = 0;
}

std::uint64_t stable_dram_cache::bytes_used() const {
  std::lock_guard lock(mutex_);
  return bytes_used_;
}

}  // namespace tensorreg::stable
