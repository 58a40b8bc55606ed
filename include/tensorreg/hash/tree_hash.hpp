// tensorreg/hash/tree_hash.hpp — the data hash of an artifact (registration.md §3.3,
// DECISIONS §5.1).
//
// Provides the 4 MiB-leaf binary SHA-256 tree: leaves are SHA-256 of consecutive
// `leaf_bytes` chunks of the canonical buffer (the last may be short); each parent is
// SHA-256(left ‖ right); an odd last node is promoted unchanged to the next level; one leaf
// is its own root. Zero leaves give 32 zero bytes — a documented sentinel, not SHA-256 of
// empty input; every data-hash entry point of the engine rejects total_size 0 before getting
// here. Leaves are always 4 MiB, never adaptive, so CPU and GPU paths agree bit for bit.
//
//   * `tree_hash` / `leaf_digests` / `hash_leaf` read a `memory::byte_source` in place (its
//     pieces are fed straight into SHA-256, no copy), optionally over a `thread_pool`; the
//     result never depends on the number of threads.
//   * `tree_root` folds given leaf digests.
//   * `incremental_tree_hash` collects leaf digests in any order (streaming ingest) and folds
//     them once complete.
//
// Thread-safety: the free functions are reentrant; the source must allow concurrent visits
// (every byte_source does). `incremental_tree_hash` is safe to use from many threads at once.
// Ownership: nothing here keeps a reference to a source or pool after returning.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "tensorreg/common/error.hpp"
#include "tensorreg/common/function_ref.hpp"
#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/memory/byte_source.hpp"

namespace tensorreg {
class thread_pool;
}

namespace tensorreg::hash {

/// Leaf size of the data tree hash: 4 MiB, fixed.
inline constexpr std::uint64_t leaf_bytes = std::uint64_t{4} << 20;

/// Number of leaves of a buffer of `total_size` bytes (0 for 0).
[[nodiscard]] constexpr std::uint64_t leaf_count(std::uint64_t total_size) noexcept {
  return total_size / leaf_bytes + (total_size % leaf_bytes != 0 ? 1 : 0);
}

/// Root of the tree over `leaves` (in order). One leaf → that leaf; none → 32 zero bytes.
[[nodiscard]] digest tree_root(std::span<const digest> leaves);

/// SHA-256 of leaf `leaf_index` of `source`: bytes [i·leaf_bytes, min((i+1)·leaf_bytes, size)).
/// Errors: OUT_OF_RANGE if leaf_index >= leaf_count(source.size()); whatever source.visit()
/// returns.
[[nodiscard]] result<digest> hash_leaf(const memory::byte_source& source, std::uint64_t leaf_index);

/// Every leaf digest of `source`, in order, hashed over `pool` and the calling thread (a null
/// pool means the calling thread alone). A source of size 0 has no leaves.
/// Errors: the first error of source.visit() (OUT_OF_RANGE, DATA_LOSS, …).
[[nodiscard]] result<std::vector<digest>> leaf_digests(const memory::byte_source& source, thread_pool* pool = nullptr);

/// How leaf_digests() splits the leaves of a buffer of `size` bytes into jobs for `threads`
/// threads. Where SHA-NI can hash two messages at once on one core (two_lane_sha256), job j <
/// `pairs` is the two whole leaves 2j and 2j + 1, and the jobs after them are one leaf each,
/// from leaf 2·pairs on (an odd whole leaf, a short last one). Pairs are made only while every
/// thread still gets two or more: a pair keeps one core longer than one leaf does.
struct leaf_jobs {
  std::size_t pairs = 0;
  std::size_t count = 0;  // jobs in all
  /// The first leaf of job j.
  [[nodiscard]] std::size_t first_leaf(std::size_t j) const noexcept { return j < pairs ? 2 * j : pairs + j; }
};
[[nodiscard]] leaf_jobs plan_leaf_jobs(std::uint64_t size, std::size_t threads) noexcept;

/// Sees each piece a hash reads, with its offset in the source.
using piece_seen = function_ref<status(std::uint64_t offset, std::span<const std::byte> piece)>;

/// The digests of the whole leaves `first` and `first` + 1 of `source`, hashed together on
/// this thread (two_lane_sha256; the second leaf is visited inside the first's visit, so that
/// each lane gets equal lengths). For the pairs of plan_leaf_jobs(), which makes them only
/// where SHA-NI is (elsewhere the lanes run a slow portable compression). `seen`, when given,
/// gets every piece of both leaves as the hash reads it (to keep a copy of exactly the bytes
/// hashed).
/// REQUIRES: both leaves whole: (first + 2) · leaf_bytes <= source.size().
/// Errors: whatever source.visit() or `seen` returns.
[[nodiscard]] result<std::array<digest, 2>> hash_leaf_pair(const memory::byte_source& source, std::uint64_t first,
                                                           const piece_seen* seen = nullptr);

/// The digests of two equal-length messages, hashed together (two_lane_sha256): for the pairs
/// of plan_leaf_jobs(), as hash_leaf_pair(). REQUIRES: a.size() == b.size().
[[nodiscard]] std::array<digest, 2> sha256_two(std::span<const std::byte> a, std::span<const std::byte> b);

/// tree_root(leaf_digests(source, pool)): the data hash of `source`. Size 0 gives 32 zero
/// bytes (see above). Errors: as leaf_digests().
[[nodiscard]] result<digest> tree_hash(const memory::byte_source& source, thread_pool* pool = nullptr);

/// Collects the leaf digests of a buffer of known size in any order, from any thread, and
/// folds them into the root once all are present. Move-only.
class incremental_tree_hash {
 public:
  /// A collector for a buffer of `total_size` bytes (leaf_count(total_size) leaves).
  /// Errors: INVALID_ARGUMENT for total_size 0.
  [[nodiscard]] static result<incremental_tree_hash> create(std::uint64_t total_size);

  ~incremental_tree_hash();
  incremental_tree_hash(incremental_tree_hash&&) noexcept;
  incremental_tree_hash& operator=(incremental_tree_hash&&) noexcept;
  incremental_tree_hash(const incremental_tree_hash&) = delete;
  incremental_tree_hash& operator=(const incremental_tree_hash&) = delete;

  [[nodiscard]] std::uint64_t total_size() const noexcept;
  [[nodiscard]] std::uint64_t leaf_count() const noexcept;
  /// Number of leaves added so far.
  [[nodiscard]] std::uint64_t leaves_added() const;

  /// Records the digest of leaf `leaf_index`. Thread-safe.
  /// Errors: OUT_OF_RANGE if leaf_index >= leaf_count(); FAILED_PRECONDITION if that leaf
  /// was already added (the first digest is kept).
  [[nodiscard]] status add_leaf(std::uint64_t leaf_index, const digest& leaf);

  /// True once every leaf has been added.
  [[nodiscard]] bool complete() const;

  /// The root over all leaves. May be called more than once.
  /// Errors: FAILED_PRECONDITION naming the first missing leaf and how many are missing.
  [[nodiscard]] result<digest> finish() const;

 private:
  struct state;
  explicit incremental_tree_hash(std::unique_ptr<state> s) noexcept;
  std::unique_ptr<state> state_;
};

}  // namespace tensorreg::hash
