// src/cuda/batched_copier.hpp — many device-to-device runs, and the zeros between them, in one
// kernel launch (private to src/cuda/): how snapshot_to_device fills a snapshot.
//
// `batched_copier::enqueue` cuts the runs into a table of chunks (copy_plan.hpp), writes it
// into pinned host memory, uploads it to a device table and launches the batched copy kernel
// (batched_copy.cu) over it, all on the caller's stream. Both tables are kept and grown on
// demand: a weight-sync loop, which snapshots the same layout at every step, allocates them
// once. A table is rewritten only after the work that read it before has finished (an event
// recorded after each enqueue), so a caller need not synchronize between enqueues.
//
// Thread-safety: one thread at a time (device_memory_provider keeps one per device, under its
// snapshot lane's mutex). Ownership: owns its tables and event, released on its device
// (noexcept, quiet when the runtime is already unloading); move-only.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <span>

#include "cuda/copy_plan.hpp"
#include "tensorreg/common/error.hpp"
#include "tensorreg/cuda/gpu_tree_hash.hpp"

namespace tensorreg::cuda::detail {

struct batched_copy_options {
  /// The most bytes of one chunk (a multiple of 16, ≤ 2^31).
  std::uint64_t chunk_bytes = default_copy_chunk_bytes;
  /// Resident blocks per multiprocessor (8 × 256 threads fill an SM).
  unsigned blocks_per_sm = 8;
};

class batched_copier {
 public:
  /// A copier for `device`, which must be current; allocates nothing but an event until the
  /// first enqueue.
  /// Errors: INVALID_ARGUMENT for a chunk_bytes the plan cannot use; CUDA errors (check()).
  [[nodiscard]] static result<batched_copier> create(int device, batched_copy_options opts = {});

  ~batched_copier();
  batched_copier(batched_copier&& other) noexcept;
  batched_copier& operator=(batched_copier&&) = delete;
  batched_copier(const batched_copier&) = delete;
  batched_copier& operator=(const batched_copier&) = delete;

  /// Enqueues on `stream` the writing of the `size` bytes at `to`: `runs` copied from their
  /// device memory, every other byte zero. Asynchronous: the bytes are there once `stream` has
  /// done the work (the runs' memory must stay mapped until then).
  /// REQUIRES: the copier's device current; `to` device memory of it with room for `size`
  /// bytes, 16-byte aligned (cudaMalloc's memory is); runs sorted by `at`, disjoint, inside
  /// [0, size), none empty, not overlapping [to, to + size).
  /// Errors: RESOURCE_EXHAUSTED when a table cannot grow; the CUDA error of the upload or of the
  /// launch (a device without code for the kernel: cudaErrorNoKernelImageForDevice). After an
  /// error no part of the copy may be assumed done or not done: copy every byte another way on
  /// the same stream.
  [[nodiscard]] status enqueue(void* to, std::uint64_t size, std::span<const device_piece> runs, cudaStream_t stream);

  /// Chunks in the last enqueue, and the bytes each table holds now (for tests and benchmarks).
  [[nodiscard]] std::uint64_t last_chunks() const noexcept { return last_chunks_; }
  [[nodiscard]] std::uint64_t table_capacity_bytes() const noexcept { return device_table_bytes_; }

 private:
  batched_copier(int device, batched_copy_options opts, int sm_count, cudaEvent_t done) noexcept
      : device_(device), opts_(opts), sm_count_(sm_count), done_(done) {}

  int device_;
  batched_copy_options opts_;
  int sm_count_;
  cudaEvent_t done_;                  // recorded after the last work that read the tables
  copy_chunk* host_table_ = nullptr;  // pinned
  std::uint64_t host_table_bytes_ = 0;
  copy_chunk* device_table_ = nullptr;
  std::uint64_t device_table_bytes_ = 0;
  std::uint64_t last_chunks_ = 0;
};

}  // namespace tensorreg::cuda::detail
