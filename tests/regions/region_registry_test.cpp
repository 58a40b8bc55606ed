#include "tensorreg/regions/region_registry.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <memory>
#include <string>
#include <thread>

#include "support/fake_clock.hpp"
#include "tensorreg/memory/unlocked_release.hpp"

namespace {

using namespace tensorreg::regions;
using std::chrono::milliseconds;
using tensorreg::errc;
using tensorreg::error;

register_request managed_host(std::int32_t pid, std::uint64_t size = 4096, std::uint32_t ttl_ms = 0) {
  register_request r;
  r.kind = memory_kind::host_shared;
  r.owner_pid = pid;
  r.size_bytes = size;
  r.ttl_ms = ttl_ms;
  r.host_shared = host_shared_spec{"", true, host_shared_class::scratch};
  return r;
}

register_request vram(std::int32_t pid, std::int32_t device) {
  register_request r;
  r.kind = memory_kind::vram;
  r.owner_pid = pid;
  r.size_bytes = 1 << 20;
  r.device_id = device;
  r.cuda_ipc_handle = std::string(64, '\x01');
  return r;
}

}  // namespace

TEST_CASE("region_registry: a daemon-managed HOST_SHARED region gets an id, a token and zeroed memory",
          "[regions][region_registry]") {
  tensorreg::testing::fake_clock clock;
  region_registry registry(clock);
  auto info = registry.register_region(managed_host(42)).value();
  CHECK(info.id.rfind("region:", 0) == 0);
  CHECK(info.id.size() == 7 + 32);
  CHECK(info.attach_token.rfind("region-attach:", 0) == 0);
  CHECK(info.attach_token.size() == 14 + 32);
  CHECK(info.device_id == -1);
  REQUIRE(info.memory);
  CHECK(info.memory->size() == 4096);
  CHECK(info.memory->bytes()[4095] == std::byte{0});
  CHECK_FALSE(info.expires_at);  // TTL 0: no expiry, lives until the owner exits
}

TEST_CASE("region_registry: a client memfd is adopted and its bytes are visible", "[regions][region_registry]") {
  tensorreg::testing::fake_clock clock;
  region_registry registry(clock);
  auto client = tensorreg::memory::shared_memory::create(8192, "client").value();
  client.mutable_bytes()[10] = std::byte{9};
  auto r = managed_host(7, 8192);
  r.host_shared->daemon_managed = false;
  r.host_shared->attach_token = "client-token";
  r.memfd = client.duplicate_fd().value();
  auto info = registry.register_region(std::move(r)).value();
  CHECK(info.attach_token == "client-token");
  CHECK(info.memory->bytes()[10] == std::byte{9});
}

TEST_CASE("region_registry: register rejects each malformed request with its message", "[regions][region_registry]") {
  tensorreg::testing::fake_clock clock;
  region_registry registry(clock);
  auto expect = [&](register_request r, errc code, const std::string& message) {
    auto got = registry.register_region(std::move(r));
    REQUIRE_FALSE(got);
    CHECK(got.error() == error{code, message});
  };
  {
    auto r = managed_host(1);
    r.kind = memory_kind::unspecified;
    expect(std::move(r), errc::invalid_argument, "cannot register region: memory_kind is unspecified");
  }
  expect(managed_host(0), errc::invalid_argument, "cannot register region: owner_pid is required (>0)");
  expect(managed_host(1, 0), errc::invalid_argument, "cannot register region: size_bytes must be > 0");
  expect(vram(1, -1), errc::invalid_argument, "cannot register region: VRAM needs device_id >= 0, got -1");
  {
    auto r = vram(1, 0);
    r.cuda_ipc_handle.clear();
    expect(std::move(r), errc::invalid_argument, "cannot register region: VRAM needs a cuda_ipc_handle");
  }
  {
    auto r = managed_host(1);
    r.host_shared->attach_token = "x";
    expect(std::move(r), errc::invalid_argument,
           "cannot register region: a daemon-managed region takes no attach_token");
  }
  {
    auto r = managed_host(1);
    r.host_shared->daemon_managed = false;
    expect(std::move(r), errc::invalid_argument,
           "cannot register region: HOST_SHARED needs an attach_token unless daemon_managed");
  }
  {
    auto r = managed_host(1);
    r.host_shared->daemon_managed = false;
    r.host_shared->attach_token = "t";
    expect(std::move(r), errc::invalid_argument,
           "cannot register region: HOST_SHARED needs the client's memfd unless daemon_managed");
  }
  {
    auto r = managed_host(1);
    r.host_shared.reset();
    expect(std::move(r), errc::invalid_argument, "cannot register region: HOST_SHARED needs a host_shared spec");
  }
}

