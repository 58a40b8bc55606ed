// tensorreg_gpu_host_tests: the plan of the batched copy kernel (src/cuda/copy_plan.hpp) and
// what a block does with each chunk (src/cuda/batched_copy_device.cuh), compiled by nvcc as host
// code and run on host memory, one emulated thread after another. Needs no GPU: chunk bounds,
// unit choice, zero gaps and the kernel's indexing are checked wherever CUDA is built; the GPU
// suite (weight_sync_tests.cpp) checks the same layouts through a real launch.
#include "cuda/copy_plan.hpp"

#include <catch2/catch.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/batched_copy_device.cuh"

namespace {

namespace detail = tensorreg::cuda::detail;
using detail::copy_chunk;
using tensorreg::cuda::device_piece;

constexpr std::uint64_t kib = 1024;

// Host memory standing in for device memory: 16-byte aligned, like cudaMalloc's.
struct aligned_bytes {
  std::vector<uint4> storage;
  explicit aligned_bytes(std::uint64_t bytes) : storage((bytes + 15) / 16) {}
  unsigned char* data() { return reinterpret_cast<unsigned char*>(storage.data()); }
};

// Runs the chunks the way the kernel does, each by `threads` emulated threads of one block.
void run_chunks(const std::vector<copy_chunk>& chunks, unsigned char* base, unsigned threads) {
  for (const auto& c : chunks) {
    for (unsigned t = 0; t < threads; ++t) detail::copy_one_chunk(c, base, t, threads);
  }
}

// Every chunk is inside [0, size), in order, next to the one before, at most chunk_bytes long,
// of a unit dividing its source address, destination offset and length; together they cover
// [0, size) once.
void check_chunks(const std::vector<copy_chunk>& chunks, std::uint64_t size, std::uint64_t chunk_bytes) {
  std::uint64_t at = 0;
  for (std::size_t i = 0; i < chunks.size(); ++i) {
    const auto& c = chunks[i];
    INFO("chunk " << i << " at " << c.dst << ", " << c.bytes << " bytes, unit " << c.unit);
    REQUIRE(c.dst == at);
    REQUIRE(c.bytes > 0);
    REQUIRE(c.bytes <= chunk_bytes);
    REQUIRE((c.unit == 1 || c.unit == 2 || c.unit == 4 || c.unit == 8 || c.unit == 16));
    CHECK(c.dst % c.unit == 0);
    CHECK(c.bytes % c.unit == 0);
    CHECK(reinterpret_cast<std::uintptr_t>(c.src) % c.unit == 0);
    at += c.bytes;
  }
  CHECK(at == size);
}

// The snapshot of `runs` read from `source` into a `size`-byte buffer first filled with 0xAB
// (what an earlier allocation may have left), as the kernel writes it, next to the expected
// bytes: each run's, zeros elsewhere.
void check_snapshot(const std::vector<device_piece>& runs, std::uint64_t size, std::uint64_t chunk_bytes,
                    unsigned threads) {
  const auto chunks = detail::plan_copy_chunks(runs, size, chunk_bytes);
  check_chunks(chunks, size, chunk_bytes);
  CHECK(chunks.size() == detail::count_copy_chunks(runs, size, chunk_bytes));
  aligned_bytes out(size);
  std::memset(out.data(), 0xAB, size);
  run_chunks(chunks, out.data(), threads);
  std::string expected(size, '\0');
  for (const auto& r : runs) std::memcpy(expected.data() + r.at, r.src, r.length);
  CHECK(std::string(reinterpret_cast<const char*>(out.data()), size) == expected);
}

// A source of distinct bytes (a byte of the run's length would not show a shifted copy).
aligned_bytes patterned(std::uint64_t bytes) {
  aligned_bytes b(bytes);
  std::uint32_t x = 0x9e3779b9U;
  for (std::uint64_t i = 0; i < bytes; ++i) {
    x = x * 1664525U + 1013904223U;
    b.data()[i] = static_cast<unsigned char>(x >> 24);
  }
  return b;
}

}  // namespace

TEST_CASE("cuda copy_plan: the unit is the widest power of two up to 16 dividing address, offset and length",
          "[cuda][copy_plan]") {
  CHECK(detail::copy_unit(0, 0, 0) == 16);
  CHECK(detail::copy_unit(256, 4096, 1 << 20) == 16);
  CHECK(detail::copy_unit(256, 4096, 24) == 8);
  CHECK(detail::copy_unit(4, 4096, 4096) == 4);
  CHECK(detail::copy_unit(256, 2, 4096) == 2);
  CHECK(detail::copy_unit(256, 4096, 3) == 1);
  CHECK(detail::copy_unit(0x1001, 0, 16) == 1);
}

TEST_CASE("cuda copy_plan: an aligned run is cut into chunks of at most chunk_bytes, all in 16-byte units",
          "[cuda][copy_plan]") {
  auto source = patterned(1024 * kib + 16);
  const std::vector<device_piece> runs = {{0, source.data(), 1024 * kib + 16}};
  const auto chunks = detail::plan_copy_chunks(runs, 1024 * kib + 16, 256 * kib);
  REQUIRE(chunks.size() == 5);
  for (std::size_t i = 0; i < 4; ++i) {
    CHECK(chunks[i].bytes == 256 * kib);
    CHECK(chunks[i].dst == i * 256 * kib);
    CHECK(chunks[i].src == source.data() + i * 256 * kib);
    CHECK(chunks[i].unit == 16);
  }
  CHECK(chunks[4].bytes == 16);
  CHECK(chunks[4].unit == 16);
  check_chunks(chunks, 1024 * kib + 16, 256 * kib);
}

