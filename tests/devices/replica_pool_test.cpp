#include "devices/replica_pool.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace tensorreg::devices;
using namespace tensorreg::memory;
using tensorreg::unique_fd;

// An arena of `size` bytes whose pin counts its own release in `released`.
replica_pool::arena make_arena(std::uint64_t size, std::shared_ptr<int> released) {
  auto memory = shared_memory::create(size, "tensorreg-pool-test").value();
  std::shared_ptr<void> pin(new int(0), [released](void* p) {
    ++*released;
    delete static_cast<int*>(p);
  });
  return {std::move(memory), std::move(pin), 4096};
}

}  // namespace

TEST_CASE("replica_pool: a dropped replica comes back with its pin, bytes and exact size", "[devices][replica_pool]") {
  auto pool = replica_pool::create(1 << 20);
  auto released = std::make_shared<int>(0);
  CHECK_FALSE(pool->take(8192));
  auto replica = pool->lend(make_arena(8192, released));
  const void* address = replica->bytes().data();
  std::memset(replica->mutable_bytes().data(), 0xab, 8192);
  CHECK(pool->idle_bytes() == 0);
  replica.reset();
  CHECK(pool->idle_bytes() == 8192);
  CHECK(*released == 0);  // still pinned: that is the point of keeping it

  CHECK_FALSE(pool->take(4096));  // exact sizes only
  auto again = pool->take(8192);
  REQUIRE(again);
  CHECK(again->memory.bytes().data() == address);
  CHECK(again->pin_unit == 4096);
  CHECK(again->memory.bytes()[8191] == std::byte{0xab});  // the old bytes: the taker overwrites them
  CHECK(pool->idle_bytes() == 0);
  const auto c = pool->stats();
  CHECK(c.hits == 1);
  CHECK(c.misses == 2);
  CHECK(c.recycled == 1);
  again.reset();
  CHECK(*released == 1);
}

TEST_CASE("replica_pool: an exported replica is never taken back", "[devices][replica_pool]") {
  auto pool = replica_pool::create(1 << 20);
  auto released = std::make_shared<int>(0);
  SECTION("its fd was duplicated") {
    auto replica = pool->lend(make_arena(8192, released));
    auto fd = replica->duplicate_fd();
    REQUIRE(fd);
    replica.reset();
  }
  SECTION("its owner marked it (a reopened fd went out)") {
    auto replica = pool->lend(make_arena(8192, released));
    replica->mark_exported();
    replica.reset();
  }
  CHECK(pool->idle_bytes() == 0);
  CHECK_FALSE(pool->take(8192));
  CHECK(pool->stats().refused_exported == 1);
  CHECK(pool->stats().recycled == 0);
  CHECK(*released == 1);  // unpinned and freed
}

TEST_CASE("replica_pool: idle bytes stay within the bound, the oldest arenas going first", "[devices][replica_pool]") {
  auto pool = replica_pool::create(3 * 4096);
  auto released = std::make_shared<int>(0);
  std::vector<std::shared_ptr<const shared_memory>> held;
  for (int i = 0; i < 3; ++i) held.push_back(pool->lend(make_arena(4096, released)));
  auto big = pool->lend(make_arena(2 * 4096, released));
  auto too_big = pool->lend(make_arena(4 * 4096, released));
  const void* oldest = held[0]->bytes().data();
  const void* newest = held[2]->bytes().data();
  held.clear();  // three of 4096: exactly the bound
  CHECK(pool->idle_bytes() == 3 * 4096);
  CHECK(*released == 0);
  too_big.reset();  // larger than the bound: freed at once
  CHECK(*released == 1);
  CHECK(pool->idle_bytes() == 3 * 4096);
  big.reset();  // 8192 more: the two oldest 4096 arenas make room
  CHECK(*released == 3);
  CHECK(pool->idle_bytes() == 3 * 4096);
  CHECK(pool->stats().dropped_over_bound == 3);
  auto small = pool->take(4096);
  REQUIRE(small);
  CHECK(small->memory.bytes().data() == newest);
  CHECK(small->memory.bytes().data() != oldest);
  REQUIRE(pool->take(8192));
  CHECK(pool->idle_bytes() == 0);
}

TEST_CASE("replica_pool: a replica outliving its pool is freed, and a pool of 0 bytes keeps nothing",
          "[devices][replica_pool]") {
  auto released = std::make_shared<int>(0);
  {
    auto pool = replica_pool::create(1 << 20);
    auto replica = pool->lend(make_arena(4096, released));
    pool.reset();
    replica.reset();
    CHECK(*released == 1);
  }
  auto none = replica_pool::create(0);
  none->lend(make_arena(4096, released)).reset();
  CHECK(*released == 2);
  CHECK(none->idle_bytes() == 0);
}

TEST_CASE("replica_pool: replicas dropped on many threads all come back once", "[devices][replica_pool][concurrency]") {
  auto pool = replica_pool::create(64 * 4096);
  auto released = std::make_shared<int>(0);
  std::vector<std::shared_ptr<const shared_memory>> held;
  for (int i = 0; i < 32; ++i) held.push_back(pool->lend(make_arena(4096, released)));
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = t; i < 32; i += 4) held[static_cast<std::size_t>(i)].reset();
    });
  }
  for (auto& t : threads) t.join();
  CHECK(pool->idle_bytes() == 32 * 4096);
  CHECK(pool->stats().recycled == 32);
  int taken = 0;
  while (pool->take(4096)) ++taken;
  CHECK(taken == 32);
  CHECK(*released == 32);
}

TEST_CASE("replica_pool: a lent replica is sealed, so the fd a reader gets cannot change it, and is never recycled",
          "[devices][replica_pool]") {
  auto pool = replica_pool::create(1 << 20);
  auto released = std::make_shared<int>(0);
  auto replica = pool->lend(make_arena(8192, released));
  CHECK(replica->sealed_against_writes());
  std::memset(replica->mutable_bytes().data(), 0x5a, 8192);  // the taker's fill still works
  auto fd = replica->export_read_only();
  REQUIRE(fd);
  // A reader reopens its fd read-write through /proc: the seals refuse every way to write.
  unique_fd rw(::open(("/proc/self/fd/" + std::to_string(fd->get())).c_str(), O_RDWR | O_CLOEXEC));
  REQUIRE(rw);
  CHECK(::pwrite(rw.get(), "x", 1, 0) == -1);
  CHECK(errno == EPERM);
  CHECK(::mmap(nullptr, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, rw.get(), 0) == MAP_FAILED);
  CHECK(errno == EPERM);
  CHECK(::ftruncate(rw.get(), 0) == -1);
  CHECK(replica->bytes()[0] == std::byte{0x5a});
  replica.reset();
  CHECK(pool->stats().refused_exported == 1);
  CHECK_FALSE(pool->take(8192));
  CHECK(*released == 1);
}

TEST_CASE("replica_pool: a sealed replica nobody was handed comes back and is refilled through its own mapping",
          "[devices][replica_pool]") {
  auto pool = replica_pool::create(1 << 20);
  auto released = std::make_shared<int>(0);
  pool->lend(make_arena(4096, released)).reset();
  auto again = pool->take(4096);
  REQUIRE(again);
  CHECK(again->memory.sealed_against_writes());
  std::memset(again->memory.mutable_bytes().data(), 0x33, 4096);
  auto replica = pool->lend(std::move(*again));
  CHECK(replica->bytes()[4095] == std::byte{0x33});
  CHECK(pool->stats().recycled == 1);
}
