#include "devices/replica_pool.hpp"

#include <algorithm>
#include <utility>
#include <vector>

namespace tensorreg::devices {

using memory::shared_memory;

std::shared_ptr<replica_pool> replica_pool::create(std::uint64_t max_idle_bytes) {
  return std::shared_ptr<replica_pool>(new replica_pool(max_idle_bytes));
}

std::optional<replica_pool::arena> replica_pool::take(std::uint64_t size) {
  std::lock_guard lock(mutex_);
  // Newest first: its pages are the likeliest to still be warm in the caches.
  for (auto it = idle_.rbegin(); it != idle_.rend(); ++it) {
    if (it->memory.size() != size) continue;
    arena out = std::move(*it);
    idle_.erase(std::next(it).base());
    idle_bytes_ -= size;
    ++counters_.hits;
    return out;
  }
  ++counters_.misses;
  return std::nullopt;
}

bool replica_pool::holds(std::uint64_t size) const {
  std::lock_guard lock(mutex_);
  return std::any_of(idle_.begin(), idle_.end(), [&](const arena& a) { return a.memory.size() == size; });
}

std::shared_ptr<const shared_memory> replica_pool::lend(arena a) {
  TENSORREG_ASSERT(a.memory.writable());
  // Its bytes are final for as long as it is lent: no fd a reader gets (GetArtifactMemfd), even
  // reopened read-write through /proc, may change them. The pool's own mapping stays writable
  // for the next taker. Memory that cannot carry the seals is still lent, but never handed out
  // (shared_memory::export_read_only refuses it).
  static_cast<void>(a.memory.seal_against_writes());
  // The holder owns the arena; the deleter gets it back whole (pin included) when the last
  // reference goes, wherever that is.
  auto holder = std::make_unique<arena>(std::move(a));
  const shared_memory* memory = &holder->memory;
  std::weak_ptr<replica_pool> home = weak_from_this();
  return std::shared_ptr<const shared_memory>(memory, [holder = holder.release(), home](const shared_memory*) noexcept {
    std::unique_ptr<arena> owned(holder);
    if (auto pool = home.lock()) pool->give_back(std::move(*owned));
  });
}

void replica_pool::give_back(arena a) noexcept {
  std::vector<arena> freed;  // destroyed after the lock: unpinning and unmapping take a while
  std::lock_guard lock(mutex_);
  const std::uint64_t size = a.memory.size();
  if (a.memory.exported()) {
    // A reader elsewhere may still map it: it is freed (`a` is destroyed after the lock goes).
    ++counters_.refused_exported;
    return;
  }
  if (size > max_idle_bytes_) {
    ++counters_.dropped_over_bound;
    return;
  }
  try {
    while (idle_bytes_ + size > max_idle_bytes_) {
      freed.push_back(std::move(idle_.front()));
      idle_.pop_front();
      idle_bytes_ -= freed.back().memory.size();
      ++counters_.dropped_over_bound;
    }
    idle_.push_back(std::move(a));
    idle_bytes_ += size;
    ++counters_.recycled;
  } catch (...) {
    // Out of memory for the bookkeeping: the arena is freed instead of kept.
  }
}

std::uint64_t replica_pool::idle_bytes() const {
  std::lock_guard lock(mutex_);
  return idle_bytes_;
}

replica_pool::counters replica_pool::stats() const {
  std::lock_guard lock(mutex_);
  return counters_;
}

}  // namespace tensorreg::devices