TEST_CASE("cuda copy_plan: gaps are chunks of zeros (null source) in the destination's widest unit",
          "[cuda][copy_plan]") {
  auto source = patterned(64);
  // A gap of 100 bytes, a 32-byte run, a tail gap of 600 KiB + 3 (longer than a chunk).
  const std::uint64_t size = 100 + 32 + 600 * kib + 3;
  const std::vector<device_piece> runs = {{100, source.data() + 4, 32}};
  const auto chunks = detail::plan_copy_chunks(runs, size, 256 * kib);
  check_chunks(chunks, size, 256 * kib);
  // [0, 96) zeros in 16s, [96, 100) zeros in 4s; the run (source and destination both 4 mod 16,
  // so one unit of 4 up to the boundary, then 16s, then 4); then the tail.
  REQUIRE(chunks.size() >= 6);
  CHECK((chunks[0].src == nullptr && chunks[0].bytes == 96 && chunks[0].unit == 16));
  CHECK((chunks[1].src == nullptr && chunks[1].bytes == 4 && chunks[1].unit == 4));
  CHECK((chunks[2].src == source.data() + 4 && chunks[2].dst == 100 && chunks[2].bytes == 12 && chunks[2].unit == 4));
  CHECK((chunks[3].src == source.data() + 16 && chunks[3].bytes == 16 && chunks[3].unit == 16));
  CHECK((chunks[4].src == source.data() + 32 && chunks[4].bytes == 4 && chunks[4].unit == 4));
  for (std::size_t i = 5; i < chunks.size(); ++i) CHECK(chunks[i].src == nullptr);
  check_snapshot(runs, size, 256 * kib, 256);
}

TEST_CASE("cuda copy_plan: a buffer with no runs is all zero chunks", "[cuda][copy_plan]") {
  const auto chunks = detail::plan_copy_chunks({}, 300 * kib + 1, 256 * kib);
  REQUIRE(chunks.size() == 3);
  CHECK((chunks[0].bytes == 256 * kib && chunks[0].unit == 16));
  CHECK((chunks[1].bytes == 44 * kib && chunks[1].unit == 16));
  CHECK((chunks[2].bytes == 1 && chunks[2].unit == 1));
  for (const auto& c : chunks) CHECK(c.src == nullptr);
  check_snapshot({}, 300 * kib + 1, 256 * kib, 256);
  CHECK(detail::plan_copy_chunks({}, 0).empty());
}

TEST_CASE("cuda copy_plan: source and destination that differ modulo 16 go in the widest unit they agree on",
          "[cuda][copy_plan]") {
  auto source = patterned(64 * kib);
  const std::uint64_t length = 8 * kib;
  // Source 4 mod 16, destination 0: 4-byte units throughout. Source 2 mod 8, destination 0
  // mod 8: 2-byte units. Source odd against an even destination: bytes.
  const struct {
    std::uint64_t src_offset;
    std::uint32_t unit;
  } cases[] = {{4, 4}, {8, 8}, {2, 2}, {6, 2}, {1, 1}, {15, 1}};
  for (const auto& c : cases) {
    INFO("source offset " << c.src_offset);
    const std::vector<device_piece> runs = {{0, source.data() + c.src_offset, length}};
    const auto chunks = detail::plan_copy_chunks(runs, length, 256 * kib);
    REQUIRE(chunks.size() == 1);
    CHECK(chunks[0].unit == c.unit);
    check_snapshot(runs, length, 256 * kib, 256);
  }
}

TEST_CASE("cuda copy_plan: runs of odd sizes and alignments snapshot to their bytes with zero gaps",
          "[cuda][copy_plan]") {
  auto source = patterned(4 * 1024 * kib);
  auto* s = source.data();
  // 1, 3, 17 and 4096 + 5 bytes at odd offsets on either side, an aligned run of several
  // chunks, a 16-aligned run whose length is not, neighbours with no gap between them, and a
  // tail gap.
  const std::vector<device_piece> runs = {
      {3, s + 7, 1},
      {5, s + 1001, 3},
      {8, s + 8, 17},  // both 8 mod 16: an 8-byte head in one unit, a 9-byte tail in bytes
      {25, s + 3000, 4096 + 5},
      {4128, s + 65536, 1024 * kib},  // 4128 = 16 · 258: aligned on both sides, four chunks
      {4128 + 1024 * kib, s + 2 * 1024 * kib, 4096 + 5},
      {4128 + 1024 * kib + 4096 + 5, s + 3 * 1024 * kib + 1, 17},
      {1100 * kib, s + 16, 48},
  };
  const std::uint64_t size = 1100 * kib + 48 + 13;
  // Full blocks, a single warp (more units per thread than the unroll), and one thread.
  const unsigned threads = GENERATE(256u, 32u, 1u);
  const std::uint64_t chunk_bytes = GENERATE(std::uint64_t{256} * 1024, std::uint64_t{16}, std::uint64_t{4096});
  INFO(threads << " threads, chunks of " << chunk_bytes);
  check_snapshot(runs, size, chunk_bytes, threads);
}

TEST_CASE("cuda copy_plan: a launch has up to blocks_per_sm blocks on each multiprocessor, no more than chunks",
          "[cuda][copy_plan]") {
  CHECK(detail::copy_grid_blocks(65536, 132, 8) == 1056);
  CHECK(detail::copy_grid_blocks(100, 132, 8) == 100);
  CHECK(detail::copy_grid_blocks(0, 132, 8) == 1);
  CHECK(detail::copy_grid_blocks(5000, 0, 0) == 1);
  CHECK(detail::copy_grid_blocks(5000, 2, 4) == 8);
}
