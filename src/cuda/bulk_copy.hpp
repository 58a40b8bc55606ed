// src/cuda/bulk_copy.hpp — device bytes into a host replica at copy speed (private to src/cuda/).
//
// `bulk_copier::copy` is the GPU side of device_memory::copy_to_host: it snapshots a canonical
// buffer (runs of device memory of one device, gaps zero) device-to-device into a private
// scratch buffer, then copies the snapshot into a new memfd while the GPU tree-hashes the same
// snapshot on its own thread. Both read the snapshot, which nobody else can reach, so the
// digest describes exactly the bytes kept even if a client scribbles on its memory meanwhile;
// the snapshot costs size / HBM bandwidth (an order of magnitude above the D2H), the hash runs
// on SMs while the copy engine does the D2H, so the whole copy takes about max(D2H, GPU hash).
//
// The snapshot reaches the replica one of two ways.
//  * Through a replica pool (bulk_copy_options::replicas, src/devices/replica_pool.hpp): the
//    replica is an arena of exactly `size` bytes that is already resident and registered with
//    CUDA (cudaHostRegister, one registration per chunk), recycled from a replica nobody holds
//    any more, and the D2H goes by DMA straight into it, at the copy engine's speed, with no
//    staging memcpy and no page faults. Every byte of it is overwritten
//    from the snapshot, whose gaps are zeroed on the device, so no byte of the arena's old
//    replica survives. With no idle arena of that size, a fresh memfd is made, and each worker
//    populates (MADV_POPULATE_WRITE), registers and DMAs its chunks straight into it; the
//    registrations are kept, so that replica returns to the pool ready when it is dropped.
//  * Without a pool: pinned staging. Each worker DMAs chunks into its own pinned double
//    buffer and memcpys them into a fresh memfd, faulting its pages in while its DMA runs.
// Where the first touch of fresh memfd pages is slow (a VM, shmem THP off), a fresh memfd is
// bound by it whichever way it is filled: staging and per-chunk registration (then undone)
// reach the same rate, the populate rate (benchmarks/RESULTS.md, 2026-11-25). Only recycled
// memory escapes that bound.
//
// Either way the replica is sealed against writes once its bytes are final
// (shared_memory::seal_against_writes): the fd a reader gets cannot change it, even reopened
// read-write, while a pooled replica keeps its own writable, registered mapping for reuse.
//
// Thread-safety: copy() may be called concurrently (each call takes its own staging slots).
// Ownership: the copier owns pinned staging slots kept for reuse, freed by its destructor;
// a copy's scratch lives for the call; the replica belongs to the returned host_copy (a
// pooled replica goes back to its pool, registrations and all, when its last holder drops it,
// unless it was exported).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "cuda/pinned_double_buffer.hpp"
#include "devices/replica_pool.hpp"
#include "tensorreg/common/error.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/cuda/gpu_tree_hash.hpp"
#include "tensorreg/registration/device_memory.hpp"

namespace tensorreg::cuda::detail {

/// `length` device bytes at `src` that land at `dst` in the canonical buffer.
struct device_range {
  std::uint64_t dst = 0;
  const std::byte* src = nullptr;
  std::uint64_t length = 0;
  /// The allocation `src` lies in (its mapping), when known: two allocations can be neighbours
  /// in the address space, but no copy may span them.
  const void* allocation = nullptr;
};

struct bulk_copy_options {
  /// Bytes per DMA (a multiple of the page size).
  std::uint64_t chunk_bytes = std::uint64_t{32} << 20;
  /// Workers at most (each a pool thread with its own stream and 2 × chunk_bytes of pinned
  /// memory, kept; fewer when the pool is smaller). 8 did as well as 16 and better than 4 in
  /// gpu_stable_put_bench --sweep (benchmarks/RESULTS.md).
  unsigned workers = 8;
  /// Where replicas come from and return to (must be owned by a shared_ptr, as
  /// replica_pool::create makes it); null: every replica is a fresh memfd filled through
  /// pinned staging and never registered.
  devices::replica_pool* replicas = nullptr;
};

/// Hashes `size` bytes of the snapshot at `device_ptr` on `stream` (the copy's device).
using snapshot_hasher =
    std::function<result<hash::digest>(const void* device_ptr, std::uint64_t size, stream_view stream)>;

class bulk_copier {
 public:
  bulk_copier();
  ~bulk_copier();
  bulk_copier(const bulk_copier&) = delete;
  bulk_copier& operator=(const bulk_copier&) = delete;

  /// Snapshots `ranges` (sorted by dst, disjoint, inside [0, size)) of device `device` into
  /// scratch, then copies the snapshot into a memfd of `size` bytes (recycled from
  /// opts.replicas when it holds one of that size, else new) on `pool` while `hash` (when not
  /// null) hashes the snapshot on another thread.
  /// REQUIRES: size > 0; the ranges' device memory stays mapped for the call.
  /// Errors: RESOURCE_EXHAUSTED when the scratch does not fit on the device (callers then copy
  /// on the host) or the memfd cannot be made; the hasher's errors; CUDA errors.
  [[nodiscard]] result<registration::host_copy> copy(int device, std::span<const device_range> ranges,
                                                     std::uint64_t size, const snapshot_hasher* hash, thread_pool& pool,
                                                     const bulk_copy_options& opts = {});

 private:
  // A worker's pinned double buffer (half_bytes 0: the snapshot's control stream).
  using slot = pinned_double_buffer;
  [[nodiscard]] result<std::unique_ptr<slot>> acquire(int device, std::uint64_t bytes);
  void give_back(std::unique_ptr<slot> s) noexcept;

  std::mutex mutex_;
  std::vector<std::unique_ptr<slot>> free_;  // kept for reuse: pinned memory is slow to allocate
};

}  // namespace tensorreg::cuda::detail
