// tensorreg/cuda/device_memory.hpp — the engine's real device memory: CUDA IPC mappings and
// daemon-owned device buffers (DECISIONS §6; registration.md §5.2).
//
// Provides `device_memory_provider`, the implementation of registration::device_memory on a
// machine with CUDA devices, and `device_source`, the byte_source every device mapping or
// buffer it hands out implements. Readers that can use device bytes in place (the GPU tree
// hash) detect a device source with `as_device_source()`; everyone else reads it through
// visit(), which stages the bytes through pinned host memory in chunks (4 MiB by default),
// double-buffered so the copy of the next chunk overlaps the sink of the previous one.
//
// IPC mappings are cached by (owner pid, handle bytes): each distinct key is opened once
// (cudaIpcOpenMemHandle with lazy peer access) and shared by every caller that asks for it
// while it is open; the cache holds only weak references, so the mapping is closed
// (cudaIpcCloseMemHandle) when the last returned shared_ptr goes. open_mappings() counts the
// mappings open now.
//
// This header needs no CUDA header: device pointers are `const void*`.
//
// Thread-safety: every member function of the provider may be called concurrently. Sources
// are safe to visit from many threads at once (each visit takes its own staging buffer from a
// per-device pool of pinned buffers). A visit makes the source's device current for the call
// and restores the caller's current device before returning.
// Ownership: the provider owns its staging pool and cache; returned sources share both
// (they stay valid after the provider is destroyed). A mapping source keeps its IPC mapping
// open; an allocated buffer source owns its device memory (cudaFree when the last shared_ptr
// goes). Release paths are noexcept and tolerate a CUDA runtime that is already unloading.
#pragma once

#include <cstdint>
#include <memory>
#include <string_view>

#include "tensorreg/common/error.hpp"
#include "tensorreg/memory/byte_source.hpp"
#include "tensorreg/registration/device_memory.hpp"

namespace tensorreg::cuda {

namespace detail {
struct provider_state;  // private to src/cuda/device_memory.cpp
}  // namespace detail

/// A byte_source whose bytes live in device memory of one CUDA device.
class device_source : public memory::byte_source {
 public:
  /// The first byte (offset 0) in device memory; readable by `device()` for size() bytes.
  [[nodiscard]] virtual const void* device_pointer() const noexcept = 0;
  /// The CUDA device (ordinal in this process) the memory is mapped on.
  [[nodiscard]] virtual std::int32_t device() const noexcept = 0;
};

/// The device_source behind `source`, or null when `source` is not device memory.
[[nodiscard]] const device_source* as_device_source(const memory::byte_source& source) noexcept;

/// registration::device_memory over the CUDA devices of this process.
class device_memory_provider final : public registration::device_memory {
 public:
  struct options {
    /// Bytes per staged chunk of visit() (each staging buffer holds two of them).
    std::uint64_t staging_chunk_bytes = std::uint64_t{4} << 20;
    /// Staging buffers kept per device for reuse; more are made on demand and freed on release.
    std::size_t staging_buffers_kept = 16;
    /// Canonical buffers at least this large are hashed on the GPU (tree_hash_on_device).
    /// Measured on an H100 host (benchmarks/RESULTS.md): the GPU hash takes ~107 ms at any
    /// size, 16 host cores hash 1 GiB in ~86 ms after it was staged to the host; so below
    /// about 1.5 GB the host is the faster place.
    std::uint64_t gpu_hash_min_bytes = std::uint64_t{3} << 29;
  };

  /// A provider for this process's CUDA devices.
  /// Errors: FAILED_PRECONDITION when there is no CUDA device (none present, no driver, or
  /// the runtime cannot start: the message says which), so callers fall back to no GPU;
  /// INVALID_ARGUMENT for a staging_chunk_bytes of 0.
  [[nodiscard]] static result<std::shared_ptr<device_memory_provider>> create();
  [[nodiscard]] static result<std::shared_ptr<device_memory_provider>> create(options opts);

  ~device_memory_provider() override;
  device_memory_provider(const device_memory_provider&) = delete;
  device_memory_provider& operator=(const device_memory_provider&) = delete;

  /// Opens (or finds open) the allocation behind `ipc_handle` (cudaIpcMemHandle_t bytes) of
  /// `owner_pid` on `device_id`. The returned source is a device_source starting at the
  /// handle's base pointer; size() = the allocation's bytes from there.
  /// Errors: INVALID_ARGUMENT (handle not cudaIpcMemHandle_t-sized; a stale or malformed
  /// handle: the message carries the CUDA error), FAILED_PRECONDITION (no device
  /// `device_id`; the memory lives on another device), OUT_OF_RANGE (allocation smaller than
  /// `min_bytes`), RESOURCE_EXHAUSTED / INTERNAL for other CUDA failures.
  [[nodiscard]] result<std::shared_ptr<const memory::byte_source>> open_ipc(
      std::int32_t owner_pid, std::int32_t device_id, std::string_view ipc_handle,
      std::uint64_t min_bytes) override;

  /// cudaMalloc of `bytes` (zero-filled) on `device_id`, exported with cudaIpcGetMemHandle.
  /// `bytes` of the result is a device_source owning the memory.
  /// Errors: INVALID_ARGUMENT (bytes 0), FAILED_PRECONDITION (no device `device_id`),
  /// RESOURCE_EXHAUSTED (out of device memory), INTERNAL for other CUDA failures.
  [[nodiscard]] result<registration::device_buffer> allocate(std::int32_t device_id, std::uint64_t bytes) override;

  /// IPC mappings open right now (distinct (owner pid, handle) keys with a live holder).
  [[nodiscard]] std::size_t open_mappings() const override;

  /// Hashes `canonical` on its GPU when it is at least gpu_hash_min_bytes and every segment
  /// (through nested segmented views) reads device memory of one device: the DATA bytes are
  /// gathered into a zeroed scratch buffer with device-to-device copies (PAD stays zero), then
  /// the GPU tree hash runs there. nullopt otherwise, or when the scratch does not fit on the
  /// device (the host then hashes through staging).
  /// Errors (inside the optional): the GPU hash's, and CUDA errors of the gather.
  [[nodiscard]] std::optional<result<hash::digest>> tree_hash_on_device(
      const memory::segmented_view& canonical) override;

  /// How many canonical buffers tree_hash_on_device() has hashed on a GPU.
  [[nodiscard]] std::uint64_t device_hashes() const noexcept;

  /// Number of CUDA devices this provider sees.
  [[nodiscard]] std::int32_t device_count() const noexcept;


 private:
  explicit device_memory_provider(std::shared_ptr<detail::provider_state> state) noexcept;
  std::shared_ptr<detail::provider_state> state_;
};

}  // namespace tensorreg::cuda
