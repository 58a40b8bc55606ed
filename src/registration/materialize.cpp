#include "registration/materialize.hpp"

#include <cstring>
#include <vector>

#include "tensorreg/hash/tree_hash.hpp"

namespace tensorreg::registration::detail {

result<materialized> materialize(const memory::byte_source& source, bool want_digest, thread_pool& pool) {
  const std::uint64_t total = source.size();
  TENSORREG_TRY_ASSIGN(auto copy, memory::shared_memory::create(total, "tensorreg-stable"));
  const auto dst = copy.mutable_bytes();
  const std::uint64_t leaves = hash::leaf_count(total);
  std::vector<hash::digest> digests(want_digest ? leaves : 0);
  TENSORREG_TRY(pool.parallel_for(leaves, [&](std::size_t leaf) -> status {
    const std::uint64_t begin = leaf * hash::leaf_bytes;
    const std::uint64_t length = std::min(hash::leaf_bytes, total - begin);
    std::uint64_t at = begin;
    TENSORREG_TRY(source.visit(begin, length, [&](std::span<const std::byte> piece) -> status {
      std::memcpy(dst.data() + at, piece.data(), piece.size());
      at += piece.size();
      return {};
    }));
    if (want_digest) digests[leaf] = hash::sha256(std::span<const std::byte>(dst.subspan(begin, length)));
    return {};
  }));
  materialized out;
  if (want_digest) out.data_digest = hash::tree_root(digests);
  out.replica = std::make_shared<const memory::shared_memory>(std::move(copy));
  return out;
}

}  // namespace tensorreg::registration::detail
