// src/cuda/sha256_device.cuh — SHA-256 compression, padding and tree steps for the GPU tree hash,
// written once as __host__ __device__ code.
//
// The same functions run in the kernels of tree_hash.cu and, compiled as host code, in
// tensorreg_gpu_host_tests, which checks them against OpenSSL on a machine with no GPU. On
// the host the CUDA intrinsics (__funnelshift_r, __byte_perm) are replaced by emulations of
// their documented semantics, so even the selector and shift arguments are exercised there.
//
// Layout conventions: a digest lives in device memory as 8 native 32-bit words, the SHA-256
// state words H0..H7 (digest byte 4j+k = byte 3-k of word j). A parent's message block is
// exactly the two children's state words, so no byte swapping happens in the tree.
//
// Thread-safety: pure functions. Include only from .cu files (or files compiled by nvcc).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define TENSORREG_SHA_HD __host__ __device__ __forceinline__
#else
#define TENSORREG_SHA_HD inline
#endif

// Loop unrolling hints for the device pass only (the host compiler would warn about them).
#if defined(__CUDA_ARCH__)
#define TENSORREG_SHA_UNROLL _Pragma("unroll")
#define TENSORREG_SHA_NO_UNROLL _Pragma("unroll 1")
#else
#define TENSORREG_SHA_UNROLL
#define TENSORREG_SHA_NO_UNROLL
#endif

namespace tensorreg::cuda::detail {

/// Leaf size, fixed (hash::leaf_bytes; kept in sync by a static_assert in gpu_tree_hash.cpp).
inline constexpr std::uint64_t sha_leaf_bytes = std::uint64_t{4} << 20;

/// The 64 SHA-256 round constants (FIPS 180-4), listed once for the host and device tables.
#define TENSORREG_SHA256_ROUND_CONSTANTS                                                                               \
  0x428a2f98U, 0x71374491U, 0xb5c0fbcfU, 0xe9b5dba5U, 0x3956c25bU, 0x59f111f1U, 0x923f82a4U, 0xab1c5ed5U, 0xd807aa98U, \
      0x12835b01U, 0x243185beU, 0x550c7dc3U, 0x72be5d74U, 0x80deb1feU, 0x9bdc06a7U, 0xc19bf174U, 0xe49b69c1U,          \
      0xefbe4786U, 0x0fc19dc6U, 0x240ca1ccU, 0x2de92c6fU, 0x4a7484aaU, 0x5cb0a9dcU, 0x76f988daU, 0x983e5152U,          \
      0xa831c66dU, 0xb00327c8U, 0xbf597fc7U, 0xc6e00bf3U, 0xd5a79147U, 0x06ca6351U, 0x14292967U, 0x27b70a85U,          \
      0x2e1b2138U, 0x4d2c6dfcU, 0x53380d13U, 0x650a7354U, 0x766a0abbU, 0x81c2c92eU, 0x92722c85U, 0xa2bfe8a1U,          \
      0xa81a664bU, 0xc24b8b70U, 0xc76c51a3U, 0xd192e819U, 0xd6990624U, 0xf40e3585U, 0x106aa070U, 0x19a4c116U,          \
      0x1e376c08U, 0x2748774cU, 0x34b0bcb5U, 0x391c0cb3U, 0x4ed8aa4aU, 0x5b9cca4fU, 0x682e6ff3U, 0x748f82eeU,          \
      0x78a5636fU, 0x84c87814U, 0x8cc70208U, 0x90befffaU, 0xa4506cebU, 0xbef9a3f7U, 0xc67178f2U

/// The round constants, for the host copy of the rolled variant.
inline constexpr std::uint32_t sha_k_host[64] = {TENSORREG_SHA256_ROUND_CONSTANTS};

#if defined(__CUDACC__)
/// Device copy of the round constants for the rolled variant (rounds 16..63 in a loop); every
/// warp reads the same element at the same time, so constant memory broadcasts it.
static __constant__ std::uint32_t sha_k_device[64] = {TENSORREG_SHA256_ROUND_CONSTANTS};
#endif

/// funnelshift_r(lo, hi, n): the low 32 bits of (hi:lo) >> (n & 31), as CUDA documents
/// __funnelshift_r. rotr(x, n) = funnelshift_r(x, x, n): one SHF on the GPU.
TENSORREG_SHA_HD std::uint32_t funnelshift_r(std::uint32_t lo, std::uint32_t hi, unsigned n) {
#if defined(__CUDA_ARCH__)
  return __funnelshift_r(lo, hi, n);
#else
  const std::uint64_t joined = (static_cast<std::uint64_t>(hi) << 32) | lo;
  return static_cast<std::uint32_t>(joined >> (n & 31U));
#endif
}

/// byte_perm(x, y, s): byte i of the result is byte (s >> 4i) & 7 of the 8-byte value y:x,
/// as CUDA documents __byte_perm (the sign-replicate mode bit 3 is not used here).
TENSORREG_SHA_HD std::uint32_t byte_perm(std::uint32_t x, std::uint32_t y, unsigned s) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, y, s);
#else
  const std::uint64_t joined = (static_cast<std::uint64_t>(y) << 32) | x;
  std::uint32_t out = 0;
  for (unsigned i = 0; i < 4; ++i) {
    const unsigned sel = (s >> (4 * i)) & 7U;
    out |= static_cast<std::uint32_t>((joined >> (8 * sel)) & 0xFFU) << (8 * i);
  }
  return out;
