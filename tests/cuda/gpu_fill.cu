#include "gpu_fill.hpp"

namespace tensorreg::cuda::testing {
namespace {

__host__ __device__ std::uint64_t splitmix(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

__host__ __device__ unsigned char byte_at(std::uint64_t i, std::uint64_t seed) {
  return static_cast<unsigned char>(splitmix(seed + i / 8) >> (8 * (i % 8)));
}

// Byte-exact for any alignment: whole 8-byte words (and the ragged end byte by byte) when
// the start is 8-byte aligned, bytes otherwise.
__global__ void fill_kernel(unsigned char* p, std::uint64_t bytes, std::uint64_t seed) {
  const std::uint64_t stride = static_cast<std::uint64_t>(gridDim.x) * blockDim.x;
  const std::uint64_t first = blockIdx.x * static_cast<std::uint64_t>(blockDim.x) + threadIdx.x;
  const auto address = reinterpret_cast<std::uintptr_t>(p);
  if (address % 8 == 0) {
    const std::uint64_t words = bytes / 8;
    auto* w = reinterpret_cast<std::uint64_t*>(p);
    for (std::uint64_t k = first; k < words; k += stride) w[k] = splitmix(seed + k);
    for (std::uint64_t i = words * 8 + first; i < bytes; i += stride) p[i] = byte_at(i, seed);
  } else {
    for (std::uint64_t i = first; i < bytes; i += stride) p[i] = byte_at(i, seed);
  }
}

}  // namespace

cudaError_t fill_random(void* device_ptr, std::uint64_t bytes, std::uint64_t seed, cudaStream_t stream) {
  if (bytes == 0) return cudaSuccess;
  std::uint64_t blocks = (bytes / 8 + 255) / 256;
  if (blocks < 1) blocks = 1;
  if (blocks > 65536) blocks = 65536;
  fill_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(static_cast<unsigned char*>(device_ptr), bytes, seed);
  return cudaGetLastError();
}

void fill_random_host(std::byte* out, std::uint64_t bytes, std::uint64_t seed) {
  for (std::uint64_t i = 0; i < bytes; ++i) out[i] = static_cast<std::byte>(byte_at(i, seed));
}

std::uint64_t mix64(std::uint64_t x) { return splitmix(x); }

}  // namespace tensorreg::cuda::testing
