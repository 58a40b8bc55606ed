#include "cuda/vmm_import.hpp"

#include "cuda/driver_entry.hpp"

#include <cuda_runtime_api.h>

#include <cstdio>
#include <utility>

#include "tensorreg/devices/device_identity.hpp"

namespace tensorreg::cuda::detail {
namespace {

template <typename Fn>
void find(Fn& out, const char* name, int version, std::string& missing) {
  if (!find_driver_entry(out, name, version) && missing.empty()) missing = name;
}

/// The code of a failed driver call: running out of memory or address space is
/// RESOURCE_EXHAUSTED, a driver that cannot do it FAILED_PRECONDITION; `otherwise` for the rest.
errc code_of(CUresult r, errc otherwise) noexcept {
  switch (r) {
    case CUDA_ERROR_OUT_OF_MEMORY: return errc::resource_exhausted;
    case CUDA_ERROR_NOT_SUPPORTED:
    case CUDA_ERROR_NOT_INITIALIZED:
    case CUDA_ERROR_DEINITIALIZED:
    case CUDA_ERROR_NO_DEVICE:
    case CUDA_ERROR_INVALID_DEVICE: return errc::failed_precondition;
    default: return otherwise;
  }
}

void release_check(const vmm_driver& driver, CUresult r, const char* what) noexcept {
  // DEINITIALIZED: the driver is shutting down at process exit and reclaims everything itself.
  if (r == CUDA_SUCCESS || r == CUDA_ERROR_DEINITIALIZED) return;
  const char* name = nullptr;
  if (driver.error_name == nullptr || driver.error_name(r, &name) != CUDA_SUCCESS || name == nullptr) name = "?";
  std::fprintf(stderr, "tensorreg: cannot %s: %s (CUresult %d)\n", what, name, static_cast<int>(r));
}

}  // namespace

vmm_driver vmm_driver::load() {
  vmm_driver d;
  find(d.import_handle, "cuMemImportFromShareableHandle", 10020, d.missing);
  find(d.properties, "cuMemGetAllocationPropertiesFromHandle", 10020, d.missing);
  find(d.granularity, "cuMemGetAllocationGranularity", 10020, d.missing);
  find(d.reserve, "cuMemAddressReserve", 10020, d.missing);
  find(d.address_free, "cuMemAddressFree", 10020, d.missing);
  find(d.map, "cuMemMap", 10020, d.missing);
  find(d.unmap, "cuMemUnmap", 10020, d.missing);
  find(d.set_access, "cuMemSetAccess", 10020, d.missing);
  find(d.release, "cuMemRelease", 10020, d.missing);
  std::string optional;  // messages fall back to the number without it
  find(d.error_name, "cuGetErrorName", 6000, optional);
  return d;
}

std::string vmm_driver::describe(CUresult r) const {
  const char* name = nullptr;
  if (error_name != nullptr && error_name(r, &name) == CUDA_SUCCESS && name != nullptr) return name;
  return "CUresult " + std::to_string(static_cast<int>(r));
}

result<std::uint64_t> vmm_driver::device_granularity(int device) const {
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
  std::size_t g = 0;
  if (const CUresult r = granularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM); r != CUDA_SUCCESS) {
    return fail(code_of(r, errc::internal), "cannot query the VMM allocation granularity of CUDA device " +
                                                std::to_string(device) + ": " + describe(r));
  }
  return static_cast<std::uint64_t>(g);
}

