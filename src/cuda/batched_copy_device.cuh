// src/cuda/batched_copy_device.cuh — what one block of the batched copy kernel does with one
// chunk (copy_plan.hpp), as __host__ __device__ code (private to src/cuda/): batched_copy.cu
// runs it on the GPU, tensorreg_gpu_host_tests runs it on host memory, one emulated thread
// after another, so its indexing is checked on a machine without a GPU.
//
// The threads of a block stride through the chunk's units together (thread t takes units t,
// t + threads, ...), so a warp's loads and stores are contiguous; each thread loads four units
// before it stores them, so each has four loads in flight instead of one.
//
// Thread-safety: pure functions of their arguments.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/copy_plan.hpp"

// Unrolling hints for the device pass only (the host compiler would warn about them).
#if defined(__CUDA_ARCH__)
#define TENSORREG_COPY_UNROLL _Pragma("unroll")
#else
#define TENSORREG_COPY_UNROLL
#endif

namespace tensorreg::cuda::detail {

/// Units per thread in flight between a load and its store.
inline constexpr unsigned copy_unroll = 4;

/// Copies units [0, n) from `src` to `dst` (zeros when `src` is null): the share of `thread` of
/// `threads` threads. 32-bit indices (a chunk holds at most 2^31 bytes): 64-bit ones cost the
/// registers that 8 resident blocks per SM cannot spare.
template <typename Unit>
__host__ __device__ inline void copy_chunk_units(const Unit* __restrict__ src, Unit* __restrict__ dst, std::uint32_t n,
                                                 unsigned thread, unsigned threads) {
  std::uint32_t i = thread;
  if (src == nullptr) {
    const Unit zero{};
    for (; i < n; i += threads) dst[i] = zero;
    return;
  }
  const std::uint32_t span = (copy_unroll - 1) * threads;
  for (; i + span < n; i += copy_unroll * threads) {
    Unit v[copy_unroll];
    TENSORREG_COPY_UNROLL
    for (unsigned k = 0; k < copy_unroll; ++k) v[k] = src[i + k * threads];
    TENSORREG_COPY_UNROLL
    for (unsigned k = 0; k < copy_unroll; ++k) dst[i + k * threads] = v[k];
  }
  for (; i < n; i += threads) dst[i] = src[i];
}

template <typename Unit>
__host__ __device__ inline void copy_chunk_as(const copy_chunk& c, unsigned char* base, unsigned thread,
                                              unsigned threads) {
  copy_chunk_units(reinterpret_cast<const Unit*>(c.src), reinterpret_cast<Unit*>(base + c.dst),
                   static_cast<std::uint32_t>(c.bytes / sizeof(Unit)), thread, threads);
}

/// The share of `thread` of `threads` of chunk `c` of a destination buffer at `base`.
/// REQUIRES: base 16-byte aligned (the plan's units divide offsets, not addresses).
__host__ __device__ inline void copy_one_chunk(const copy_chunk& c, unsigned char* base, unsigned thread,
                                               unsigned threads) {
  switch (c.unit) {
    case 16: copy_chunk_as<uint4>(c, base, thread, threads); break;
    case 8: copy_chunk_as<std::uint64_t>(c, base, thread, threads); break;
    case 4: copy_chunk_as<std::uint32_t>(c, base, thread, threads); break;
    case 2: copy_chunk_as<std::uint16_t>(c, base, thread, threads); break;
    default: copy_chunk_as<unsigned char>(c, base, thread, threads); break;
  }
}

}  // namespace tensorreg::cuda::detail