#endif
}

/// Sets s to the SHA-256 initial state H0..H7 (immediates, usable on host and device).
TENSORREG_SHA_HD void init_state(std::uint32_t (&s)[8]) {
  s[0] = 0x6a09e667U;
  s[1] = 0xbb67ae85U;
  s[2] = 0x3c6ef372U;
  s[3] = 0xa54ff53aU;
  s[4] = 0x510e527fU;
  s[5] = 0x9b05688cU;
  s[6] = 0x1f83d9abU;
  s[7] = 0x5be0cd19U;
}

TENSORREG_SHA_HD std::uint32_t rotr(std::uint32_t x, unsigned n) { return funnelshift_r(x, x, n); }

/// Big-endian word from a little-endian load (one PRMT).
TENSORREG_SHA_HD std::uint32_t bswap32(std::uint32_t x) { return byte_perm(x, 0, 0x0123); }

TENSORREG_SHA_HD std::uint32_t big_sigma0(std::uint32_t a) { return rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22); }
TENSORREG_SHA_HD std::uint32_t big_sigma1(std::uint32_t e) { return rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25); }
TENSORREG_SHA_HD std::uint32_t small_sigma0(std::uint32_t w) { return rotr(w, 7) ^ rotr(w, 18) ^ (w >> 3); }
TENSORREG_SHA_HD std::uint32_t small_sigma1(std::uint32_t w) { return rotr(w, 17) ^ rotr(w, 19) ^ (w >> 10); }
// One LOP3 each on the GPU.
TENSORREG_SHA_HD std::uint32_t choose(std::uint32_t e, std::uint32_t f, std::uint32_t g) { return g ^ (e & (f ^ g)); }
TENSORREG_SHA_HD std::uint32_t majority(std::uint32_t a, std::uint32_t b, std::uint32_t c) {
  return (a & b) | (c & (a | b));
}

/// Opaque constants that steer work from the integer ALU pipe onto the FMA pipe. On Hopper a
/// warp instruction of either pipe occupies it for 2 cycles (16 lanes per sub-partition), so
/// one thread's SHA-256 chain is bound by the ALU pipe (SHF, LOP3, IADD3) while the FMA pipe
/// idles. With a multiplier the compiler cannot see (a kernel argument that is 1 at run
/// time), x·one + y must be an IMAD, and umulhi(w, 2^(32-n)) = w >> n an IMAD.HI: both on
/// the FMA pipe, halving the ALU work of the additions and the σ shifts.
struct fma_steer {
  std::uint32_t one = 1;
  std::uint32_t p29 = std::uint32_t{1} << 29;  // w >> 3  = umulhi(w, p29)
  std::uint32_t p22 = std::uint32_t{1} << 22;  // w >> 10 = umulhi(w, p22)
};

/// A steer built from a run-time 1 (REQUIRES: one == 1).
TENSORREG_SHA_HD fma_steer make_fma_steer(std::uint32_t one) {
  fma_steer st;
  st.one = one;
  st.p29 = one << 29;
  st.p22 = one << 22;
  return st;
}

