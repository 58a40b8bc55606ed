#include "hash/sha256_x2.hpp"

#include <algorithm>
#include <bit>

#include "tensorreg/common/error.hpp"

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace tensorreg::hash {
namespace {

// FIPS 180-4 section 4.2.2. Aligned so that the SHA-NI rounds load four at a time straight from here.
alignas(16) constexpr std::uint32_t sha256_round_constants[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

// FIPS 180-4 section 5.3.3.
constexpr std::array<std::uint32_t, 8> sha256_initial_state = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                                               0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

constexpr std::uint32_t load_be32(const std::byte* p) noexcept {
  return (std::to_integer<std::uint32_t>(p[0]) << 24) | (std::to_integer<std::uint32_t>(p[1]) << 16) |
         (std::to_integer<std::uint32_t>(p[2]) << 8) | std::to_integer<std::uint32_t>(p[3]);
}

constexpr void store_be32(std::uint32_t v, std::byte* p) noexcept {
  p[0] = static_cast<std::byte>(v >> 24);
  p[1] = static_cast<std::byte>(v >> 16);
  p[2] = static_cast<std::byte>(v >> 8);
  p[3] = static_cast<std::byte>(v);
}

// The portable compression, one block of one lane: only the fallback where SHA-NI is missing,
// so it is the plain FIPS 180-4 section 6.2.2 loop, written for clarity rather than speed.
void compress_block(std::uint32_t* h, const std::byte* block) noexcept {
  std::array<std::uint32_t, 64> w{};
  for (std::size_t t = 0; t < 16; ++t) w[t] = load_be32(block + 4 * t);
  for (std::size_t t = 16; t < 64; ++t) {
    const std::uint32_t s0 = std::rotr(w[t - 15], 7) ^ std::rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
    const std::uint32_t s1 = std::rotr(w[t - 2], 17) ^ std::rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
    w[t] = w[t - 16] + s0 + w[t - 7] + s1;
  }
  std::uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
  for (std::size_t t = 0; t < 64; ++t) {
    const std::uint32_t s1 = std::rotr(e, 6) ^ std::rotr(e, 11) ^ std::rotr(e, 25);
    const std::uint32_t choose = (e & f) ^ (~e & g);
    const std::uint32_t t1 = hh + s1 + choose + sha256_round_constants[t] + w[t];
    const std::uint32_t s0 = std::rotr(a, 2) ^ std::rotr(a, 13) ^ std::rotr(a, 22);
    const std::uint32_t majority = (a & b) ^ (a & c) ^ (b & c);
    hh = g;
    g = f;
    f = e;
    e = d + t1;
    d = c;
    c = b;
    b = a;
    a = t1 + s0 + majority;
  }
  h[0] += a;
  h[1] += b;
  h[2] += c;
  h[3] += d;
  h[4] += e;
  h[5] += f;
  h[6] += g;
  h[7] += hh;
}

void compress_x2_portable(std::uint32_t* state0, std::uint32_t* state1, const std::byte* data0, const std::byte* data1,
                          std::size_t blocks) noexcept {
  for (; blocks > 0; --blocks, data0 += 64, data1 += 64) {
    compress_block(state0, data0);
    compress_block(state1, data1);
  }
}

#if defined(__x86_64__)

// Every function that uses the SHA instructions is compiled for them alone, so that the rest of
// the library keeps the baseline ISA and runs anywhere; these run only where sha_ni_available().
#define TENSORREG_SHA_NI_TARGET __attribute__((target("sha,sse4.1,ssse3")))
// The helpers must inline into the block loop: out of line, each would pass both lanes' state
// and message schedule through memory.
#define TENSORREG_SHA_NI_INLINE TENSORREG_SHA_NI_TARGET __attribute__((always_inline)) inline

// One lane as SHA256RNDS2 wants it: the state as two vectors (ABEF and CDGH at the start of a
// block; the two swap roles every two rounds) and the rolling message schedule, w[g % 4]
// holding W[4g..4g+3] while quad-round group g runs.
struct ni_lane {
  __m128i s0;
  __m128i s1;
  __m128i w[4];
};

TENSORREG_SHA_NI_INLINE __m128i load_words(const std::byte* p) {
  // The message words are big-endian.
  const __m128i byte_swap = _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL);
  return _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), byte_swap);
}

TENSORREG_SHA_NI_INLINE ni_lane ni_load_state(const std::uint32_t* state) {
  const __m128i dcba = _mm_shuffle_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(state)), 0xB1);
  const __m128i efgh = _mm_shuffle_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(state + 4)), 0x1B);
  ni_lane lane{};
  lane.s0 = _mm_alignr_epi8(dcba, efgh, 8);     // ABEF
  lane.s1 = _mm_blend_epi16(efgh, dcba, 0xF0);  // CDGH
  return lane;
}