result<vmm_import> vmm_import::create(const vmm_driver& driver, int device, std::span<const int> fds,
                                      std::span<const std::uint64_t> chunk_bytes, std::uint64_t granularity,
                                      std::string_view what) {
  TENSORREG_TRY_ASSIGN(const std::uint64_t reserve,
                       devices::vmm_reservation_bytes(fds.size(), chunk_bytes, granularity, what));
  const std::string prefix = std::string(what) + ": ";
  // Every early return below destroys `out`, whose destructor undoes the steps done so far.
  vmm_import out(driver);
  out.chunks_.reserve(chunk_bytes.size());

  for (std::size_t i = 0; i < fds.size(); ++i) {
    const std::string chunk_name = "chunk " + std::to_string(i) + " (fd " + std::to_string(fds[i]) + ")";
    CUmemGenericAllocationHandle handle = 0;
    // The driver reads the fd and keeps its own reference; the caller's fd stays the caller's.
    const CUresult imported =
        driver.import_handle(&handle, reinterpret_cast<void*>(static_cast<std::uintptr_t>(fds[i])),
                             CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
    if (imported != CUDA_SUCCESS) {
      return fail(code_of(imported, errc::invalid_argument),
                  prefix + "cannot import " + chunk_name + ": " + driver.describe(imported));
    }
    out.chunks_.push_back({handle, chunk_bytes[i], false});
    CUmemAllocationProp prop{};
    if (const CUresult r = driver.properties(&prop, handle); r != CUDA_SUCCESS) {
      return fail(code_of(r, errc::internal),
                  prefix + "cannot query the allocation of " + chunk_name + ": " + driver.describe(r));
    }
    if (prop.location.type != CU_MEM_LOCATION_TYPE_DEVICE) {
      return fail(errc::failed_precondition, prefix + "the memory of " + chunk_name +
                                                 " is not device memory (CUmemLocationType " +
                                                 std::to_string(static_cast<int>(prop.location.type)) + ")");
    }
    if (prop.location.id != device) {
      return fail(errc::failed_precondition,
                  prefix + "the memory of " + chunk_name + " lives on device " + std::to_string(prop.location.id));
    }
  }

  CUdeviceptr base = 0;
  if (const CUresult r = driver.reserve(&base, reserve, 0, 0, 0); r != CUDA_SUCCESS) {
    return fail(code_of(r, errc::resource_exhausted), prefix + "cannot reserve " + std::to_string(reserve) +
                                                          " bytes of address space: " + driver.describe(r));
  }
  out.base_ = base;
  out.reserved_ = reserve;

  std::uint64_t offset = 0;
  for (std::size_t i = 0; i < out.chunks_.size(); ++i) {
    auto& c = out.chunks_[i];
    if (const CUresult r = driver.map(base + offset, c.bytes, 0, c.handle, 0); r != CUDA_SUCCESS) {
      // The reservation is ours and fits, so a refusal here is about the client's chunk size:
      // the driver maps whole allocations only and refuses a chunk larger or smaller than its
      // allocation (CUDA_ERROR_NOT_SUPPORTED). Only running out of memory is not the caller's.
      const errc code = r == CUDA_ERROR_OUT_OF_MEMORY ? errc::resource_exhausted : errc::invalid_argument;
      return fail(code, prefix + "cannot map chunk " + std::to_string(i) + " (" + std::to_string(c.bytes) +
                            " bytes) at offset " + std::to_string(offset) + ": " + driver.describe(r) +
                            " (does the chunk size differ from its allocation's?)");
    }
    c.mapped = true;
    offset += c.bytes;
  }
  out.mapped_ = offset;

  // The daemon only reads (hashes, copies out), so it asks for read access alone: a bug of ours
  // then faults instead of writing into a client's weights. The VMM API documents PROT_READ, but
  // drivers have answered it with CUDA_ERROR_INVALID_VALUE / NOT_SUPPORTED; then read-write is
  // the only access there is, and we take it.
  CUmemAccessDesc access{};
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = device;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READ;
  CUresult granted = driver.set_access(base, offset, &access, 1);
  out.read_only_ = granted == CUDA_SUCCESS;
  if (granted != CUDA_SUCCESS) {
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    granted = driver.set_access(base, offset, &access, 1);
  }
  if (granted != CUDA_SUCCESS) {
    return fail(code_of(granted, errc::internal), prefix + "cannot grant device " + std::to_string(device) +
                                                      " access to the mapping: " + driver.describe(granted));
  }
  return out;
}

vmm_import::vmm_import(vmm_import&& other) noexcept
    : driver_(other.driver_),
      chunks_(std::move(other.chunks_)),
      base_(std::exchange(other.base_, 0)),
      reserved_(std::exchange(other.reserved_, 0)),
      mapped_(std::exchange(other.mapped_, 0)),
      read_only_(other.read_only_) {
  other.chunks_.clear();
}

vmm_import::~vmm_import() {
  // The reverse of create(): mappings, then the reservation they lie in, then the handles (the
  // physical memory is the exporter's; releasing our handle drops only our reference).
  std::uint64_t offset = 0;
  for (const auto& c : chunks_) {
    if (c.mapped) release_check(*driver_, driver_->unmap(base_ + offset, c.bytes), "unmap an imported CUDA VMM chunk");
    offset += c.bytes;
  }
  if (reserved_ != 0) {
    release_check(*driver_, driver_->address_free(base_, reserved_), "free the address space of a CUDA VMM import");
  }
  for (const auto& c : chunks_) {
    release_check(*driver_, driver_->release(c.handle), "release an imported CUDA VMM allocation");
  }
}

}  // namespace tensorreg::cuda::detail
