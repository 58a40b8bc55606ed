// src/hash/sha256_x2.hpp — SHA-256 of two equal-length messages at once (tree-hash leaves
// hashed two at a time).
//
// Private to the library. `two_lane_sha256` hashes two independent messages side by side. On
// x86-64 with SHA-NI it runs both lanes' instruction streams interleaved in one loop over
// blocks: SHA256RNDS2 is bound by its latency when one message feeds it, and the other lane's
// rounds fill that latency (the idea of the Linux kernel's sha256_ni "finup2x" by Eric
// Biggers). On the dev VM's AMD EPYC (Zen 5) a core hashes 2.6 GB/s this way against OpenSSL's
// 1.76 for one stream: 1.5x, where the SHA unit's throughput (an independent SHA256RNDS2 every
// 2.5 to 3 cycles) appears to be the limit. Elsewhere (no SHA-NI, or not x86-64) a portable
// scalar compression gives the same digests, slowly. The digests are standard SHA-256, equal
// to `sha256()` of each lane's bytes.
//
// Thread-safety: sha_ni_available() may be called from any thread. A `two_lane_sha256` is a
// plain value: one thread at a time; distinct objects are independent.
// Ownership: the object holds its whole state inline (no heap, no OpenSSL) and is copyable;
// update() reads its spans only during the call.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>

#include "tensorreg/hash/sha256.hpp"

namespace tensorreg::hash {

/// Whether two_lane_sha256 runs on SHA-NI here (cpuid: SHA, SSE4.1, SSSE3), checked once.
/// Always false on builds for other architectures than x86-64.
[[nodiscard]] bool sha_ni_available() noexcept;

/// Two SHA-256 messages of equal length at once. update() appends equal-length byte spans to
/// lane 0 and lane 1; finish() returns both digests and starts two new messages.
class two_lane_sha256 {
 public:
  /// Uses SHA-NI where sha_ni_available(), else the portable compression.
  two_lane_sha256() noexcept;

  /// Chooses the compression: SHA-NI when `use_sha_ni`, else the portable one. For tests, so
  /// that both run on a machine with SHA-NI. REQUIRES: !use_sha_ni || sha_ni_available().
  explicit two_lane_sha256(bool use_sha_ni) noexcept;

  /// Appends `a` to lane 0 and `b` to lane 1. REQUIRES: a.size() == b.size().
  void update(std::span<const std::byte> a, std::span<const std::byte> b) noexcept;

  /// Returns the digests of lane 0 and lane 1 (everything appended since construction or the
  /// last finish()/reset()), and starts two new messages.
  [[nodiscard]] std::array<digest, 2> finish() noexcept;

  /// Discards what was appended and starts two new messages.
  void reset() noexcept;

  /// Whether this object compresses with SHA-NI (for tests and benchmarks).
  [[nodiscard]] bool uses_sha_ni() const noexcept;

 private:
  static constexpr std::size_t block_bytes = 64;

  // Compresses `blocks` whole blocks of each lane into that lane's state (H0..H7): one call
  // for all the blocks an update() has, so that the choice costs nothing per block.
  using compress_function = void (*)(std::uint32_t* state0, std::uint32_t* state1, const std::byte* data0,
                                     const std::byte* data1, std::size_t blocks) noexcept;

  compress_function compress_;
  std::array<std::array<std::uint32_t, 8>, 2> state_;
  // Both lanes' partial blocks are always filled to the same level, length_ % block_bytes,
  // because every update() appends the same number of bytes to each.
  std::array<std::array<std::byte, block_bytes>, 2> partial_;
  std::uint64_t length_;
};

}  // namespace tensorreg::hash
