// src/cuda/leaf_plan.hpp — how gpu_tree_hasher::tree_hash_pieces feeds the leaf kernel a canonical
// buffer made of pieces (private to src/cuda/; plain C++, so tensorreg_gpu_host_tests checks it
// on a machine without a GPU).
//
// Each 4 MiB leaf becomes a short list of segments, each a run of whole 64-byte blocks read from
// one 16-byte aligned device address, or zero blocks (PAD, gaps): the leaf kernel streams a
// leaf's blocks across its segments (sha256_segment_words, sha256_device.cuh). A leaf whose
// piece or gap boundaries do not fall on its 64-byte blocks, or whose address is not 16-byte
// aligned, is gathered instead: copied (gather_task, one block of the gather kernel each) into
// a slot of a gather buffer and read from there as one segment.
//
// Thread-safety: pure functions and values.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "tensorreg/cuda/gpu_tree_hash.hpp"
#include "tensorreg/hash/tree_hash.hpp"

namespace tensorreg::cuda::detail {

/// `blocks` 64-byte blocks at device address `address`, or zero blocks when `address` is 0. The
/// last segment of a leaf also holds its tail (the bytes after the whole blocks) right after
/// its blocks; only that segment may have 0 blocks.
struct leaf_segment {
  std::uint64_t address;
  std::uint64_t blocks;
};

/// One block's work in the gather kernel: `length` bytes to `dst_offset` of the gather buffer,
/// copied from `src`, or zeros when `src` is null.
struct gather_task {
  const unsigned char* src;
  std::uint64_t dst_offset;
  std::uint64_t length;
};

/// The most bytes one gather_task carries (longer copies are split).
inline constexpr std::uint64_t gather_task_bytes = std::uint64_t{256} << 10;

/// What the leaf kernel and the gather kernel are given.
struct leaf_plan {
  std::vector<leaf_segment> segments;
  /// leaves + 1 entries: leaf i's segments are segments[first[i] .. first[i + 1]).
  std::vector<std::uint32_t> first;
  /// Segments whose address is an offset into the gather buffer until rebase().
  std::vector<std::uint32_t> gathered;
  std::vector<gather_task> tasks;
  std::uint64_t gather_bytes = 0;

  /// Turns the gathered segments' offsets into addresses in the buffer at `base`.
  void rebase(std::uint64_t base) {
    for (const auto i : gathered) segments[i].address += base;
  }
};

namespace leaf_plan_detail {

inline void add_tasks(leaf_plan& plan, const unsigned char* src, std::uint64_t dst, std::uint64_t length) {
  while (length > 0) {
    const std::uint64_t n = std::min(length, gather_task_bytes);
    plan.tasks.push_back({src, dst, n});
    if (src != nullptr) src += n;
    dst += n;
    length -= n;
  }
}

// Leaf [lo, hi) as segments over pieces[k..], appended to `out`; false when it must be gathered.
inline bool segment_leaf(const std::vector<device_piece>& pieces, std::size_t k, std::uint64_t lo, std::uint64_t hi,
                         std::vector<leaf_segment>& out) {
  const std::size_t start = out.size();
  const bool has_tail = (hi - lo) % 64 != 0;
  std::uint64_t at = lo;
  const auto add_part = [&](std::uint64_t from, std::uint64_t to, std::uint64_t address) {
    // Every part starts on a block of the leaf; only the leaf's last part may end inside one
    // (its tail), and a tail must be read from memory, not be zeros.
    if ((from - lo) % 64 != 0) return false;
    if (to != hi && (to - lo) % 64 != 0) return false;
    if (to == hi && has_tail && address == 0) return false;
    if (address % 16 != 0) return false;
    const std::uint64_t blocks = (to - from) / 64;
    if (blocks == 0 && to != hi) return false;
    if (address == 0 && out.size() > start && out.back().address == 0) {
      out.back().blocks += blocks;  // gaps next to each other
    } else {
      out.push_back({address, blocks});
    }
    return true;
  };
  for (std::size_t j = k; j < pieces.size() && pieces[j].at < hi; ++j) {
    const auto& p = pieces[j];
    const std::uint64_t from = std::max(lo, p.at);
    const std::uint64_t to = std::min(hi, p.at + p.length);
    if (from > at && !add_part(at, from, 0)) return false;
    const auto address = reinterpret_cast<std::uintptr_t>(p.src) + (from - p.at);
    if (address == 0 || !add_part(from, to, address)) return false;
    at = to;
  }
  if (at < hi && !add_part(at, hi, 0)) return false;
  return true;
}

}  // namespace leaf_plan_detail

/// The plan for a `size`-byte buffer of `pieces` (zeros elsewhere) in `leaves` leaves.
/// REQUIRES: pieces sorted by `at`, not overlapping, not empty, inside [0, size); leaves ==
/// ceil(size / 4 MiB) < 2^31.
inline leaf_plan plan_leaves(const std::vector<device_piece>& pieces, std::uint64_t size, std::uint64_t leaves) {
  constexpr std::uint64_t leaf = hash::leaf_bytes;
  leaf_plan plan;
  plan.first.reserve(leaves + 1);
  plan.segments.reserve(leaves + 2 * pieces.size());
  std::size_t k = 0;  // the first piece that ends after the current leaf's start
  for (std::uint64_t i = 0; i < leaves; ++i) {
    const std::uint64_t lo = i * leaf;
    const std::uint64_t hi = std::min(lo + leaf, size);
    while (k < pieces.size() && pieces[k].at + pieces[k].length <= lo) ++k;
    const auto start = plan.segments.size();
    plan.first.push_back(static_cast<std::uint32_t>(start));
    if (leaf_plan_detail::segment_leaf(pieces, k, lo, hi, plan.segments)) continue;
    plan.segments.resize(start);
    // Gathered: its bytes copied into the next slot, read from there as one segment.
    const std::uint64_t slot = plan.gather_bytes;
    plan.gather_bytes += leaf;
    plan.gathered.push_back(static_cast<std::uint32_t>(start));
    plan.segments.push_back({slot, (hi - lo) / 64});
    std::uint64_t at = lo;
    for (std::size_t j = k; j < pieces.size() && pieces[j].at < hi; ++j) {
      const auto& p = pieces[j];
      const std::uint64_t from = std::max(lo, p.at);
      const std::uint64_t to = std::min(hi, p.at + p.length);
      if (from > at) leaf_plan_detail::add_tasks(plan, nullptr, slot + (at - lo), from - at);
      leaf_plan_detail::add_tasks(plan, static_cast<const unsigned char*>(p.src) + (from - p.at), slot + (from - lo),
                                  to - from);
      at = to;
    }
    if (at < hi) leaf_plan_detail::add_tasks(plan, nullptr, slot + (at - lo), hi - at);
  }
  plan.first.push_back(static_cast<std::uint32_t>(plan.segments.size()));
  return plan;
}

}  // namespace tensorreg::cuda::detail
