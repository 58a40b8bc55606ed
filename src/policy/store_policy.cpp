#include "tensorreg/policy/store_policy.hpp"

#include <algorithm>
#include <array>
#include <charconv>
#include <string>
#include <utility>

namespace tensorreg::policy {
namespace {

constexpr std::uint64_t kColdTtlMs = 60'000;

template <typename Enum, std::size_t N>
std::string_view name_in(Enum value, const std::array<std::string_view, N>& names) noexcept {
  const auto index = static_cast<std::int64_t>(value);
  if (index < 0 || static_cast<std::size_t>(index) >= N) return "unknown";
  return names[static_cast<std::size_t>(index)];
}

template <typename Enum>
bool in_range(Enum value, Enum last) noexcept {
  return static_cast<std::int32_t>(value) >= 0 && static_cast<std::int32_t>(value) <= static_cast<std::int32_t>(last);
}

/// "ttl (2)"-style text for an enum value: the name, or the raw number when out of range.
template <typename Enum>
std::string describe(Enum value) {
  const std::string_view name = to_string(value);
  if (name == "unknown") return "unknown value " + std::to_string(static_cast<std::int32_t>(value));
  return std::string(name);
}

tl::unexpected<error> invalid(std::string reason) {
  return fail(errc::invalid_argument, "cannot resolve store policy: " + std::move(reason));
}

scope effective_scope(scope s) noexcept { return s == scope::unspecified ? scope::any : s; }

retention effective_retention(retention r) noexcept { return r == retention::unspecified ? retention::best_effort : r; }

int retention_rank(retention r) noexcept { return static_cast<int>(effective_retention(r)); }

requirement max_level(requirement a, requirement b) noexcept {
  return static_cast<int>(a) >= static_cast<int>(b) ? a : b;
}

/// Describes the retention fields a tier carries ("retention_policy ttl, retention_ttl_ms 1000").
std::string retention_fields(const tier_spec& spec) {
  std::string out;
  if (spec.retention != retention::unspecified) out = "retention_policy " + describe(spec.retention);
  if (spec.retention_ttl_ms) {
    if (!out.empty()) out += ", ";
    out += "retention_ttl_ms " + std::to_string(*spec.retention_ttl_ms);
  }
  return out;
}

/// Merges the local stable tier at `level` into `out`: a higher level replaces the retention,
/// a lower one is ignored, an equal one keeps the higher retention rank and the longer ttl.
void merge_local(requirement level, retention r, std::optional<std::uint64_t> ttl_ms, resolved_policy& out) {
  if (static_cast<int>(level) > static_cast<int>(out.local_stable)) {
    out.local_stable = level;
    out.local_retention = r;
    out.local_ttl_ms = ttl_ms;
    return;
  }
  if (level != out.local_stable) return;
  if (retention_rank(r) > retention_rank(out.local_retention)) {
    out.local_retention = r;
    out.local_ttl_ms = ttl_ms;
  } else if (r == retention::ttl && out.local_retention == retention::ttl && ttl_ms && out.local_ttl_ms &&
             *ttl_ms > *out.local_ttl_ms) {
    out.local_ttl_ms = ttl_ms;
  }
}

status apply_tier(const tier_spec& spec, std::string_view list, std::size_t index, requirement level,
                  resolved_policy& out) {
  const std::string where = std::string(list) + "[" + std::to_string(index) + "]";
  if (!in_range(spec.tier, tier::shared_disk)) return invalid(where + ": unknown tier " + describe(spec.tier));
  if (spec.tier == tier::unspecified) return invalid(where + ": tier must be specified, got unspecified");
  if (!in_range(spec.scope, scope::any)) return invalid(where + ": unknown scope " + describe(spec.scope));
  if (!in_range(spec.retention, retention::pinned)) {
    return invalid(where + ": unknown retention_policy " + describe(spec.retention));
  }
  const std::string tier_where = where + " (" + std::string(to_string(spec.tier)) + ")";
  const scope sc = effective_scope(spec.scope);
  const std::uint32_t replicas = spec.min_replicas == 0 ? 1U : spec.min_replicas;

  if (spec.tier == tier::shared_disk) {
    if (sc != scope::any) return invalid(tier_where + ": scope must be any, got " + describe(spec.scope));
    if (spec.retention != retention::unspecified || spec.retention_ttl_ms) {
      return invalid(tier_where + ": retention_policy and retention_ttl_ms are not supported, got " +
                     retention_fields(spec));
    }
    if (replicas != 1) {
      return invalid(tier_where + ": min_replicas must be 1, got " + std::to_string(spec.min_replicas));
    }
    out.shared_disk = max_level(out.shared_disk, level);
    return {};
  }

  // stable_dram
  if (sc == scope::local && replicas != 1) {
    return invalid(tier_where + ": min_replicas must be 1 with scope local, got " + std::to_string(spec.min_replicas));
  }
  if (spec.retention == retention::ttl) {
    if (!spec.retention_ttl_ms || *spec.retention_ttl_ms == 0) {
      return invalid(tier_where + ": retention_policy ttl requires retention_ttl_ms > 0, got " +
                     (spec.retention_ttl_ms ? std::string("0") : std::string("none")));
    }
  } else if (spec.retention_ttl_ms) {
    return invalid(tier_where + ": retention_ttl_ms " + std::to_string(*spec.retention_ttl_ms) +
                   " requires retention_policy ttl, got " + describe(spec.retention));
  }
  if (sc == scope::remote && (spec.retention != retention::unspecified || spec.retention_ttl_ms)) {
    return invalid(tier_where + ": scope remote does not take retention fields, got " + retention_fields(spec));
  }
  const retention r = effective_retention(spec.retention);
  if (sc == scope::local || sc == scope::any) {
    if (level == requirement::must && r != retention::pinned) {
      return invalid(tier_where + ": must with scope " + describe(sc) + " requires retention_policy pinned, got " +
                     describe(spec.retention));
    }
    merge_local(level, r, r == retention::ttl ? spec.retention_ttl_ms : std::nullopt, out);
  }
  if (sc == scope::remote || sc == scope::any) out.remote_stable = max_level(out.remote_stable, level);
  // Hosts that hold a stable copy, this one counted (docs/cluster.md §5): remote N is N others.
  const std::uint32_t hosts = sc == scope::remote ? replicas + 1 : sc == scope::any ? replicas : 1U;
  if (hosts > 1) {
    out.replica_level = max_level(out.replica_level, level);
    out.replica_hosts = std::max(out.replica_hosts, hosts);
    if (level == requirement::must) out.replica_hosts_must = std::max(out.replica_hosts_must, hosts);
  }
  return {};
}

resolved_policy expand_profile(profile p) {
  resolved_policy out;
  out.profile = p;
  switch (p) {
    case profile::durable:
      out.shared_disk = requirement::must;
      out.local_stable = requirement::should;
      break;
    case profile::ha:
      out.shared_disk = requirement::must;
      out.remote_stable = requirement::should;
      out.replica_level = requirement::should;
      out.replica_hosts = 2;
      out.local_stable = requirement::should;
      break;
    case profile::cold:
      out.shared_disk = requirement::must;
      out.local_stable = requirement::should;
      out.local_retention = retention::ttl;
      out.local_ttl_ms = kColdTtlMs;
      break;
    case profile::warm:
      out.local_stable = requirement::should;
      out.overflow = overflow::reject;
      break;
    case profile::pinned:
      out.local_stable = requirement::must;
      out.local_retention = retention::pinned;
      out.overflow = overflow::reject;
      break;
    case profile::unspecified:
    case profile::cache:
      out.profile = profile::cache;
      out.local_stable = requirement::may;
      break;
  }
  return out;
}

status check_spill(const resolved_policy& out) {
  if (out.overflow == overflow::spill && static_cast<int>(out.shared_disk) < static_cast<int>(requirement::should)) {
    return invalid("overflow spill requires a shared_disk tier in must or should, got shared_disk " +
                   describe(out.shared_disk));
  }
  return {};
}

}  // namespace

std::string_view to_string(profile value) noexcept {
  static constexpr std::array<std::string_view, 7> names{"unspecified", "cache",  "durable", "ha",
                                                         "cold",        "pinned", "warm"};
  return name_in(value, names);
}

std::string_view to_string(tier value) noexcept {
  static constexpr std::array<std::string_view, 3> names{"unspecified", "stable_dram", "shared_disk"};
  return name_in(value, names);
}

std::string_view to_string(scope value) noexcept {
  static constexpr std::array<std::string_view, 4> names{"unspecified", "local", "remote", "any"};
  return name_in(value, names);
}

std::string_view to_string(retention value) noexcept {
  static constexpr std::array<std::string_view, 4> names{"unspecified", "best_effort", "ttl", "pinned"};
  return name_in(value, names);
}

std::string_view to_string(overflow value) noexcept {
  static constexpr std::array<std::string_view, 4> names{"unspecified", "evict", "spill", "reject"};
  return name_in(value, names);
}

std::string_view to_string(layout value) noexcept {
  static constexpr std::array<std::string_view, 4> names{"unspecified", "auto", "unsharded", "sharded"};
  return name_in(value, names);
}

std::string_view to_string(requirement value) noexcept {
  static constexpr std::array<std::string_view, 4> names{"none", "may", "should", "must"};
  return name_in(value, names);
}

result<resolved_policy> resolve(const std::optional<store_policy>& policy) {
  if (!policy) {
    resolved_policy out = expand_profile(profile::cache);
    out.cache = derive_cache_policy(out);
    return out;
  }
  const store_policy& in = *policy;
  if (!in_range(in.profile, profile::warm)) return invalid("unknown profile " + describe(in.profile));
  if (!in_range(in.overflow, overflow::reject)) return invalid("unknown overflow_policy " + describe(in.overflow));
  if (!in_range(in.layout, layout::sharded)) return invalid("unknown layout " + describe(in.layout));

  const std::size_t tier_count = in.must.size() + in.should.size() + in.may.size();
  const bool has_profile = in.profile != profile::unspecified;
  if (has_profile && tier_count > 0) {
    return invalid("profile " + describe(in.profile) + " cannot be combined with must/should/may tiers, got " +
                   std::to_string(tier_count) + " tier(s)");
  }

  resolved_policy out;
  if (tier_count == 0) {
    out = expand_profile(in.profile);
  } else {
    out.overflow = overflow::evict;
    const std::pair<std::string_view, const std::vector<tier_spec>*> lists[] = {
        {"must", &in.must}, {"should", &in.should}, {"may", &in.may}};
    const requirement levels[] = {requirement::must, requirement::should, requirement::may};
    for (std::size_t l = 0; l < 3; ++l) {
      const auto& [name, specs] = lists[l];
      for (std::size_t i = 0; i < specs->size(); ++i) {
        TENSORREG_TRY(apply_tier((*specs)[i], name, i, levels[l], out));
      }
    }
  }
  if (in.overflow != overflow::unspecified) out.overflow = in.overflow;
  out.layout = in.layout == layout::unspecified ? layout::automatic : in.layout;
  TENSORREG_TRY(check_spill(out));
  out.cache = derive_cache_policy(out);
  return out;
}

std::optional<cache_policy> derive_cache_policy(const resolved_policy& resolved) noexcept {
  if (resolved.local_stable == requirement::none) return std::nullopt;
  cache_policy out;
  out.retention = effective_retention(resolved.local_retention);
  out.ttl_ms = out.retention == retention::ttl ? resolved.local_ttl_ms : std::nullopt;
  out.overflow = resolved.overflow == overflow::unspecified ? overflow::evict : resolved.overflow;
  out.required = resolved.local_stable == requirement::must;
  out.require_shared_disk_for_spill = resolved.shared_disk == requirement::must;
  out.require_remote_stable_for_spill = resolved.remote_stable == requirement::must;
  return out;
}

result<profile> parse_profile(std::string_view text) {
  static constexpr std::pair<std::string_view, profile> names[] = {
      {"cache", profile::cache}, {"durable", profile::durable}, {"ha", profile::ha},
      {"cold", profile::cold},   {"warm", profile::warm},       {"pinned", profile::pinned}};
  for (const auto& [name, value] : names) {
    if (text == name) return value;
  }
  return fail(errc::invalid_argument, "cannot parse policy profile '" + std::string(text) +
                                          "': expected one of cache, durable, ha, cold, warm, pinned");
}

result<store_policy> parse_policy(std::string_view text) {
  store_policy out;
  if (text.find(':') == std::string_view::npos) {
    TENSORREG_TRY_ASSIGN(out.profile, parse_profile(text));
    return out;
  }
  auto bad = [&text](const std::string& why) {
    return fail(errc::invalid_argument, "cannot parse policy '" + std::string(text) + "': " + why +
                                            " (a profile, or tiers LEVEL:TIER[:SCOPE[:N]] separated by commas, "
                                            "e.g. should:stable_dram:remote:2)");
  };
  std::string_view rest = text;
  while (true) {
    const auto comma = rest.find(',');
    const std::string_view item = rest.substr(0, comma);
    std::vector<std::string_view> parts;
    for (std::size_t at = 0;;) {
      const auto colon = item.find(':', at);
      parts.push_back(item.substr(at, colon == std::string_view::npos ? std::string_view::npos : colon - at));
      if (colon == std::string_view::npos) break;
      at = colon + 1;
    }
    if (parts.size() < 2 || parts.size() > 4) return bad("'" + std::string(item) + "' is not LEVEL:TIER[:SCOPE[:N]]");
    std::vector<tier_spec>* list = parts[0] == "must"     ? &out.must
                                   : parts[0] == "should" ? &out.should
                                   : parts[0] == "may"    ? &out.may
                                                          : nullptr;
    if (list == nullptr) return bad("unknown level '" + std::string(parts[0]) + "' (must, should, may)");
    tier_spec t;
    if (parts[1] == "stable_dram") {
      t.tier = tier::stable_dram;
    } else if (parts[1] == "shared_disk") {
      t.tier = tier::shared_disk;
    } else {
      return bad("unknown tier '" + std::string(parts[1]) + "' (stable_dram, shared_disk)");
    }
    if (parts.size() > 2) {
      if (parts[2] == "local") {
        t.scope = scope::local;
      } else if (parts[2] == "remote") {
        t.scope = scope::remote;
      } else if (parts[2] == "any") {
        t.scope = scope::any;
      } else {
        return bad("unknown scope '" + std::string(parts[2]) + "' (local, remote, any)");
      }
    }
    if (parts.size() > 3) {
      std::uint32_t n = 0;
      const auto* end = parts[3].data() + parts[3].size();
      const auto [ptr, ec] = std::from_chars(parts[3].data(), end, n);
      if (parts[3].empty() || ec != std::errc() || ptr != end) {
        return bad("min_replicas '" + std::string(parts[3]) + "' is not a number");
      }
      t.min_replicas = n;
    }
    list->push_back(t);
    if (comma == std::string_view::npos) break;
    rest = rest.substr(comma + 1);
  }
  return out;
}

}  // namespace tensorreg::policy
