#include "tensorreg/hash/fingerprint.hpp"

#include <xxhash.h>

#include <algorithm>
#include <memory>

#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/hash/tree_hash.hpp"

namespace tensorreg::hash {
namespace {

struct state_deleter {
  void operator()(XXH3_state_t* s) const noexcept { XXH3_freeState(s); }
};
using xxh3_state = std::unique_ptr<XXH3_state_t, state_deleter>;

xxh3_state new_state() {
  xxh3_state s(XXH3_createState());
  TENSORREG_ASSERT(s != nullptr);
  return s;
}

fingerprint128 to_fingerprint(XXH128_hash_t h) noexcept { return {h.low64, h.high64}; }

// Streams the range's pieces into `s`: a non-host-contiguous source hands out several pieces.
result<fingerprint128> fingerprint_range(const memory::byte_source& source, std::uint64_t offset, std::uint64_t length,
                                         XXH3_state_t* s) {
  const XXH_errorcode reset = XXH3_128bits_reset(s);
  TENSORREG_ASSERT(reset == XXH_OK);
  TENSORREG_TRY(source.visit(offset, length, [&](std::span<const std::byte> piece) -> status {
    const XXH_errorcode updated = XXH3_128bits_update(s, piece.data(), piece.size());
    TENSORREG_ASSERT(updated == XXH_OK);
    return {};
  }));
  return to_fingerprint(XXH3_128bits_digest(s));
}

}  // namespace

fingerprint128 xxh3_128(std::span<const std::byte> bytes) {
  return to_fingerprint(XXH3_128bits(bytes.data(), bytes.size()));
}

result<fingerprint128> xxh3_128(const memory::byte_source& source, std::uint64_t offset, std::uint64_t length) {
  auto s = new_state();
  return fingerprint_range(source, offset, length, s.get());
}

result<std::vector<fingerprint128>> leaf_fingerprints(const memory::byte_source& source, thread_pool* pool) {
  const std::uint64_t size = source.size();
  std::vector<fingerprint128> out(static_cast<std::size_t>(leaf_count(size)));
  const auto leaf_range = [&](std::size_t i) {
    const std::uint64_t offset = i * leaf_bytes;
    return std::pair{offset, std::min(leaf_bytes, size - offset)};
  };
  if (pool != nullptr) {
    TENSORREG_TRY(pool->parallel_for(out.size(), [&](std::size_t i) -> status {
      auto s = new_state();
      const auto [offset, length] = leaf_range(i);
      TENSORREG_TRY_ASSIGN(out[i], fingerprint_range(source, offset, length, s.get()));
      return {};
    }));
  } else {
    auto s = new_state();
    for (std::size_t i = 0; i < out.size(); ++i) {
      const auto [offset, length] = leaf_range(i);
      TENSORREG_TRY_ASSIGN(out[i], fingerprint_range(source, offset, length, s.get()));
    }
  }
  return out;
}

}  // namespace tensorreg::hash
