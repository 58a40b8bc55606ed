// src/cuda/cuda_check.hpp — checked CUDA runtime calls (private to src/cuda/).
//
// Every CUDA call of the library goes through `check` (or TENSORREG_CUDA_TRY), which turns a
// failure into a tensorreg::error whose message carries cudaGetErrorName and
// cudaGetErrorString: "cannot <what>: cudaErrorMemoryAllocation: out of memory". Release
// paths (destructors) use `check_release`, which is noexcept and stays quiet about
// cudaErrorCudartUnloading (the runtime is already gone at process exit).
//
// Thread-safety: stateless; safe from any thread.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <string_view>

#include "tensorreg/common/error.hpp"

namespace tensorreg::cuda::detail {

/// "cudaErrorInvalidValue: invalid argument".
[[nodiscard]] std::string describe(cudaError_t e);

/// The errc a CUDA error maps to: RESOURCE_EXHAUSTED for allocation failures,
/// FAILED_PRECONDITION for a missing device or driver, INVALID_ARGUMENT for bad values and
/// pointers, INTERNAL otherwise (a kernel fault, a sticky context error).
[[nodiscard]] errc code_of(cudaError_t e) noexcept;

/// OK for cudaSuccess; otherwise error{code_of(e), "cannot <what>: <describe(e)>"}. A failed
/// call's error is also cleared from the runtime's last-error slot (cudaGetLastError), so a
/// later launch check does not report it a second time.
[[nodiscard]] status check(cudaError_t e, std::string_view what);

/// For destructors and release paths: ignores cudaSuccess and cudaErrorCudartUnloading and
/// writes any other error to stderr. Never throws.
void check_release(cudaError_t e, const char* what) noexcept;

/// Makes `device` current for the calling thread and restores the previous device when it
/// goes out of scope (rmm's pattern: callers never see their current device change).
class device_guard {
 public:
  /// Errors: as check() for cudaGetDevice / cudaSetDevice.
  [[nodiscard]] static result<device_guard> create(std::int32_t device);
  ~device_guard();
  device_guard(device_guard&& other) noexcept;
  device_guard& operator=(device_guard&&) = delete;
  device_guard(const device_guard&) = delete;
  device_guard& operator=(const device_guard&) = delete;

 private:
  device_guard(int previous, bool restore) noexcept : previous_(previous), restore_(restore) {}
  int previous_;
  bool restore_;
};

}  // namespace tensorreg::cuda::detail

/// Evaluates a CUDA runtime call; on failure returns its error (see check()) from the
/// enclosing function, which must return a tensorreg::result.
#define TENSORREG_CUDA_TRY(call, what) TENSORREG_TRY(::tensorreg::cuda::detail::check((call), (what)))
