#include "tensorreg/policy/store_policy.hpp"

#include <catch2/catch.hpp>

namespace {

using namespace tensorreg::policy;
using tensorreg::errc;

tier_spec spec(tier t, scope s = scope::unspecified, retention r = retention::unspecified,
               std::optional<std::uint64_t> ttl_ms = std::nullopt, std::uint32_t min_replicas = 0) {
  return tier_spec{t, s, min_replicas, r, ttl_ms};
}

store_policy with_profile(profile p) {
  store_policy out;
  out.profile = p;
  return out;
}

/// Resolves a policy that must be rejected and returns the message.
std::string rejection(const store_policy& p) {
  const auto r = resolve(p);
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::invalid_argument);
  return r.error().message;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Numbering and names

TEST_CASE("store_policy: enum values are upstream's wire numbers", "[policy][store_policy]") {
  CHECK(static_cast<int>(profile::cache) == 1);
  CHECK(static_cast<int>(profile::durable) == 2);
  CHECK(static_cast<int>(profile::ha) == 3);
  CHECK(static_cast<int>(profile::cold) == 4);
  CHECK(static_cast<int>(profile::pinned) == 5);
  CHECK(static_cast<int>(profile::warm) == 6);
  CHECK(static_cast<int>(tier::stable_dram) == 1);
  CHECK(static_cast<int>(tier::shared_disk) == 2);
  CHECK(static_cast<int>(scope::local) == 1);
  CHECK(static_cast<int>(scope::remote) == 2);
  CHECK(static_cast<int>(scope::any) == 3);
  CHECK(static_cast<int>(retention::best_effort) == 1);
  CHECK(static_cast<int>(retention::ttl) == 2);
  CHECK(static_cast<int>(retention::pinned) == 3);
  CHECK(static_cast<int>(overflow::evict) == 1);
  CHECK(static_cast<int>(overflow::spill) == 2);
  CHECK(static_cast<int>(overflow::reject) == 3);
  CHECK(static_cast<int>(layout::automatic) == 1);
  CHECK(static_cast<int>(layout::unsharded) == 2);
  CHECK(static_cast<int>(layout::sharded) == 3);
}

TEST_CASE("store_policy: enum names are lower case and unknown values say so", "[policy][store_policy]") {
  CHECK(to_string(profile::ha) == "ha");
  CHECK(to_string(tier::shared_disk) == "shared_disk");
  CHECK(to_string(scope::remote) == "remote");
  CHECK(to_string(retention::best_effort) == "best_effort");
  CHECK(to_string(overflow::spill) == "spill");
  CHECK(to_string(layout::automatic) == "auto");
  CHECK(to_string(requirement::should) == "should");
  CHECK(to_string(static_cast<profile>(42)) == "unknown");
  CHECK(to_string(static_cast<tier>(-1)) == "unknown");
}

// ---------------------------------------------------------------------------------------------
// Profiles

TEST_CASE("store_policy: no policy resolves to the cache profile", "[policy][store_policy]") {
  const auto r = resolve(std::nullopt);
  REQUIRE(r.has_value());
  CHECK(r->profile == profile::cache);
  CHECK(r->local_stable == requirement::may);
  CHECK(r->remote_stable == requirement::none);
  CHECK(r->shared_disk == requirement::none);
  CHECK(r->local_retention == retention::best_effort);
  CHECK_FALSE(r->local_ttl_ms);
  CHECK(r->overflow == overflow::evict);
  CHECK(r->layout == layout::automatic);
  REQUIRE(r->cache);
  CHECK(r->cache == cache_policy{retention::best_effort, std::nullopt, overflow::evict, false, false, false});
}

TEST_CASE("store_policy: an empty policy resolves like no policy", "[policy][store_policy]") {
  const auto empty = resolve(store_policy{});
  const auto none = resolve(std::nullopt);
  REQUIRE(empty.has_value());
  CHECK(*empty == *none);
}

TEST_CASE("store_policy: the cache profile expands to local may best_effort", "[policy][store_policy]") {
  const auto r = resolve(with_profile(profile::cache));
  REQUIRE(r.has_value());
  CHECK(r->profile == profile::cache);
  CHECK(r->local_stable == requirement::may);
  CHECK(r->shared_disk == requirement::none);
  CHECK(r->overflow == overflow::evict);
}

TEST_CASE("store_policy: the durable profile expands to shared_disk must and local should", "[policy][store_policy]") {
  const auto r = resolve(with_profile(profile::durable));
  REQUIRE(r.has_value());
  CHECK(r->shared_disk == requirement::must);
  CHECK(r->local_stable == requirement::should);
  CHECK(r->remote_stable == requirement::none);
  CHECK(r->local_retention == retention::best_effort);
  CHECK(r->overflow == overflow::evict);
  REQUIRE(r->cache);
  CHECK_FALSE(r->cache->required);
  CHECK(r->cache->require_shared_disk_for_spill);
  CHECK_FALSE(r->cache->require_remote_stable_for_spill);
}

// upstream: "StorePolicyResolver expands ha profile"
TEST_CASE("store_policy: the ha profile expands to disk must, remote should, local should", "[policy][store_policy]") {
  const auto r = resolve(with_profile(profile::ha));
  REQUIRE(r.has_value());
  CHECK(r->profile == profile::ha);
  CHECK(r->shared_disk == requirement::must);
  CHECK(r->remote_stable == requirement::should);
  CHECK(r->replica_level == requirement::should);
  CHECK(r->replica_hosts == 2);
  CHECK(r->local_stable == requirement::should);
  CHECK(r->local_retention == retention::best_effort);
  CHECK(r->layout == layout::automatic);
}

TEST_CASE("store_policy: the cold profile keeps the local copy for 60000 ms", "[policy][store_policy]") {
  const auto r = resolve(with_profile(profile::cold));
  REQUIRE(r.has_value());
  CHECK(r->shared_disk == requirement::must);
  CHECK(r->local_stable == requirement::should);
  CHECK(r->local_retention == retention::ttl);
  CHECK(r->local_ttl_ms == 60000U);
  REQUIRE(r->cache);
  CHECK(r->cache->retention == retention::ttl);
  CHECK(r->cache->ttl_ms == 60000U);
}

// upstream: "StorePolicyResolver expands warm profile"
TEST_CASE("store_policy: the warm profile expands to local should best_effort with overflow reject",
          "[policy][store_policy]") {
  const auto r = resolve(with_profile(profile::warm));
  REQUIRE(r.has_value());
  CHECK(r->shared_disk == requirement::none);
  CHECK(r->remote_stable == requirement::none);
  CHECK(r->local_stable == requirement::should);
  CHECK(r->local_retention == retention::best_effort);
  CHECK(r->overflow == overflow::reject);
  CHECK(r->layout == layout::automatic);
}

TEST_CASE("store_policy: the pinned profile requires a pinned local copy with overflow reject",
          "[policy][store_policy]") {
  const auto r = resolve(with_profile(profile::pinned));
  REQUIRE(r.has_value());
  CHECK(r->local_stable == requirement::must);
  CHECK(r->local_retention == retention::pinned);
  CHECK(r->overflow == overflow::reject);
  REQUIRE(r->cache);
  CHECK(r->cache == cache_policy{retention::pinned, std::nullopt, overflow::reject, true, false, false});
}

TEST_CASE("store_policy: an explicit overflow and layout override a profile's", "[policy][store_policy]") {
  store_policy p = with_profile(profile::warm);
  p.overflow = overflow::evict;
  p.layout = layout::sharded;
  const auto r = resolve(p);
  REQUIRE(r.has_value());
  CHECK(r->overflow == overflow::evict);
  CHECK(r->layout == layout::sharded);

  store_policy durable = with_profile(profile::durable);
  durable.overflow = overflow::spill;  // allowed: the profile puts shared_disk at must
  const auto d = resolve(durable);
  REQUIRE(d.has_value());
  CHECK(d->overflow == overflow::spill);
  CHECK(d->cache->overflow == overflow::spill);
}

// ---------------------------------------------------------------------------------------------
// Explicit tiers

TEST_CASE("store_policy: explicit tiers default to overflow evict and layout auto", "[policy][store_policy]") {
  store_policy p;
  p.should.push_back(spec(tier::stable_dram, scope::local));
  const auto r = resolve(p);
  REQUIRE(r.has_value());
  CHECK(r->profile == profile::unspecified);
  CHECK(r->local_stable == requirement::should);
  CHECK(r->remote_stable == requirement::none);
  CHECK(r->local_retention == retention::best_effort);
  CHECK(r->overflow == overflow::evict);
  CHECK(r->layout == layout::automatic);
}

// upstream: "StorePolicyResolver honors remote must tiers"
TEST_CASE("store_policy: a remote must tier is honoured and leaves the local tier out", "[policy][store_policy]") {
  store_policy p;
  p.must.push_back(spec(tier::stable_dram, scope::remote, retention::unspecified, std::nullopt, 1));
  const auto r = resolve(p);
  REQUIRE(r.has_value());
  CHECK(r->remote_stable == requirement::must);
  CHECK(r->local_stable == requirement::none);
  CHECK_FALSE(r->cache);
}

TEST_CASE("store_policy: scope any (or unspecified) asks for both the local and the remote tier",
          "[policy][store_policy]") {
  store_policy p;
  p.must.push_back(spec(tier::stable_dram, scope::unspecified, retention::pinned));
  p.may.push_back(spec(tier::stable_dram, scope::any));
  const auto r = resolve(p);
  REQUIRE(r.has_value());
  CHECK(r->local_stable == requirement::must);
  CHECK(r->remote_stable == requirement::must);
  CHECK(r->local_retention == retention::pinned);
  REQUIRE(r->cache);
  CHECK(r->cache->required);
  CHECK(r->cache->require_remote_stable_for_spill);
}

TEST_CASE("store_policy: levels combine by max and the highest level's retention wins", "[policy][store_policy]") {
  store_policy p;
  p.may.push_back(spec(tier::shared_disk));
  p.should.push_back(spec(tier::shared_disk, scope::any, retention::unspecified, std::nullopt, 1));
  p.may.push_back(spec(tier::stable_dram, scope::local, retention::ttl, 999999));
  p.should.push_back(spec(tier::stable_dram, scope::local, retention::best_effort));
  const auto r = resolve(p);
  REQUIRE(r.has_value());
  CHECK(r->shared_disk == requirement::should);
  CHECK(r->local_stable == requirement::should);
  CHECK(r->local_retention == retention::best_effort);  // the may tier's ttl is below should
  CHECK_FALSE(r->local_ttl_ms);
  REQUIRE(r->cache);
  CHECK_FALSE(r->cache->require_shared_disk_for_spill);  // disk is should, not must
}

TEST_CASE("store_policy: within one level the higher retention rank and the longer ttl win", "[policy][store_policy]") {
  store_policy p;
  p.should.push_back(spec(tier::stable_dram, scope::local, retention::best_effort));
  p.should.push_back(spec(tier::stable_dram, scope::local, retention::ttl, 1000));
  p.should.push_back(spec(tier::stable_dram, scope::local, retention::ttl, 5000));
  p.should.push_back(spec(tier::stable_dram, scope::local, retention::ttl, 2000));
  auto r = resolve(p);
  REQUIRE(r.has_value());
  CHECK(r->local_retention == retention::ttl);
  CHECK(r->local_ttl_ms == 5000U);

  p.should.push_back(spec(tier::stable_dram, scope::local, retention::pinned));
  r = resolve(p);
  REQUIRE(r.has_value());
  CHECK(r->local_retention == retention::pinned);
  CHECK_FALSE(r->local_ttl_ms);
  CHECK(r->cache->retention == retention::pinned);
}

TEST_CASE("store_policy: spill is accepted with a shared_disk tier at should", "[policy][store_policy]") {
  store_policy p;
  p.should.push_back(spec(tier::shared_disk));
  p.may.push_back(spec(tier::stable_dram, scope::local));
  p.overflow = overflow::spill;
  const auto r = resolve(p);
  REQUIRE(r.has_value());
  CHECK(r->overflow == overflow::spill);
  CHECK(r->cache->overflow == overflow::spill);
}

TEST_CASE("store_policy: the derived cache policy follows the must levels", "[policy][store_policy]") {
  resolved_policy rp;
  CHECK_FALSE(derive_cache_policy(rp));
  rp.local_stable = requirement::must;
  rp.local_retention = retention::pinned;
  rp.shared_disk = requirement::must;
  rp.remote_stable = requirement::should;
  rp.overflow = overflow::reject;
  const auto c = derive_cache_policy(rp);
  REQUIRE(c);
  CHECK(c == cache_policy{retention::pinned, std::nullopt, overflow::reject, true, true, false});
}

// ---------------------------------------------------------------------------------------------
// Rejections: one case each

// upstream: "StorePolicyResolver rejects profile with tier list"
TEST_CASE("store_policy: rejects a profile together with explicit tiers", "[policy][store_policy]") {
  store_policy p = with_profile(profile::cache);
  p.must.push_back(spec(tier::shared_disk));
  CHECK(rejection(p) ==
        "cannot resolve store policy: profile cache cannot be combined with must/should/may tiers, got 1 tier(s)");
}

TEST_CASE("store_policy: rejects a tier that is unspecified", "[policy][store_policy]") {
  store_policy p;
  p.should.push_back(spec(tier::stable_dram, scope::local));
  p.should.push_back(spec(tier::unspecified));
  CHECK(rejection(p) == "cannot resolve store policy: should[1]: tier must be specified, got unspecified");
}

TEST_CASE("store_policy: rejects a tier number outside the list", "[policy][store_policy]") {
  store_policy p;
  p.may.push_back(spec(static_cast<tier>(7)));
  CHECK(rejection(p) == "cannot resolve store policy: may[0]: unknown tier unknown value 7");
}

TEST_CASE("store_policy: rejects a scope number outside the list", "[policy][store_policy]") {
  store_policy p;
  p.may.push_back(spec(tier::stable_dram, static_cast<scope>(9)));
  CHECK(rejection(p) == "cannot resolve store policy: may[0]: unknown scope unknown value 9");
}

TEST_CASE("store_policy: rejects a retention number outside the list", "[policy][store_policy]") {
  store_policy p;
  p.may.push_back(spec(tier::stable_dram, scope::local, static_cast<retention>(4)));
  CHECK(rejection(p) == "cannot resolve store policy: may[0]: unknown retention_policy unknown value 4");
}

TEST_CASE("store_policy: rejects a profile number outside the list", "[policy][store_policy]") {
  CHECK(rejection(with_profile(static_cast<profile>(7))) ==
        "cannot resolve store policy: unknown profile unknown value 7");
}

TEST_CASE("store_policy: rejects an overflow number outside the list", "[policy][store_policy]") {
  store_policy p;
  p.overflow = static_cast<overflow>(-2);
  CHECK(rejection(p) == "cannot resolve store policy: unknown overflow_policy unknown value -2");
}

TEST_CASE("store_policy: rejects a layout number outside the list", "[policy][store_policy]") {
  store_policy p;
  p.layout = static_cast<layout>(4);
  CHECK(rejection(p) == "cannot resolve store policy: unknown layout unknown value 4");
}

TEST_CASE("store_policy: rejects shared_disk with a scope other than any", "[policy][store_policy]") {
  store_policy p;
  p.must.push_back(spec(tier::shared_disk, scope::local));
  CHECK(rejection(p) == "cannot resolve store policy: must[0] (shared_disk): scope must be any, got local");
}

// upstream: "StorePolicyResolver rejects shared_disk retention fields"
TEST_CASE("store_policy: rejects shared_disk with retention fields", "[policy][store_policy]") {
  store_policy p;
  p.must.push_back(spec(tier::shared_disk, scope::unspecified, retention::ttl, 1000));
  CHECK(rejection(p) ==
        "cannot resolve store policy: must[0] (shared_disk): retention_policy and retention_ttl_ms are not "
        "supported, got retention_policy ttl, retention_ttl_ms 1000");
}

TEST_CASE("store_policy: rejects shared_disk with only a retention ttl", "[policy][store_policy]") {
  store_policy p;
  p.should.push_back(spec(tier::shared_disk, scope::any, retention::unspecified, 0));
  CHECK(rejection(p) ==
        "cannot resolve store policy: should[0] (shared_disk): retention_policy and retention_ttl_ms are not "
        "supported, got retention_ttl_ms 0");
}

TEST_CASE("store_policy: rejects shared_disk with min_replicas other than 1", "[policy][store_policy]") {
  store_policy p;
  p.must.push_back(spec(tier::shared_disk, scope::any, retention::unspecified, std::nullopt, 3));
  CHECK(rejection(p) == "cannot resolve store policy: must[0] (shared_disk): min_replicas must be 1, got 3");
}

// upstream: "StorePolicyResolver rejects stable_dram min_replicas != 1"; we take it with scope
// remote or any (DECISIONS §5.21), and reject it with scope local.
TEST_CASE("store_policy: rejects stable_dram local with min_replicas other than 1", "[policy][store_policy]") {
  store_policy p;
  p.should.push_back(spec(tier::stable_dram, scope::local, retention::unspecified, std::nullopt, 2));
  CHECK(rejection(p) ==
        "cannot resolve store policy: should[0] (stable_dram): min_replicas must be 1 with scope local, got 2");
}

TEST_CASE("store_policy: stable_dram remote N asks N + 1 hosts, any N asks N", "[policy][store_policy]") {
  store_policy remote;
  remote.should.push_back(spec(tier::stable_dram, scope::remote, retention::unspecified, std::nullopt, 2));
  const auto r = resolve(remote);
  REQUIRE(r.has_value());
  CHECK(r->remote_stable == requirement::should);
  CHECK(r->local_stable == requirement::none);
  CHECK(r->replica_level == requirement::should);
  CHECK(r->replica_hosts == 3);
  CHECK(r->replica_hosts_must == 1);

  store_policy any;
  any.may.push_back(spec(tier::stable_dram, scope::any, retention::unspecified, std::nullopt, 3));
  const auto a = resolve(any);
  REQUIRE(a.has_value());
  CHECK(a->replica_level == requirement::may);
  CHECK(a->replica_hosts == 3);

  store_policy one;  // any 1 (and 0) is this host: nothing to place elsewhere
  one.should.push_back(spec(tier::stable_dram, scope::any));
  const auto o = resolve(one);
  REQUIRE(o.has_value());
  CHECK(o->replica_level == requirement::none);
  CHECK(o->replica_hosts == 1);

  store_policy both;  // levels keep their own counts: must 2 hosts, should 4
  both.must.push_back(spec(tier::stable_dram, scope::remote, retention::unspecified, std::nullopt, 1));
  both.should.push_back(spec(tier::stable_dram, scope::remote, retention::unspecified, std::nullopt, 3));
  const auto b = resolve(both);
  REQUIRE(b.has_value());
  CHECK(b->replica_level == requirement::must);
  CHECK(b->replica_hosts == 4);
  CHECK(b->replica_hosts_must == 2);
}

TEST_CASE("store_policy: rejects retention ttl without a ttl", "[policy][store_policy]") {
  store_policy p;
  p.should.push_back(spec(tier::stable_dram, scope::local, retention::ttl));
  CHECK(rejection(p) ==
        "cannot resolve store policy: should[0] (stable_dram): retention_policy ttl requires retention_ttl_ms > 0, "
        "got none");
}

TEST_CASE("store_policy: rejects retention ttl with a ttl of 0", "[policy][store_policy]") {
  store_policy p;
  p.may.push_back(spec(tier::stable_dram, scope::local, retention::ttl, 0));
  CHECK(rejection(p) ==
        "cannot resolve store policy: may[0] (stable_dram): retention_policy ttl requires retention_ttl_ms > 0, "
        "got 0");
}

TEST_CASE("store_policy: rejects a ttl without retention ttl", "[policy][store_policy]") {
  store_policy p;
  p.should.push_back(spec(tier::stable_dram, scope::local, retention::best_effort, 500));
  CHECK(rejection(p) ==
        "cannot resolve store policy: should[0] (stable_dram): retention_ttl_ms 500 requires retention_policy ttl, "
        "got best_effort");
}

// upstream: "StorePolicyResolver rejects retention on remote stable_dram"
TEST_CASE("store_policy: rejects retention fields on a remote tier", "[policy][store_policy]") {
  store_policy p;
  p.must.push_back(spec(tier::stable_dram, scope::remote, retention::pinned));
  CHECK(rejection(p) ==
        "cannot resolve store policy: must[0] (stable_dram): scope remote does not take retention fields, got "
        "retention_policy pinned");
}

// upstream: "StorePolicyResolver rejects must local stable_dram without pinned retention"
TEST_CASE("store_policy: rejects must local stable_dram that is not pinned", "[policy][store_policy]") {
  store_policy p;
  p.must.push_back(spec(tier::stable_dram, scope::local, retention::best_effort));
  CHECK(rejection(p) ==
        "cannot resolve store policy: must[0] (stable_dram): must with scope local requires retention_policy "
        "pinned, got best_effort");
}

TEST_CASE("store_policy: rejects must stable_dram of scope any without retention", "[policy][store_policy]") {
  store_policy p;
  p.must.push_back(spec(tier::stable_dram));
  CHECK(rejection(p) ==
        "cannot resolve store policy: must[0] (stable_dram): must with scope any requires retention_policy "
        "pinned, got unspecified");
}

// upstream: "StorePolicyResolver rejects spill without shared disk"
TEST_CASE("store_policy: rejects spill without a shared_disk tier", "[policy][store_policy]") {
  store_policy p;
  p.overflow = overflow::spill;
  CHECK(rejection(p) ==
        "cannot resolve store policy: overflow spill requires a shared_disk tier in must or should, got shared_disk "
        "none");
}

TEST_CASE("store_policy: rejects spill with shared_disk only at may", "[policy][store_policy]") {
  store_policy p;
  p.may.push_back(spec(tier::shared_disk));
  p.should.push_back(spec(tier::stable_dram, scope::local));
  p.overflow = overflow::spill;
  CHECK(rejection(p) ==
        "cannot resolve store policy: overflow spill requires a shared_disk tier in must or should, got shared_disk "
        "may");
}

TEST_CASE("store_policy: rejects spill on a profile without shared_disk", "[policy][store_policy]") {
  store_policy p = with_profile(profile::warm);
  p.overflow = overflow::spill;
  CHECK(rejection(p) ==
        "cannot resolve store policy: overflow spill requires a shared_disk tier in must or should, got shared_disk "
        "none");
}

// ---------------------------------------------------------------------------------------------
// Profile names

TEST_CASE("store_policy: parses every profile name", "[policy][store_policy]") {
  CHECK(parse_profile("cache").value() == profile::cache);
  CHECK(parse_profile("durable").value() == profile::durable);
  CHECK(parse_profile("ha").value() == profile::ha);
  CHECK(parse_profile("cold").value() == profile::cold);
  CHECK(parse_profile("warm").value() == profile::warm);
  CHECK(parse_profile("pinned").value() == profile::pinned);
}

TEST_CASE("store_policy: rejects an unknown profile name", "[policy][store_policy]") {
  const auto r = parse_profile("Cache ");
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::invalid_argument);
  CHECK(r.error().message ==
        "cannot parse policy profile 'Cache ': expected one of cache, durable, ha, cold, warm, pinned");
}

