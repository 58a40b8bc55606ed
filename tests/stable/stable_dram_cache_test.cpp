#include "tensorreg/stable/stable_dram_cache.hpp"

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "support/fake_clock.hpp"

namespace {

using namespace std::chrono_literals;
using tensorreg::errc;
using tensorreg::memory::byte_source;
using tensorreg::memory::zero_source;
using tensorreg::policy::overflow;
using tensorreg::policy::retention;
using tensorreg::stable::admit_policy;
using tensorreg::stable::cache_hooks;
using tensorreg::stable::evicted_entry;
using tensorreg::stable::eviction_reason;
using tensorreg::stable::stable_dram_cache;
using tensorreg::testing::fake_clock;

constexpr std::uint64_t kChunk = 64;

std::shared_ptr<const byte_source> replica(std::uint64_t size = kChunk) {
  return std::make_shared<const zero_source>(size);
}

admit_policy make_policy(retention r, overflow o, bool required = false,
                         std::optional<std::uint64_t> ttl_ms = std::nullopt) {
  admit_policy p;
  p.retention = r;
  p.overflow = o;
  p.required = required;
  p.ttl_ms = ttl_ms;
  return p;
}

const admit_policy kBestEffortEvict = make_policy(retention::best_effort, overflow::evict);

}  // namespace

// ---------------------------------------------------------------------------------------------
// The upstream cases (core/store/components/stable_dram_cache_manager_test.cc), re-expressed

TEST_CASE("stable_dram_cache: evicts best-effort entries on overflow", "[stable][stable_dram_cache]") {
  fake_clock clk;
  std::vector<evicted_entry> seen;
  cache_hooks hooks;
  hooks.on_evict = [&](const evicted_entry& e) { seen.push_back(e); };
  stable_dram_cache cache(kChunk, clk, hooks);

  const auto first = cache.admit("artifact-1", kChunk, replica(), kBestEffortEvict);
  REQUIRE(first.has_value());
  CHECK(first->admitted);
  CHECK_FALSE(first->upgraded);
  CHECK(first->evicted.empty());

  const auto second = cache.admit("artifact-2", kChunk, replica(), kBestEffortEvict);
  REQUIRE(second.has_value());
  CHECK(second->admitted);
  CHECK(second->evicted == std::vector<std::string>{"artifact-1"});
  CHECK_FALSE(cache.contains("artifact-1"));
  CHECK(cache.contains("artifact-2"));
  REQUIRE(seen.size() == 1);
  CHECK(seen[0].key == "artifact-1");
  CHECK(seen[0].size_bytes == kChunk);
  CHECK(seen[0].reason == eviction_reason::capacity);
  const auto s = cache.stats();
  CHECK(s.entries == 1);
  CHECK(s.bytes_used == kChunk);
  CHECK(s.evictions == 1);
  CHECK(s.evicted_bytes == kChunk);
}

TEST_CASE("stable_dram_cache: rejects admission when the overflow policy is reject", "[stable][stable_dram_cache]") {
  fake_clock clk;
  stable_dram_cache cache(kChunk, clk);
  REQUIRE(cache.admit("artifact-reject-1", kChunk, replica(), kBestEffortEvict).value().admitted);

  const auto second =
      cache.admit("artifact-reject-2", kChunk, replica(), make_policy(retention::best_effort, overflow::reject));
  REQUIRE_FALSE(second.has_value());
  CHECK(second.error().code == errc::resource_exhausted);
  CHECK(second.error().message ==
        "cannot admit 'artifact-reject-2' (64 bytes) to the stable dram cache: insufficient stable bytes: 0 of 64 "
        "free, overflow reject");
  CHECK(cache.contains("artifact-reject-1"));
  CHECK_FALSE(cache.contains("artifact-reject-2"));
  CHECK(cache.stats().evictions == 0);
}

