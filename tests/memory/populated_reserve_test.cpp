// The spare memfd a host put takes: resident and mapped before the put, zeros, sized and
// sealed as a fresh memfd, and made again after each take.
#include "memory/populated_reserve.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <fstream>
#include <span>
#include <sstream>
#include <thread>

namespace {

using tensorreg::memory::populated_reserve;

constexpr std::uint64_t mib = std::uint64_t{1} << 20;

// Waits up to 10 s for the reserve's thread to have a spare ready.
bool wait_ready(const populated_reserve& r) {
  for (int i = 0; i < 1000 && r.ready_bytes() == 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  return r.ready_bytes() != 0;
}

// Bytes the memfd has pages for (st_blocks counts 512-byte units).
std::uint64_t resident_bytes(int fd) {
  struct stat st {};
  REQUIRE(::fstat(fd, &st) == 0);
  return static_cast<std::uint64_t>(st.st_blocks) * 512;
}

// Pages of `bytes` that this process's page tables map now (/proc/self/pagemap's present bit),
// counted without touching them.
std::uint64_t mapped_pages(std::span<const std::byte> bytes) {
  const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
  const int fd = ::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  std::uint64_t present = 0;
  const auto first = reinterpret_cast<std::uintptr_t>(bytes.data()) / page;
  const auto last = (reinterpret_cast<std::uintptr_t>(bytes.data()) + bytes.size() + page - 1) / page;
  for (auto p = first; p < last; ++p) {
    std::uint64_t entry = 0;
    REQUIRE(::pread(fd, &entry, sizeof entry, static_cast<off_t>(p * sizeof entry)) == sizeof entry);
    present += (entry >> 63) & 1;
  }
  ::close(fd);
  return present;
}

}  // namespace

TEST_CASE("populated_reserve: a put of about its size takes memory already resident",
          "[memory][populated_reserve][concurrency]") {
  populated_reserve reserve(16 * mib, "tensorreg-publish");
  REQUIRE(wait_ready(reserve));
  CHECK(reserve.ready_bytes() == 16 * mib);

  auto taken = reserve.take(12 * mib + 5);
  REQUIRE(taken.has_value());
  CHECK(reserve.taken() == 1);
  CHECK(taken->size() == 12 * mib + 5);
  CHECK(taken->writable());
  // Faulted in before the take, shrunk to the put's size (the tail freed).
  const std::uint64_t resident = resident_bytes(taken->fd());
  CHECK(resident >= 12 * mib);
  CHECK(resident <= 13 * mib);
  // Handed over with the mapping the populate filled in: the put faults nothing in again.
  const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  CHECK(mapped_pages(taken->bytes()) == (12 * mib + 5 + page - 1) / page);
  // As a fresh memfd: zeros, its size fixed for the processes that will map it.
  const auto bytes = taken->bytes();
  bool zeros = true;
  for (const auto b : bytes) zeros = zeros && b == std::byte{0};
  CHECK(zeros);
  const int seals = ::fcntl(taken->fd(), F_GET_SEALS);
  CHECK((seals & F_SEAL_GROW) != 0);
  CHECK((seals & F_SEAL_SHRINK) != 0);
  CHECK((seals & F_SEAL_WRITE) == 0);
  CHECK(taken->seal_read_only());

  // The next spare is made for the next put.
  REQUIRE(wait_ready(reserve));
  auto bigger = reserve.take(20 * mib);
  REQUIRE(bigger.has_value());
  CHECK(bigger->size() == 20 * mib);
  CHECK(resident_bytes(bigger->fd()) >= 16 * mib);
  // Grown: the populated 16 MiB stay mapped, the new tail is mapped and writable.
  CHECK(mapped_pages(bigger->bytes().first(16 * mib)) == 16 * mib / page);
  bigger->mutable_bytes().back() = std::byte{7};
  CHECK(bigger->bytes().back() == std::byte{7});
  CHECK(reserve.taken() == 2);
}

TEST_CASE("populated_reserve: a put under half its size, or with none ready, makes its own",
          "[memory][populated_reserve][concurrency]") {
  populated_reserve reserve(16 * mib, "tensorreg-publish");
  REQUIRE(wait_ready(reserve));
  CHECK_FALSE(reserve.take(8 * mib - 1).has_value());
  CHECK_FALSE(reserve.take(0).has_value());
  CHECK(reserve.ready_bytes() == 16 * mib);  // still there for a put of its size
  REQUIRE(reserve.take(8 * mib).has_value());
  // Taken: until the refill is done, no spare (the caller creates a fresh memfd).
  CHECK(reserve.taken() == 1);
}

TEST_CASE("populated_reserve: the host's available memory is read from /proc/meminfo's text",
          "[memory][populated_reserve]") {
  using tensorreg::memory::mem_available_bytes;
  CHECK(mem_available_bytes("MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:   20480000 kB\n") ==
        std::uint64_t{20480000} * 1024);
  CHECK(mem_available_bytes("MemAvailable: 7 kB") == std::uint64_t{7} * 1024);
  CHECK_FALSE(mem_available_bytes("MemTotal: 1 kB\n").has_value());
  CHECK_FALSE(mem_available_bytes("MemAvailable: kB\n").has_value());
  // This host's own file parses, as the refill reads it.
  std::ifstream in("/proc/meminfo");
  REQUIRE(in);
  std::stringstream text;
  text << in.rdbuf();
  const auto here = mem_available_bytes(text.str());
  REQUIRE(here.has_value());
  CHECK(*here > 0);
}
