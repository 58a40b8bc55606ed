// src/cuda/copy_plan.hpp — the table one launch of the batched copy kernel walks to fill a
// snapshot (private to src/cuda/; plain C++, so tensorreg_gpu_host_tests checks it on a machine
// without a GPU).
//
// A snapshot of a canonical buffer is its device runs (device_piece: bytes at `at`, read from
// `src`) with zeros everywhere else. The plan cuts [0, size) into chunks so that every byte is in
// exactly one: bytes of a run are copied from device memory, bytes no run covers (PAD, holes
// between tensors) are written as zeros by the same launch, so a snapshot needs no memsets of
// its own. A chunk holds at most `chunk_bytes` (1 MiB by default): the kernel's blocks walk
// the table grid-stride, and with chunks that small every block gets about the same work however
// the runs' sizes vary (the Python client's kernel, with the same chunks, copied at 0.90× of a
// plain device copy, benchmarks/RESULTS.md "batched copy kernel").
//
// Each chunk is copied in units of 16, 8, 4, 2 or 1 bytes, the widest that divides its source
// address, its destination offset and its length. So that a run's bulk goes in the widest unit
// its source and destination allow, a run is cut where its destination reaches that unit's
// boundary: a head shorter than the unit, the body in whole units, a tail shorter than the unit.
// A state dict's runs start and end on 16-byte boundaries on both sides and are all body; a run
// whose source and destination differ modulo 16 (a tensor at an odd offset of its allocation)
// gets the widest unit they agree on, down to single bytes.
//
// Thread-safety: pure functions and values.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "tensorreg/cuda/gpu_tree_hash.hpp"

namespace tensorreg::cuda::detail {

/// One block-sized piece of work of the batched copy kernel: `bytes` bytes to offset `dst` of
/// the destination buffer, copied from `src` (device memory), or zeros when `src` is null, in
/// units of `unit` bytes (a power of two ≤ 16 dividing src, dst and bytes).
struct copy_chunk {
  const unsigned char* src;
  std::uint64_t dst;
  std::uint32_t bytes;
  std::uint32_t unit;
};
static_assert(sizeof(copy_chunk) == 24, "the table's layout is shared with device code");

/// The most bytes of a chunk by default.
inline constexpr std::uint64_t default_copy_chunk_bytes = std::uint64_t{1} << 20;

/// The widest unit (16, 8, 4, 2, 1) dividing all three.
[[nodiscard]] constexpr std::uint32_t copy_unit(std::uint64_t src, std::uint64_t dst, std::uint64_t bytes) noexcept {
  const std::uint64_t bits = src | dst | bytes;
  for (std::uint32_t unit = 16; unit > 1; unit /= 2) {
    if (bits % unit == 0) return unit;
  }
  return 1;
}

/// Blocks of one launch over `chunks` chunks on a device of `sm_count` multiprocessors:
/// `blocks_per_sm` on each (all resident at once; they walk the table grid-stride, so more
/// would only queue), never more than there are chunks, at least 1.
[[nodiscard]] constexpr unsigned copy_grid_blocks(std::uint64_t chunks, int sm_count, unsigned blocks_per_sm) noexcept {
  const std::uint64_t sms = sm_count > 0 ? static_cast<std::uint64_t>(sm_count) : 1;
  const std::uint64_t per_sm = blocks_per_sm > 0 ? blocks_per_sm : 1;
  return static_cast<unsigned>(std::clamp<std::uint64_t>(std::min(chunks, sms * per_sm), 1, 1U << 30));
}

namespace copy_plan_detail {

// `length` bytes to `dst`, from `src` (null: zeros), as head, body and tail chunks.
template <typename Emit>
void emit_span(const unsigned char* src, std::uint64_t dst, std::uint64_t length, std::uint64_t chunk_bytes,
               Emit& emit) {
  // Zeros have no source alignment to agree with: they take the destination's.
  const auto from = src != nullptr ? reinterpret_cast<std::uintptr_t>(src) : static_cast<std::uintptr_t>(dst);
  std::uint64_t unit = 16;
  while (unit > 1 && from % unit != dst % unit) unit /= 2;
  const std::uint64_t head = std::min(length, (unit - dst % unit) % unit);
  const std::uint64_t body = (length - head) / unit * unit;
  std::uint64_t at = 0;
  const auto piece = [&](std::uint64_t n) {
    const unsigned char* s = src != nullptr ? src + at : nullptr;
    emit(copy_chunk{s, dst + at, static_cast<std::uint32_t>(n), copy_unit(from + at, dst + at, n)});
    at += n;
  };
  if (head > 0) piece(head);
  for (std::uint64_t left = body; left > 0;) {
    const std::uint64_t n = std::min(left, chunk_bytes);
    piece(n);
    left -= n;
  }
  if (at < length) piece(length - at);
}

}  // namespace copy_plan_detail

/// Calls emit(copy_chunk) for each chunk of a `size`-byte buffer holding `runs` and zeros
/// elsewhere, in order of destination.
/// REQUIRES: runs sorted by `at`, not overlapping, inside [0, size), none empty, no null src;
/// chunk_bytes a multiple of 16 in [16, 2^31].
template <typename Emit>
void for_each_copy_chunk(std::span<const device_piece> runs, std::uint64_t size, std::uint64_t chunk_bytes,
                         Emit&& emit) {
  std::uint64_t at = 0;
  for (const auto& r : runs) {
    if (r.at > at) copy_plan_detail::emit_span(nullptr, at, r.at - at, chunk_bytes, emit);
    copy_plan_detail::emit_span(static_cast<const unsigned char*>(r.src), r.at, r.length, chunk_bytes, emit);
    at = r.at + r.length;
  }
  if (size > at) copy_plan_detail::emit_span(nullptr, at, size - at, chunk_bytes, emit);
}

/// How many chunks for_each_copy_chunk makes (to size a table before filling it).
[[nodiscard]] inline std::uint64_t count_copy_chunks(std::span<const device_piece> runs, std::uint64_t size,
                                                     std::uint64_t chunk_bytes) {
  std::uint64_t n = 0;
  for_each_copy_chunk(runs, size, chunk_bytes, [&n](const copy_chunk&) { ++n; });
  return n;
}

/// The chunks as a vector.
[[nodiscard]] inline std::vector<copy_chunk> plan_copy_chunks(std::span<const device_piece> runs, std::uint64_t size,
                                                              std::uint64_t chunk_bytes = default_copy_chunk_bytes) {
  std::vector<copy_chunk> out;
  for_each_copy_chunk(runs, size, chunk_bytes, [&out](const copy_chunk& c) { out.push_back(c); });
  return out;
}

}  // namespace tensorreg::cuda::detail
