// The client's real CUDA driver (CUDA builds only): the calls cuda_plan.hpp's planner makes,
// reached through the runtime (cudaGetDriverEntryPointByVersion, src/cuda/driver_entry.hpp)
// so that nothing links libcuda.so and the binary starts on a machine without a driver.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>

#include <cstring>

#include "client/cuda_register.hpp"
#include "cuda/driver_entry.hpp"
#include "tensorreg/devices/device_identity.hpp"

namespace tensorreg::client::detail {

namespace {

std::string runtime_reason(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + " (" + cudaGetErrorString(e) + ")";
}

class real_driver final : public cuda_driver {
 public:
  static result<std::unique_ptr<real_driver>> create(std::int32_t ordinal, cuda_device& device) {
    int count = 0;
    if (const cudaError_t e = cudaGetDeviceCount(&count); e != cudaSuccess || count == 0) {
      static_cast<void>(cudaGetLastError());
      return fail(errc::failed_precondition, "cannot register CUDA tensors: no CUDA device (" +
                                                 (e != cudaSuccess ? runtime_reason(e) : std::string("none visible")) +
                                                 ")");
    }
    int previous = 0;
    if (const cudaError_t e = cudaGetDevice(&previous); e != cudaSuccess) {
      return fail(errc::failed_precondition,
                  "cannot register CUDA tensors: cannot read the current device: " + runtime_reason(e));
    }
    const int wanted = ordinal < 0 ? previous : ordinal;
    if (wanted >= count) {
      return fail(errc::invalid_argument, "cannot register CUDA tensors: device " + std::to_string(wanted) +
                                              " is not one of the " + std::to_string(count) + " visible");
    }
    std::unique_ptr<real_driver> d(new real_driver(previous));
    if (const cudaError_t e = cudaSetDevice(wanted); e != cudaSuccess) {
      return fail(errc::failed_precondition, "cannot register CUDA tensors: cannot use device " +
                                                 std::to_string(wanted) + ": " + runtime_reason(e));
    }
    cudaDeviceProp prop{};
    if (const cudaError_t e = cudaGetDeviceProperties(&prop, wanted); e != cudaSuccess) {
      return fail(errc::failed_precondition, "cannot register CUDA tensors: cannot read device " +
                                                 std::to_string(wanted) + ": " + runtime_reason(e));
    }
    devices::gpu_uuid uuid;
    static_assert(sizeof prop.uuid.bytes == sizeof uuid.bytes);
    std::memcpy(uuid.bytes.data(), prop.uuid.bytes, sizeof uuid.bytes);
    device = {wanted, devices::format_gpu_uuid(uuid)};
    using cuda::detail::find_driver_entry;
    if (!find_driver_entry(d->get_address_range_, "cuMemGetAddressRange", 3020) ||
        !find_driver_entry(d->ipc_get_mem_handle_, "cuIpcGetMemHandle", 4010)) {
      return fail(errc::failed_precondition,
                  "cannot register CUDA tensors: the CUDA driver lacks "
                  "cuMemGetAddressRange or cuIpcGetMemHandle");
    }
    // VMM support is optional: without it, only cudaMalloc memory registers.
    static_cast<void>(find_driver_entry(d->retain_, "cuMemRetainAllocationHandle", 11000));
    static_cast<void>(find_driver_entry(d->release_, "cuMemRelease", 10020));
    static_cast<void>(find_driver_entry(d->properties_, "cuMemGetAllocationPropertiesFromHandle", 10020));
    static_cast<void>(find_driver_entry(d->export_, "cuMemExportToShareableHandle", 10020));
    static_cast<void>(find_driver_entry(d->error_name_, "cuGetErrorName", 6000));
    return d;
  }

  ~real_driver() override { static_cast<void>(cudaSetDevice(previous_)); }