TENSORREG_SHA_HD std::uint32_t umulhi(std::uint32_t a, std::uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<std::uint32_t>((static_cast<std::uint64_t>(a) * b) >> 32);
#endif
}

/// Round I. The eight working variables rotate by renaming (the caller passes them shifted),
/// so only d and h are written. For I >= 16 the message word W[I mod 16] is extended in place
/// first. The sums are ordered so that what depends on this round's e comes last
/// (e -> Σ1 -> new e is three dependent instructions); with Steer they are IMADs (fma_steer).
template <int I, bool Steer>
TENSORREG_SHA_HD void round(std::uint32_t a, std::uint32_t b, std::uint32_t c, std::uint32_t& d, std::uint32_t e,
                            std::uint32_t f, std::uint32_t g, std::uint32_t& h, std::uint32_t (&w)[16], std::uint32_t k,
                            fma_steer st) {
  const auto add = [st](std::uint32_t x, std::uint32_t y) -> std::uint32_t {
    if constexpr (Steer) {
      return x * st.one + y;
    } else {
      return x + y;
    }
  };
  if constexpr (I >= 16) {
    const std::uint32_t w15 = w[(I - 15) & 15];
    const std::uint32_t w2 = w[(I - 2) & 15];
    std::uint32_t s0;
    std::uint32_t s1;
    if constexpr (Steer) {
      s0 = rotr(w15, 7) ^ rotr(w15, 18) ^ umulhi(w15, st.p29);
      s1 = rotr(w2, 17) ^ rotr(w2, 19) ^ umulhi(w2, st.p22);
    } else {
      s0 = small_sigma0(w15);
      s1 = small_sigma1(w2);
    }
    w[I & 15] = add(add(add(w[I & 15], s1), w[(I - 7) & 15]), s0);
  }
  const std::uint32_t x = h + k + w[I & 15];  // ready rounds ahead
  const std::uint32_t y = add(x, choose(e, f, g));
  const std::uint32_t sigma1 = big_sigma1(e);
  const std::uint32_t t1 = add(y, sigma1);
  d = add(add(d, y), sigma1);                          // d + T1
  h = add(t1, add(big_sigma0(a), majority(a, b, c)));  // T1 + T2
}

/// How the 64 rounds are laid out in code.
enum class unroll_mode {
  full,    ///< 64 rounds inline, constants as immediates (~2k instructions)
  rolled,  ///< rounds 0..15 inline, 16..63 as 3 turns of a 16-round body, constants from a table
};