TEST_CASE("store_policy: parse_policy takes a profile or explicit tiers", "[policy][store_policy]") {
  const auto ha = parse_policy("ha");
  REQUIRE(ha.has_value());
  CHECK(ha->profile == profile::ha);
  CHECK(ha->must.empty());

  const auto tiers = parse_policy("should:stable_dram:local,must:stable_dram:remote:2,may:shared_disk");
  REQUIRE(tiers.has_value());
  CHECK(tiers->profile == profile::unspecified);
  REQUIRE(tiers->should.size() == 1);
  CHECK(tiers->should[0] == spec(tier::stable_dram, scope::local));
  REQUIRE(tiers->must.size() == 1);
  CHECK(tiers->must[0] == spec(tier::stable_dram, scope::remote, retention::unspecified, std::nullopt, 2));
  REQUIRE(tiers->may.size() == 1);
  CHECK(tiers->may[0] == spec(tier::shared_disk));

  for (const char* bad : {"should:stable_dram:remote:x", "often:stable_dram", "should:vram", "should:stable_dram:far",
                          "should", "should:stable_dram:remote:2:3", "should:stable_dram:remote:"}) {
    INFO(bad);
    const auto r = parse_policy(bad);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == errc::invalid_argument);
    CHECK_THAT(r.error().message, Catch::StartsWith("cannot parse "));
  }
}
