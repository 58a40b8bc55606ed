// tensorreg/policy/store_policy.hpp — StorePolicy as library types, and its resolver.
//
// Provides the library-side mirror of upstream's `StorePolicy` message (registration.md §1.6):
// enums with the proto's numeric values (so the daemon converts with a static_cast and a
// range check happens here), `tier_spec`, `store_policy`; the resolver of registration.md
// §6.1 that validates a policy and expands a profile into per-tier requirement levels
// (`resolve`); the stable-DRAM cache policy derived from the result (`derive_cache_policy`);
// and a parser for profile names typed on a command line (`parse_profile`).
//
// Wire values arrive unchecked (proto3 enums are open), so every enum field may hold a value
// outside its list; the resolver rejects those with INVALID_ARGUMENT naming the number.
// Where upstream silently maps an unknown value to a default, we reject (stricter, never
// looser).
//
// Thread-safety: plain values and pure functions; no shared state.
// Ownership: everything is held by value.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "tensorreg/common/error.hpp"

namespace tensorreg::policy {

/// PolicyProfile. Numbers are upstream's wire values.
enum class profile : std::int32_t { unspecified = 0, cache = 1, durable = 2, ha = 3, cold = 4, pinned = 5, warm = 6 };

/// PolicyTier.
enum class tier : std::int32_t { unspecified = 0, stable_dram = 1, shared_disk = 2 };

/// PolicyScope. `unspecified` counts as `any` wherever a scope is read.
enum class scope : std::int32_t { unspecified = 0, local = 1, remote = 2, any = 3 };

/// RetentionPolicy. Rank for merging: pinned > ttl > best_effort (`unspecified` = best_effort).
enum class retention : std::int32_t { unspecified = 0, best_effort = 1, ttl = 2, pinned = 3 };

/// OverflowPolicy. Rank for merging: reject > spill > evict (`unspecified` = evict).
enum class overflow : std::int32_t { unspecified = 0, evict = 1, spill = 2, reject = 3 };

/// PolicyLayout. `automatic` is POLICY_LAYOUT_AUTO (`auto` is a keyword).
enum class layout : std::int32_t { unspecified = 0, automatic = 1, unsharded = 2, sharded = 3 };

/// How strongly a tier is asked for; levels combine by max (must > should > may > none).
enum class requirement : std::int32_t { none = 0, may = 1, should = 2, must = 3 };

/// Lower-case names ("cache", "stable_dram", "best_effort", "auto", "must", ...) for messages
/// and the CLI; "unknown" for a value outside the list.
[[nodiscard]] std::string_view to_string(profile value) noexcept;
[[nodiscard]] std::string_view to_string(tier value) noexcept;
[[nodiscard]] std::string_view to_string(scope value) noexcept;
[[nodiscard]] std::string_view to_string(retention value) noexcept;
[[nodiscard]] std::string_view to_string(overflow value) noexcept;
[[nodiscard]] std::string_view to_string(layout value) noexcept;
[[nodiscard]] std::string_view to_string(requirement value) noexcept;

/// TierSpec: one requested tier at the level of the list it sits in.
struct tier_spec {
  policy::tier tier = policy::tier::unspecified;
  policy::scope scope = policy::scope::unspecified;
  /// 0 means 1. Scope remote: hosts other than this one; any: hosts in all, this one counted;
  /// local and shared_disk: only 1.
  std::uint32_t min_replicas = 0;
  policy::retention retention = policy::retention::unspecified;
  std::optional<std::uint64_t> retention_ttl_ms;  ///< Only with retention ttl, and then > 0.

  friend bool operator==(const tier_spec&, const tier_spec&) = default;
};

/// StorePolicy: either a profile, or explicit tier lists (not both), plus overrides.
struct store_policy {
  policy::profile profile = policy::profile::unspecified;
  std::vector<tier_spec> must;
  std::vector<tier_spec> should;
  std::vector<tier_spec> may;
  policy::overflow overflow = policy::overflow::unspecified;  ///< Overrides a profile's default.
  policy::layout layout = policy::layout::unspecified;        ///< unspecified resolves to automatic.