/// One SHA-256 compression: s = s + F(s, w). Clobbers w (message schedule in place).
template <unroll_mode Mode = unroll_mode::full, bool Steer = false>
TENSORREG_SHA_HD void compress(std::uint32_t (&s)[8], std::uint32_t (&w)[16], fma_steer st = {}) {
  std::uint32_t a = s[0], b = s[1], c = s[2], d = s[3], e = s[4], f = s[5], g = s[6], h = s[7];
  if constexpr (Mode == unroll_mode::full) {
    // With Steer, rounds 0..15 sit in a loop that runs `one` (= 1) time. The compiler cannot
    // see through it, so it cannot sink the caller's prefetch loads of the next block to the
    // end of the iteration (which it does to a straight-line body, exposing their latency).
    TENSORREG_SHA_NO_UNROLL
    for (std::uint32_t once = 0; once < (Steer ? st.one : 1U); ++once) {
      round<0, Steer>(a, b, c, d, e, f, g, h, w, 0x428a2f98U, st);
      round<1, Steer>(h, a, b, c, d, e, f, g, w, 0x71374491U, st);
      round<2, Steer>(g, h, a, b, c, d, e, f, w, 0xb5c0fbcfU, st);
      round<3, Steer>(f, g, h, a, b, c, d, e, w, 0xe9b5dba5U, st);
      round<4, Steer>(e, f, g, h, a, b, c, d, w, 0x3956c25bU, st);
      round<5, Steer>(d, e, f, g, h, a, b, c, w, 0x59f111f1U, st);
      round<6, Steer>(c, d, e, f, g, h, a, b, w, 0x923f82a4U, st);
      round<7, Steer>(b, c, d, e, f, g, h, a, w, 0xab1c5ed5U, st);
      round<8, Steer>(a, b, c, d, e, f, g, h, w, 0xd807aa98U, st);
      round<9, Steer>(h, a, b, c, d, e, f, g, w, 0x12835b01U, st);
      round<10, Steer>(g, h, a, b, c, d, e, f, w, 0x243185beU, st);
      round<11, Steer>(f, g, h, a, b, c, d, e, w, 0x550c7dc3U, st);
      round<12, Steer>(e, f, g, h, a, b, c, d, w, 0x72be5d74U, st);
      round<13, Steer>(d, e, f, g, h, a, b, c, w, 0x80deb1feU, st);
      round<14, Steer>(c, d, e, f, g, h, a, b, w, 0x9bdc06a7U, st);
      round<15, Steer>(b, c, d, e, f, g, h, a, w, 0xc19bf174U, st);
    }
    round<16, Steer>(a, b, c, d, e, f, g, h, w, 0xe49b69c1U, st);
    round<17, Steer>(h, a, b, c, d, e, f, g, w, 0xefbe4786U, st);
    round<18, Steer>(g, h, a, b, c, d, e, f, w, 0x0fc19dc6U, st);
    round<19, Steer>(f, g, h, a, b, c, d, e, w, 0x240ca1ccU, st);
    round<20, Steer>(e, f, g, h, a, b, c, d, w, 0x2de92c6fU, st);
    round<21, Steer>(d, e, f, g, h, a, b, c, w, 0x4a7484aaU, st);
    round<22, Steer>(c, d, e, f, g, h, a, b, w, 0x5cb0a9dcU, st);
    round<23, Steer>(b, c, d, e, f, g, h, a, w, 0x76f988daU, st);
    round<24, Steer>(a, b, c, d, e, f, g, h, w, 0x983e5152U, st);
    round<25, Steer>(h, a, b, c, d, e, f, g, w, 0xa831c66dU, st);
    round<26, Steer>(g, h, a, b, c, d, e, f, w, 0xb00327c8U, st);
    round<27, Steer>(f, g, h, a, b, c, d, e, w, 0xbf597fc7U, st);
    round<28, Steer>(e, f, g, h, a, b, c, d, w, 0xc6e00bf3U, st);
    round<29, Steer>(d, e, f, g, h, a, b, c, w, 0xd5a79147U, st);
    round<30, Steer>(c, d, e, f, g, h, a, b, w, 0x06ca6351U, st);
    round<31, Steer>(b, c, d, e, f, g, h, a, w, 0x14292967U, st);
    round<32, Steer>(a, b, c, d, e, f, g, h, w, 0x27b70a85U, st);
    round<33, Steer>(h, a, b, c, d, e, f, g, w, 0x2e1b2138U, st);
    round<34, Steer>(g, h, a, b, c, d, e, f, w, 0x4d2c6dfcU, st);
    round<35, Steer>(f, g, h, a, b, c, d, e, w, 0x53380d13U, st);
    round<36, Steer>(e, f, g, h, a, b, c, d, w, 0x650a7354U, st);
    round<37, Steer>(d, e, f, g, h, a, b, c, w, 0x766a0abbU, st);
    round<38, Steer>(c, d, e, f, g, h, a, b, w, 0x81c2c92eU, st);
    round<39, Steer>(b, c, d, e, f, g, h, a, w, 0x92722c85U, st);
    round<40, Steer>(a, b, c, d, e, f, g, h, w, 0xa2bfe8a1U, st);
    round<41, Steer>(h, a, b, c, d, e, f, g, w, 0xa81a664bU, st);
    round<42, Steer>(g, h, a, b, c, d, e, f, w, 0xc24b8b70U, st);
    round<43, Steer>(f, g, h, a, b, c, d, e, w, 0xc76c51a3U, st);
    round<44, Steer>(e, f, g, h, a, b, c, d, w, 0xd192e819U, st);
    round<45, Steer>(d, e, f, g, h, a, b, c, w, 0xd6990624U, st);
    round<46, Steer>(c, d, e, f, g, h, a, b, w, 0xf40e3585U, st);
    round<47, Steer>(b, c, d, e, f, g, h, a, w, 0x106aa070U, st);
    round<48, Steer>(a, b, c, d, e, f, g, h, w, 0x19a4c116U, st);
    round<49, Steer>(h, a, b, c, d, e, f, g, w, 0x1e376c08U, st);
    round<50, Steer>(g, h, a, b, c, d, e, f, w, 0x2748774cU, st);
    round<51, Steer>(f, g, h, a, b, c, d, e, w, 0x34b0bcb5U, st);
    round<52, Steer>(e, f, g, h, a, b, c, d, w, 0x391c0cb3U, st);
    round<53, Steer>(d, e, f, g, h, a, b, c, w, 0x4ed8aa4aU, st);
    round<54, Steer>(c, d, e, f, g, h, a, b, w, 0x5b9cca4fU, st);
    round<55, Steer>(b, c, d, e, f, g, h, a, w, 0x682e6ff3U, st);
    round<56, Steer>(a, b, c, d, e, f, g, h, w, 0x748f82eeU, st);
    round<57, Steer>(h, a, b, c, d, e, f, g, w, 0x78a5636fU, st);
    round<58, Steer>(g, h, a, b, c, d, e, f, w, 0x84c87814U, st);
    round<59, Steer>(f, g, h, a, b, c, d, e, w, 0x8cc70208U, st);
    round<60, Steer>(e, f, g, h, a, b, c, d, w, 0x90befffaU, st);
    round<61, Steer>(d, e, f, g, h, a, b, c, w, 0xa4506cebU, st);
    round<62, Steer>(c, d, e, f, g, h, a, b, w, 0xbef9a3f7U, st);
    round<63, Steer>(b, c, d, e, f, g, h, a, w, 0xc67178f2U, st);
  } else {
    round<0, Steer>(a, b, c, d, e, f, g, h, w, 0x428a2f98U, st);
    round<1, Steer>(h, a, b, c, d, e, f, g, w, 0x71374491U, st);
    round<2, Steer>(g, h, a, b, c, d, e, f, w, 0xb5c0fbcfU, st);
    round<3, Steer>(f, g, h, a, b, c, d, e, w, 0xe9b5dba5U, st);
    round<4, Steer>(e, f, g, h, a, b, c, d, w, 0x3956c25bU, st);
    round<5, Steer>(d, e, f, g, h, a, b, c, w, 0x59f111f1U, st);
    round<6, Steer>(c, d, e, f, g, h, a, b, w, 0x923f82a4U, st);
    round<7, Steer>(b, c, d, e, f, g, h, a, w, 0xab1c5ed5U, st);
    round<8, Steer>(a, b, c, d, e, f, g, h, w, 0xd807aa98U, st);
    round<9, Steer>(h, a, b, c, d, e, f, g, w, 0x12835b01U, st);
    round<10, Steer>(g, h, a, b, c, d, e, f, w, 0x243185beU, st);
    round<11, Steer>(f, g, h, a, b, c, d, e, w, 0x550c7dc3U, st);
    round<12, Steer>(e, f, g, h, a, b, c, d, w, 0x72be5d74U, st);
    round<13, Steer>(d, e, f, g, h, a, b, c, w, 0x80deb1feU, st);
    round<14, Steer>(c, d, e, f, g, h, a, b, w, 0x9bdc06a7U, st);
    round<15, Steer>(b, c, d, e, f, g, h, a, w, 0xc19bf174U, st);
#if defined(__CUDA_ARCH__)
    const std::uint32_t* table = sha_k_device;
#else
    const std::uint32_t* table = sha_k_host;
#endif
    TENSORREG_SHA_NO_UNROLL
    for (int turn = 0; turn < 3; ++turn) {
      const std::uint32_t* k = table + 16 * turn;
      round<16, Steer>(a, b, c, d, e, f, g, h, w, k[16], st);
      round<17, Steer>(h, a, b, c, d, e, f, g, w, k[17], st);
      round<18, Steer>(g, h, a, b, c, d, e, f, w, k[18], st);
      round<19, Steer>(f, g, h, a, b, c, d, e, w, k[19], st);
      round<20, Steer>(e, f, g, h, a, b, c, d, w, k[20], st);
      round<21, Steer>(d, e, f, g, h, a, b, c, w, k[21], st);
      round<22, Steer>(c, d, e, f, g, h, a, b, w, k[22], st);
      round<23, Steer>(b, c, d, e, f, g, h, a, w, k[23], st);
      round<24, Steer>(a, b, c, d, e, f, g, h, w, k[24], st);
      round<25, Steer>(h, a, b, c, d, e, f, g, w, k[25], st);
      round<26, Steer>(g, h, a, b, c, d, e, f, w, k[26], st);
      round<27, Steer>(f, g, h, a, b, c, d, e, w, k[27], st);
      round<28, Steer>(e, f, g, h, a, b, c, d, w, k[28], st);
      round<29, Steer>(d, e, f, g, h, a, b, c, w, k[29], st);
      round<30, Steer>(c, d, e, f, g, h, a, b, w, k[30], st);
      round<31, Steer>(b, c, d, e, f, g, h, a, w, k[31], st);
    }
  }
  s[0] += a;
  s[1] += b;
  s[2] += c;
  s[3] += d;
  s[4] += e;
  s[5] += f;
  s[6] += g;
  s[7] += h;
}

