#include "devices/hash_placement.hpp"

#include <catch2/catch.hpp>

#include <optional>

namespace {

using tensorreg::devices::choose_site;
using tensorreg::devices::hash_site;
using tensorreg::devices::hash_speeds;
using tensorreg::devices::plan_copy;
using tensorreg::devices::plan_hash;

constexpr std::uint64_t gib = std::uint64_t{1} << 30;

// The H100 host of benchmarks/RESULTS.md: GPU hash 107 ms flat (16 384 leaves measured flat on
// 132 SMs), 1.2 GB/s SHA-256 per core on 16 cores, ~50 GiB/s pinned D2H, ~1.5 TB/s on device.
hash_speeds h100() {
  hash_speeds s;
  s.gpu_flat_seconds = 0.107;
  s.gpu_parallel_leaves = 132 * 128;
  s.host_core_hash_rate = 1.2e9;
  s.host_core_copy_rate = 8e9;
  s.host_threads = 16;
  s.d2h_rate = 50.0 * static_cast<double>(gib);
  s.d2d_rate = 1.5e12;
  return s;
}

}  // namespace

TEST_CASE("hash_placement: small device buffers hash on the host, large ones on the GPU", "[devices][hash_placement]") {
  const auto s = h100();
  // 19.2 GB/s on the host: 1 GiB takes 56 ms there, 107 ms on the GPU.
  const auto one = plan_hash(s, gib, false);
  CHECK(one.site == hash_site::host);
  CHECK(one.host_seconds == Approx(static_cast<double>(gib) / 19.2e9));
  CHECK(one.gpu_seconds == Approx(0.107));
  // 4 GiB: 224 ms on the host.
  CHECK(plan_hash(s, 4 * gib, false).site == hash_site::gpu);
  // The crossover is where the host needs the GPU's flat time: 0.107 s × 19.2 GB/s ≈ 2.05 GB.
  CHECK(plan_hash(s, 1'900'000'000, false).site == hash_site::host);
  CHECK(plan_hash(s, 2'200'000'000, false).site == hash_site::gpu);
}

TEST_CASE("hash_placement: fewer host threads move the crossover down", "[devices][hash_placement]") {
  auto s = h100();
  s.host_threads = 2;  // 2.4 GB/s: 256 MiB takes 112 ms on the host
  CHECK(plan_hash(s, 256ull << 20, false).site == hash_site::gpu);
  CHECK(plan_hash(s, 128ull << 20, false).site == hash_site::host);
}

TEST_CASE("hash_placement: a slow link makes the host wait for its bytes", "[devices][hash_placement]") {
  auto s = h100();
  s.d2h_rate = 5e9;  // below the cores' 19.2 GB/s: the host is bound by the copy
  const auto plan = plan_hash(s, 500ull << 20, false);
  CHECK(plan.host_seconds == Approx(static_cast<double>(500ull << 20) / 5e9));
  CHECK(plan.site == hash_site::host);  // 104.9 ms vs the GPU's 107 ms
  CHECK(plan_hash(s, 600ull << 20, false).site == hash_site::gpu);
}

TEST_CASE("hash_placement: the gather and rounds of leaves count on the GPU", "[devices][hash_placement]") {
  auto s = h100();
  const auto direct = plan_hash(s, 8 * gib, false);
  const auto gathered = plan_hash(s, 8 * gib, true);
  CHECK(gathered.gpu_seconds == Approx(direct.gpu_seconds + static_cast<double>(8 * gib) / 1.5e12));
  s.gpu_parallel_leaves = 1000;  // 2 048 leaves: three rounds
  CHECK(plan_hash(s, 8 * gib, false).gpu_seconds == Approx(3 * 0.107));
}

TEST_CASE("hash_placement: copy and hash: the GPU hashes while the snapshot goes to the host",
          "[devices][hash_placement]") {
  const auto s = h100();
  const auto big = plan_copy(s, 8 * gib, true);
  CHECK(big.site == hash_site::gpu);
  // The D2H (164 ms) outlasts the hash (107 ms): the copy sets the time.
  CHECK(big.gpu_seconds == Approx(static_cast<double>(8 * gib) / 1.5e12 + 8.0 / 50.0));
  // 1 GiB: the GPU cannot beat its 107 ms; 16 threads copy and hash at ~16.7 GB/s (64 ms).
  const auto small = plan_copy(s, gib, true);
  CHECK(small.site == hash_site::host);
  CHECK(small.host_seconds == Approx(static_cast<double>(gib) / (16.0 / (1 / 1.2e9 + 1 / 8e9))));
  // Without a digest nothing is hashed: the GPU side is the snapshot and the copy alone.
  CHECK(plan_copy(s, gib, false).gpu_seconds == Approx(static_cast<double>(gib) / 1.5e12 + 1.0 / 50.0));
}

TEST_CASE("hash_placement: unmeasured speeds keep the host", "[devices][hash_placement]") {
  auto s = h100();
  s.gpu_flat_seconds = 0;
  CHECK(plan_hash(s, 64 * gib, false).site == hash_site::host);
  CHECK(plan_copy(s, 64 * gib, true).site == hash_site::host);
  CHECK(plan_hash(hash_speeds{}, 64 * gib, true).site == hash_site::host);
  CHECK(plan_hash(h100(), 0, false).site == hash_site::host);
}

TEST_CASE("hash_placement: choose_site: a forced site wins without measuring", "[devices][hash_placement]") {
  int measured = 0;
  const auto measure = [&]() -> tensorreg::result<hash_speeds> {
    ++measured;
    return h100();
  };
  const auto plan = [](const hash_speeds& s) { return plan_hash(s, 64 * gib, false); };
  CHECK(choose_site(hash_site::host, 16, measure, plan) == hash_site::host);
  CHECK(choose_site(hash_site::gpu, 16, measure, plan) == hash_site::gpu);
  CHECK(measured == 0);
  CHECK(choose_site(std::nullopt, 16, measure, plan) == hash_site::gpu);
  CHECK(measured == 1);
}

TEST_CASE("hash_placement: choose_site: the plan sees the caller's threads, a failed measurement keeps the host",
          "[devices][hash_placement]") {
  unsigned seen_threads = 0;
  const auto plan = [&](const hash_speeds& s) {
    seen_threads = s.host_threads;
    return plan_hash(s, 256ull << 20, false);
  };
  // The probe leaves host_threads 0; choose_site sets the caller's count before planning.
  const auto probe = []() -> tensorreg::result<hash_speeds> {
    auto s = h100();
    s.host_threads = 0;
    return s;
  };
  CHECK(choose_site(std::nullopt, 2, probe, plan) == hash_site::gpu);
  CHECK(seen_threads == 2);
  CHECK(choose_site(std::nullopt, 16, probe, plan) == hash_site::host);
  CHECK(seen_threads == 16);

  const auto broken = []() -> tensorreg::result<hash_speeds> {
    return tensorreg::fail(tensorreg::errc::resource_exhausted, "cannot allocate a speed probe buffer: out of memory");
  };
  seen_threads = 0;
  CHECK(choose_site(std::nullopt, 16, broken, plan) == hash_site::host);
  CHECK(seen_threads == 0);  // nothing to plan with
}

TEST_CASE("hash_placement: copy: a fresh memfd's first touch bounds the host, a recycled replica frees the GPU of it",
          "[devices][hash_placement]") {
  // The VM of benchmarks/RESULTS.md: one core writes fresh pages at 1.5 GB/s, all 16 together
  // at only 4.4 GiB/s.
  auto s = h100();
  s.host_core_copy_rate = 1.5e9;
  s.host_fresh_write_rate = 4.4 * static_cast<double>(gib);
  const auto ready = plan_copy(s, gib, true, true);
  // Host: 16 × (1.2 ⊕ 1.5 GB/s) = 10.7 GB/s on paper, 4.4 GiB/s in fact: 227 ms.
  CHECK(ready.host_seconds == Approx(1.0 / 4.4));
  // GPU into a recycled replica: snapshot + max(D2H 20 ms, hash 107 ms).
  CHECK(ready.gpu_seconds == Approx(static_cast<double>(gib) / 1.5e12 + 0.107));
  CHECK(ready.site == hash_site::gpu);
  // No replica of that size idle: the GPU's D2H lands in fresh pages too, as slow as the host.
  const auto fresh = plan_copy(s, gib, true, false);
  CHECK(fresh.gpu_seconds == Approx(static_cast<double>(gib) / 1.5e12 + 1.0 / 4.4));
  CHECK(fresh.site == hash_site::host);  // the host's 227 ms vs 227.7
}

TEST_CASE("hash_placement: copy: an unmeasured first-touch rate counts nothing extra", "[devices][hash_placement]") {
  const auto s = h100();  // host_fresh_write_rate 0
  CHECK(plan_copy(s, gib, true).host_seconds == Approx(static_cast<double>(gib) / (16.0 / (1 / 1.2e9 + 1 / 8e9))));
  CHECK(plan_copy(s, gib, true, true).gpu_seconds == plan_copy(s, gib, true, false).gpu_seconds);
}
