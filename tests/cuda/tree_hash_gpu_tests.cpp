// tensorreg_gpu_tests: the GPU tree hash (tensorreg/cuda/gpu_tree_hash.hpp) against the CPU path
// (hash::tree_hash, OpenSSL) on random data written on the GPU. Runs only where a CUDA device
// is present (gpu_main.cpp exits 77 otherwise).
//
// Named *_tests.cpp, not *_test.cpp, so the CPU suite's glob (tests/CMakeLists.txt) does not
// pick it up.
#include "tensorreg/cuda/gpu_tree_hash.hpp"

#include <catch2/catch.hpp>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "cuda/tree_hash_kernels.hpp"
#include "gpu_fill.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/memory/byte_source.hpp"

namespace {

using tensorreg::errc;
using tensorreg::cuda::gpu_tree_hasher;
using tensorreg::hash::digest;
using tensorreg::hash::leaf_bytes;

constexpr std::uint64_t mib = std::uint64_t{1} << 20;
constexpr std::uint64_t gib = std::uint64_t{1} << 30;

#define CUDA_REQUIRE(call)                                   \
  do {                                                       \
    const cudaError_t cuda_require_e = (call);               \
    INFO(#call << ": " << cudaGetErrorName(cuda_require_e)); \
    REQUIRE(cuda_require_e == cudaSuccess);                  \
  } while (false)

struct device_buffer {
  void* ptr = nullptr;
  explicit device_buffer(std::uint64_t bytes) {
    if (cudaMalloc(&ptr, bytes) != cudaSuccess) {
      static_cast<void>(cudaGetLastError());
      ptr = nullptr;
    }
  }
  ~device_buffer() {
    if (ptr != nullptr) static_cast<void>(cudaFree(ptr));
  }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  [[nodiscard]] unsigned char* bytes() const { return static_cast<unsigned char*>(ptr); }
};

struct pinned_buffer {
  void* ptr = nullptr;
  explicit pinned_buffer(std::uint64_t bytes) {
    if (cudaMallocHost(&ptr, bytes) != cudaSuccess) {
      static_cast<void>(cudaGetLastError());
      ptr = nullptr;
    }
  }
  ~pinned_buffer() {
    if (ptr != nullptr) static_cast<void>(cudaFreeHost(ptr));
  }
  pinned_buffer(const pinned_buffer&) = delete;
  pinned_buffer& operator=(const pinned_buffer&) = delete;
  [[nodiscard]] std::byte* bytes() const { return static_cast<std::byte*>(ptr); }
};

tensorreg::thread_pool& pool() {
  static tensorreg::thread_pool instance(std::max(1U, std::thread::hardware_concurrency()) - 1);
  return instance;
}

gpu_tree_hasher& shared_hasher() {
  static gpu_tree_hasher instance = [] {
    auto h = gpu_tree_hasher::create(0);
    if (!h) FAIL("cannot create hasher: " << h.error().message);
    return std::move(h).value();
  }();
  return instance;
}

// GPU leaves and root of [p, p + size) against the CPU path over a host copy of the same bytes.
void check_against_cpu(const unsigned char* p, std::uint64_t size) {
  INFO("size " << size << " at offset " << reinterpret_cast<std::uintptr_t>(p) % 256 << " mod 256");
  pinned_buffer host(size);
  REQUIRE(host.ptr != nullptr);
  CUDA_REQUIRE(cudaMemcpy(host.ptr, p, size, cudaMemcpyDeviceToHost));
  const tensorreg::memory::host_bytes_view view(std::span<const std::byte>(host.bytes(), size));
  const auto cpu_leaves = tensorreg::hash::leaf_digests(view, &pool());
  REQUIRE(cpu_leaves.has_value());
  const digest cpu_root = tensorreg::hash::tree_root(*cpu_leaves);

  auto& hasher = shared_hasher();
  const auto gpu_leaves = hasher.leaf_digests(p, size);
  REQUIRE(gpu_leaves.has_value());
  REQUIRE(gpu_leaves->size() == cpu_leaves->size());
  for (std::size_t i = 0; i < cpu_leaves->size(); ++i) {
    INFO("leaf " << i);
    CHECK((*gpu_leaves)[i] == (*cpu_leaves)[i]);
  }
  const auto gpu_root = hasher.tree_hash(p, size);
  REQUIRE(gpu_root.has_value());
  CHECK(tensorreg::hash::to_hex(*gpu_root) == tensorreg::hash::to_hex(cpu_root));
}

// Fills a fresh buffer of size + slack bytes on the GPU and checks [base + offset, +size).
void check_random(std::uint64_t size, std::uint64_t seed, std::uint64_t offset = 0) {
  device_buffer buffer(size + offset + 64);
  REQUIRE(buffer.ptr != nullptr);
  CUDA_REQUIRE(tensorreg::cuda::testing::fill_random(buffer.ptr, size + offset + 64, seed));
  CUDA_REQUIRE(cudaDeviceSynchronize());
  check_against_cpu(buffer.bytes() + offset, size);
}

}  // namespace

TEST_CASE("cuda tree_hash: the §3.4 vector (bytes 0x00..0x1f, one leaf)", "[cuda][tree_hash]") {
  unsigned char bytes[32];
  for (int i = 0; i < 32; ++i) bytes[i] = static_cast<unsigned char>(i);
  device_buffer buffer(32);
  REQUIRE(buffer.ptr != nullptr);
  CUDA_REQUIRE(cudaMemcpy(buffer.ptr, bytes, 32, cudaMemcpyHostToDevice));
  const auto root = tensorreg::cuda::tree_hash_device(buffer.ptr, 32, {}, 0);
  REQUIRE(root.has_value());
  CHECK(tensorreg::hash::encode_multihash(*root) == "bciqggdonfftmim3gsejfisf3wjnu75asusohglnszcv4docydplrbxi");
}

TEST_CASE("cuda tree_hash: small sizes and block boundaries equal the CPU path", "[cuda][tree_hash]") {
  for (std::uint64_t size : {1, 2, 31, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129, 1000, 4096, 65537}) {
    check_random(size, size);
  }
}

TEST_CASE("cuda tree_hash: sizes around one leaf equal the CPU path", "[cuda][tree_hash]") {
  for (std::uint64_t size :
       {leaf_bytes - 65, leaf_bytes - 64, leaf_bytes - 9, leaf_bytes - 1, leaf_bytes, leaf_bytes + 1, leaf_bytes + 55,
        leaf_bytes + 64, 2 * leaf_bytes, 3 * leaf_bytes, 3 * leaf_bytes - 1, 3 * leaf_bytes + 77}) {
    check_random(size, 1000 + size);
  }
}

TEST_CASE("cuda tree_hash: 1 to 17 leaves (odd nodes promoted) equal the CPU path", "[cuda][tree_hash]") {
  for (std::uint64_t leaves = 1; leaves <= 17; ++leaves) check_random(leaves * leaf_bytes - 3 * leaves, 77 + leaves);
}

TEST_CASE("cuda tree_hash: random sizes not a multiple of 64 equal the CPU path", "[cuda][tree_hash]") {
  std::mt19937_64 rng(12345);
  for (int trial = 0; trial < 12; ++trial) {
    std::uint64_t size = rng() % (40 * mib) + 1;
    if (size % 64 == 0) ++size;
    check_random(size, rng());
  }
}

TEST_CASE("cuda tree_hash: unaligned device pointers take the 4-byte and byte loaders", "[cuda][tree_hash]") {
  for (std::uint64_t offset : {1, 2, 3, 4, 8, 12, 15}) {
    check_random(2 * leaf_bytes + 333, 500 + offset, offset);
    check_random(100, 600 + offset, offset);
  }
}

TEST_CASE("cuda tree_hash: 1 GiB and 1 GiB + 13 equal the CPU path", "[cuda][tree_hash][large]") {
  check_random(gib, 42);
  check_random(gib + 13, 43);
}

TEST_CASE("cuda tree_hash: 4 GiB + 4 MiB + 3 (1026 leaves: a wide tree level) equals the CPU path",
          "[cuda][tree_hash][large]") {
  check_random(4 * gib + leaf_bytes + 3, 44);
}

TEST_CASE("cuda tree_hash: 16 GiB equals the CPU path when the device has the memory", "[cuda][tree_hash][large]") {
  constexpr std::uint64_t size = 16 * gib;
  std::size_t free_bytes = 0;
  std::size_t total_bytes = 0;
  CUDA_REQUIRE(cudaMemGetInfo(&free_bytes, &total_bytes));
  if (free_bytes < size + gib) {
    WARN("skipped: 16 GiB test needs " << (size + gib) << " free device bytes, " << free_bytes << " free");
    return;
  }
  device_buffer buffer(size);
  pinned_buffer host(size);
  if (buffer.ptr == nullptr || host.ptr == nullptr) {
    WARN("skipped: cannot allocate 16 GiB on the device and 16 GiB of pinned host memory");
    return;
  }
  CUDA_REQUIRE(tensorreg::cuda::testing::fill_random(buffer.ptr, size, 16));
  CUDA_REQUIRE(cudaMemcpy(host.ptr, buffer.ptr, size, cudaMemcpyDeviceToHost));
  const tensorreg::memory::host_bytes_view view(std::span<const std::byte>(host.bytes(), size));
  const auto cpu = tensorreg::hash::tree_hash(view, &pool());
  REQUIRE(cpu.has_value());
  const auto gpu = shared_hasher().tree_hash(buffer.ptr, size);
  REQUIRE(gpu.has_value());
  CHECK(tensorreg::hash::to_hex(*gpu) == tensorreg::hash::to_hex(*cpu));
}

TEST_CASE("cuda tree_hash: the tree kernels fold any leaf count as hash::tree_root", "[cuda][tree_hash]") {
  std::vector<std::uint32_t> counts;
  for (std::uint32_t n = 1; n <= 40; ++n) counts.push_back(n);
  for (std::uint32_t n :
       {511U, 512U, 513U, 1023U, 1024U, 1025U, 1026U, 2047U, 2048U, 2049U, 4097U, 16384U, 16385U, 100001U}) {
    counts.push_back(n);
  }
  std::mt19937 rng(9);
  for (std::uint32_t n : counts) {
    INFO("leaves " << n);
    std::vector<digest> leaves(n);
    std::vector<std::uint32_t> words(8 * static_cast<std::size_t>(n));
    for (std::uint32_t i = 0; i < n; ++i) {
      for (std::size_t j = 0; j < 8; ++j) {
        const auto w = static_cast<std::uint32_t>(rng());
        words[8 * i + j] = w;
        for (std::size_t k = 0; k < 4; ++k) leaves[i][4 * j + k] = static_cast<std::byte>((w >> (24 - 8 * k)) & 0xFFU);
      }
    }
    const std::size_t level_words = 8 * static_cast<std::size_t>(n);
    device_buffer buffer(4 * (level_words + 8 * ((n + 1) / 2) + 8));
    REQUIRE(buffer.ptr != nullptr);
    auto* a = static_cast<std::uint32_t*>(buffer.ptr);
    std::uint32_t* b = a + level_words;
    std::uint32_t* root = b + 8 * ((n + 1) / 2);
    CUDA_REQUIRE(cudaMemcpy(a, words.data(), 4 * level_words, cudaMemcpyHostToDevice));
    CUDA_REQUIRE(cudaMemset(root, 0xA5, 32));  // poison
    CUDA_REQUIRE(tensorreg::cuda::detail::launch_tree_kernels(a, b, n, root, nullptr));
    std::uint32_t got[8];
    CUDA_REQUIRE(cudaMemcpy(got, root, 32, cudaMemcpyDeviceToHost));
    digest d{};
    for (std::size_t j = 0; j < 8; ++j) {
      for (std::size_t k = 0; k < 4; ++k) d[4 * j + k] = static_cast<std::byte>((got[j] >> (24 - 8 * k)) & 0xFFU);
    }
    CHECK(tensorreg::hash::to_hex(d) == tensorreg::hash::to_hex(tensorreg::hash::tree_root(leaves)));
  }
}

TEST_CASE("cuda tree_hash: every threads-per-block and every kernel variant give the same leaves",
          "[cuda][tree_hash]") {
  const std::uint64_t size = 70 * leaf_bytes + 5;  // 71 leaves: three warps, ragged
  device_buffer buffer(size);
  REQUIRE(buffer.ptr != nullptr);
  CUDA_REQUIRE(tensorreg::cuda::testing::fill_random(buffer.ptr, size, 71));
  const auto want = shared_hasher().leaf_digests(buffer.ptr, size);
  REQUIRE(want.has_value());
  device_buffer out(32 * 71);
  REQUIRE(out.ptr != nullptr);
  for (auto variant : tensorreg::cuda::detail::all_leaf_variants) {
    for (unsigned threads : {32U, 64U, 96U, 128U}) {
      INFO("threads " << threads << ", variant " << static_cast<int>(variant));
      CUDA_REQUIRE(cudaMemset(out.ptr, 0, 32 * 71));
      CUDA_REQUIRE(tensorreg::cuda::detail::launch_leaf_kernel(
          buffer.ptr, size, 71, static_cast<std::uint32_t*>(out.ptr), threads, nullptr, variant));
      std::vector<std::uint32_t> words(8 * 71);
      CUDA_REQUIRE(cudaMemcpy(words.data(), out.ptr, 32 * 71, cudaMemcpyDeviceToHost));
      for (std::size_t i = 0; i < 71; ++i) {
        digest d{};
        for (std::size_t j = 0; j < 8; ++j) {
          for (std::size_t k = 0; k < 4; ++k) {
            d[4 * j + k] = static_cast<std::byte>((words[8 * i + j] >> (24 - 8 * k)) & 0xFFU);
          }
        }
        CHECK(d == (*want)[i]);
      }
    }
  }
}

TEST_CASE("cuda tree_hash: pinned mapped host memory and managed memory are accepted", "[cuda][tree_hash]") {
  const std::uint64_t size = leaf_bytes + 100;
  void* host = nullptr;
  CUDA_REQUIRE(cudaHostAlloc(&host, size, cudaHostAllocMapped));
  tensorreg::cuda::testing::fill_random_host(static_cast<std::byte*>(host), size, 5);
  const tensorreg::memory::host_bytes_view view(std::span<const std::byte>(static_cast<std::byte*>(host), size));
  const auto cpu = tensorreg::hash::tree_hash(view);
  REQUIRE(cpu.has_value());
  const auto gpu = shared_hasher().tree_hash(host, size);
  REQUIRE(gpu.has_value());
  CHECK(*gpu == *cpu);
  void* managed = nullptr;
  CUDA_REQUIRE(cudaMallocManaged(&managed, size));
  std::memcpy(managed, host, size);
  const auto gpu_managed = shared_hasher().tree_hash(managed, size);
  REQUIRE(gpu_managed.has_value());
  CHECK(*gpu_managed == *cpu);
  CUDA_REQUIRE(cudaFree(managed));
  CUDA_REQUIRE(cudaFreeHost(host));
}

TEST_CASE("cuda tree_hash: the host fill formula matches the device fill", "[cuda][tree_hash]") {
  const std::uint64_t size = 1000;
  device_buffer buffer(size);
  REQUIRE(buffer.ptr != nullptr);
  CUDA_REQUIRE(tensorreg::cuda::testing::fill_random(buffer.ptr, size, 99));
  std::vector<std::byte> from_device(size);
  std::vector<std::byte> from_host(size);
  CUDA_REQUIRE(cudaMemcpy(from_device.data(), buffer.ptr, size, cudaMemcpyDeviceToHost));
  tensorreg::cuda::testing::fill_random_host(from_host.data(), size, 99);
  CHECK(from_device == from_host);
}

TEST_CASE("cuda tree_hash: a hasher reuses its scratch and a caller's stream", "[cuda][tree_hash]") {
  auto hasher = gpu_tree_hasher::create(0, 8 * leaf_bytes);
  REQUIRE(hasher.has_value());
  CHECK(hasher->device() == 0);
  CHECK(hasher->capacity_leaves() == 8);
  const std::uint64_t size = 5 * leaf_bytes + 1;
  device_buffer buffer(size);
  REQUIRE(buffer.ptr != nullptr);
  cudaStream_t stream = nullptr;
  CUDA_REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  // Filled on the caller's stream: the hash is ordered after it without a host sync.
  CUDA_REQUIRE(tensorreg::cuda::testing::fill_random(buffer.ptr, size, 8, stream));
  const auto first = hasher->tree_hash(buffer.ptr, size, stream);
  REQUIRE(first.has_value());
  const auto second = hasher->tree_hash(buffer.ptr, size, stream);
  REQUIRE(second.has_value());
  CHECK(*first == *second);
  CHECK(hasher->capacity_leaves() == 8);
  std::vector<std::byte> host(size);
  CUDA_REQUIRE(cudaMemcpy(host.data(), buffer.ptr, size, cudaMemcpyDeviceToHost));
  const tensorreg::memory::host_bytes_view view{std::span<const std::byte>(host)};
  CHECK(*first == *tensorreg::hash::tree_hash(view));
  CUDA_REQUIRE(cudaStreamDestroy(stream));
  // Growing past the reservation.
  device_buffer big(9 * leaf_bytes);
  REQUIRE(big.ptr != nullptr);
  CUDA_REQUIRE(tensorreg::cuda::testing::fill_random(big.ptr, 9 * leaf_bytes, 9));
  REQUIRE(hasher->tree_hash(big.ptr, 9 * leaf_bytes).has_value());
  CHECK(hasher->capacity_leaves() == 9);
  // A moved-to hasher works.
  gpu_tree_hasher moved = std::move(*hasher);
  CHECK(moved.tree_hash(buffer.ptr, size).value() == *first);
}

TEST_CASE("cuda tree_hash: invalid arguments are rejected with their values named", "[cuda][tree_hash]") {
  auto& hasher = shared_hasher();
  device_buffer buffer(64);
  REQUIRE(buffer.ptr != nullptr);

  auto zero = hasher.tree_hash(buffer.ptr, 0);
  REQUIRE_FALSE(zero.has_value());
  CHECK(zero.error().code == errc::invalid_argument);
  CHECK(zero.error().message == "cannot hash device memory: size is 0");
  auto zero_free = tensorreg::cuda::tree_hash_device(buffer.ptr, 0, {}, 0);
  REQUIRE_FALSE(zero_free.has_value());
  CHECK(zero_free.error().code == errc::invalid_argument);
  auto zero_leaves = tensorreg::cuda::leaf_digests_device(buffer.ptr, 0, {}, 0);
  REQUIRE_FALSE(zero_leaves.has_value());
  CHECK(zero_leaves.error().message == "cannot hash device memory leaves: size is 0");

  auto null = hasher.tree_hash(nullptr, 10);
  REQUIRE_FALSE(null.has_value());
  CHECK(null.error().code == errc::invalid_argument);
  CHECK(null.error().message == "cannot hash device memory: the device pointer is null");

  std::vector<unsigned char> pageable(64);
  auto host = hasher.tree_hash(pageable.data(), 64);
  REQUIRE_FALSE(host.has_value());
  CHECK(host.error().code == errc::invalid_argument);
  CHECK_THAT(host.error().message, Catch::Matchers::EndsWith("is not CUDA memory"));

  auto huge = hasher.tree_hash(buffer.ptr, std::uint64_t{1} << 53);
  REQUIRE_FALSE(huge.has_value());
  CHECK(huge.error().code == errc::out_of_range);

  auto negative = gpu_tree_hasher::create(-1);
  REQUIRE_FALSE(negative.has_value());
  CHECK(negative.error().code == errc::invalid_argument);
  CHECK(negative.error().message == "cannot create gpu tree hasher: device -1 is negative");

  const int count = tensorreg::cuda::device_count();
  auto missing = gpu_tree_hasher::create(count);
  REQUIRE_FALSE(missing.has_value());
  CHECK(missing.error().code == errc::failed_precondition);
  CHECK(missing.error().message == "cannot create gpu tree hasher: no CUDA device " + std::to_string(count) + " (" +
                                       std::to_string(count) + " present)");
}

TEST_CASE("cuda tree_hash: the caller's current device is left unchanged", "[cuda][tree_hash]") {
  int before = -1;
  CUDA_REQUIRE(cudaGetDevice(&before));
  device_buffer buffer(100);
  REQUIRE(buffer.ptr != nullptr);
  CUDA_REQUIRE(cudaMemset(buffer.ptr, 1, 100));
  REQUIRE(tensorreg::cuda::tree_hash_device(buffer.ptr, 100, {}, 0).has_value());
  int after = -1;
  CUDA_REQUIRE(cudaGetDevice(&after));
  CHECK(before == after);
}

// ---- tree_hash_pieces: a canonical buffer made of many allocations, not assembled ----------------

namespace {

// Device allocations filled on the GPU, and pieces of them placed in a canonical buffer.
struct piece_layout {
  std::vector<std::unique_ptr<device_buffer>> allocations;
  std::vector<tensorreg::cuda::device_piece> pieces;
  std::uint64_t cursor = 0;  // the canonical end so far

