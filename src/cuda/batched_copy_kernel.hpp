// src/cuda/batched_copy_kernel.hpp — the launcher of the batched copy kernel (private to
// src/cuda/).
//
// batched_copy.cu holds the kernel; this header lets plain C++ (batched_copier.cpp, compiled by
// the host compiler with the project's warnings) enqueue it. One launch writes a whole snapshot
// from a device table of chunks (copy_plan.hpp).
//
// Thread-safety: the launcher only enqueues work on the given stream; it is reentrant.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/copy_plan.hpp"

namespace tensorreg::cuda::detail {

/// Threads per block of the batched copy kernel.
inline constexpr unsigned batched_copy_threads = 256;

/// Enqueues the batched copy kernel: `blocks` blocks of batched_copy_threads walk the `count`
/// chunks at `chunks` (a device array) grid-stride, each chunk written into the buffer at
/// `base` by one block. Returns the launch error (cudaGetLastError), if any;
/// cudaErrorMisalignedAddress when `base` is not 16-byte aligned.
/// REQUIRES: chunks that do not overlap in the buffer and lie inside it; blocks ≥ 1.
cudaError_t launch_batched_copy_kernel(const copy_chunk* chunks, std::uint64_t count, unsigned char* base,
                                       unsigned blocks, cudaStream_t stream);

}  // namespace tensorreg::cuda::detail
