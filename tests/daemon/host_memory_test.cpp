// The stable DRAM budget from --stable-bytes: bytes or a percentage of the host's memory,
// never above that memory (the systemd units pass 50%).
#include "daemon/host_memory.hpp"

#include <catch2/catch.hpp>

#include <cstdint>

using tensorreg::errc;
using tensorreg::daemon::lower_by_cgroup_limit;
using tensorreg::daemon::parse_stable_budget;

namespace {
constexpr std::uint64_t kGiB = std::uint64_t{1} << 30;
}

TEST_CASE("host_memory: a number of bytes within memory is kept as given", "[daemon][host_memory]") {
  auto b = parse_stable_budget("1073741824", 16 * kGiB);
  REQUIRE(b);
  CHECK(b->bytes == kGiB);
  CHECK(b->note.empty());
  auto unlimited = parse_stable_budget("0", 16 * kGiB);
  REQUIRE(unlimited);
  CHECK(unlimited->bytes == 0);
}

TEST_CASE("host_memory: a percentage is that share of memory in whole pages", "[daemon][host_memory]") {
  auto half = parse_stable_budget("50%", 16 * kGiB);
  REQUIRE(half);
  CHECK(half->bytes == 8 * kGiB);
  auto all = parse_stable_budget("100%", 16 * kGiB + 123);
  REQUIRE(all);
  CHECK(all->bytes <= 16 * kGiB + 123);
  CHECK(all->bytes % 4096 == 0);
}

TEST_CASE("host_memory: a budget above memory is lowered to it, and says so", "[daemon][host_memory]") {
  auto b = parse_stable_budget("68719476736", 16 * kGiB);
  REQUIRE(b);
  CHECK(b->bytes == 16 * kGiB);
  CHECK(b->note == "--stable-bytes 68719476736 (64.0 GiB) is more than this host's memory of 16.0 GiB; using 16.0 GiB");
  auto unknown = parse_stable_budget("68719476736", std::nullopt);
  REQUIRE(unknown);
  CHECK(unknown->bytes == 64 * kGiB);
}

TEST_CASE("host_memory: bad budgets are refused naming the text", "[daemon][host_memory]") {
  const auto refused = [](const char* text, std::optional<std::uint64_t> memory, const std::string& why) {
    auto b = parse_stable_budget(text, memory);
    REQUIRE_FALSE(b);
    CHECK(b.error().code == errc::invalid_argument);
    CHECK(b.error().message == std::string("cannot use --stable-bytes '") + text + "': " + why);
  };
  refused("0%", kGiB, "a percentage of memory must be 1% to 100%");
  refused("101%", kGiB, "a percentage of memory must be 1% to 100%");
  refused("%", kGiB, "a percentage of memory must be 1% to 100%");
  refused("50%", std::nullopt, "this host's memory size cannot be read; give a number of bytes");
  refused("1G", kGiB, "it needs a number of bytes (0 = unlimited) or a percentage of memory such as 50%");
  refused("", kGiB, "it needs a number of bytes (0 = unlimited) or a percentage of memory such as 50%");
}

TEST_CASE("host_memory: a cgroup's memory.max lowers the memory, 'max' does not", "[daemon][host_memory]") {
  CHECK(lower_by_cgroup_limit(16 * kGiB, "4294967296\n") == 4 * kGiB);
  CHECK(lower_by_cgroup_limit(16 * kGiB, "max\n") == 16 * kGiB);
  CHECK(lower_by_cgroup_limit(16 * kGiB, "") == 16 * kGiB);
  CHECK(lower_by_cgroup_limit(4 * kGiB, "17179869184") == 4 * kGiB);
  auto usable = tensorreg::daemon::usable_memory_bytes();
  REQUIRE(usable);
  CHECK(*usable > 0);
}
