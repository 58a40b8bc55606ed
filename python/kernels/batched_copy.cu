// One launch that copies many device buffers: WeightSubscriber.load_into()'s copy of a version
// into the reader's own tensors (python/tensorreg/_batched_copy.py). Compiled to PTX by
// python/tools/regen_batched_copy_ptx.sh; the driver JIT-compiles that PTX for the GPU at hand,
// so the Python client ships no binary and needs no compiler.
//
// The host cuts every (src, dst, bytes) pair into chunks of at most 1 MiB and
// uploads the table once per layout; each block walks the chunks grid-stride. One launch for a
// thousand tensors keeps the GPU busy from the first byte to the last: a launch per tensor (or
// torch's multi-tensor copy, a launch per few hundred blocks) leaves gaps between launches that
// cost a third of the copy rate on 16 MiB tensors.

#include <cstdint>

struct copy_chunk {
  const unsigned char* src;
  unsigned char* dst;
  unsigned long long bytes;
  unsigned long long unit;  // the widest of 16, 8, 4, 2, 1 dividing src, dst and bytes
};

template <typename T>
__device__ void copy_units(const T* __restrict__ src, T* __restrict__ dst, unsigned long long n) {
  constexpr unsigned kUnroll = 4;
  const unsigned long long stride = blockDim.x;
  unsigned long long i = threadIdx.x;
  for (; i + (kUnroll - 1) * stride < n; i += kUnroll * stride) {
    T v[kUnroll];
#pragma unroll
    for (unsigned k = 0; k < kUnroll; ++k) v[k] = src[i + k * stride];
#pragma unroll
    for (unsigned k = 0; k < kUnroll; ++k) dst[i + k * stride] = v[k];
  }
  for (; i < n; i += stride) dst[i] = src[i];
}

extern "C" __global__ void tensorreg_batched_copy(const copy_chunk* __restrict__ chunks, unsigned long long count) {
  for (unsigned long long c = blockIdx.x; c < count; c += gridDim.x) {
    const copy_chunk chunk = chunks[c];
    switch (chunk.unit) {
      case 16:
        copy_units(reinterpret_cast<const uint4*>(chunk.src), reinterpret_cast<uint4*>(chunk.dst), chunk.bytes / 16);
        break;
      case 8:
        copy_units(reinterpret_cast<const std::uint64_t*>(chunk.src), reinterpret_cast<std::uint64_t*>(chunk.dst),
                   chunk.bytes / 8);
        break;
      case 4:
        copy_units(reinterpret_cast<const std::uint32_t*>(chunk.src), reinterpret_cast<std::uint32_t*>(chunk.dst),
                   chunk.bytes / 4);
        break;
      case 2:
        copy_units(reinterpret_cast<const std::uint16_t*>(chunk.src), reinterpret_cast<std::uint16_t*>(chunk.dst),
                   chunk.bytes / 2);
        break;
      default:
        copy_units(chunk.src, chunk.dst, chunk.bytes);
        break;
    }
  }
}
