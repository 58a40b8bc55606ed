// tensorreg/common/function_ref.hpp — a non-owning reference to a callable.
//
// Used for callbacks on hot paths (byte-source piece visitors) where std::function's
// possible allocation is unwanted. The referenced callable must outlive the call.
#pragma once

#include <memory>
#include <type_traits>
#include <utility>

namespace tensorreg {

template <typename Signature>
class function_ref;

template <typename R, typename... Args>
class function_ref<R(Args...)> {
 public:
  template <typename F>
  requires(!std::is_same_v<std::remove_cvref_t<F>, function_ref> && std::is_invocable_r_v<R, F&, Args...>)
      function_ref(F&& f)
  noexcept  // NOLINT(google-explicit-constructor): meant to bind lambdas
      : object_(const_cast<void*>(static_cast<const void*>(std::addressof(f)))),
        call_([](void* object, Args... args) -> R {
          return (*static_cast<std::remove_reference_t<F>*>(object))(std::forward<Args>(args)...);
        }) {}

  R operator()(Args... args) const { return call_(object_, std::forward<Args>(args)...); }

 private:
  void* object_;
  R (*call_)(void*, Args...);
};

}  // namespace tensorreg
