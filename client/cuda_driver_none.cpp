// The client built without CUDA: register_cuda reports it (cuda_driver.cpp in CUDA builds).
#include "client/cuda_register.hpp"

namespace tensorreg::client::detail {

bool have_cuda_driver() noexcept { return false; }

result<opened_driver> open_cuda_driver(std::int32_t) {
  return fail(errc::failed_precondition,
              "cannot register CUDA tensors: this tensorreg client was built without CUDA (TENSORREG_CUDA=OFF)");
}

}  // namespace tensorreg::client::detail