TENSORREG_SHA_NI_INLINE void ni_store_state(const ni_lane& lane, std::uint32_t* state) {
  const __m128i feba = _mm_shuffle_epi32(lane.s0, 0x1B);
  const __m128i dchg = _mm_shuffle_epi32(lane.s1, 0xB1);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(state), _mm_blend_epi16(feba, dchg, 0xF0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(state + 4), _mm_alignr_epi8(dchg, feba, 8));
}

// Rounds 4G..4G+3 of both lanes, each step done for lane x and then lane y: the two lanes share
// no data, so each SHA256RNDS2 of one lane issues while the other's is still in flight. This is
// the usual single-stream SHA-NI schedule (Intel's sample code), run twice side by side.
template <int G>
TENSORREG_SHA_NI_INLINE void quad_round_x2(ni_lane& x, ni_lane& y, const std::byte* x_block, const std::byte* y_block) {
  constexpr int now = G % 4;
  constexpr int next = (G + 1) % 4;
  constexpr int before = (G + 3) % 4;
  if constexpr (G < 4) {
    x.w[now] = load_words(x_block + 16 * G);
    y.w[now] = load_words(y_block + 16 * G);
  }
  const __m128i k = _mm_load_si128(reinterpret_cast<const __m128i*>(sha256_round_constants + 4 * G));
  __m128i x_wk = _mm_add_epi32(x.w[now], k);
  __m128i y_wk = _mm_add_epi32(y.w[now], k);
  x.s1 = _mm_sha256rnds2_epu32(x.s1, x.s0, x_wk);
  y.s1 = _mm_sha256rnds2_epu32(y.s1, y.s0, y_wk);
  if constexpr (G >= 3 && G <= 14) {
    // Finishes W for group G + 1: SHA256MSG1 left W[t-16] + sigma0(W[t-15]) there; add W[t-7]
    // (the words straddling this group and the one before), then SHA256MSG2 adds sigma1(W[t-2]).
    x.w[next] = _mm_add_epi32(x.w[next], _mm_alignr_epi8(x.w[now], x.w[before], 4));
    y.w[next] = _mm_add_epi32(y.w[next], _mm_alignr_epi8(y.w[now], y.w[before], 4));
    x.w[next] = _mm_sha256msg2_epu32(x.w[next], x.w[now]);
    y.w[next] = _mm_sha256msg2_epu32(y.w[next], y.w[now]);
  }
  // SHA256RNDS2 takes its two W+K words from the low half.
  x_wk = _mm_shuffle_epi32(x_wk, 0x0E);
  y_wk = _mm_shuffle_epi32(y_wk, 0x0E);
  x.s0 = _mm_sha256rnds2_epu32(x.s0, x.s1, x_wk);
  y.s0 = _mm_sha256rnds2_epu32(y.s0, y.s1, y_wk);
  if constexpr (G >= 1 && G <= 12) {
    // Starts W for group G + 3 (in the slot of group G - 1, now used up).
    x.w[before] = _mm_sha256msg1_epu32(x.w[before], x.w[now]);
    y.w[before] = _mm_sha256msg1_epu32(y.w[before], y.w[now]);
  }
}

TENSORREG_SHA_NI_TARGET void compress_x2_sha_ni(std::uint32_t* state0, std::uint32_t* state1, const std::byte* data0,
                                                const std::byte* data1, std::size_t blocks) noexcept {
  ni_lane x = ni_load_state(state0);
  ni_lane y = ni_load_state(state1);
  for (; blocks > 0; --blocks, data0 += 64, data1 += 64) {
    // The state at the block's start, added back at its end. Both lanes need all 16 xmm
    // registers for their state and schedule, so something lives in memory; volatile makes it
    // this, read once a block. Left to itself, g++ 12 kept the running state in memory
    // instead, a store and reload on each lane's dependency chain every block (about 4% slower).
    volatile __m128i saved[4];
    saved[0] = x.s0;
    saved[1] = x.s1;
    saved[2] = y.s0;
    saved[3] = y.s1;
    quad_round_x2<0>(x, y, data0, data1);
    quad_round_x2<1>(x, y, data0, data1);
    quad_round_x2<2>(x, y, data0, data1);
    quad_round_x2<3>(x, y, data0, data1);
    quad_round_x2<4>(x, y, data0, data1);
    quad_round_x2<5>(x, y, data0, data1);
    quad_round_x2<6>(x, y, data0, data1);
    quad_round_x2<7>(x, y, data0, data1);
    quad_round_x2<8>(x, y, data0, data1);
    quad_round_x2<9>(x, y, data0, data1);
    quad_round_x2<10>(x, y, data0, data1);
    quad_round_x2<11>(x, y, data0, data1);
    quad_round_x2<12>(x, y, data0, data1);
    quad_round_x2<13>(x, y, data0, data1);
    quad_round_x2<14>(x, y, data0, data1);
    quad_round_x2<15>(x, y, data0, data1);
    x.s0 = _mm_add_epi32(x.s0, saved[0]);
    x.s1 = _mm_add_epi32(x.s1, saved[1]);
    y.s0 = _mm_add_epi32(y.s0, saved[2]);
    y.s1 = _mm_add_epi32(y.s1, saved[3]);
  }
  ni_store_state(x, state0);
  ni_store_state(y, state1);
}

