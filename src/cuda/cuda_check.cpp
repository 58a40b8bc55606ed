#include "cuda/cuda_check.hpp"

#include <cstdio>

namespace tensorreg::cuda::detail {

std::string describe(cudaError_t e) {
  const char* name = cudaGetErrorName(e);
  const char* text = cudaGetErrorString(e);
  std::string out = name != nullptr ? name : "cudaError(" + std::to_string(static_cast<int>(e)) + ")";
  out += ": ";
  out += text != nullptr ? text : "unknown error";
  return out;
}

errc code_of(cudaError_t e) noexcept {
  switch (e) {
    case cudaSuccess: return errc::ok;
    case cudaErrorMemoryAllocation:
    case cudaErrorHostMemoryAlreadyRegistered:
    case cudaErrorLaunchOutOfResources: return errc::resource_exhausted;
    case cudaErrorNoDevice:
    case cudaErrorInvalidDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorDevicesUnavailable:
    case cudaErrorNoKernelImageForDevice:
    case cudaErrorUnsupportedPtxVersion:
    case cudaErrorSystemDriverMismatch:
    case cudaErrorCompatNotSupportedOnDevice:
    case cudaErrorStubLibrary:
    case cudaErrorCudartUnloading: return errc::failed_precondition;
    case cudaErrorInvalidValue:
    case cudaErrorInvalidDevicePointer:
    case cudaErrorInvalidResourceHandle: return errc::invalid_argument;
    default: return errc::internal;
  }
}

status check(cudaError_t e, std::string_view what) {
  if (e == cudaSuccess) return {};
  static_cast<void>(cudaGetLastError());  // clear a non-sticky error so it is reported once
  std::string message = "cannot ";
  message += what;
  message += ": ";
  message += describe(e);
  return fail(code_of(e), std::move(message));
}

void check_release(cudaError_t e, const char* what) noexcept {
  if (e == cudaSuccess || e == cudaErrorCudartUnloading) return;
  static_cast<void>(cudaGetLastError());
  const char* name = cudaGetErrorName(e);
  const char* text = cudaGetErrorString(e);
  std::fprintf(stderr, "tensorreg: cannot %s: %s: %s\n", what, name != nullptr ? name : "?",
               text != nullptr ? text : "?");
}

result<device_guard> device_guard::create(std::int32_t device) {
  int previous = 0;
  TENSORREG_CUDA_TRY(cudaGetDevice(&previous), "query the current CUDA device");
  if (previous == device) return device_guard(previous, false);
  TENSORREG_TRY(check(cudaSetDevice(device), "make CUDA device " + std::to_string(device) + " current"));
  return device_guard(previous, true);
}

device_guard::device_guard(device_guard&& other) noexcept : previous_(other.previous_), restore_(other.restore_) {
  other.restore_ = false;
}

device_guard::~device_guard() {
  if (restore_) check_release(cudaSetDevice(previous_), "restore the current CUDA device");
}

}  // namespace tensorreg::cuda::detail
