#include "tensorreg/index/byte_range_map.hpp"

#include <catch2/catch.hpp>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace {

using tensorreg::errc;
using tensorreg::index::byte_range;
using tensorreg::index::byte_range_map;
using tensorreg::index::canonical_index;
using tensorreg::index::entry;
using tensorreg::index::range_kind;
using tensorreg::index::source_range;

constexpr std::uint64_t u64_max = std::numeric_limits<std::uint64_t>::max();

entry tensor(std::string name, std::uint64_t offset, std::uint64_t size) {
  return entry{std::move(name), offset, size, {1}, {1}, "torch.uint8", 0};
}

byte_range data(std::uint64_t offset, std::uint64_t length, std::uint32_t source = 0,
                std::uint64_t src = ~std::uint64_t{0}) {
  return {offset, length, range_kind::data, source, src == ~std::uint64_t{0} ? offset : src};
}

byte_range pad(std::uint64_t offset, std::uint64_t length) { return {offset, length, range_kind::pad, 0, 0}; }

std::vector<byte_range> ranges_of(const byte_range_map& map) { return {map.ranges().begin(), map.ranges().end()}; }

void require_invalid(const tensorreg::result<byte_range_map>& r, const std::string& message) {
  REQUIRE_FALSE(r);
  CHECK(r.error().code == errc::invalid_argument);
  CHECK(r.error().message == message);
}

}  // namespace

// ---- from index entries -------------------------------------------------------------------

TEST_CASE("byte_range_map: entries become data and gaps become pad up to total_size", "[index][byte_range_map]") {
  const std::vector<entry> es = {tensor("b", 24, 3), tensor("a", 0, 4), tensor("c", 8, 10)};
  const auto map = byte_range_map::from_entries(es, 40);
  REQUIRE(map);
  CHECK(ranges_of(*map) ==
        std::vector<byte_range>{data(0, 4), pad(4, 4), data(8, 10), pad(18, 6), data(24, 3), pad(27, 13)});
  CHECK(map->total_size() == 40);
  CHECK(map->data_bytes() == 17);
}

TEST_CASE("byte_range_map: touching entries stay separate ranges", "[index][byte_range_map]") {
  const std::vector<entry> es = {tensor("a", 0, 8), tensor("b", 8, 8)};
  const auto map = byte_range_map::from_entries(es, 16);
  REQUIRE(map);
  CHECK(ranges_of(*map) == std::vector<byte_range>{data(0, 8), data(8, 8)});
}

TEST_CASE("byte_range_map: aliases with identical offset and size merge", "[index][byte_range_map]") {
  const std::vector<entry> es = {tensor("a", 0, 16), tensor("a_view", 0, 16), tensor("a_t", 0, 16)};
  const auto map = byte_range_map::from_entries(es, 16);
  REQUIRE(map);
  CHECK(ranges_of(*map) == std::vector<byte_range>{data(0, 16)});
  CHECK(map->data_bytes() == 16);
}

TEST_CASE("byte_range_map: a partial overlap of entries names both tensors", "[index][byte_range_map]") {
  const std::vector<entry> es = {tensor("late", 8, 16), tensor("early", 0, 16)};
  require_invalid(byte_range_map::from_entries(es, 32),
                  "cannot build byte range map: tensor 'early' [0, 16) and tensor 'late' [8, 24) "
                  "overlap without being aliases");
}

TEST_CASE("byte_range_map: an entry containing another names both tensors", "[index][byte_range_map]") {
  // Same start, different size, is containment too.
  const std::vector<entry> same_start = {tensor("big", 0, 32), tensor("small", 0, 8)};
  require_invalid(byte_range_map::from_entries(same_start, 32),
                  "cannot build byte range map: tensor 'small' [0, 8) and tensor 'big' [0, 32) "
                  "overlap without being aliases");
  const std::vector<entry> inside = {tensor("big", 0, 32), tensor("mid", 8, 8), tensor("z", 40, 8)};
  require_invalid(byte_range_map::from_entries(inside, 48),
                  "cannot build byte range map: tensor 'big' [0, 32) and tensor 'mid' [8, 16) "
                  "overlap without being aliases");
}