TEST_CASE("stable_dram_cache: honours ttl and pinned retention", "[stable][stable_dram_cache]") {
  fake_clock clk;
  stable_dram_cache cache(kChunk * 4, clk);
  REQUIRE(cache.admit("artifact-ttl", kChunk, replica(), make_policy(retention::ttl, overflow::evict, false, 5000))
              .value()
              .admitted);
  CHECK_FALSE(cache.is_evictable("artifact-ttl"));
  const auto info = cache.info("artifact-ttl");
  REQUIRE(info);
  CHECK(info->retention == retention::ttl);
  CHECK(info->deadline == clk.now() + 5000ms);
  clk.advance(4999ms);
  CHECK_FALSE(cache.is_evictable("artifact-ttl"));
  clk.advance(1ms);
  CHECK(cache.is_evictable("artifact-ttl"));
  clk.advance(10s);
  CHECK(cache.is_evictable("artifact-ttl"));

  REQUIRE(cache.admit("artifact-pinned", kChunk, replica(), make_policy(retention::pinned, overflow::evict))
              .value()
              .admitted);
  CHECK_FALSE(cache.is_evictable("artifact-pinned"));
  clk.advance(1h);
  CHECK_FALSE(cache.is_evictable("artifact-pinned"));
  CHECK_FALSE(cache.is_evictable("absent"));
  // The room an eviction could make: the expired ttl entry's, not the pinned one's.
  CHECK(cache.evictable_bytes() == kChunk);
  REQUIRE(cache.admit("artifact-evict", kChunk, replica(), make_policy(retention::best_effort, overflow::evict))
              .value()
              .admitted);
  CHECK(cache.evictable_bytes() == 2 * kChunk);
}

TEST_CASE("stable_dram_cache: upgrades retention on re-admit", "[stable][stable_dram_cache]") {
  fake_clock clk;
  stable_dram_cache cache(kChunk * 4, clk);
  REQUIRE(cache.admit("artifact-upgrade", kChunk, replica(), kBestEffortEvict).value().admitted);
  CHECK(cache.is_evictable("artifact-upgrade"));
  const auto bytes_before = cache.bytes_used();

  const auto again =
      cache.admit("artifact-upgrade", kChunk, replica(), make_policy(retention::pinned, overflow::evict));
  REQUIRE(again.has_value());
  CHECK(again->admitted);
  CHECK(again->upgraded);
  clk.advance(1h);
  CHECK_FALSE(cache.is_evictable("artifact-upgrade"));
  CHECK(cache.bytes_used() == bytes_before);
  CHECK(cache.stats().entries == 1);
}

TEST_CASE("stable_dram_cache: rejects admission when required pinned entries fill the budget",
          "[stable][stable_dram_cache]") {
  fake_clock clk;
  stable_dram_cache cache(kChunk, clk);
  const auto pinned_required = make_policy(retention::pinned, overflow::evict, true);
  REQUIRE(cache.admit("artifact-required-1", kChunk, replica(), pinned_required).value().admitted);

  const auto second = cache.admit("artifact-required-2", kChunk, replica(), pinned_required);
  REQUIRE_FALSE(second.has_value());
  CHECK(second.error().code == errc::resource_exhausted);
  CHECK(second.error().message ==
        "cannot admit 'artifact-required-2' (64 bytes) to the stable dram cache: insufficient stable bytes: 0 of 64 "
        "free, overflow evict, required");
  CHECK(cache.contains("artifact-required-1"));
}

TEST_CASE("stable_dram_cache: spill fails closed when no durable store is configured", "[stable][stable_dram_cache]") {
  fake_clock clk;
  stable_dram_cache cache(kChunk, clk);  // no has_durable_copy hook
  const auto spill = make_policy(retention::best_effort, overflow::spill);
  REQUIRE(cache.admit("artifact-spill-1", kChunk, replica(), spill).value().admitted);

  const auto second = cache.admit("artifact-spill-2", kChunk, replica(), spill);
  REQUIRE_FALSE(second.has_value());
  CHECK(second.error().code == errc::resource_exhausted);
  CHECK(second.error().message ==
        "cannot admit 'artifact-spill-2' (64 bytes) to the stable dram cache: stable cache spill blocked: no durable "
        "store is configured, so no entry has a durable copy to fall back on");
  CHECK(cache.contains("artifact-spill-1"));
}

