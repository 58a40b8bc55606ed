// The view plan's streamed_view_hash: a PIECE's view hash carried over its bytes as they land,
// in any order and on many threads, equal to the hash of the staging taken whole at Commit.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstring>
#include <random>
#include <thread>

#include "registration/plans/view.hpp"
#include "support/engine_helpers.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/hash/tree_hash.hpp"

namespace {

using tensorreg::registration::detail::streamed_view_hash;
using tensorreg::registration::detail::written_ranges;

constexpr std::uint64_t leaf = 4096;  // small leaves: many of them, chunks across their edges
constexpr std::uint64_t size = 10 * leaf + 1000;

// SHA-256 of each `leaf` bytes of `bytes`, then their tree: the view hash with small leaves.
tensorreg::hash::digest whole(const std::vector<std::byte>& bytes) {
  std::vector<tensorreg::hash::digest> leaves;
  for (std::uint64_t at = 0; at < bytes.size(); at += leaf) {
    leaves.push_back(tensorreg::hash::sha256(std::span(bytes).subspan(at, std::min(leaf, bytes.size() - at))));
  }
  return tensorreg::hash::tree_root(leaves);
}

struct upload {
  std::vector<std::byte> source;
  std::vector<std::byte> staging = std::vector<std::byte>(size);
  written_ranges written;
  streamed_view_hash streamed{size, leaf};

  explicit upload(std::uint32_t seed) {
    const auto text = tensorreg::testing::pattern(size, seed);
    source.resize(size);
    std::memcpy(source.data(), text.data(), size);
  }

  // The hash's reads of the staging buffer, as the view plan's.
  void read(tensorreg::hash::sha256_hasher& h, std::uint64_t from, std::uint64_t to) const {
    h.update(std::span(staging).subspan(from, to - from));
  }
  auto reader() {
    return [this](tensorreg::hash::sha256_hasher& h, std::uint64_t from, std::uint64_t to) { read(h, from, to); };
  }

  // What a Feed does with a chunk.
  void land(std::uint64_t at, std::uint64_t n) {
    std::memcpy(staging.data() + at, source.data() + at, n);
    if (written.add(at, n)) {
      streamed.spoil();
    } else {
      streamed.advance(reader(), written, at, n);
    }
  }
};

// Chunks of 700 bytes (not a divisor of the leaf), in a shuffled order.
std::vector<std::uint64_t> chunk_starts(std::uint32_t seed) {
  std::vector<std::uint64_t> starts;
  for (std::uint64_t at = 0; at < size; at += 700) starts.push_back(at);
  std::mt19937 rng(seed);
  std::shuffle(starts.begin(), starts.end(), rng);
  return starts;
}

}  // namespace

TEST_CASE("streamed view hash: chunks in any order give the hash of the whole staging",
          "[registration][streamed_view_hash]") {
  tensorreg::thread_pool pool(2);
  const auto seed = GENERATE(1u, 2u, 3u);
  upload u(seed);
  for (const auto at : chunk_starts(seed)) u.land(at, std::min<std::uint64_t>(700, size - at));
  auto got = u.streamed.finish(u.reader(), pool);
  REQUIRE(got.has_value());
  CHECK(*got == whole(u.source));
  CHECK_FALSE(u.streamed.finish(u.reader(), pool).has_value());  // spent: a second Commit rehashes
}

TEST_CASE("streamed view hash: bytes never written are hashed at the finish as they are",
          "[registration][streamed_view_hash]") {
  tensorreg::thread_pool pool(1);
  upload u(4);
  u.land(0, 3 * leaf + 10);
  u.land(5 * leaf, 2 * leaf);  // a gap before it: leaves 3 and 4 wait for the finish
  auto got = u.streamed.finish(u.reader(), pool);
  REQUIRE(got.has_value());
  CHECK(*got == whole(u.staging));
}

TEST_CASE("streamed view hash: a chunk written again spoils it", "[registration][streamed_view_hash]") {
  tensorreg::thread_pool pool(1);
  upload u(5);
  u.land(0, 2 * leaf);
  u.source[100] = std::byte{0x5A};
  u.land(0, 200);  // the same bytes again, one of them changed: what was hashed is stale
  u.land(2 * leaf, size - 2 * leaf);
  CHECK_FALSE(u.streamed.finish(u.reader(), pool).has_value());
}

TEST_CASE("streamed view hash: chunks landing on many threads give the hash of the whole staging",
          "[registration][streamed_view_hash][concurrency]") {
  tensorreg::thread_pool pool(2);
  for (std::uint32_t seed = 10; seed < 20; ++seed) {
    upload u(seed);
    const auto starts = chunk_starts(seed);
    std::atomic<std::size_t> next{0};
    std::vector<std::thread> feeds;
    for (int t = 0; t < 4; ++t) {
      feeds.emplace_back([&] {
        for (std::size_t k = next++; k < starts.size(); k = next++) {
          u.land(starts[k], std::min<std::uint64_t>(700, size - starts[k]));
        }
      });
    }
    for (auto& f : feeds) f.join();
    auto got = u.streamed.finish(u.reader(), pool);
    REQUIRE(got.has_value());
    CHECK(*got == whole(u.source));
  }
}

TEST_CASE("written ranges: merged as they come, against a byte map", "[registration][streamed_view_hash]") {
  const auto seed = GENERATE(1u, 2u, 3u, 4u);
  std::mt19937 rng(seed);
  constexpr std::uint64_t universe = 300;
  std::vector<bool> set(universe, false);
  written_ranges written;
  for (int k = 0; k < 200; ++k) {
    const std::uint64_t at = rng() % universe;
    const std::uint64_t n = rng() % 4 == 0 ? 0 : 1 + rng() % std::min<std::uint64_t>(20, universe - at);
    bool before = false;
    for (std::uint64_t i = at; i < at + n; ++i) before = before || set[i];
    CHECK(written.add(at, n) == before);
    for (std::uint64_t i = at; i < at + n; ++i) set[i] = true;
    const std::uint64_t probe = rng() % universe;
    std::uint64_t through = probe;
    while (through < universe && set[through]) ++through;
    CHECK(written.written_through(probe) == through);
  }
  // The first byte not written in a required range, as Commit asks.
  const std::vector<tensorreg::views::byte_range> required{{10, 50}, {100, 150}};
  std::optional<tensorreg::views::byte_range> gap;
  for (const auto& r : required) {
    for (std::uint64_t i = r.offset; i < r.end() && !gap; ++i) {
      if (set[i]) continue;
      std::uint64_t end = i;
      while (end < r.end() && !set[end]) ++end;
      gap = tensorreg::views::byte_range{i, end - i};
    }
    if (gap) break;
  }
  CHECK(written.first_missing(required) == gap);
}
