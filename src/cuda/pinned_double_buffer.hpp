// src/cuda/pinned_double_buffer.hpp — a pinned host buffer of two halves with its own stream and
// an event per half, bound to one device (private to src/cuda/).
//
// What both D2H paths use to overlap a copy with the work on what it brought: the staged visit()
// of device sources (device_memory_provider.cpp) and the bulk copier's workers (bulk_copy.cpp)
// copy chunk i + 1 into one half while the host reads chunk i from the other, waiting on that
// half's event.
// A buffer of half_bytes 0 has no host memory: a stream with its events only.
//
// Thread-safety: one user at a time. Ownership: owns its pinned memory, stream and events,
// released on `device` (noexcept, quiet when the runtime is already unloading).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "cuda/cuda_check.hpp"

namespace tensorreg::cuda::detail {

struct pinned_double_buffer {
  int device = 0;
  std::uint64_t half_bytes = 0;  // bytes per half; 0 when there is no host memory
  std::byte* host = nullptr;     // 2 × half_bytes, page-locked
  cudaStream_t stream = nullptr;
  cudaEvent_t done[2] = {nullptr, nullptr};

  /// A buffer of two halves of `half_bytes` on `device`, which must be current.
  /// Errors: RESOURCE_EXHAUSTED (no pinned memory), other CUDA errors (check()).
  [[nodiscard]] static result<std::unique_ptr<pinned_double_buffer>> create(int device, std::uint64_t half_bytes) {
    auto b = std::make_unique<pinned_double_buffer>();
    b->device = device;
    b->half_bytes = half_bytes;
    if (half_bytes > 0) {
      void* host = nullptr;
      TENSORREG_CUDA_TRY(cudaHostAlloc(&host, 2 * half_bytes, cudaHostAllocDefault),
                         "allocate " + std::to_string(2 * half_bytes) + " bytes of pinned staging memory");
      b->host = static_cast<std::byte*>(host);
    }
    TENSORREG_CUDA_TRY(cudaStreamCreateWithFlags(&b->stream, cudaStreamNonBlocking), "create a staging stream");
    for (auto& ev : b->done) {
      TENSORREG_CUDA_TRY(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "create a staging event");
    }
    return b;
  }

  pinned_double_buffer() = default;
  pinned_double_buffer(const pinned_double_buffer&) = delete;
  pinned_double_buffer& operator=(const pinned_double_buffer&) = delete;
  ~pinned_double_buffer() {
    release_device_guard guard(device);
    for (auto* ev : done) {
      if (ev != nullptr) check_release(cudaEventDestroy(ev), "destroy a staging event");
    }
    if (stream != nullptr) check_release(cudaStreamDestroy(stream), "destroy a staging stream");
    if (host != nullptr) check_release(cudaFreeHost(host), "free a pinned staging buffer");
  }
};

}  // namespace tensorreg::cuda::detail
