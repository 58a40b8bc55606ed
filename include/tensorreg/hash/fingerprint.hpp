// tensorreg/hash/fingerprint.hpp — fast non-cryptographic fingerprints (XXH3-128).
//
// Provides `fingerprint128`, `xxh3_128` and `leaf_fingerprints`: one XXH3-128 per 4 MiB leaf
// (the same leaves as tree_hash.hpp), used to check cached replicas for corruption cheaply.
// Fingerprints are NOT content ids: never use them where an adversary chooses the bytes.
// Values equal those of XXH3_128bits (seed 0) of libxxhash.
//
// Thread-safety: pure functions; the source must allow concurrent visits.
// Ownership: nothing is retained after a call returns.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "tensorreg/common/error.hpp"
#include "tensorreg/memory/byte_source.hpp"

namespace tensorreg {
class thread_pool;
}

namespace tensorreg::hash {

/// A 128-bit XXH3 value (`low64`, `high64` of XXH128_hash_t).
struct fingerprint128 {
  std::uint64_t low = 0;
  std::uint64_t high = 0;

  friend bool operator==(const fingerprint128&, const fingerprint128&) = default;
};

/// XXH3-128 (seed 0) of `bytes`.
[[nodiscard]] fingerprint128 xxh3_128(std::span<const std::byte> bytes);

/// XXH3-128 of bytes [offset, offset + length) of `source`, streamed over its pieces.
/// Errors: as source.visit() (OUT_OF_RANGE, …).
[[nodiscard]] result<fingerprint128> xxh3_128(const memory::byte_source& source, std::uint64_t offset,
                                              std::uint64_t length);

/// XXH3-128 of every 4 MiB leaf of `source` (hash::leaf_bytes; the last may be short), in
/// order, over `pool` and the calling thread (null pool: calling thread only). Size 0 gives
/// no fingerprints. Errors: the first error of source.visit().
[[nodiscard]] result<std::vector<fingerprint128>> leaf_fingerprints(const memory::byte_source& source,
                                                                    thread_pool* pool = nullptr);

}  // namespace tensorreg::hash