TEST_CASE("byte_range_map: an entry past total_size is refused", "[index][byte_range_map]") {
  const std::vector<entry> es = {tensor("a", 0, 8), tensor("b", 8, 9)};
  require_invalid(byte_range_map::from_entries(es, 16),
                  "cannot build byte range map: tensor 'b' ends at 17, past total_size 16");
  const std::vector<entry> empty_past = {tensor("a", 0, 8), tensor("e", 17, 0)};
  require_invalid(byte_range_map::from_entries(empty_past, 16),
                  "cannot build byte range map: tensor 'e' ends at 17, past total_size 16");
}

TEST_CASE("byte_range_map: an entry whose end overflows is refused", "[index][byte_range_map]") {
  const std::vector<entry> es = {tensor("a", u64_max, 1)};
  require_invalid(byte_range_map::from_entries(es, u64_max),
                  "cannot build byte range map: tensor 'a' at offset 18446744073709551615 with "
                  "size 1 ends past 2^64");
}

TEST_CASE("byte_range_map: total_size 0 is refused", "[index][byte_range_map]") {
  require_invalid(byte_range_map::from_entries({}, 0), "cannot build byte range map: total_size must be > 0");
  require_invalid(byte_range_map::from_sources({}, 0), "cannot build byte range map: total_size must be > 0");
}

TEST_CASE("byte_range_map: empty entries cover nothing, even inside another", "[index][byte_range_map]") {
  const std::vector<entry> es = {tensor("a", 0, 16), tensor("empty", 8, 0)};
  const auto map = byte_range_map::from_entries(es, 16);
  REQUIRE(map);
  CHECK(ranges_of(*map) == std::vector<byte_range>{data(0, 16)});
}

TEST_CASE("byte_range_map: no entries is all pad", "[index][byte_range_map]") {
  const auto map = byte_range_map::from_entries({}, 10);
  REQUIRE(map);
  CHECK(ranges_of(*map) == std::vector<byte_range>{pad(0, 10)});
  CHECK(map->data_bytes() == 0);
}

TEST_CASE("byte_range_map: from_index maps a canonical index", "[index][byte_range_map]") {
  const auto idx = canonical_index::parse(
      R"({"a":[0,4,[4],[1],"torch.uint8",0],"b":[8,4,[4],[1],"torch.uint8",0],"c":[8,4,[2],[1],"torch.uint8",2]})", 14);
  REQUIRE(idx);
  const auto map = byte_range_map::from_index(*idx);
  CHECK(ranges_of(map) == std::vector<byte_range>{data(0, 4), pad(4, 4), data(8, 4), pad(12, 2)});
}

TEST_CASE("byte_range_map: find returns the range holding an offset", "[index][byte_range_map]") {
  const std::vector<entry> es = {tensor("a", 0, 4), tensor("b", 8, 4)};
  const auto map = byte_range_map::from_entries(es, 14);
  REQUIRE(map);
  CHECK(map->find(0) == 0);
  CHECK(map->find(3) == 0);
  CHECK(map->find(4) == 1);
  CHECK(map->find(7) == 1);
  CHECK(map->find(8) == 2);
  CHECK(map->find(12) == 3);
  CHECK(map->find(13) == 3);
}

// ---- from generic source ranges -------------------------------------------------------------

TEST_CASE("byte_range_map: source ranges keep their source and source offset", "[index][byte_range_map]") {
  const std::vector<source_range> rs = {{16, 8, 2, 100}, {0, 8, 1, 0}};
  const auto map = byte_range_map::from_sources(rs, 30);
  REQUIRE(map);
  CHECK(ranges_of(*map) == std::vector<byte_range>{data(0, 8, 1, 0), pad(8, 8), data(16, 8, 2, 100), pad(24, 6)});
  CHECK(map->data_bytes() == 16);
}

TEST_CASE("byte_range_map: overlapping source ranges with the same source and delta merge", "[index][byte_range_map]") {
  // [0,16) at src 100 and [8,24) at src 108 both map dst d to src d + 100.
  const std::vector<source_range> rs = {{8, 16, 3, 108}, {0, 16, 3, 100}, {4, 4, 3, 104}};
  const auto map = byte_range_map::from_sources(rs, 24);
  REQUIRE(map);
  CHECK(ranges_of(*map) == std::vector<byte_range>{data(0, 24, 3, 100)});
  CHECK(map->data_bytes() == 24);
}

TEST_CASE("byte_range_map: overlapping source ranges from different sources are refused", "[index][byte_range_map]") {
  const std::vector<source_range> rs = {{0, 16, 1, 0}, {8, 16, 2, 8}};
  require_invalid(byte_range_map::from_sources(rs, 32),
                  "cannot build byte range map: range 0 [0, 16) (source 1 at 0) and range 1 "
                  "[8, 24) (source 2 at 8) overlap but map to different source bytes");
}

