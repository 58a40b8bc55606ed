// src/registration/owner_watch.hpp — notices when owner processes exit, through pidfds.
//
// The engine watches every owner pid that holds something (a pending registration, a lease,
// a join, a region). A pidfd becomes readable when its process exits; one thread polls them
// all and calls `on_exit(pid)` once per watched pid, outside any lock of its own.
//
// Thread-safety: watch() may be called from any thread. The callback runs on the watcher's
// thread. Destruction stops the thread; no callback runs after the destructor returns.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

#include "tensorreg/common/error.hpp"

namespace tensorreg::registration::detail {

class owner_watch {
 public:
  /// Errors: INTERNAL when the eventfd or thread cannot be created.
  [[nodiscard]] static result<std::unique_ptr<owner_watch>> create(std::function<void(std::int32_t)> on_exit);

  ~owner_watch();
  owner_watch(const owner_watch&) = delete;
  owner_watch& operator=(const owner_watch&) = delete;

  /// Starts watching `pid` (no-op if already watched).
  /// Errors: INVALID_ARGUMENT when no such process exists; INTERNAL when pidfd_open fails
  /// otherwise (the message says why).
  [[nodiscard]] status watch(std::int32_t pid);

  [[nodiscard]] std::size_t watched() const;

 private:
  struct impl;
  explicit owner_watch(std::unique_ptr<impl> i) noexcept;
  std::unique_ptr<impl> impl_;
};

}  // namespace tensorreg::registration::detail
