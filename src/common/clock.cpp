#include "tensorreg/common/clock.hpp"

namespace tensorreg {
namespace {

class steady_clock_impl final : public clock {
 public:
  [[nodiscard]] time_point now() const noexcept override { return std::chrono::steady_clock::now(); }
};

}  // namespace

const clock& system_clock() noexcept {
  // Never destroyed, so components torn down during static destruction may still read it.
  static const auto* const instance = new steady_clock_impl();
  return *instance;
}

}  // namespace tensorreg