  result<std::pair<std::uint64_t, std::uint64_t>> address_range(std::uint64_t ptr) override {
    CUdeviceptr base = 0;
    std::size_t size = 0;
    if (const CUresult r = get_address_range_(&base, &size, static_cast<CUdeviceptr>(ptr)); r != CUDA_SUCCESS) {
      return fail(errc::failed_precondition,
                  "cannot register CUDA tensors: cannot find the allocation of device "
                  "address " +
                      hex_address(ptr) + ": " + describe(r));
    }
    return std::pair<std::uint64_t, std::uint64_t>{base, size};
  }

  std::optional<std::string> try_ipc_handle(std::uint64_t base) override {
    CUipcMemHandle h{};
    if (ipc_get_mem_handle_(&h, static_cast<CUdeviceptr>(base)) != CUDA_SUCCESS) return std::nullopt;
    return std::string(h.reserved, sizeof h.reserved);
  }

  error ipc_handle_error(std::uint64_t base) override {
    CUipcMemHandle h{};
    const CUresult r = ipc_get_mem_handle_(&h, static_cast<CUdeviceptr>(base));
    return error{errc::failed_precondition, "cuIpcGetMemHandle: " + describe(r)};
  }

  std::optional<std::uint64_t> retain_allocation(std::uint64_t base) override {
    if (retain_ == nullptr || release_ == nullptr || properties_ == nullptr || export_ == nullptr) return std::nullopt;
    CUmemGenericAllocationHandle h = 0;
    if (retain_(&h, reinterpret_cast<void*>(static_cast<std::uintptr_t>(base))) != CUDA_SUCCESS) return std::nullopt;
    return static_cast<std::uint64_t>(h);
  }

  void release(std::uint64_t handle) noexcept override {
    if (release_ != nullptr) static_cast<void>(release_(static_cast<CUmemGenericAllocationHandle>(handle)));
  }

  std::uint64_t handle_types(std::uint64_t handle) override {
    CUmemAllocationProp prop{};
    if (properties_(&prop, static_cast<CUmemGenericAllocationHandle>(handle)) != CUDA_SUCCESS) return 0;
    return static_cast<std::uint64_t>(prop.requestedHandleTypes);
  }

  result<unique_fd> export_fd(std::uint64_t handle) override {
    int fd = -1;
    if (const CUresult r = export_(&fd, static_cast<CUmemGenericAllocationHandle>(handle),
                                   CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
        r != CUDA_SUCCESS) {
      return fail(errc::failed_precondition,
                  "cannot register CUDA tensors: cannot export a VMM page as a POSIX fd: " + describe(r));
    }
    return unique_fd(fd);
  }

 private:
  explicit real_driver(int previous) noexcept : previous_(previous) {}

  std::string describe(CUresult r) const {
    const char* name = nullptr;
    if (error_name_ != nullptr && error_name_(r, &name) == CUDA_SUCCESS && name != nullptr) return name;
    return "CUresult " + std::to_string(static_cast<int>(r));
  }

  int previous_ = 0;
  PFN_cuMemGetAddressRange_v3020 get_address_range_ = nullptr;
  PFN_cuIpcGetMemHandle_v4010 ipc_get_mem_handle_ = nullptr;
  PFN_cuMemRetainAllocationHandle_v11000 retain_ = nullptr;
  PFN_cuMemRelease_v10020 release_ = nullptr;
  PFN_cuMemGetAllocationPropertiesFromHandle_v10020 properties_ = nullptr;
  PFN_cuMemExportToShareableHandle_v10020 export_ = nullptr;
  PFN_cuGetErrorName_v6000 error_name_ = nullptr;
};

}  // namespace

bool have_cuda_driver() noexcept { return true; }

result<opened_driver> open_cuda_driver(std::int32_t ordinal) {
  opened_driver out;
  TENSORREG_TRY_ASSIGN(auto d, real_driver::create(ordinal, out.device));
  out.driver = std::move(d);
  return out;
}

}  // namespace tensorreg::client::detail
