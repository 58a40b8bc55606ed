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

/// Makes `device` current and restores the previous device, for release paths: never fails,
/// never throws (a failure is reported by check_release and the release goes on).
class release_device_guard {
 public:
  explicit release_device_guard(int device) noexcept {
    if (cudaGetDevice(&previous_) != cudaSuccess) {
      static_cast<void>(cudaGetLastError());
      return;
    }
    if (previous_ == device) return;
    const cudaError_t e = cudaSetDevice(device);
    check_release(e, "make a CUDA device current to release memory");
    restore_ = e == cudaSuccess;
  }
  ~release_device_guard() {
    if (restore_) check_release(cudaSetDevice(previous_), "restore the current CUDA device");
  }
  release_device_guard(const release_device_guard&) = delete;
  release_device_guard& operator=(const release_device_guard&) = delete;

 private:
  int previous_ = 0;
  bool restore_ = false;
};

}  // namespace tensorreg::cuda::detail

/// Evaluates a CUDA runtime call; on failure returns its error (see check()) from the
/// enclosing function, which must return a tensorreg::result.
#define TENSORREG_CUDA_TRY(call, what) TENSORREG_TRY(::tensorreg::cuda::detail::check((call), (what)))
