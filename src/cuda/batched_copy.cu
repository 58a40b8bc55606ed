// src/cuda/batched_copy.cu — the batched copy kernel: a whole snapshot (registration.md §5.4)
// in one launch.
//
// A snapshot is a thousand runs of device memory, one per tensor or allocation; one copy
// launch each leaves the GPU idle between launches for about a third of the time
// (cuda_snapshot_bench: 0.6× of one plain copy of the same bytes). Here a fixed grid of
// resident blocks walks a table of chunks of at most 1 MiB by default (copy_plan.hpp)
// grid-stride, one chunk per block at a time, so the GPU streams from the first byte to the
// last. Bytes no run covers are chunks of zeros in the same table.
#include "cuda/batched_copy_kernel.hpp"

#include <cstdint>

#include "cuda/batched_copy_device.cuh"

namespace tensorreg::cuda::detail {
namespace {

// 8 blocks of 256 threads fill an SM (2048 threads): registers must stay ≤ 32 per thread.
__global__ void __launch_bounds__(batched_copy_threads, 8)
    batched_copy_kernel(const copy_chunk* __restrict__ chunks, std::uint64_t count, unsigned char* base) {
  for (std::uint64_t c = blockIdx.x; c < count; c += gridDim.x) {
    const copy_chunk chunk = chunks[c];
    copy_one_chunk(chunk, base, threadIdx.x, blockDim.x);
  }
}

}  // namespace

cudaError_t launch_batched_copy_kernel(const copy_chunk* chunks, std::uint64_t count, unsigned char* base,
                                       unsigned blocks, cudaStream_t stream) {
  if (reinterpret_cast<std::uintptr_t>(base) % 16 != 0) return cudaErrorMisalignedAddress;
  if (count == 0) return cudaSuccess;
  batched_copy_kernel<<<blocks, batched_copy_threads, 0, stream>>>(chunks, count, base);
  return cudaGetLastError();
}

}  // namespace tensorreg::cuda::detail