TEST_CASE("stable_dram_cache: spill rejects when no entry has a durable copy", "[stable][stable_dram_cache]") {
  fake_clock clk;
  cache_hooks hooks;
  hooks.has_durable_copy = [](std::string_view) { return false; };
  stable_dram_cache cache(kChunk, clk, hooks);
  const auto spill = make_policy(retention::best_effort, overflow::spill);
  REQUIRE(cache.admit("artifact-spill-nodurable-1", kChunk, replica(), spill).value().admitted);

  const auto second = cache.admit("artifact-spill-nodurable-2", kChunk, replica(), spill);
  REQUIRE_FALSE(second.has_value());
  CHECK(second.error().code == errc::resource_exhausted);
  CHECK(second.error().message ==
        "cannot admit 'artifact-spill-nodurable-2' (64 bytes) to the stable dram cache: could not free enough bytes: "
        "need 64 more, 0 held by entries with a durable copy that may be spilled");
  CHECK(cache.contains("artifact-spill-nodurable-1"));
}

TEST_CASE("stable_dram_cache: spill evicts entries that have a durable copy", "[stable][stable_dram_cache]") {
  fake_clock clk;
  std::vector<evicted_entry> seen;
  cache_hooks hooks;
  hooks.has_durable_copy = [](std::string_view id) { return id == "artifact-spill-ok-1"; };
  hooks.on_evict = [&](const evicted_entry& e) { seen.push_back(e); };
  stable_dram_cache cache(kChunk * 2, clk, hooks);
  const auto spill = make_policy(retention::best_effort, overflow::spill);
  REQUIRE(cache.admit("artifact-spill-ok-1", kChunk, replica(), spill).value().admitted);
  REQUIRE(cache.admit("artifact-spill-no-copy", kChunk, replica(), spill).value().admitted);
  REQUIRE(cache.lookup("artifact-spill-ok-1"));  // most recently used, yet the only one with a copy

  const auto third = cache.admit("artifact-spill-ok-2", kChunk, replica(), spill);
  REQUIRE(third.has_value());
  CHECK(third->admitted);
  CHECK(third->evicted == std::vector<std::string>{"artifact-spill-ok-1"});
  CHECK_FALSE(cache.contains("artifact-spill-ok-1"));
  CHECK(cache.contains("artifact-spill-no-copy"));
  CHECK(cache.contains("artifact-spill-ok-2"));
  REQUIRE(seen.size() == 1);
  CHECK(seen[0].reason == eviction_reason::spill);
}

// ---------------------------------------------------------------------------------------------
// Admission rules beyond the upstream cases