TEST_CASE("region_registry: capacity is enforced with RESOURCE_EXHAUSTED", "[regions][region_registry]") {
  tensorreg::testing::fake_clock clock;
  region_registry registry(clock, {.capacity = 3});
  for (int i = 0; i < 3; ++i) REQUIRE(registry.register_region(vram(1, 0)));
  auto full = registry.register_region(vram(1, 0));
  REQUIRE_FALSE(full);
  CHECK(full.error() ==
        error{errc::resource_exhausted, "cannot register region: the registry holds its capacity of 3 regions"});
}

TEST_CASE("region_registry: TTL is clamped to 10 minutes", "[regions][region_registry]") {
  tensorreg::testing::fake_clock clock;
  region_registry registry(clock);
  auto r = vram(1, 0);
  r.ttl_ms = 3'600'000;
  auto info = registry.register_region(std::move(r)).value();
  CHECK(info.ttl_ms == 600'000);
  CHECK(*info.expires_at == clock.now() + milliseconds(600'000));
}

TEST_CASE("region_registry: acquire counts references, checks the owner and refreshes expiry",
          "[regions][region_registry]") {
  tensorreg::testing::fake_clock clock;
  region_registry registry(clock);
  auto r = vram(5, 0);
  r.ttl_ms = 1000;
  const auto id = registry.register_region(std::move(r)).value().id;
  clock.advance(milliseconds(900));
  auto got = registry.acquire(id, 5).value();
  CHECK(got.refs == 1);
  CHECK(*got.expires_at == clock.now() + milliseconds(1000));
  CHECK(registry.acquire(id, 0).value().refs == 2);  // 0: the engine acting for nobody in particular

  auto wrong = registry.acquire(id, 6);
  REQUIRE_FALSE(wrong);
  CHECK(wrong.error() == error{errc::permission_denied, "cannot acquire region '" + id + "': owned by pid 5, not 6"});

  auto missing = registry.acquire("region:nope", 5);
  REQUIRE_FALSE(missing);
  CHECK(missing.error() == error{errc::not_found, "cannot find region 'region:nope': no such region"});
}

TEST_CASE("region_registry: acquire_all takes every reference or none", "[regions][region_registry]") {
  tensorreg::testing::fake_clock clock;
  region_registry registry(clock);
  std::vector<std::string> ids;
  for (int i = 0; i < 3; ++i) ids.push_back(registry.register_region(vram(5, 0)).value().id);
  const auto refs = [&] {
    std::vector<std::uint32_t> out;
    for (const auto& id : ids) out.push_back(registry.find(id).value().refs);
    return out;
  };
  REQUIRE(registry.acquire_all(ids, 5));
  CHECK(refs() == std::vector<std::uint32_t>{1, 1, 1});

  // Each refusal is acquire()'s, and leaves every count as it was.
  CHECK(registry.acquire_all(ids, 6).error() ==
        error{errc::permission_denied, "cannot acquire region '" + ids[0] + "': owned by pid 5, not 6"});
  auto with_unknown = ids;
  with_unknown.push_back("region:nope");
  CHECK(registry.acquire_all(with_unknown, 5).error() ==
        error{errc::not_found, "cannot find region 'region:nope': no such region"});
  REQUIRE(registry.poison(ids[2], "device lost"));
  CHECK(registry.acquire_all(ids, 5).error() ==
        error{errc::failed_precondition, "cannot acquire region '" + ids[2] + "': region is poisoned: device lost"});
  CHECK(refs() == std::vector<std::uint32_t>{1, 1, 1});
  CHECK(registry.release_all(ids) == 0);
  CHECK(refs() == std::vector<std::uint32_t>{0, 0, 0});
}

TEST_CASE("region_registry: release below zero is FAILED_PRECONDITION", "[regions][region_registry]") {
  tensorreg::testing::fake_clock clock;
  region_registry registry(clock);
  const auto id = registry.register_region(vram(5, 0)).value().id;
  REQUIRE(registry.acquire(id, 5));
  REQUIRE(registry.release(id));
  auto below = registry.release(id);
  REQUIRE_FALSE(below);
  CHECK(below.error() == error{errc::failed_precondition, "cannot release region '" + id + "': no reference is held"});
}

TEST_CASE("region_registry: a reference blocks unregister unless forced, force retires the region",
          "[regions][region_registry]") {
  tensorreg::testing::fake_clock clock;
  region_registry registry(clock);
  const auto id = registry.register_region(managed_host(5)).value().id;
  auto held = registry.acquire(id, 5).value();

  auto blocked = registry.unregister(id, 5, false);
  REQUIRE_FALSE(blocked);
  CHECK(blocked.error() ==
        error{errc::failed_precondition, "cannot unregister region '" + id + "': 1 references are held (use force)"});

  auto wrong_owner = registry.unregister(id, 6, true);
  REQUIRE_FALSE(wrong_owner);
  CHECK(wrong_owner.error().code == errc::permission_denied);

  CHECK(registry.unregister(id, 5, true).value() == false);  // retiring, not yet gone
  auto retiring = registry.acquire(id, 5);
  REQUIRE_FALSE(retiring);
  CHECK(retiring.error() == error{errc::failed_precondition, "cannot acquire region '" + id + "': region is retiring"});
  CHECK(held.memory->size() == 4096);  // the holder's memory stays mapped
  REQUIRE(registry.release(id));
  CHECK(registry.find(id).error().code == errc::not_found);
}

TEST_CASE("region_registry: unregister without references removes the region", "[regions][region_registry]") {
  tensorreg::testing::fake_clock clock;
  region_registry registry(clock);
  const auto id = registry.register_region(vram(5, 0)).value().id;
  CHECK(registry.unregister(id, 5, false).value() == true);
  CHECK(registry.unregister(id, 5, false).error().code == errc::not_found);
}

TEST_CASE("region_registry: poison blocks acquire", "[regions][region_registry]") {
  tensorreg::testing::fake_clock clock;
  region_registry registry(clock);
  const auto id = registry.register_region(vram(5, 0)).value().id;
  REQUIRE(registry.poison(id, "device lost"));
  auto got = registry.acquire(id, 5);
  REQUIRE_FALSE(got);
  CHECK(got.error() ==
        error{errc::failed_precondition, "cannot acquire region '" + id + "': region is poisoned: device lost"});
}

TEST_CASE("region_registry: sweep expires idle regions and renews referenced ones", "[regions][region_registry]") {
  tensorreg::testing::fake_clock clock;
  region_registry registry(clock);
  auto idle_req = vram(5, 0);
  idle_req.ttl_ms = 100;
  auto used_req = vram(5, 0);
  used_req.ttl_ms = 100;
  const auto idle = registry.register_region(std::move(idle_req)).value().id;
  const auto used = registry.register_region(std::move(used_req)).value().id;
  const auto forever = registry.register_region(vram(5, 0)).value().id;
  REQUIRE(registry.acquire(used, 5));

  clock.advance(milliseconds(99));
  CHECK(registry.sweep().empty());
  clock.advance(milliseconds(1));
  CHECK(registry.sweep() == std::vector<std::string>{idle});
  CHECK(*registry.find(used).value().expires_at == clock.now() + milliseconds(100));
  clock.advance(std::chrono::hours(24));
  REQUIRE(registry.release(used));
  CHECK(registry.sweep() == std::vector<std::string>{used});
  CHECK(registry.find(forever));
}

TEST_CASE("region_registry: owner exit removes all of that pid's regions", "[regions][region_registry]") {
  tensorreg::testing::fake_clock clock;
  region_registry registry(clock);
  const auto a = registry.register_region(vram(5, 0)).value().id;
  const auto b = registry.register_region(managed_host(5)).value().id;
  const auto other = registry.register_region(vram(6, 0)).value().id;
  REQUIRE(registry.acquire(a, 5));
  auto removed = registry.release_owner(5);
  std::sort(removed.begin(), removed.end());
  std::vector<std::string> expected{a, b};
  std::sort(expected.begin(), expected.end());
  CHECK(removed == expected);
  CHECK(registry.size() == 1);
  CHECK(registry.find(other));
}

TEST_CASE("region_registry: concurrent acquire and release keep the count exact",
          "[regions][region_registry][concurrency]") {
  tensorreg::testing::fake_clock clock;
  region_registry registry(clock);
  const auto id = registry.register_region(vram(5, 0)).value().id;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 500; ++i) {
        if (registry.acquire(id, 5)) (void)registry.release(id);
        (void)registry.sweep();
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(registry.find(id).value().refs == 0);
}

TEST_CASE("region_registry: a client memfd must be sealed against shrinking", "[regions][region_registry]") {
  tensorreg::testing::fake_clock clock;
  region_registry registry(clock);
  auto client_region = [](tensorreg::unique_fd fd) {
    auto r = managed_host(7, 8192);
    r.host_shared->daemon_managed = false;
    r.host_shared->attach_token = "client-token";
    r.memfd = std::move(fd);
    return r;
  };
  tensorreg::unique_fd unsealed(::memfd_create("client", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  REQUIRE(::ftruncate(unsealed.get(), 8192) == 0);
  auto refused = registry.register_region(client_region(std::move(unsealed)));
  REQUIRE_FALSE(refused);
  CHECK(refused.error() == error{errc::failed_precondition,
                                 "cannot register region: cannot map shared memory: the memfd lacks the seal "
                                 "F_SEAL_SHRINK, so it could shrink under the mapping; add it with "
                                 "fcntl(F_ADD_SEALS, F_SEAL_SHRINK) before sending"});
  CHECK(registry.size() == 0);

  // Sealed, it is adopted, and its owner can no longer take pages away under our reads.
  tensorreg::unique_fd sealed(::memfd_create("client", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  REQUIRE(::ftruncate(sealed.get(), 8192) == 0);
  REQUIRE(::fcntl(sealed.get(), F_ADD_SEALS, F_SEAL_SHRINK) == 0);
  const int owner_fd = ::fcntl(sealed.get(), F_DUPFD_CLOEXEC, 0);
  tensorreg::unique_fd owner(owner_fd);
  REQUIRE(registry.register_region(client_region(std::move(sealed))));
  CHECK(::ftruncate(owner.get(), 0) == -1);
  CHECK(errno == EPERM);
}

namespace {

// A stand-in for a device mapping, counting how often the kept_mapping asked for one.
struct counting_opener {
  int opens = 0;
  tensorreg::result<std::shared_ptr<const tensorreg::memory::byte_source>> operator()() {
    ++opens;
    return std::shared_ptr<const tensorreg::memory::byte_source>(
        std::make_shared<tensorreg::memory::shared_memory>(*tensorreg::memory::shared_memory::create(64, "kept")));
  }
};

}  // namespace

TEST_CASE("region_registry: a VRAM region by handle keeps the mapping its first user opened",
          "[regions][region_registry]") {
  tensorreg::testing::fake_clock clock;
  region_registry reg(clock);
  auto r = reg.register_region(vram(100, 0));
  REQUIRE(r);
  REQUIRE(r->ipc_mapping);
  CHECK_FALSE(r->ipc_mapping->is_open());
  counting_opener open;
  auto first = r->ipc_mapping->get_or_open(open);
  REQUIRE(first);
  // Another copy of the region's info (a later registration's acquire) finds the same mapping.
  auto again = reg.acquire(r->id, 100);
  REQUIRE(again);
  auto second = again->ipc_mapping->get_or_open(open);
  REQUIRE(second);
  CHECK(second->get() == first->get());
  CHECK(open.opens == 1);
  REQUIRE(reg.release(r->id));
  // A HOST_SHARED region has its memfd and no IPC mapping.
  auto host = reg.register_region(managed_host(100));
  REQUIRE(host);
  CHECK_FALSE(host->ipc_mapping);
}

TEST_CASE("region_registry: the kept mapping goes with its region: unregister, sweep, owner exit, retirement",
          "[regions][region_registry]") {
  tensorreg::testing::fake_clock clock;
  region_registry reg(clock);
  counting_opener open;
  const auto opened = [&](std::uint32_t ttl_ms = 0) {
    auto req = vram(100, 0);
    req.ttl_ms = ttl_ms;
    auto r = reg.register_region(std::move(req));
    REQUIRE(r);
    REQUIRE(r->ipc_mapping->get_or_open(open));
    CHECK(r->ipc_mapping->is_open());
    return *r;
  };
  SECTION("unregister") {
    auto r = opened();
    REQUIRE(reg.unregister(r.id, 100, false));
    CHECK_FALSE(r.ipc_mapping->is_open());
  }
  SECTION("sweep") {
    auto r = opened(1000);
    clock.advance(milliseconds(1001));
    CHECK(reg.sweep() == std::vector<std::string>{r.id});
    CHECK_FALSE(r.ipc_mapping->is_open());
  }
  SECTION("owner exit") {
    auto r = opened();
    CHECK(reg.release_owner(100) == std::vector<std::string>{r.id});
    CHECK_FALSE(r.ipc_mapping->is_open());
  }
  SECTION("forced unregister under a reference: kept until the last release") {
    auto r = opened();
    REQUIRE(reg.acquire(r.id, 100));
    auto retired = reg.unregister(r.id, 100, true);
    REQUIRE(retired);
    CHECK_FALSE(*retired);
    CHECK(r.ipc_mapping->is_open());
    REQUIRE(reg.release(r.id));
    CHECK_FALSE(r.ipc_mapping->is_open());
  }
  // A stale copy of a gone region's info opens without keeping: nothing outlives the region.
  auto stale = opened();
  REQUIRE(reg.unregister(stale.id, 100, false));
  const int before = open.opens;
  REQUIRE(stale.ipc_mapping->get_or_open(open));
  CHECK(open.opens == before + 1);
  CHECK_FALSE(stale.ipc_mapping->is_open());
}

TEST_CASE("region_registry: an unregistered region's memory is unmapped after the caller's locks",
          "[regions][region_registry]") {
  tensorreg::testing::fake_clock clock;
  region_registry registry(clock);
  auto info = registry.register_region(managed_host(42)).value();
  const std::string id = info.id;
  std::weak_ptr<const tensorreg::memory::shared_memory> memory = info.memory;
  info = {};
  REQUIRE_FALSE(memory.expired());
  CHECK(registry.size() == 1);
  {
    tensorreg::memory::unlocked_release_scope scope;  // as the engine holds its mutex
    REQUIRE(registry.unregister(id, 42, false).value());
    CHECK(registry.size() == 0);
    CHECK_FALSE(memory.expired());  // still mapped while the caller holds its locks
  }
  CHECK(memory.expired());
}