#undef TENSORREG_SHA_NI_INLINE
#undef TENSORREG_SHA_NI_TARGET

#endif  // defined(__x86_64__)

}  // namespace

bool sha_ni_available() noexcept {
#if defined(__x86_64__)
  // cpuid rather than __builtin_cpu_supports("sha"): clang 14 rejects that feature name.
  static const bool available = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (__get_cpuid(1, &eax, &ebx, &ecx, &edx) == 0) return false;
    const bool ssse3 = ((ecx >> 9) & 1U) != 0;
    const bool sse41 = ((ecx >> 19) & 1U) != 0;
    if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return false;
    const bool sha = ((ebx >> 29) & 1U) != 0;
    return ssse3 && sse41 && sha;
  }();
  return available;
#else
  return false;
#endif
}

two_lane_sha256::two_lane_sha256() noexcept : two_lane_sha256(sha_ni_available()) {}

two_lane_sha256::two_lane_sha256(bool use_sha_ni) noexcept : compress_(compress_x2_portable) {
  TENSORREG_ASSERT(!use_sha_ni || sha_ni_available());
#if defined(__x86_64__)
  if (use_sha_ni) compress_ = compress_x2_sha_ni;
#endif
  reset();
}

bool two_lane_sha256::uses_sha_ni() const noexcept { return compress_ != compress_x2_portable; }

void two_lane_sha256::update(std::span<const std::byte> a, std::span<const std::byte> b) noexcept {
  TENSORREG_ASSERT(a.size() == b.size());
  const std::size_t fill = length_ % block_bytes;
  length_ += a.size();
  if (fill != 0) {
    const std::size_t take = std::min(block_bytes - fill, a.size());
    std::copy_n(a.data(), take, partial_[0].data() + fill);
    std::copy_n(b.data(), take, partial_[1].data() + fill);
    a = a.subspan(take);
    b = b.subspan(take);
    if (fill + take < block_bytes) return;
    compress_(state_[0].data(), state_[1].data(), partial_[0].data(), partial_[1].data(), 1);
  }
  const std::size_t blocks = a.size() / block_bytes;
  if (blocks != 0) {
    compress_(state_[0].data(), state_[1].data(), a.data(), b.data(), blocks);
    a = a.subspan(blocks * block_bytes);
    b = b.subspan(blocks * block_bytes);
  }
  std::copy_n(a.data(), a.size(), partial_[0].data());
  std::copy_n(b.data(), b.size(), partial_[1].data());
}

std::array<digest, 2> two_lane_sha256::finish() noexcept {
  // FIPS 180-4 section 5.1.1: a 1 bit, zeros, and the length in bits as a big-endian 64-bit number
  // ending a block; a block of padding more when the length no longer fits behind the 1 bit.
  const std::size_t fill = length_ % block_bytes;
  constexpr std::size_t length_at = block_bytes - 8;
  for (auto& block : partial_) {
    block[fill] = std::byte{0x80};
    std::fill(block.begin() + static_cast<std::ptrdiff_t>(fill) + 1, block.end(), std::byte{0});
  }
  if (fill >= length_at) {
    compress_(state_[0].data(), state_[1].data(), partial_[0].data(), partial_[1].data(), 1);
    for (auto& block : partial_) block.fill(std::byte{0});
  }
  const std::uint64_t bits = length_ * 8;
  for (auto& block : partial_) {
    store_be32(static_cast<std::uint32_t>(bits >> 32), block.data() + length_at);
    store_be32(static_cast<std::uint32_t>(bits), block.data() + length_at + 4);
  }
  compress_(state_[0].data(), state_[1].data(), partial_[0].data(), partial_[1].data(), 1);

  std::array<digest, 2> out{};
  for (std::size_t lane = 0; lane < 2; ++lane) {
    for (std::size_t i = 0; i < 8; ++i) store_be32(state_[lane][i], out[lane].data() + 4 * i);
  }
  reset();
  return out;
}

void two_lane_sha256::reset() noexcept {
  state_ = {sha256_initial_state, sha256_initial_state};
  // Cleared so that no byte of the last messages lingers in the object.
  partial_ = {};
  length_ = 0;
}

}  // namespace tensorreg::hash