/// Block loaders by the alignment of the leaf start (leaves start at base + i·4 MiB, so every
/// leaf has the base's alignment). load() fetches one 64-byte block as 16 "raw" words and
/// may return before the data arrives; word() turns a raw word into the big-endian message
/// word and is where the wait happens. Keeping the two apart lets the next block's loads fly
/// during the current compression.
template <int Align>
struct block_loader;

/// 16-byte aligned: four 128-bit read-only loads (LDG.E.128.CONSTANT).
template <>
struct block_loader<16> {
  TENSORREG_SHA_HD static void load(const unsigned char* p, std::uint32_t (&raw)[16]) {
#if defined(__CUDA_ARCH__)
    const uint4* q = reinterpret_cast<const uint4*>(p);
    TENSORREG_SHA_UNROLL
    for (int i = 0; i < 4; ++i) {
      const uint4 v = __ldg(q + i);
      raw[4 * i + 0] = v.x;
      raw[4 * i + 1] = v.y;
      raw[4 * i + 2] = v.z;
      raw[4 * i + 3] = v.w;
    }
#else
    std::memcpy(raw, p, 64);  // little-endian host, as the GPU
#endif
  }
  TENSORREG_SHA_HD static std::uint32_t word(std::uint32_t raw) { return bswap32(raw); }
};