TEST_CASE("stable_dram_cache: a re-admit merges policies by rank and keeps the later deadline",
          "[stable][stable_dram_cache]") {
  fake_clock clk;
  stable_dram_cache cache(kChunk * 4, clk);
  const auto t0 = clk.now();
  REQUIRE(cache.admit("a", kChunk, replica(), make_policy(retention::ttl, overflow::spill, false, 10'000)).has_value());
  clk.advance(1s);
  admit_policy shorter = make_policy(retention::ttl, overflow::evict, true, 2'000);
  shorter.require_shared_disk_for_spill = true;
  const auto again = cache.admit("a", kChunk, replica(), shorter);
  REQUIRE(again.has_value());
  CHECK(again->upgraded);
  auto info = cache.info("a");
  REQUIRE(info);
  CHECK(info->retention == retention::ttl);
  CHECK(info->deadline == t0 + 10s);  // 10 s from t0 is later than 1 s + 2 s
  CHECK(info->overflow == overflow::spill);
  CHECK(info->required);
  CHECK(info->require_shared_disk_for_spill);
  CHECK_FALSE(info->require_remote_stable_for_spill);

  clk.advance(20s);
  REQUIRE(cache.admit("a", kChunk, replica(), make_policy(retention::ttl, overflow::reject, false, 5'000)).has_value());
  info = cache.info("a");
  CHECK(info->deadline == t0 + 21s + 5s);
  CHECK(info->overflow == overflow::reject);
  CHECK(info->required);  // ORed: never downgraded

  REQUIRE(cache.admit("a", kChunk, replica(), kBestEffortEvict).has_value());
  CHECK(cache.info("a")->retention == retention::ttl);  // best_effort ranks below ttl
}

TEST_CASE("stable_dram_cache: an entry larger than the budget is skipped unless required",
          "[stable][stable_dram_cache]") {
  fake_clock clk;
  stable_dram_cache cache(kChunk, clk);
  const auto skipped = cache.admit("big", kChunk + 1, replica(kChunk + 1), kBestEffortEvict);
  REQUIRE(skipped.has_value());
  CHECK_FALSE(skipped->admitted);
  CHECK(skipped->skip_reason == "65 bytes exceed the stable budget of 64 bytes");
  CHECK_FALSE(cache.contains("big"));
}

TEST_CASE("stable_dram_cache: a required entry larger than the budget is resource exhausted",
          "[stable][stable_dram_cache]") {
  fake_clock clk;
  stable_dram_cache cache(kChunk, clk);
  const auto r =
      cache.admit("big", kChunk + 1, replica(kChunk + 1), make_policy(retention::pinned, overflow::evict, true));
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::resource_exhausted);
  CHECK(r.error().message ==
        "cannot admit 'big' (65 bytes) to the stable dram cache: 65 bytes exceed the stable budget of 64 bytes");
}

TEST_CASE("stable_dram_cache: an evict shortfall is skipped when not required", "[stable][stable_dram_cache]") {
  fake_clock clk;
  stable_dram_cache cache(kChunk, clk);
  REQUIRE(cache.admit("pinned", kChunk, replica(), make_policy(retention::pinned, overflow::evict)).has_value());
  const auto r = cache.admit("next", kChunk, replica(), kBestEffortEvict);
  REQUIRE(r.has_value());
  CHECK_FALSE(r->admitted);
  CHECK(r->skip_reason == "insufficient stable bytes: 0 of 64 free, overflow evict");
  CHECK(cache.contains("pinned"));
}

TEST_CASE("stable_dram_cache: ttl entries protect their bytes until the deadline", "[stable][stable_dram_cache]") {
  fake_clock clk;
  stable_dram_cache cache(kChunk, clk);
  REQUIRE(cache.admit("ttl", kChunk, replica(), make_policy(retention::ttl, overflow::evict, false, 1000)).has_value());
  auto r = cache.admit("next", kChunk, replica(), kBestEffortEvict);
  REQUIRE(r.has_value());
  CHECK_FALSE(r->admitted);
  clk.advance(1000ms);
  r = cache.admit("next", kChunk, replica(), kBestEffortEvict);
  REQUIRE(r.has_value());
  CHECK(r->admitted);
  CHECK(r->evicted == std::vector<std::string>{"ttl"});
}

TEST_CASE("stable_dram_cache: a failed admission evicts nothing", "[stable][stable_dram_cache]") {
  fake_clock clk;
  stable_dram_cache cache(kChunk * 2, clk);
  REQUIRE(cache.admit("loose", kChunk, replica(), kBestEffortEvict).has_value());
  REQUIRE(cache.admit("pinned", kChunk, replica(), make_policy(retention::pinned, overflow::evict)).has_value());
  // Needs 128 bytes free; only 64 can be evicted, so nothing is.
  const auto r =
      cache.admit("wide", kChunk * 2, replica(kChunk * 2), make_policy(retention::pinned, overflow::evict, true));
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::resource_exhausted);
  CHECK(cache.contains("loose"));
  CHECK(cache.stats().evictions == 0);
}

TEST_CASE("stable_dram_cache: eviction follows least recent use and lookup touches", "[stable][stable_dram_cache]") {
  fake_clock clk;
  stable_dram_cache cache(kChunk * 3, clk);
  for (const char* key : {"a", "b", "c"}) REQUIRE(cache.admit(key, kChunk, replica(), kBestEffortEvict).has_value());
  REQUIRE(cache.lookup("a"));
  CHECK_FALSE(cache.lookup("absent"));
  const auto r = cache.admit("d", kChunk * 2, replica(kChunk * 2), kBestEffortEvict);
  REQUIRE(r.has_value());
  CHECK(r->evicted == std::vector<std::string>{"b", "c"});
  CHECK(cache.contains("a"));
  CHECK(cache.bytes_used() == kChunk * 3);
}

TEST_CASE("stable_dram_cache: spill never evicts an entry that demands a remote stable copy",
          "[stable][stable_dram_cache]") {
  fake_clock clk;
  cache_hooks hooks;
  hooks.has_durable_copy = [](std::string_view) { return true; };
  stable_dram_cache cache(kChunk, clk, hooks);
  admit_policy needs_remote = make_policy(retention::best_effort, overflow::spill);
  needs_remote.require_remote_stable_for_spill = true;
  REQUIRE(cache.admit("a", kChunk, replica(), needs_remote).has_value());
  const auto r = cache.admit("b", kChunk, replica(), make_policy(retention::best_effort, overflow::spill));
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::resource_exhausted);
  CHECK(cache.contains("a"));
}

TEST_CASE("stable_dram_cache: a budget of 0 is unlimited", "[stable][stable_dram_cache]") {
  fake_clock clk;
  stable_dram_cache cache(0, clk);
  for (int i = 0; i < 100; ++i) {
    const auto r = cache.admit("k" + std::to_string(i), 1 << 20, replica(1 << 20),
                               make_policy(retention::pinned, overflow::reject, true));
    REQUIRE(r.has_value());
    CHECK(r->admitted);
  }
  const auto s = cache.stats();
  CHECK(s.entries == 100);
  CHECK(s.bytes_used == 100ULL << 20);
  CHECK(s.budget_bytes == 0);
  CHECK(cache.preempt_for_export(1ULL << 40).value() == 0);
}

TEST_CASE("stable_dram_cache: eviction drops only the cache's reference", "[stable][stable_dram_cache]") {
  fake_clock clk;
  stable_dram_cache cache(kChunk, clk);
  std::weak_ptr<const byte_source> watch;
  {
    auto r = replica();
    watch = r;
    REQUIRE(cache.admit("a", kChunk, std::move(r), kBestEffortEvict).has_value());
  }
  auto reader = cache.lookup("a");
  REQUIRE(reader);
  REQUIRE(cache.admit("b", kChunk, replica(), kBestEffortEvict).value().admitted);
  CHECK_FALSE(cache.contains("a"));
  CHECK_FALSE(watch.expired());  // the reader still holds the bytes
  std::byte out[8]{};
  CHECK(reader->read(0, out).has_value());
  reader.reset();
  CHECK(watch.expired());
}

TEST_CASE("stable_dram_cache: remove drops any entry and is not counted as an eviction",
          "[stable][stable_dram_cache]") {
  fake_clock clk;
  stable_dram_cache cache(kChunk, clk);
  REQUIRE(cache.admit("a", kChunk, replica(), make_policy(retention::pinned, overflow::reject, true)).has_value());
  CHECK(cache.remove("a"));
  CHECK_FALSE(cache.remove("a"));
  const auto s = cache.stats();
  CHECK(s.entries == 0);
  CHECK(s.bytes_used == 0);
  CHECK(s.evictions == 0);
  CHECK(cache.admit("b", kChunk, replica(), kBestEffortEvict).value().admitted);
}

TEST_CASE("stable_dram_cache: preempt_for_export ignores retention but keeps required entries",
          "[stable][stable_dram_cache]") {
  fake_clock clk;
  std::vector<evicted_entry> seen;
  cache_hooks hooks;
  hooks.on_evict = [&](const evicted_entry& e) { seen.push_back(e); };
  stable_dram_cache cache(kChunk * 4, clk, hooks);
  REQUIRE(
      cache.admit("required", kChunk, replica(), make_policy(retention::pinned, overflow::evict, true)).has_value());
  REQUIRE(cache.admit("pinned", kChunk, replica(), make_policy(retention::pinned, overflow::evict)).has_value());
  REQUIRE(
      cache.admit("ttl", kChunk, replica(), make_policy(retention::ttl, overflow::evict, false, 60'000)).has_value());

  CHECK(cache.preempt_for_export(kChunk).value() == 0);  // 64 already free
  const auto freed = cache.preempt_for_export(kChunk * 3);
  REQUIRE(freed.has_value());
  CHECK(*freed == kChunk * 2);
  CHECK(cache.contains("required"));
  CHECK_FALSE(cache.contains("pinned"));
  CHECK_FALSE(cache.contains("ttl"));
  REQUIRE(seen.size() == 2);
  CHECK(seen[0].key == "pinned");
  CHECK(seen[0].reason == eviction_reason::preempt);
}

TEST_CASE("stable_dram_cache: preempt_for_export fails without evicting when required entries are in the way",
          "[stable][stable_dram_cache]") {
  fake_clock clk;
  stable_dram_cache cache(kChunk * 2, clk);
  REQUIRE(
      cache.admit("required", kChunk, replica(), make_policy(retention::pinned, overflow::evict, true)).has_value());
  REQUIRE(cache.admit("loose", kChunk, replica(), kBestEffortEvict).has_value());
  const auto r = cache.preempt_for_export(kChunk * 2);
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::resource_exhausted);
  CHECK(r.error().message ==
        "cannot preempt the stable dram cache for an export of 128 bytes: 0 of 128 free and 64 held by entries that "
        "are not required");
  CHECK(cache.contains("loose"));
}

TEST_CASE("stable_dram_cache: the eviction listener runs outside the lock", "[stable][stable_dram_cache]") {
  fake_clock clk;
  stable_dram_cache* self = nullptr;
  std::vector<std::uint64_t> seen_entries;
  cache_hooks hooks;
  hooks.on_evict = [&](const evicted_entry&) { seen_entries.push_back(self->stats().entries); };
  stable_dram_cache cache(kChunk, clk, hooks);
  self = &cache;
  REQUIRE(cache.admit("a", kChunk, replica(), kBestEffortEvict).has_value());
  REQUIRE(cache.admit("b", kChunk, replica(), kBestEffortEvict).has_value());
  CHECK(seen_entries == std::vector<std::uint64_t>{1});  // called back without deadlock, after "b" went in
}

// ---------------------------------------------------------------------------------------------
// Invalid admissions: one case each

TEST_CASE("stable_dram_cache: rejects an empty key", "[stable][stable_dram_cache]") {
  fake_clock clk;
  stable_dram_cache cache(kChunk, clk);
  const auto r = cache.admit("", kChunk, replica(), kBestEffortEvict);
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::invalid_argument);
  CHECK(r.error().message == "cannot admit an entry to the stable dram cache: the key is empty");
}

TEST_CASE("stable_dram_cache: rejects a missing replica", "[stable][stable_dram_cache]") {
  fake_clock clk;
  stable_dram_cache cache(kChunk, clk);
  const auto r = cache.admit("a", kChunk, nullptr, kBestEffortEvict);
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::invalid_argument);
  CHECK(r.error().message == "cannot admit 'a' (64 bytes) to the stable dram cache: no replica was given");
}

TEST_CASE("stable_dram_cache: rejects a size of 0", "[stable][stable_dram_cache]") {
  fake_clock clk;
  stable_dram_cache cache(kChunk, clk);
  const auto r = cache.admit("a", 0, replica(), kBestEffortEvict);
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::invalid_argument);
  CHECK(r.error().message == "cannot admit 'a' (0 bytes) to the stable dram cache: size must be > 0");
}

TEST_CASE("stable_dram_cache: rejects a replica smaller than the size", "[stable][stable_dram_cache]") {
  fake_clock clk;
  stable_dram_cache cache(kChunk, clk);
  const auto r = cache.admit("a", kChunk, replica(kChunk - 1), kBestEffortEvict);
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::invalid_argument);
  CHECK(r.error().message == "cannot admit 'a' (64 bytes) to the stable dram cache: the replica holds only 63 bytes");
}

TEST_CASE("stable_dram_cache: rejects retention ttl without a ttl", "[stable][stable_dram_cache]") {
  fake_clock clk;
  stable_dram_cache cache(kChunk, clk);
  const auto r = cache.admit("a", kChunk, replica(), make_policy(retention::ttl, overflow::evict, false, 0));
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::invalid_argument);
  CHECK(r.error().message ==
        "cannot admit 'a' (64 bytes) to the stable dram cache: retention ttl requires ttl_ms > 0, got 0");
}

TEST_CASE("stable_dram_cache: rejects an unknown overflow value", "[stable][stable_dram_cache]") {
  fake_clock clk;
  stable_dram_cache cache(kChunk, clk);
  const auto r = cache.admit("a", kChunk, replica(), make_policy(retention::best_effort, static_cast<overflow>(9)));
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::invalid_argument);
  CHECK(r.error().message == "cannot admit 'a' (64 bytes) to the stable dram cache: unknown overflow 9");
}

