// client/cuda_register.hpp — connection::register_cuda's flow over a driver seam (private).
//
// register_cuda_tensors() does the lease-in-place of CUDA tensors with whatever cuda_driver it
// is given: plan_layout, plan_device, one RegisterRegion per planned region (VMM page fds on
// the frame), Begin, the one Feed frame (region refs filled in from the answers), Commit; on
// failure it revokes what was begun and unregisters what was registered. open_cuda_driver()
// is the real driver (cuda_driver.cpp) in CUDA builds, FAILED_PRECONDITION otherwise
// (cuda_driver_none.cpp).
//
// Thread-safety: one call at a time per driver. Ownership: the driver is the caller's.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "client/cuda_plan.hpp"
#include "client/raw_connection.hpp"
#include "tensorreg/client/connection.hpp"

namespace tensorreg::client::detail {

/// The device the tensors live on, as the daemon is told about it.
struct cuda_device {
  std::int32_t ordinal = 0;
  std::string uuid;  ///< "GPU-..."
};

/// The real driver with `ordinal` (-1: the current device) made current until it is destroyed.
struct opened_driver {
  std::unique_ptr<cuda_driver> driver;
  cuda_device device;
};
/// Errors: FAILED_PRECONDITION (built without CUDA, no device, the driver's refusals).
[[nodiscard]] result<opened_driver> open_cuda_driver(std::int32_t ordinal);

/// True when open_cuda_driver can succeed on a machine with a device.
[[nodiscard]] bool have_cuda_driver() noexcept;

[[nodiscard]] result<lease> register_cuda_tensors(const std::shared_ptr<raw::connection>& raw, cuda_driver& driver,
                                                  const cuda_device& device, std::span<const cuda_tensor> tensors,
                                                  const cuda_register_options& options);

}  // namespace tensorreg::client::detail
