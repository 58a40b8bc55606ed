// src/devices/replica_pool.hpp — host memfds kept resident (and pinned) for reuse as replicas.
//
// On a host where the first touch of fresh memfd pages is slow (a VM can hand them out an
// order of magnitude below the D2H rate, benchmarks/RESULTS.md), a GPU → stable DRAM put can
// only run at DMA speed into memory that is already faulted in and registered with the GPU.
// The pool keeps such memory: an `arena` is a memfd mapping plus an opaque `pin` (the CUDA
// provider's host registration; the pool never looks inside it). A replica made from an arena
// is handed out with lend(): when its last holder drops it, the arena comes back here, unless
//  * its memory was exported (shared_memory::exported(): a reader in another process may map
//    it forever, so it must never carry other bytes), or
//  * keeping it would put the idle bytes over the bound (then the oldest idle arenas go).
// Arenas are matched by exact size: a replica is always the whole memfd, so a reader given its
// fd sees exactly the replica, never stale bytes past its end, and the workload this serves
// (weight sync, repeated checkpoints) puts the same sizes again and again.
//
// A recycled arena holds an old replica's bytes: whoever takes one must overwrite every byte.
//
// A lent replica is sealed against writes (shared_memory::seal_against_writes): its memfd keeps
// the pool's writable mapping, through which the next taker refills it, but no fd of it, handed
// to a reader and reopened read-write through /proc or not, can change its bytes or size. So the
// fd GetArtifactMemfd hands out is as safe as a fully sealed replica's, and the memory it names
// is never recycled (it is exported).
//
// Thread-safety: all member functions may be called concurrently; lent replicas may be
// dropped on any thread, after the pool is gone too (their arena is then freed).
// Ownership: the pool owns idle arenas; a lent replica owns its arena until it returns.
// An arena's pin is released before its mapping is unmapped.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>

#include "tensorreg/memory/shared_memory.hpp"

namespace tensorreg::devices {

class replica_pool : public std::enable_shared_from_this<replica_pool> {
 public:
  struct arena {
    memory::shared_memory memory;
    /// What keeps the memory ready (e.g. a CUDA host registration), released first.
    std::shared_ptr<void> pin;
    /// The pin covers [k × pin_unit, (k + 1) × pin_unit) separately: a DMA must not cross a
    /// multiple of it. 0: one pin covers everything.
    std::uint64_t pin_unit = 0;
  };

  struct counters {
    std::uint64_t hits = 0;                ///< take() found an arena
    std::uint64_t misses = 0;              ///< take() found none
    std::uint64_t recycled = 0;            ///< arenas that came back idle
    std::uint64_t refused_exported = 0;    ///< arenas freed on return because they were exported
    std::uint64_t dropped_over_bound = 0;  ///< arenas freed to keep idle bytes within the bound
  };

  /// A pool that keeps at most `max_idle_bytes` of idle arenas (0: keeps none).
  [[nodiscard]] static std::shared_ptr<replica_pool> create(std::uint64_t max_idle_bytes);

  replica_pool(const replica_pool&) = delete;
  replica_pool& operator=(const replica_pool&) = delete;

  /// The most recently returned idle arena of exactly `size` bytes, or nullopt. Its bytes are
  /// an old replica's: the caller overwrites all of them.
  [[nodiscard]] std::optional<arena> take(std::uint64_t size);

  /// Whether an idle arena of exactly `size` bytes is there now (a later take() may still miss
  /// it: another caller may take it first). For predictions only.
  [[nodiscard]] bool holds(std::uint64_t size) const;

  /// `a` as a replica, sealed against writes through any fd (see above): the returned pointer
  /// is a.memory; when its last holder drops it, the arena returns to this pool (see above).
  /// REQUIRES: a.memory.writable().
  [[nodiscard]] std::shared_ptr<const memory::shared_memory> lend(arena a);

  [[nodiscard]] std::uint64_t max_idle_bytes() const noexcept { return max_idle_bytes_; }
  [[nodiscard]] std::uint64_t idle_bytes() const;
  [[nodiscard]] counters stats() const;

 private:
  explicit replica_pool(std::uint64_t max_idle_bytes) noexcept : max_idle_bytes_(max_idle_bytes) {}
  // Takes `a` back (or frees it); arenas freed are destroyed after the lock is let go.
  void give_back(arena a) noexcept;

  const std::uint64_t max_idle_bytes_;
  mutable std::mutex mutex_;
  std::deque<arena> idle_;  // oldest first
  std::uint64_t idle_bytes_ = 0;
  counters counters_;
};

}  // namespace tensorreg::devices
