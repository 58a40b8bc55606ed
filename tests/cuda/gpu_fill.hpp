// tests/cuda/gpu_fill.hpp — deterministic pseudo-random bytes written on the GPU, for the GPU
// tests and benchmark (no huge host copies to make test data).
//
// Byte i of stream `seed` is byte (i mod 8) (little-endian) of splitmix64(seed + i / 8), so
// the host can compute any byte too (fill_random_host).
// Thread-safety: reentrant. Ownership: the caller owns the buffers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace tensorreg::cuda::testing {

/// Enqueues writing `bytes` pseudo-random bytes of stream `seed` at `device_ptr` (any
/// alignment) on `stream`. Returns the launch error, if any.
cudaError_t fill_random(void* device_ptr, std::uint64_t bytes, std::uint64_t seed, cudaStream_t stream = nullptr);

/// The same bytes on the host.
void fill_random_host(std::byte* out, std::uint64_t bytes, std::uint64_t seed);

/// splitmix64 finaliser of x (the generator of both functions).
std::uint64_t mix64(std::uint64_t x);

}  // namespace tensorreg::cuda::testing