  // A fresh allocation of `bytes` + `skip` bytes (stream `seed`), whose bytes from `skip` on
  // follow `gap` zero bytes in the canonical buffer.
  void add(std::uint64_t bytes, std::uint64_t seed, std::uint64_t gap = 0, std::uint64_t skip = 0) {
    auto a = std::make_unique<device_buffer>(bytes + skip);
    REQUIRE(a->ptr != nullptr);
    REQUIRE(tensorreg::cuda::testing::fill_random(a->ptr, bytes + skip, seed) == cudaSuccess);
    cursor += gap;
    pieces.push_back({cursor, a->bytes() + skip, bytes});
    cursor += bytes;
    allocations.push_back(std::move(a));
  }

  // The canonical bytes assembled on the host: the pieces, zeros between them and up to size.
  std::vector<std::byte> assembled(std::uint64_t size) const {
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    std::vector<std::byte> out(size, std::byte{0});
    for (const auto& p : pieces) {
      REQUIRE(cudaMemcpy(out.data() + p.at, p.src, p.length, cudaMemcpyDeviceToHost) == cudaSuccess);
    }
    return out;
  }
};

digest host_tree_hash(const std::vector<std::byte>& bytes) {
  const tensorreg::memory::host_bytes_view view{std::span<const std::byte>(bytes)};
  auto d = tensorreg::hash::tree_hash(view, &pool());
  REQUIRE(d.has_value());
  return *d;
}

}  // namespace

TEST_CASE("cuda tree_hash: pieces of many allocations hash as their assembled bytes", "[cuda][tree_hash][pieces]") {
  auto hasher = gpu_tree_hasher::create(0);
  REQUIRE(hasher.has_value());
  piece_layout l;
  // Leaves 0 and 1 inside one allocation (hashed where they lie), leaf 2 across its end.
  l.add(9 * mib, 1);
  // A 100-byte gap, then a 7-byte allocation read from an odd offset.
  l.add(7, 2, 100, 3);
  // 6 MiB + 13 read from 5 bytes in: every leaf of it is unaligned, so gathered.
  l.add(6 * mib + 13, 3, 64, 5);
  // Two pieces back to back in the canonical buffer, from two allocations.
  l.add(3 * mib + 512, 4, 7);
  l.add(2 * mib, 5);
  // 300 tiny allocations (1 to 4 KiB, some gaps of 1 to 64 bytes): one leaf spans many.
  std::mt19937_64 random(17);
  for (int i = 0; i < 300; ++i)
    l.add(1 + random() % 4096, 100 + static_cast<std::uint64_t>(i), random() % 3 == 0 ? 1 + random() % 64 : 0);
  // A large aligned allocation whose leaves lie inside it, then a short last leaf and a tail gap.
  l.add(12 * mib + 4096, 6, 4096 - l.cursor % 4096);
  const std::uint64_t size = l.cursor + 17;
  INFO(l.pieces.size() << " pieces, " << size << " bytes, " << tensorreg::hash::leaf_count(size) << " leaves");

  const auto expected = host_tree_hash(l.assembled(size));
  const auto got = hasher->tree_hash_pieces(l.pieces, size);
  REQUIRE(got.has_value());
  CHECK(tensorreg::hash::to_hex(*got) == tensorreg::hash::to_hex(expected));
  // The gather scratch stays for the next hash of the same layout, and gives the same id.
  const auto kept = hasher->gather_capacity_bytes();
  CHECK(kept > 0);
  CHECK(kept % leaf_bytes == 0);
  CHECK(kept < size);  // not a canonical copy: some leaves were hashed where they lie
  const auto again = hasher->tree_hash_pieces(l.pieces, size);
  REQUIRE(again.has_value());
  CHECK(*again == *got);
  CHECK(hasher->gather_capacity_bytes() == kept);
  // The same bytes as one contiguous buffer hash the same through tree_hash.
  const auto bytes = l.assembled(size);
  device_buffer whole(size);
  REQUIRE(whole.ptr != nullptr);
  CUDA_REQUIRE(cudaMemcpy(whole.ptr, bytes.data(), size, cudaMemcpyHostToDevice));
  CHECK(hasher->tree_hash(whole.ptr, size).value() == *got);
}

TEST_CASE("cuda tree_hash: pieces that are aligned leaves gather nothing; no pieces hash zeros",
          "[cuda][tree_hash][pieces]") {
  auto hasher = gpu_tree_hasher::create(0);
  REQUIRE(hasher.has_value());
  SECTION("one allocation, leaf-aligned pieces, a short last leaf") {
    const std::uint64_t size = 3 * leaf_bytes + 1000;
    device_buffer buffer(size);
    REQUIRE(buffer.ptr != nullptr);
    CUDA_REQUIRE(tensorreg::cuda::testing::fill_random(buffer.ptr, size, 21));
    CUDA_REQUIRE(cudaDeviceSynchronize());
    // Split at leaf boundaries: every leaf lies inside one piece.
    std::vector<tensorreg::cuda::device_piece> pieces = {{0, buffer.bytes(), 2 * leaf_bytes},
                                                         {2 * leaf_bytes, buffer.bytes() + 2 * leaf_bytes, leaf_bytes},
                                                         {3 * leaf_bytes, buffer.bytes() + 3 * leaf_bytes, 1000}};
    const auto got = hasher->tree_hash_pieces(pieces, size);
    REQUIRE(got.has_value());
    CHECK(*got == hasher->tree_hash(buffer.ptr, size).value());
    CHECK(hasher->gather_capacity_bytes() == 0);
  }
  SECTION("no pieces: the hash of zeros") {
    const std::uint64_t size = leaf_bytes + 5;
    const auto got = hasher->tree_hash_pieces({}, size);
    REQUIRE(got.has_value());
    CHECK(*got == host_tree_hash(std::vector<std::byte>(size, std::byte{0})));
  }
}

TEST_CASE("cuda tree_hash: bad piece tables are INVALID_ARGUMENT naming the piece", "[cuda][tree_hash][pieces]") {
  auto& hasher = shared_hasher();
  device_buffer buffer(4096);
  REQUIRE(buffer.ptr != nullptr);
  const auto* b = buffer.bytes();
  const auto error_of = [&](const std::vector<tensorreg::cuda::device_piece>& pieces, std::uint64_t size) {
    auto r = hasher.tree_hash_pieces(pieces, size);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == errc::invalid_argument);
    return r.error().message;
  };
  CHECK(error_of({}, 0) == "cannot hash device memory pieces: size is 0");
  CHECK(error_of({{0, b, 0}}, 10) == "cannot hash device memory pieces: piece 0 at 0 is empty or has a null address");
  CHECK(error_of({{0, nullptr, 4}}, 10) ==
        "cannot hash device memory pieces: piece 0 at 0 is empty or has a null address");
  CHECK(error_of({{0, b, 8}, {4, b, 4}}, 100) ==
        "cannot hash device memory pieces: piece 1 at 4 starts before the end of the piece before it, 8");
  CHECK(error_of({{90, b, 20}}, 100) ==
        "cannot hash device memory pieces: piece 0 at 90 of 20 bytes ends past size 100");
}
