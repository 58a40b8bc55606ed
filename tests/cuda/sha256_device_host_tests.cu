// tensorreg_gpu_host_tests: the kernels' SHA-256 logic (src/cuda/sha256_device.cuh), compiled
// by nvcc as host code, against OpenSSL (hash::sha256) and the CPU tree (hash::tree_root).
// Needs no GPU: it runs everywhere CUDA is built, so logic bugs in padding, loaders, rotation
// and byte-permute selectors, the rolled/unrolled round layouts and the tree step show up on
// a machine without a device.
#include "cuda/sha256_device.cuh"

#include "cuda/leaf_plan.hpp"

#include <catch2/catch.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <span>
#include <vector>

#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/memory/byte_source.hpp"

namespace {

namespace detail = tensorreg::cuda::detail;
using detail::unroll_mode;
using tensorreg::hash::digest;

digest to_digest(const std::uint32_t (&s)[8]) {
  digest d{};
  for (std::size_t j = 0; j < 8; ++j) {
    for (std::size_t k = 0; k < 4; ++k) d[4 * j + k] = static_cast<std::byte>((s[j] >> (24 - 8 * k)) & 0xFFU);
  }
  return d;
}

void to_words(const digest& d, std::uint32_t* out) {
  for (std::size_t j = 0; j < 8; ++j) {
    std::uint32_t v = 0;
    for (std::size_t k = 0; k < 4; ++k) v = (v << 8) | static_cast<std::uint32_t>(d[4 * j + k]);
    out[j] = v;
  }
}

std::vector<std::byte> random_bytes(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::byte> out(n);
  for (auto& b : out) b = static_cast<std::byte>(rng() & 0xFFU);
  return out;
}

// SHA-256 through the kernel code path with the given alignment and round layout; `p` must
// have that alignment.
template <int Align, unroll_mode Mode, bool Steer = false>
digest device_logic_sha256(const std::byte* p, std::uint64_t len) {
  std::uint32_t s[8];
  detail::sha256_words<Align, Mode, Steer>(reinterpret_cast<const unsigned char*>(p), len, s,
                                           detail::make_fma_steer(1));
  return to_digest(s);
}

// Copies `bytes` to an offset of `misalign` from a 64-byte aligned address (so the loader's
// alignment contract holds exactly as the kernel sees it) and hashes with every loader that
// alignment allows.
void check_all_paths(std::span<const std::byte> bytes, std::size_t misalign) {
  std::vector<std::byte> storage(bytes.size() + 128);
  auto base = reinterpret_cast<std::uintptr_t>(storage.data());
  std::byte* p = storage.data() + ((64 - base % 64) % 64) + misalign;
  if (!bytes.empty()) std::memcpy(p, bytes.data(), bytes.size());
  const digest want = tensorreg::hash::sha256(bytes);
  const auto len = static_cast<std::uint64_t>(bytes.size());
  INFO("length " << len << ", misalignment " << misalign);
  CHECK(device_logic_sha256<1, unroll_mode::full>(p, len) == want);
  CHECK(device_logic_sha256<1, unroll_mode::rolled>(p, len) == want);
  CHECK(device_logic_sha256<1, unroll_mode::rolled, true>(p, len) == want);
  if (misalign % 4 == 0) {
    CHECK(device_logic_sha256<4, unroll_mode::full>(p, len) == want);
    CHECK(device_logic_sha256<4, unroll_mode::rolled>(p, len) == want);
    CHECK(device_logic_sha256<4, unroll_mode::rolled, true>(p, len) == want);
  }
  if (misalign % 16 == 0) {
    CHECK(device_logic_sha256<16, unroll_mode::full>(p, len) == want);
    CHECK(device_logic_sha256<16, unroll_mode::rolled>(p, len) == want);
    CHECK(device_logic_sha256<16, unroll_mode::full, true>(p, len) == want);
    CHECK(device_logic_sha256<16, unroll_mode::rolled, true>(p, len) == want);
  }
}

}  // namespace

