// src/cuda/tree_hash_kernels.hpp — launchers of the tree-hash kernels (private to src/cuda/).
//
// tree_hash.cu holds the kernels; this header lets plain C++ (gpu_tree_hash.cpp, compiled by
// the host compiler with the project's warnings) enqueue them. Digests travel in device memory
// as 8 native 32-bit state words each (see sha256_device.cuh).
//
// Thread-safety: the launchers only enqueue work on the given stream; they are reentrant.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/leaf_plan.hpp"

namespace tensorreg::cuda::detail {

/// How the 64 SHA-256 rounds of the leaf kernel are laid out (sha256_device.cuh).
enum class leaf_kernel_variant : std::uint8_t {
  full_unroll,          ///< 64 rounds inline, constants as immediates
  rolled,               ///< rounds 16..63 as a 3-turn loop over a 16-round body
  full_unroll_steered,  ///< full_unroll with additions and σ shifts on the FMA pipe (fma_steer)
  rolled_steered,       ///< rolled with additions and σ shifts on the FMA pipe (fma_steer)
};

/// Every variant, for tests and the benchmark.
inline constexpr leaf_kernel_variant all_leaf_variants[] = {
    leaf_kernel_variant::full_unroll, leaf_kernel_variant::rolled, leaf_kernel_variant::full_unroll_steered,
    leaf_kernel_variant::rolled_steered};

/// A short name of a variant ("rolled_steered").
[[nodiscard]] const char* variant_name(leaf_kernel_variant v) noexcept;

/// The variant tree_hash uses.
inline constexpr leaf_kernel_variant default_leaf_variant = leaf_kernel_variant::rolled_steered;

/// Threads per block of the leaf kernel for `leaves` leaves on a device with `sm_count`
/// multiprocessors: enough warps per block (1..4) that the blocks need at most one per SM,
/// so each warp gets a scheduler of its own whenever there are at most 4 warps per SM.
[[nodiscard]] unsigned leaf_threads_per_block(std::uint64_t leaves, int sm_count) noexcept;

/// Enqueues the leaf kernel: leaf i of the `size` bytes at `data` (bytes [i·4 MiB,
/// min((i+1)·4 MiB, size))) gets its state words at leaf_words[8i..8i+7], one thread per
/// leaf. Picks 128-bit, 32-bit or byte loads from the alignment of `data`.
/// REQUIRES: size > 0; leaves == ceil(size / 4 MiB) < 2^31; threads_per_block in {32,64,96,128}.
/// Returns the launch error (cudaGetLastError), if any.
cudaError_t launch_leaf_kernel(const void* data, std::uint64_t size, std::uint32_t leaves, std::uint32_t* leaf_words,
                               unsigned threads_per_block, cudaStream_t stream,
                               leaf_kernel_variant variant = default_leaf_variant);

/// How the leaf kernel over a leaf plan steps from block to block (sha256_device.cuh):
/// `branching` tests for zero blocks and the last block each time, `flat` reads zero blocks
/// from device memory and loads every block unconditionally.
enum class segment_walk : std::uint8_t { branching, flat };

/// The walk tree_hash_pieces uses.
inline constexpr segment_walk default_segment_walk = segment_walk::flat;

/// Enqueues the leaf kernel over a leaf plan (leaf_plan.hpp): leaf i of a `size`-byte buffer
/// (4 MiB, the last one what is left) is read from segments[first[i] .. first[i + 1]) (device
/// arrays). Otherwise as launch_leaf_kernel with the default variant.
/// REQUIRES: the plan's rules (16-byte aligned addresses, tails after the last segment).
cudaError_t launch_leaf_segments_kernel(const leaf_segment* segments, const std::uint32_t* first, std::uint64_t size,
                                        std::uint32_t leaves, std::uint32_t* leaf_words, unsigned threads_per_block,
                                        cudaStream_t stream, segment_walk walk = default_segment_walk);

/// Enqueues the gather kernel: one block per task of `tasks` (a device array of `count`),
/// 16-byte stores where the addresses allow, bytes elsewhere. Tasks must not overlap in the
/// buffer. REQUIRES: count ≥ 1 and < 2^31.
cudaError_t launch_gather_kernel(const gather_task* tasks, std::uint32_t count, unsigned char* base,
                                 cudaStream_t stream);

/// Enqueues the tree fold over `leaves` digests at level_a (overwritten), using level_b
/// (room for ceil(leaves/2) digests) as the other half of a ping-pong pair; the root's state
/// words go to root_words[0..7]. Wide levels get one launch each; the last ≤ 1024 nodes are
/// folded by one block looping over the levels. REQUIRES: leaves ≥ 1.
cudaError_t launch_tree_kernels(std::uint32_t* level_a, std::uint32_t* level_b, std::uint32_t leaves,
                                std::uint32_t* root_words, cudaStream_t stream);

/// Enqueues the leaf kernel as one block of one thread over the first min(size, 4 MiB)
/// bytes at `data` (one leaf): the latency floor every size is measured against. Writes the
/// state words to out_words[0..7]. REQUIRES: data 16-byte aligned.
cudaError_t launch_single_leaf_floor(const void* data, std::uint64_t size, std::uint32_t* out_words,
                                     cudaStream_t stream, leaf_kernel_variant variant = default_leaf_variant);

}  // namespace tensorreg::cuda::detail
