// engine_lock — the engine mutex as every holder takes it (docs/architecture.md §8, level 1).
//
// Memory let go while the engine mutex is held (a lease's region, an evicted or removed
// replica) is unmapped only once it is released: an unmap of megabytes takes the kernel's
// mmap lock for milliseconds, and GetStats, on the FIFO I/O thread, takes this mutex.
//
// Thread-safety: a scoped guard of one thread. Ownership: holds the mutex until it goes.
#pragma once

#include <mutex>

#include "tensorreg/common/priority_inheriting_mutex.hpp"
#include "tensorreg/memory/unlocked_release.hpp"

namespace tensorreg::registration::detail {

class engine_lock {
 public:
  explicit engine_lock(priority_inheriting_mutex& engine_mutex) : held_(engine_mutex) {}

 private:
  memory::unlocked_release_scope releases_;  // declared first, so it ends after the unlock
  std::lock_guard<priority_inheriting_mutex> held_;
};

}  // namespace tensorreg::registration::detail