TEST_CASE("byte_range_map: overlapping source ranges with different deltas are refused", "[index][byte_range_map]") {
  const std::vector<source_range> rs = {{0, 16, 1, 0}, {32, 4, 1, 0}, {8, 16, 1, 0}};
  require_invalid(byte_range_map::from_sources(rs, 40),
                  "cannot build byte range map: range 0 [0, 16) (source 1 at 0) and range 2 "
                  "[8, 24) (source 1 at 0) overlap but map to different source bytes");
}

TEST_CASE("byte_range_map: a conflict names the range that reaches furthest", "[index][byte_range_map]") {
  // Range 1 extends the merged run to 40; range 2 overlaps only range 1.
  const std::vector<source_range> rs = {{0, 16, 1, 0}, {8, 32, 1, 8}, {30, 4, 2, 0}};
  require_invalid(byte_range_map::from_sources(rs, 40),
                  "cannot build byte range map: range 1 [8, 40) (source 1 at 8) and range 2 "
                  "[30, 34) (source 2 at 0) overlap but map to different source bytes");
}

TEST_CASE("byte_range_map: a source range past total_size is refused", "[index][byte_range_map]") {
  const std::vector<source_range> rs = {{0, 8, 0, 0}, {8, 9, 0, 8}};
  require_invalid(byte_range_map::from_sources(rs, 16),
                  "cannot build byte range map: range 1 ends at 17, past total_size 16");
}

TEST_CASE("byte_range_map: source ranges whose ends overflow are refused", "[index][byte_range_map]") {
  const std::vector<source_range> dst = {{u64_max - 1, 2, 0, 0}};
  require_invalid(byte_range_map::from_sources(dst, u64_max),
                  "cannot build byte range map: range 0 at offset 18446744073709551614 (source 0 "
                  "at 0) with length 2 ends past 2^64");
  const std::vector<source_range> src = {{0, 2, 0, u64_max}};
  require_invalid(byte_range_map::from_sources(src, 8),
                  "cannot build byte range map: range 0 at offset 0 (source 0 at "
                  "18446744073709551615) with length 2 ends past 2^64");
}

TEST_CASE("byte_range_map: deltas compare exactly across the 64-bit range", "[index][byte_range_map]") {
  // dst - src is negative for one and positive for the other; they must not merge.
  const std::vector<source_range> rs = {{10, 10, 0, u64_max - 20}, {12, 4, 0, 2}};
  require_invalid(byte_range_map::from_sources(rs, 20),
                  "cannot build byte range map: range 0 [10, 20) (source 0 at "
                  "18446744073709551595) and range 1 [12, 16) (source 0 at 2) overlap but map to "
                  "different source bytes");
  // A large negative delta that agrees is merged.
  const std::vector<source_range> same = {{0, 8, 0, u64_max - 20}, {4, 8, 0, u64_max - 16}};
  const auto map = byte_range_map::from_sources(same, 12);
  REQUIRE(map);
  CHECK(ranges_of(*map) == std::vector<byte_range>{data(0, 12, 0, u64_max - 20)});
}

TEST_CASE("byte_range_map: a namer names source ranges in messages", "[index][byte_range_map]") {
  const std::vector<source_range> rs = {{0, 16, 1, 0}, {8, 16, 2, 0}};
  const std::vector<std::string> storages = {"w0", "w1"};
  const auto r = byte_range_map::from_sources(
      rs, 32, [&](std::size_t i) { return "segment " + std::to_string(i) + " of storage '" + storages[i] + "'"; });
  require_invalid(r,
                  "cannot build byte range map: segment 0 of storage 'w0' [0, 16) (source 1 at 0) "
                  "and segment 1 of storage 'w1' [8, 24) (source 2 at 0) overlap but map to "
                  "different source bytes");
}

TEST_CASE("byte_range_map: zero-length source ranges cover nothing", "[index][byte_range_map]") {
  const std::vector<source_range> rs = {{0, 16, 1, 0}, {8, 0, 2, 0}, {16, 0, 3, 0}};
  const auto map = byte_range_map::from_sources(rs, 16);
  REQUIRE(map);
  CHECK(ranges_of(*map) == std::vector<byte_range>{data(0, 16, 1, 0)});
}
