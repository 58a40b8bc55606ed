#include "tensorreg/hash/tree_hash.hpp"

#include <algorithm>
#include <mutex>
#include <string>

#include "hash/sha256_x2.hpp"
#include "tensorreg/common/thread_pool.hpp"

namespace tensorreg::hash {
namespace {

digest hash_pair(const digest& left, const digest& right) {
  std::array<std::byte, 2 * sizeof(digest)> joined{};
  std::copy(left.begin(), left.end(), joined.begin());
  std::copy(right.begin(), right.end(), joined.begin() + static_cast<std::ptrdiff_t>(left.size()));
  return sha256(std::span<const std::byte>(joined));
}

result<digest> hash_leaf_with(const memory::byte_source& source, std::uint64_t leaf_index, sha256_hasher& hasher) {
  const std::uint64_t size = source.size();
  const std::uint64_t leaves = leaf_count(size);
  if (leaf_index >= leaves) {
    return fail(errc::out_of_range, "cannot hash leaf " + std::to_string(leaf_index) + ": a source of " +
                                        std::to_string(size) + " bytes has " + std::to_string(leaves) + " leaves");
  }
  const std::uint64_t offset = leaf_index * leaf_bytes;
  const std::uint64_t length = std::min(leaf_bytes, size - offset);
  hasher.reset();
  TENSORREG_TRY(source.visit(offset, length, [&](std::span<const std::byte> piece) -> status {
    hasher.update(piece);
    return {};
  }));
  return hasher.finish();
}

}  // namespace

digest tree_root(std::span<const digest> leaves) {
  if (leaves.empty()) return digest{};
  if (leaves.size() == 1) return leaves.front();
  std::vector<digest> level(leaves.begin(), leaves.end());
  while (level.size() > 1) {
    const std::size_t pairs = level.size() / 2;
    for (std::size_t i = 0; i < pairs; ++i) level[i] = hash_pair(level[2 * i], level[2 * i + 1]);
    if (level.size() % 2 != 0) {
      level[pairs] = level.back();  // odd last node promoted unchanged
      level.resize(pairs + 1);
    } else {
      level.resize(pairs);
    }
  }
  return level.front();
}

result<digest> hash_leaf(const memory::byte_source& source, std::uint64_t leaf_index) {
  sha256_hasher hasher;
  return hash_leaf_with(source, leaf_index, hasher);
}

leaf_jobs plan_leaf_jobs(std::uint64_t size, std::size_t threads) noexcept {
  const auto leaves = static_cast<std::size_t>(leaf_count(size));
  const auto whole = static_cast<std::size_t>(size / leaf_bytes);
  leaf_jobs jobs;
  jobs.pairs = sha_ni_available() && whole >= 4 * std::max<std::size_t>(threads, 1) ? whole / 2 : 0;
  jobs.count = leaves - jobs.pairs;
  return jobs;
}

result<std::array<digest, 2>> hash_leaf_pair(const memory::byte_source& source, std::uint64_t first,
                                             const piece_seen* seen) {
  const std::uint64_t a = first * leaf_bytes;
  const std::uint64_t b = a + leaf_bytes;
  TENSORREG_ASSERT(b + leaf_bytes <= source.size());
  two_lane_sha256 lanes;
  std::uint64_t at = 0;  // within the leaf
  TENSORREG_TRY(source.visit(a, leaf_bytes, [&](std::span<const std::byte> piece_a) -> status {
    std::uint64_t within = 0;
    TENSORREG_TRY(source.visit(b + at, piece_a.size(), [&](std::span<const std::byte> piece_b) -> status {
      lanes.update(piece_a.subspan(static_cast<std::size_t>(within), piece_b.size()), piece_b);
      if (seen != nullptr) TENSORREG_TRY((*seen)(b + at + within, piece_b));
      within += piece_b.size();
      return {};
    }));
    if (seen != nullptr) TENSORREG_TRY((*seen)(a + at, piece_a));
    at += piece_a.size();
    return {};
  }));
  return lanes.finish();
}

std::array<digest, 2> sha256_two(std::span<const std::byte> a, std::span<const std::byte> b) {
  TENSORREG_ASSERT(a.size() == b.size());
  two_lane_sha256 lanes;
  lanes.update(a, b);
  return lanes.finish();
}

result<std::vector<digest>> leaf_digests(const memory::byte_source& source, thread_pool* pool) {
  const std::uint64_t leaves = leaf_count(source.size());
  std::vector<digest> out(static_cast<std::size_t>(leaves));
  const auto jobs = plan_leaf_jobs(source.size(), pool != nullptr ? pool->concurrency() : 1);
  const auto job = [&](std::size_t j) -> status {
    const std::size_t i = jobs.first_leaf(j);
    if (j < jobs.pairs) {
      TENSORREG_TRY_ASSIGN(const auto two, hash_leaf_pair(source, i));
      out[i] = two[0];
      out[i + 1] = two[1];
      return {};
    }
    // One context per leaf: its cost is noise next to hashing 4 MiB, and it keeps the
    // per-thread state out of the pool.
    sha256_hasher hasher;
    TENSORREG_TRY_ASSIGN(out[i], hash_leaf_with(source, i, hasher));
    return {};
  };
  if (pool != nullptr) {
    TENSORREG_TRY(pool->parallel_for(jobs.count, job));
  } else {
    for (std::size_t j = 0; j < jobs.count; ++j) TENSORREG_TRY(job(j));
  }
  return out;
}

result<digest> tree_hash(const memory::byte_source& source, thread_pool* pool) {
  TENSORREG_TRY_ASSIGN(const auto leaves, leaf_digests(source, pool));
  return tree_root(leaves);
}

struct incremental_tree_hash::state {
  std::uint64_t total_size = 0;
  mutable std::mutex mutex;
  std::vector<digest> leaves;  // guarded by mutex
  std::vector<bool> present;   // guarded by mutex
  std::uint64_t added = 0;     // guarded by mutex
};

incremental_tree_hash::incremental_tree_hash(std::unique_ptr<state> s) noexcept : state_(std::move(s)) {}
incremental_tree_hash::~incremental_tree_hash() = default;
incremental_tree_hash::incremental_tree_hash(incremental_tree_hash&&) noexcept = default;
incremental_tree_hash& incremental_tree_hash::operator=(incremental_tree_hash&&) noexcept = default;

result<incremental_tree_hash> incremental_tree_hash::create(std::uint64_t total_size) {
  if (total_size == 0) {
    return fail(errc::invalid_argument, "cannot start a tree hash: total_size is 0");
  }
  auto s = std::make_unique<state>();
  s->total_size = total_size;
  const auto leaves = static_cast<std::size_t>(hash::leaf_count(total_size));
  s->leaves.resize(leaves);
  s->present.resize(leaves, false);
  return incremental_tree_hash(std::move(s));
}

std::uint64_t incremental_tree_hash::total_size() const noexcept { return state_->total_size; }

std::uint64_t incremental_tree_hash::leaf_count() const noexcept { return hash::leaf_count(state_->total_size); }

std::uint64_t incremental_tree_hash::leaves_added() const {
  std::lock_guard lock(state_->mutex);
  return state_->added;
}

status incremental_tree_hash::add_leaf(std::uint64_t leaf_index, const digest& leaf) {
  const std::uint64_t leaves = leaf_count();
  if (leaf_index >= leaves) {
    return fail(errc::out_of_range, "cannot add leaf " + std::to_string(leaf_index) + ": a buffer of " +
                                        std::to_string(state_->total_size) + " bytes has " + std::to_string(leaves) +
                                        " leaves");
  }
  std::lock_guard lock(state_->mutex);
  const auto i = static_cast<std::size_t>(leaf_index);
  if (state_->present[i]) {
    return fail(errc::failed_precondition, "cannot add leaf " + std::to_string(leaf_index) + ": it was already added");
  }
  state_->leaves[i] = leaf;
  state_->present[i] = true;
  ++state_->added;
  return {};
}

bool incremental_tree_hash::complete() const {
  std::lock_guard lock(state_->mutex);
  return state_->added == state_->leaves.size();
}

result<digest> incremental_tree_hash::finish() const {
  std::lock_guard lock(state_->mutex);
  if (state_->added != state_->leaves.size()) {
    const auto first = std::find(state_->present.begin(), state_->present.end(), false);
    const auto missing = state_->leaves.size() - state_->added;
    return fail(errc::failed_precondition, "cannot finish tree hash: leaf " +
                                               std::to_string(std::distance(state_->present.begin(), first)) +
                                               " is missing (" + std::to_string(missing) + " of " +
                                               std::to_string(state_->leaves.size()) + " leaves missing)");
  }
  return tree_root(state_->leaves);
}

}  // namespace tensorreg::hash