TEST_CASE("stable_dram_cache: accepts a huge ttl by saturating the deadline", "[stable][stable_dram_cache]") {
  fake_clock clk;
  stable_dram_cache cache(kChunk, clk);
  REQUIRE(cache.admit("a", kChunk, replica(), make_policy(retention::ttl, overflow::evict, false, UINT64_MAX))
              .value()
              .admitted);
  CHECK(cache.info("a")->deadline == tensorreg::clock::time_point::max());
  clk.advance(24h * 365 * 100);
  CHECK_FALSE(cache.is_evictable("a"));
}

// ---------------------------------------------------------------------------------------------
// Concurrency (also run under TSan)

TEST_CASE("stable_dram_cache: concurrent admits, lookups and removes keep the accounting exact",
          "[stable][stable_dram_cache]") {
  fake_clock clk;
  std::atomic<std::uint64_t> listened{0};
  cache_hooks hooks;
  hooks.on_evict = [&](const evicted_entry&) { listened.fetch_add(1); };
  hooks.has_durable_copy = [](std::string_view id) { return id.back() % 2 == 0; };
  constexpr std::uint64_t kBudget = kChunk * 8;
  stable_dram_cache cache(kBudget, clk, hooks);

  constexpr int kThreads = 4;
  constexpr int kOps = 2000;
  std::atomic<int> over_budget{0};
  std::atomic<int> bad_errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kOps; ++i) {
        const std::string key = "k" + std::to_string((i * 7 + t) % 24);
        switch ((i + t) % 6) {
          case 0:
          case 1: {
            const auto r = cache.admit(key, kChunk, replica(), kBestEffortEvict);
            if (!r) bad_errors.fetch_add(1);
            break;
          }
          case 2: {
            const auto r = cache.admit(key, kChunk, replica(), make_policy(retention::ttl, overflow::spill, false, 5));
            if (!r && r.error().code != errc::resource_exhausted) bad_errors.fetch_add(1);
            break;
          }
          case 3: {
            if (auto p = cache.lookup(key)) {
              std::byte b[1]{};
              if (!p->read(0, b)) bad_errors.fetch_add(1);
            }
            break;
          }
          case 4: (void)cache.remove(key); break;
          default:
            if (cache.stats().bytes_used > kBudget) over_budget.fetch_add(1);
            if (t == 0) clk.advance(1ms);
            break;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(over_budget.load() == 0);
  CHECK(bad_errors.load() == 0);
  const auto s = cache.stats();
  CHECK(s.bytes_used == s.entries * kChunk);
  CHECK(s.bytes_used <= kBudget);
  CHECK(s.evictions == listened.load());
  CHECK(s.evicted_bytes == s.evictions * kChunk);
}

// ---------------------------------------------------------------------------------------------
// Reservations: uploads in progress hold their bytes of the budget (issue #15).

TEST_CASE("stable_dram_cache: reservations together never exceed the budget, and go back when dropped",
          "[stable][stable_dram_cache][reserve]") {
  fake_clock clk;
  stable_dram_cache cache(2 * kChunk, clk);
  auto a = cache.reserve(kChunk);
  REQUIRE(a.has_value());
  CHECK(a->bytes() == kChunk);
  auto b = cache.reserve(kChunk);
  REQUIRE(b.has_value());
  CHECK(cache.stats().reserved_bytes == 2 * kChunk);
  const auto refused = cache.reserve(1);
  REQUIRE_FALSE(refused.has_value());
  CHECK(refused.error().code == errc::resource_exhausted);
  CHECK(refused.error().message ==
        "cannot reserve 1 bytes of the stable budget: 0 of 128 bytes free (128 reserved "
        "by uploads in progress, 0 held by entries that cannot be evicted)");
  // Another admission is refused the reserved room; the reservation's own entry takes it.
  const auto other = cache.admit("other", kChunk, replica(), make_policy(retention::best_effort, overflow::reject));
  REQUIRE_FALSE(other.has_value());
  CHECK(other.error().message ==
        "cannot admit 'other' (64 bytes) to the stable dram cache: insufficient stable "
        "bytes: 0 of 128 free (128 reserved by uploads in progress), overflow reject");
  const auto own = cache.admit("a", kChunk, replica(), kBestEffortEvict, &*a);
  REQUIRE(own.has_value());
  CHECK(own->admitted);
  CHECK(a->bytes() == 0);
  CHECK(cache.stats().reserved_bytes == kChunk);
  CHECK(cache.bytes_used() == kChunk);
  { auto dropped = std::move(*b); }
  CHECK(cache.stats().reserved_bytes == 0);
  // No budget: reservations are empty and always granted.
  stable_dram_cache unlimited(0, clk);
  auto free_for_all = unlimited.reserve(1u << 30);
  REQUIRE(free_for_all.has_value());
  CHECK(free_for_all->bytes() == 0);
}

TEST_CASE("stable_dram_cache: a reservation counts pinned entries as taken and evicts best-effort ones at admission",
          "[stable][stable_dram_cache][reserve]") {
  fake_clock clk;
  stable_dram_cache cache(2 * kChunk, clk);
  REQUIRE(cache.admit("pinned", kChunk, replica(), make_policy(retention::pinned, overflow::evict)).has_value());
  REQUIRE(cache.admit("loose", kChunk, replica(), kBestEffortEvict).has_value());
  const auto refused = cache.reserve(2 * kChunk);
  REQUIRE_FALSE(refused.has_value());
  CHECK(refused.error().message ==
        "cannot reserve 128 bytes of the stable budget: 64 of 128 bytes free (0 reserved "
        "by uploads in progress, 64 held by entries that cannot be evicted)");
  auto held = cache.reserve(kChunk);
  REQUIRE(held.has_value());
  const auto admitted = cache.admit("upload", kChunk, replica(), kBestEffortEvict, &*held);
  REQUIRE(admitted.has_value());
  CHECK(admitted->admitted);
  CHECK(admitted->evicted == std::vector<std::string>{"loose"});
  CHECK(cache.contains("pinned"));
}
