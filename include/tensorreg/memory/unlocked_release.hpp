// tensorreg/memory/unlocked_release.hpp — let memory go only once no lock is held.
//
// Dropping the last reference to a mapping unmaps it and closes its fd. For a region of
// megabytes that takes the kernel's mmap lock and can run for milliseconds, and a user-space
// lock held meanwhile makes everyone who wants it wait that long, the FIFO I/O thread
// answering GetStats included (docs/architecture.md §8). So code that holds a
// lock hands what it lets go to a `deferred_release`, and a thread that takes locks opens an
// `unlocked_release_scope` before it locks: everything released inside the scope is destroyed
// when its outermost scope ends, after those locks are let go. Without an open scope a
// `deferred_release` destroys its contents when it goes, as a local would.
//
// Thread-safety: each thread has its own scope and list; nothing is shared. Ownership: a
// deferred_release owns what it holds until it hands it to the thread's scope or destroys it.
#pragma once

#include <memory>
#include <utility>
#include <vector>

namespace tensorreg::memory {

/// Destroys `held` now, or at the end of this thread's outermost unlocked_release_scope.
void release_unlocked(std::shared_ptr<const void> held);

/// Opened before a thread takes its locks (declared first, so it ends last); nests.
class unlocked_release_scope {
 public:
  unlocked_release_scope() noexcept;
  ~unlocked_release_scope();
  unlocked_release_scope(const unlocked_release_scope&) = delete;
  unlocked_release_scope& operator=(const unlocked_release_scope&) = delete;
};

/// What a function lets go while it holds a lock; declared before the lock, so that it ends
/// after it, and handed to release_unlocked() then.
class deferred_release {
 public:
  deferred_release() = default;
  ~deferred_release() {
    for (auto& held : held_) release_unlocked(std::move(held));
  }
  deferred_release(const deferred_release&) = delete;
  deferred_release& operator=(const deferred_release&) = delete;

  void push_back(std::shared_ptr<const void> held) {
    if (held) held_.push_back(std::move(held));
  }

 private:
  std::vector<std::shared_ptr<const void>> held_;
};

}  // namespace tensorreg::memory