TEST_CASE("sha256_device: intrinsic emulations follow CUDA's documented semantics", "[cuda][sha256_device]") {
  CHECK(detail::funnelshift_r(0x89abcdefU, 0x01234567U, 8) == 0x6789abcdU);
  CHECK(detail::funnelshift_r(0x89abcdefU, 0x01234567U, 0) == 0x89abcdefU);
  CHECK(detail::funnelshift_r(0x89abcdefU, 0x01234567U, 40) == 0x6789abcdU);  // shift mod 32
  CHECK(detail::rotr(0x00000001U, 1) == 0x80000000U);
  CHECK(detail::rotr(0x12345678U, 16) == 0x56781234U);
  CHECK(detail::bswap32(0x11223344U) == 0x44332211U);
  const auto st = detail::make_fma_steer(1);
  CHECK(detail::umulhi(0xdeadbeefU, st.p29) == 0xdeadbeefU >> 3);
  CHECK(detail::umulhi(0xdeadbeefU, st.p22) == 0xdeadbeefU >> 10);
  CHECK(detail::byte_perm(0x33221100U, 0x77665544U, 0x7531) == 0x77553311U);
  CHECK(detail::byte_perm(0x33221100U, 0x77665544U, 0x3210) == 0x33221100U);
}

TEST_CASE("sha256_device: matches OpenSSL for every length 0..300 and every loader", "[cuda][sha256_device]") {
  const auto bytes = random_bytes(300, 1);
  for (std::size_t len = 0; len <= 300; ++len) {
    for (std::size_t misalign : {0, 1, 3, 4, 8, 16}) {
      check_all_paths(std::span<const std::byte>(bytes.data(), len), misalign);
    }
  }
}

