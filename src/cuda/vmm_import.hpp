// src/cuda/vmm_import.hpp — CUDA VMM imports (private to src/cuda/): the driver's virtual
// memory entry points and `vmm_import`, the owner of one imported chain of allocations mapped
// back to back (docs/wire-format.md §12).
//
// The entry points are reached through cudaGetDriverEntryPointByVersion, like
// cuMemGetAddressRange in device_memory_provider.cpp, so nothing links libcuda.so.
//
// Unlike PyTorch's import of an expandable segment, which reserves about 9/8 of the GPU's
// memory of address space per import (and so runs out of it after some dozens of imports), an
// import here reserves exactly the bytes it maps, rounded up to the allocation granularity.
//
// Thread-safety: a vmm_driver is immutable after load(); distinct vmm_imports may be created
// and destroyed concurrently. Ownership: a vmm_import owns its handles (one per chunk,
// cuMemRelease), its reservation (cuMemAddressFree) and its mappings (cuMemUnmap); it never
// owns the caller's fds (the driver dups what it keeps).
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tensorreg/common/error.hpp"

namespace tensorreg::cuda::detail {

/// The driver's VMM entry points.
struct vmm_driver {
  PFN_cuMemImportFromShareableHandle_v10020 import_handle = nullptr;
  PFN_cuMemGetAllocationPropertiesFromHandle_v10020 properties = nullptr;
  PFN_cuMemGetAllocationGranularity_v10020 granularity = nullptr;
  PFN_cuMemAddressReserve_v10020 reserve = nullptr;
  PFN_cuMemAddressFree_v10020 address_free = nullptr;
  PFN_cuMemMap_v10020 map = nullptr;
  PFN_cuMemUnmap_v10020 unmap = nullptr;
  PFN_cuMemSetAccess_v10020 set_access = nullptr;
  PFN_cuMemRelease_v10020 release = nullptr;
  PFN_cuGetErrorName_v6000 error_name = nullptr;
  /// The first entry point the driver lacks; empty when it has them all.
  std::string missing;

  /// Finds every entry point. Never fails: a driver without the VMM API leaves `missing` set,
  /// so imports fail FAILED_PRECONDITION while CUDA IPC keeps working.
  [[nodiscard]] static vmm_driver load();

  /// "CUDA_ERROR_INVALID_VALUE", or "CUresult N" when the driver cannot name it.
  [[nodiscard]] std::string describe(CUresult r) const;

  /// The minimum allocation granularity of pinned device memory exportable as a POSIX fd on
  /// `device` (what cuMemCreate sizes and cuMemMap offsets are multiples of).
  /// REQUIRES: missing is empty. Errors: FAILED_PRECONDITION / INTERNAL with the driver's error.
  [[nodiscard]] result<std::uint64_t> device_granularity(int device) const;
};

/// One imported chain of VMM allocations, mapped back to back and readable by its device.
/// Move-only.
class vmm_import {
 public:
  /// Imports each of `fds` (cuMemImportFromShareableHandle, POSIX fd), checks that its memory
  /// lives on `device`, reserves sum(chunk_bytes) rounded up to `granularity`, maps chunk i
  /// (allocation i, of chunk_bytes[i] bytes: the driver maps whole allocations only) after
  /// chunk i - 1, and grants
  /// `device` read access. Whatever was done is undone when a step fails. `what` prefixes
  /// every message ("cannot import CUDA VMM memory of process 7 on device 0").
  /// REQUIRES: driver.missing is empty and `driver` outlives the result; `device`'s primary
  /// context is current on the calling thread.
  /// Errors: INVALID_ARGUMENT (bad chunk list as devices::vmm_reservation_bytes; an fd that
  /// does not import; a chunk size other than its allocation's), FAILED_PRECONDITION (memory of
  /// another device or of the host), RESOURCE_EXHAUSTED (address space or memory), INTERNAL.
  [[nodiscard]] static result<vmm_import> create(const vmm_driver& driver, int device, std::span<const int> fds,
                                                 std::span<const std::uint64_t> chunk_bytes, std::uint64_t granularity,
                                                 std::string_view what);

  /// Unmaps, frees the reservation and releases every handle; failures go to stderr, a driver
  /// that is already shutting down (process exit) is tolerated.
  /// REQUIRES: the device's context is current (the driver needs one to unmap).
  ~vmm_import();
  vmm_import(vmm_import&& other) noexcept;
  vmm_import& operator=(vmm_import&&) = delete;
  vmm_import(const vmm_import&) = delete;
  vmm_import& operator=(const vmm_import&) = delete;

  /// The first mapped byte.
  [[nodiscard]] void* pointer() const noexcept { return reinterpret_cast<void*>(base_); }
  /// sum(chunk_bytes): the bytes readable from pointer().
  [[nodiscard]] std::uint64_t size() const noexcept { return mapped_; }
  /// Address space reserved: size() rounded up to the granularity.
  [[nodiscard]] std::uint64_t reserved_bytes() const noexcept { return reserved_; }
  /// Whether the driver granted read-only access (else read-write: see create()).
  [[nodiscard]] bool read_only() const noexcept { return read_only_; }

 private:
  explicit vmm_import(const vmm_driver& driver) noexcept : driver_(&driver) {}

  struct chunk {
    CUmemGenericAllocationHandle handle = 0;
    std::uint64_t bytes = 0;
    bool mapped = false;
  };

  const vmm_driver* driver_;
  std::vector<chunk> chunks_;
  CUdeviceptr base_ = 0;
  std::uint64_t reserved_ = 0;  // 0 until the reservation is made
  std::uint64_t mapped_ = 0;
  bool read_only_ = false;
};

}  // namespace tensorreg::cuda::detail