  friend bool operator==(const store_policy&, const store_policy&) = default;
};

/// What the local stable-DRAM cache is told about one artifact (the admission policy of
/// tensorreg/stable/stable_dram_cache.hpp).
struct cache_policy {
  policy::retention retention = policy::retention::best_effort;  ///< Never unspecified.
  std::optional<std::uint64_t> ttl_ms;                           ///< Set iff retention is ttl; > 0.
  policy::overflow overflow = policy::overflow::evict;           ///< Never unspecified.
  bool required = false;                                         ///< The local stable tier is must.
  bool require_shared_disk_for_spill = false;                    ///< The shared-disk tier is must.
  bool require_remote_stable_for_spill = false;                  ///< The remote stable tier is must.

  friend bool operator==(const cache_policy&, const cache_policy&) = default;
};

/// A validated policy, stated per tier.
struct resolved_policy {
  /// The profile that was expanded (`cache` when none was given and no tiers were listed);
  /// `unspecified` when explicit tiers were given.
  policy::profile profile = policy::profile::unspecified;
  requirement local_stable = requirement::none;   ///< stable_dram with scope local or any.
  requirement remote_stable = requirement::none;  ///< stable_dram with scope remote or any.
  requirement shared_disk = requirement::none;
  /// Stable copies on several hosts (docs/cluster.md §5): the highest level of a stable_dram
  /// tier asking for more than this host (remote N: N + 1 hosts; any N: N), the most hosts any
  /// tier asks for, and the most a must tier asks for; 1 = this host alone.
  requirement replica_level = requirement::none;
  std::uint32_t replica_hosts = 1;
  std::uint32_t replica_hosts_must = 1;
  /// Retention of the local stable copy: the retention of the highest level that names the
  /// local tier; within one level the highest rank, and for ttl the longest ttl.
  policy::retention local_retention = policy::retention::best_effort;
  std::optional<std::uint64_t> local_ttl_ms;  ///< Set iff local_retention is ttl.
  policy::overflow overflow = policy::overflow::evict;
  policy::layout layout = policy::layout::automatic;
  /// derive_cache_policy(*this), filled in by resolve(); nullopt when local_stable is none.
  std::optional<cache_policy> cache;

  friend bool operator==(const resolved_policy&, const resolved_policy&) = default;
};

/// Validates a policy and expands it (registration.md §6.1). No policy means profile cache.
///
/// Profiles expand as: cache → local may best_effort; durable → shared_disk must, local should
/// best_effort; ha → shared_disk must, remote should, local should best_effort; cold →
/// shared_disk must, local should ttl 60000 ms; warm → local should best_effort, overflow
/// reject; pinned → local must pinned, overflow reject. ha asks for 2 hosts at should
/// (replica_hosts). An explicit `overflow` overrides the
/// profile's. Explicit tiers default to overflow evict.
///
/// Errors: INVALID_ARGUMENT, naming the list and index of the offending tier and its value,
/// for: a profile together with explicit tiers; tier unspecified; shared_disk with a scope
/// other than any, with retention fields, or min_replicas other than 1; stable_dram with scope
/// local and min_replicas other than 1; retention ttl without retention_ttl_ms > 0; retention_ttl_ms
/// without retention ttl; scope remote with retention fields; must with scope local or any
/// whose retention is not pinned; overflow spill without a shared_disk tier at must or should;
/// any enum value outside its list.
[[nodiscard]] result<resolved_policy> resolve(const std::optional<store_policy>& policy);

/// The stable-DRAM admission policy of a resolved policy: nullopt when the local stable tier
/// is not asked for; otherwise required = (local is must), require_shared_disk_for_spill =
/// (shared_disk is must), require_remote_stable_for_spill = (remote is must).
[[nodiscard]] std::optional<cache_policy> derive_cache_policy(const resolved_policy& resolved) noexcept;

/// Parses a profile name as typed on a command line: exactly one of "cache", "durable", "ha",
/// "cold", "warm", "pinned" (lower case).
/// Errors: INVALID_ARGUMENT naming the text and the accepted names.
[[nodiscard]] result<profile> parse_profile(std::string_view text);

/// Parses a policy as typed on a command line: a profile name (parse_profile), or explicit
/// tiers `LEVEL:TIER[:SCOPE[:N]]` separated by commas, LEVEL must|should|may, TIER
/// stable_dram|shared_disk, SCOPE local|remote|any, N min_replicas (e.g.
/// "should:stable_dram:local,should:stable_dram:remote:2"). Only the syntax is checked here;
/// resolve() judges the policy.
/// Errors: INVALID_ARGUMENT naming the text and what is wrong with it.
[[nodiscard]] result<store_policy> parse_policy(std::string_view text);

}  // namespace tensorreg::policy