TEST_CASE("sha256_device: the standard vectors", "[cuda][sha256_device]") {
  std::uint32_t s[8];
  detail::sha256_words<1>(reinterpret_cast<const unsigned char*>(""), 0, s);
  CHECK(tensorreg::hash::to_hex(to_digest(s)) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  const char* abc = "abc";
  detail::sha256_words<1>(reinterpret_cast<const unsigned char*>(abc), 3, s);
  CHECK(tensorreg::hash::to_hex(to_digest(s)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST_CASE("sha256_device: matches OpenSSL around leaf and block boundaries", "[cuda][sha256_device]") {
  const std::uint64_t leaf = tensorreg::hash::leaf_bytes;
  STATIC_REQUIRE(detail::sha_leaf_bytes == tensorreg::hash::leaf_bytes);
  const auto bytes = random_bytes(static_cast<std::size_t>(leaf + 200), 2);
  for (std::uint64_t len : {std::uint64_t{1000}, std::uint64_t{4096} + 55, std::uint64_t{65536} + 56, leaf - 65,
                            leaf - 64, leaf - 9, leaf - 8, leaf - 1, leaf}) {
    for (std::size_t misalign : {0, 4, 7}) {
      check_all_paths(std::span<const std::byte>(bytes.data(), static_cast<std::size_t>(len)), misalign);
    }
  }
}

TEST_CASE("sha256_device: random lengths", "[cuda][sha256_device]") {
  std::mt19937 rng(3);
  const auto bytes = random_bytes(20000, 4);
  for (int trial = 0; trial < 200; ++trial) {
    const std::size_t len = rng() % bytes.size();
    const std::size_t misalign = rng() % 32;
    check_all_paths(std::span<const std::byte>(bytes.data(), len), misalign);
  }
}

TEST_CASE("sha256_device: the pair hash is SHA-256(left || right)", "[cuda][sha256_device]") {
  const auto bytes = random_bytes(64, 5);
  digest left{};
  digest right{};
  std::memcpy(left.data(), bytes.data(), 32);
  std::memcpy(right.data(), bytes.data() + 32, 32);
  std::uint32_t l[8];
  std::uint32_t r[8];
  std::uint32_t out_full[8];
  std::uint32_t out_rolled[8];
  to_words(left, l);
  to_words(right, r);
  detail::hash_pair_words<unroll_mode::full>(l, r, out_full);
  detail::hash_pair_words<unroll_mode::rolled>(l, r, out_rolled);
  const digest want = tensorreg::hash::sha256(std::span<const std::byte>(bytes));
  CHECK(to_digest(out_full) == want);
  CHECK(to_digest(out_rolled) == want);
}

TEST_CASE("sha256_device: the level-by-level fold equals hash::tree_root for 1..70 and some larger counts",
          "[cuda][sha256_device]") {
  std::vector<std::uint32_t> counts;
  for (std::uint32_t n = 1; n <= 70; ++n) counts.push_back(n);
  for (std::uint32_t n : {127U, 128U, 129U, 1023U, 1024U, 1025U, 2049U}) counts.push_back(n);
  for (std::uint32_t n : counts) {
    std::vector<digest> leaves(n);
    const auto bytes = random_bytes(32 * static_cast<std::size_t>(n), 100 + n);
    for (std::uint32_t i = 0; i < n; ++i) std::memcpy(leaves[i].data(), bytes.data() + 32 * i, 32);
    // The kernels' ping-pong: level buffer a (n digests) and b (ceil(n/2)).
    std::vector<std::uint32_t> a(8 * static_cast<std::size_t>(n));
    std::vector<std::uint32_t> b(8 * static_cast<std::size_t>((n + 1) / 2));
    for (std::uint32_t i = 0; i < n; ++i) to_words(leaves[i], a.data() + 8 * i);
    std::uint32_t* in = a.data();
    std::uint32_t* other = b.data();
    std::uint32_t m = n;
    while (m > 1) {
      const std::uint32_t parents = (m + 1) / 2;
      for (std::uint32_t j = 0; j < parents; ++j) detail::tree_level_node(in, m, j, other);
      std::swap(in, other);
      m = parents;
    }
    std::uint32_t root[8];
    std::memcpy(root, in, sizeof root);
    INFO("leaves " << n);
    CHECK(to_digest(root) == tensorreg::hash::tree_root(leaves));
  }
}

// ---- The leaf plan of a canonical buffer made of pieces (leaf_plan.hpp) -------------------------

namespace {

constexpr std::uint64_t mib = std::uint64_t{1} << 20;

// Host memory standing in for device allocations: 64-byte aligned blocks of random bytes.
struct host_allocations {
  std::vector<std::unique_ptr<std::uint64_t[]>> blocks;
  std::vector<tensorreg::cuda::device_piece> pieces;
  std::uint64_t cursor = 0;
  std::uint32_t seed = 1;

  // `bytes` bytes read from `skip` bytes into a fresh allocation, after `gap` zero bytes.
  void add(std::uint64_t bytes, std::uint64_t gap = 0, std::uint64_t skip = 0) {
    const std::uint64_t words = (bytes + skip + 64) / 8 + 8;
    blocks.emplace_back(new std::uint64_t[words]);
    auto* base = reinterpret_cast<unsigned char*>(blocks.back().get());
    base += (64 - reinterpret_cast<std::uintptr_t>(base) % 64) % 64;
    const auto fill = random_bytes(bytes + skip, seed++);
    std::memcpy(base, fill.data(), fill.size());
    cursor += gap;
    pieces.push_back({cursor, base + skip, bytes});
    cursor += bytes;
  }

  std::vector<std::byte> assembled(std::uint64_t size) const {
    std::vector<std::byte> out(size, std::byte{0});
    for (const auto& p : pieces) std::memcpy(out.data() + p.at, p.src, p.length);
    return out;
  }
};

// The root the leaf kernel and the gather kernel compute from the plan, computed here: the
// gather tasks run as memcpy/memset into a host gather buffer, each leaf through
// sha256_segment_words (and its flat walk, which must agree), the tree as hash::tree_root.
digest planned_root(const std::vector<tensorreg::cuda::device_piece>& pieces, std::uint64_t size,
                    detail::leaf_plan* out_plan = nullptr) {
  const std::uint64_t leaves = tensorreg::hash::leaf_count(size);
  auto plan = detail::plan_leaves(pieces, size, leaves);
  REQUIRE(plan.first.size() == leaves + 1);
  std::vector<std::uint64_t> gather_words(plan.gather_bytes / 8 + 2);
  auto* gather = reinterpret_cast<unsigned char*>(gather_words.data());
  REQUIRE(reinterpret_cast<std::uintptr_t>(gather) % 16 == 0);
  for (const auto& t : plan.tasks) {
    REQUIRE(t.length <= detail::gather_task_bytes);
    REQUIRE(t.dst_offset + t.length <= plan.gather_bytes);
    if (t.src == nullptr) {
      std::memset(gather + t.dst_offset, 0, t.length);
    } else {
      std::memcpy(gather + t.dst_offset, t.src, t.length);
    }
  }
  plan.rebase(reinterpret_cast<std::uintptr_t>(gather));
  std::vector<digest> leaf_digests;
  for (std::uint64_t i = 0; i < leaves; ++i) {
    const std::uint64_t len = std::min(tensorreg::hash::leaf_bytes, size - i * tensorreg::hash::leaf_bytes);
    const std::uint32_t count = plan.first[i + 1] - plan.first[i];
    REQUIRE(count >= 1);
    std::uint64_t blocks = 0;
    for (std::uint32_t j = 0; j < count; ++j) {
      const auto& seg = plan.segments[plan.first[i] + j];
      INFO("leaf " << i << " segment " << j);
      REQUIRE(seg.address % 16 == 0);
      if (j + 1 < count) REQUIRE(seg.blocks > 0);
      blocks += seg.blocks;
    }
    REQUIRE(blocks == len / 64);
    std::uint32_t s[8];
    detail::sha256_segment_words<unroll_mode::rolled, true>(
        reinterpret_cast<const detail::segment_words_input*>(plan.segments.data() + plan.first[i]), count, len, s,
        detail::make_fma_steer(1));
    // The flat walk (zero blocks read from memory, no branch per block) gives the same words.
    alignas(16) static const unsigned char zeros[64] = {};
    std::uint32_t flat[8];
    detail::sha256_segment_words_flat<unroll_mode::rolled, true>(
        reinterpret_cast<const detail::segment_words_input*>(plan.segments.data() + plan.first[i]), count, len,
        reinterpret_cast<std::uint64_t>(zeros), flat, detail::make_fma_steer(1));
    REQUIRE(std::equal(s, s + 8, flat));
    leaf_digests.push_back(to_digest(s));
  }
  if (out_plan != nullptr) *out_plan = std::move(plan);
  return tensorreg::hash::tree_root(leaf_digests);
}

digest assembled_root(const host_allocations& a, std::uint64_t size) {
  const auto bytes = a.assembled(size);
  const tensorreg::memory::host_bytes_view view{std::span<const std::byte>(bytes)};
  return tensorreg::hash::tree_hash(view).value();
}

}  // namespace

TEST_CASE("leaf_plan: a state dict's layout is hashed where it lies, across allocations and PAD", "[cuda][leaf_plan]") {
  // Tensors of 512-byte multiples at 64-byte aligned canonical offsets (PAD between), each in
  // its own allocation: every boundary falls on a 64-byte block, so nothing is gathered.
  host_allocations a;
  std::mt19937_64 rng(5);
  for (int i = 0; i < 40; ++i) {
    const std::uint64_t bytes = 512 * (1 + rng() % 4096);
    a.add(bytes, (64 - a.cursor % 64) % 64 + (rng() % 3 == 0 ? 64 * (rng() % 4) : 0));
  }
  const std::uint64_t size = a.cursor + 64 * 5;  // trailing PAD, whole blocks
  detail::leaf_plan plan;
  CHECK(planned_root(a.pieces, size, &plan) == assembled_root(a, size));
  CHECK(plan.gather_bytes == 0);
  CHECK(plan.tasks.empty());
  CHECK(plan.segments.size() > tensorreg::hash::leaf_count(size));  // leaves across allocations
}

TEST_CASE("leaf_plan: tails, odd boundaries, unaligned and tiny pieces are gathered and hash the same",
          "[cuda][leaf_plan]") {
  SECTION("a short last leaf whose tail is in a piece: not gathered") {
    host_allocations a;
    a.add(5 * mib + 4096);
    a.add(1000 * 64 + 17, 64);  // the tail: 17 bytes after whole blocks
    detail::leaf_plan plan;
    CHECK(planned_root(a.pieces, a.cursor, &plan) == assembled_root(a, a.cursor));
    CHECK(plan.gather_bytes == 0);
  }
  SECTION("a short last leaf whose tail is PAD: that leaf gathered") {
    host_allocations a;
    a.add(5 * mib + 4096);
    const std::uint64_t size = a.cursor + 23;
    detail::leaf_plan plan;
    CHECK(planned_root(a.pieces, size, &plan) == assembled_root(a, size));
    CHECK(plan.gather_bytes == tensorreg::hash::leaf_bytes);
  }
  SECTION("awkward: odd gaps, an unaligned piece, hundreds of tiny pieces") {
    host_allocations a;
    a.add(9 * mib);
    a.add(7, 100, 3);
    a.add(6 * mib + 13, 64, 5);
    a.add(3 * mib + 512, 7);
    a.add(2 * mib);
    std::mt19937_64 rng(17);
    for (int i = 0; i < 300; ++i) a.add(1 + rng() % 4096, rng() % 3 == 0 ? 1 + rng() % 64 : 0);
    a.add(12 * mib + 4096, 4096 - a.cursor % 4096);
    const std::uint64_t size = a.cursor + 17;
    detail::leaf_plan plan;
    CHECK(planned_root(a.pieces, size, &plan) == assembled_root(a, size));
    CHECK(plan.gather_bytes > 0);
    CHECK(plan.gather_bytes < size);
  }
  SECTION("one tiny piece, no whole block") {
    host_allocations a;
    a.add(40, 0);
    CHECK(planned_root(a.pieces, 40) == assembled_root(a, 40));
  }
  SECTION("no pieces: zeros, whole blocks and with a tail") {
    host_allocations a;
    CHECK(planned_root({}, 4096) == assembled_root(a, 4096));
    CHECK(planned_root({}, 4096 + 5) == assembled_root(a, 4096 + 5));
  }
}