/// 4-byte aligned: sixteen 32-bit read-only loads.
template <>
struct block_loader<4> {
  TENSORREG_SHA_HD static void load(const unsigned char* p, std::uint32_t (&raw)[16]) {
#if defined(__CUDA_ARCH__)
    const unsigned int* q = reinterpret_cast<const unsigned int*>(p);
    TENSORREG_SHA_UNROLL
    for (int i = 0; i < 16; ++i) raw[i] = __ldg(q + i);
#else
    std::memcpy(raw, p, 64);
#endif
  }
  TENSORREG_SHA_HD static std::uint32_t word(std::uint32_t raw) { return bswap32(raw); }
};

/// Any alignment: byte loads, assembled big-endian at once (rare: only a base pointer that is
/// not 4-byte aligned gets here).
template <>
struct block_loader<1> {
  TENSORREG_SHA_HD static void load(const unsigned char* p, std::uint32_t (&raw)[16]) {
    TENSORREG_SHA_UNROLL
    for (int i = 0; i < 16; ++i) {
      raw[i] = (static_cast<std::uint32_t>(p[4 * i]) << 24) | (static_cast<std::uint32_t>(p[4 * i + 1]) << 16) |
               (static_cast<std::uint32_t>(p[4 * i + 2]) << 8) | static_cast<std::uint32_t>(p[4 * i + 3]);
    }
  }
  TENSORREG_SHA_HD static std::uint32_t word(std::uint32_t raw) { return raw; }
};

/// The last 1 or 2 blocks of a message of `total_len` bytes whose final `r` (< 64) bytes are
/// at `tail`: those bytes, 0x80, zeros, and the 64-bit big-endian bit length. Fully unrolled
/// over compile-time indices, so nothing goes to local memory.
template <unroll_mode Mode = unroll_mode::full, bool Steer = false>
TENSORREG_SHA_HD void finish_message(std::uint32_t (&s)[8], const unsigned char* tail, unsigned r,
                                     std::uint64_t total_len, fma_steer st = {}) {
  const std::uint64_t bits = total_len * 8U;
  const int blocks = r >= 56 ? 2 : 1;
  for (int q = 0; q < blocks; ++q) {
    std::uint32_t w[16];
    TENSORREG_SHA_UNROLL
    for (int j = 0; j < 16; ++j) {
      std::uint32_t v = 0;
      TENSORREG_SHA_UNROLL
      for (int b = 0; b < 4; ++b) {
        const unsigned idx = static_cast<unsigned>(64 * q + 4 * j + b);
        const std::uint32_t byte = idx < r ? static_cast<std::uint32_t>(tail[idx]) : (idx == r ? 0x80U : 0U);
        v = (v << 8) | byte;
      }
      w[j] = v;
    }
    if (q == blocks - 1) {
      w[14] = static_cast<std::uint32_t>(bits >> 32);
      w[15] = static_cast<std::uint32_t>(bits);
    }
    compress<Mode, Steer>(s, w, st);
  }
}

