// src/cuda/driver_entry.hpp — the CUDA driver's functions, reached through the runtime
// (cudaGetDriverEntryPointByVersion) rather than by linking libcuda.so: a binary built with CUDA
// still starts on a machine without the driver, and then finds no entry points. Private to
// src/cuda/, its tests and its benchmarks.
#pragma once

#include <cuda_runtime_api.h>

namespace tensorreg::cuda::detail {

/// Sets `out` to the driver's function `name` of ABI `version` (3020, 10020, ...: the version
/// in the PFN_<name>_v<version> type of cudaTypedefs.h). Returns false, leaving `out` alone and
/// the runtime's last error cleared, when the driver has no such function.
template <typename Fn>
[[nodiscard]] bool find_driver_entry(Fn& out, const char* name, int version) noexcept {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found{};
  if (cudaGetDriverEntryPointByVersion(name, &fn, static_cast<unsigned>(version), cudaEnableDefault, &found) ==
          cudaSuccess &&
      found == cudaDriverEntryPointSuccess && fn != nullptr) {
    out = reinterpret_cast<Fn>(fn);
    return true;
  }
  static_cast<void>(cudaGetLastError());
  return false;
}

}  // namespace tensorreg::cuda::detail