/// SHA-256 state words of the `len` bytes at `p` (any len, 0 included). Streams the full
/// blocks with a one-block-ahead prefetch, then pads. `p` must have alignment Align.
template <int Align, unroll_mode Mode = unroll_mode::full, bool Steer = false>
TENSORREG_SHA_HD void sha256_words(const unsigned char* p, std::uint64_t len, std::uint32_t (&s)[8],
                                   fma_steer st = {}) {
  using loader = block_loader<Align>;
  init_state(s);
  const std::uint64_t full = len / 64;
  if (full > 0) {
    std::uint32_t raw[16];
    loader::load(p, raw);
    for (std::uint64_t blk = 0; blk < full; ++blk) {
      std::uint32_t w[16];
      TENSORREG_SHA_UNROLL
      for (int i = 0; i < 16; ++i) w[i] = loader::word(raw[i]);
      // Prefetch the next block (the last block again at the end: branch-free, in bounds).
      const std::uint64_t next = blk + 1 < full ? blk + 1 : blk;
      loader::load(p + next * 64, raw);
      compress<Mode, Steer>(s, w, st);
    }
  }
  finish_message<Mode, Steer>(s, p + full * 64, static_cast<unsigned>(len % 64), len, st);
}

/// A run of 64-byte blocks of one leaf (leaf_plan.hpp's leaf_segment, repeated here so this
/// header stays free of host-only headers): at `address`, or zeros when `address` is 0.
struct segment_words_input {
  std::uint64_t address;
  std::uint64_t blocks;
};

/// The 64-byte block at `address` (16-byte aligned), or a zero block when `address` is 0.
TENSORREG_SHA_HD void load_block_or_zero(std::uint64_t address, std::uint32_t (&raw)[16]) {
  if (address == 0) {
    TENSORREG_SHA_UNROLL
    for (int i = 0; i < 16; ++i) raw[i] = 0;
  } else {
    block_loader<16>::load(reinterpret_cast<const unsigned char*>(address), raw);
  }
}

/// SHA-256 state words of a `len`-byte message whose len / 64 whole blocks are spread over
/// `count` segments in order, and whose len % 64 tail bytes follow the last segment's blocks
/// in its memory. Every non-zero address is 16-byte aligned. Only the last segment may have 0
/// blocks; a zero segment is never followed by a tail. The same prefetch as sha256_words.
template <unroll_mode Mode = unroll_mode::full, bool Steer = false>
TENSORREG_SHA_HD void sha256_segment_words(const segment_words_input* segments, std::uint32_t count, std::uint64_t len,
                                           std::uint32_t (&s)[8], fma_steer st = {}) {
  using loader = block_loader<16>;
  init_state(s);
  const std::uint64_t full = len / 64;
  const segment_words_input* seg = segments;
  const segment_words_input* last = segments + (count - 1);
  std::uint64_t address = seg->address;
  std::uint64_t left = seg->blocks;
  if (full > 0) {
    std::uint32_t raw[16];
    load_block_or_zero(address, raw);
    for (std::uint64_t blk = 0; blk < full; ++blk) {
      std::uint32_t w[16];
      TENSORREG_SHA_UNROLL
      for (int i = 0; i < 16; ++i) w[i] = loader::word(raw[i]);
      // The next block: further in this segment, else the first of the next one (or, past the
      // last block, the tail right after the last segment's blocks).
      if (--left == 0 && seg != last) {
        ++seg;
        address = seg->address;
        left = seg->blocks;
      } else if (address != 0) {
        address += 64;
      }
      if (blk + 1 < full) load_block_or_zero(address, raw);
      compress<Mode, Steer>(s, w, st);
    }
  }
  finish_message<Mode, Steer>(s, reinterpret_cast<const unsigned char*>(address), static_cast<unsigned>(len % 64), len,
                              st);
}

/// sha256_segment_words() without a branch per block: zero segments read the 64 zero bytes at
/// `zero_block` (16-byte aligned) with a step of 0, so every block is one unconditional load
/// (the next block's, or the current one's again after the last) and one address step; only
/// a segment's end branches.
template <unroll_mode Mode = unroll_mode::full, bool Steer = false>
TENSORREG_SHA_HD void sha256_segment_words_flat(const segment_words_input* segments, std::uint32_t count,
                                                std::uint64_t len, std::uint64_t zero_block, std::uint32_t (&s)[8],
                                                fma_steer st = {}) {
  using loader = block_loader<16>;
  init_state(s);
  const std::uint64_t full = len / 64;
  const segment_words_input* seg = segments;
  const segment_words_input* last = segments + (count - 1);
  std::uint64_t address = seg->address != 0 ? seg->address : zero_block;
  std::uint64_t step = seg->address != 0 ? 64 : 0;
  std::uint64_t left = seg->blocks;
  if (full > 0) {
    std::uint32_t raw[16];
    loader::load(reinterpret_cast<const unsigned char*>(address), raw);
    for (std::uint64_t blk = 0; blk < full; ++blk) {
      std::uint32_t w[16];
      TENSORREG_SHA_UNROLL
      for (int i = 0; i < 16; ++i) w[i] = loader::word(raw[i]);
      const std::uint64_t current = address;
      if (--left == 0 && seg != last) {
        ++seg;
        address = seg->address != 0 ? seg->address : zero_block;
        step = seg->address != 0 ? 64 : 0;
        left = seg->blocks;
      } else {
        address += step;
      }
      loader::load(reinterpret_cast<const unsigned char*>(blk + 1 < full ? address : current), raw);
      compress<Mode, Steer>(s, w, st);
    }
  }
  finish_message<Mode, Steer>(s, reinterpret_cast<const unsigned char*>(address), static_cast<unsigned>(len % 64), len,
                              st);
}

/// State words of SHA-256(left ‖ right) for two digests in word form: the data block is the
/// 16 words as they are, the padding block is constant (0x80, zeros, bit length 512).
template <unroll_mode Mode = unroll_mode::full>
TENSORREG_SHA_HD void hash_pair_words(const std::uint32_t (&left)[8], const std::uint32_t (&right)[8],
                                      std::uint32_t (&out)[8]) {
  std::uint32_t s[8];
  std::uint32_t w[16];
  init_state(s);
  for (int i = 0; i < 8; ++i) {
    w[i] = left[i];
    w[8 + i] = right[i];
  }
  compress<Mode>(s, w);
  for (int i = 0; i < 16; ++i) w[i] = 0;
  w[0] = 0x80000000U;
  w[15] = 512U;
  compress<Mode>(s, w);
  for (int i = 0; i < 8; ++i) out[i] = s[i];
}

/// One node of a tree level: node j of the level above a level of n nodes (stored as 8 words
/// each at `in`) is the hash of nodes 2j and 2j+1, or node 2j unchanged when it is the odd
/// last one. REQUIRES: j < (n + 1) / 2.
TENSORREG_SHA_HD void tree_level_node(const std::uint32_t* in, std::uint32_t n, std::uint32_t j, std::uint32_t* out) {
  std::uint32_t left[8];
  std::uint32_t result[8];
  for (int i = 0; i < 8; ++i) left[i] = in[16 * static_cast<std::uint64_t>(j) + static_cast<unsigned>(i)];
  if (2 * j + 1 < n) {
    std::uint32_t right[8];
    for (int i = 0; i < 8; ++i) right[i] = in[16 * static_cast<std::uint64_t>(j) + 8 + static_cast<unsigned>(i)];
    hash_pair_words<unroll_mode::rolled>(left, right, result);
  } else {
    for (int i = 0; i < 8; ++i) result[i] = left[i];
  }
  for (int i = 0; i < 8; ++i) out[8 * static_cast<std::uint64_t>(j) + static_cast<unsigned>(i)] = result[i];
}

}  // namespace tensorreg::cuda::detail
