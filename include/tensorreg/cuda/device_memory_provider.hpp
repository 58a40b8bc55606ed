// tensorreg/cuda/device_memory_provider.hpp — the engine's real device memory: CUDA IPC
// mappings and daemon-owned device buffers (DECISIONS §6; registration.md §5.2).
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
// (cudaIpcCloseMemHandle) when the last returned shared_ptr goes. (The engine keeps the mapping
// of a VRAM region for the region's life, region_registry.hpp, so re-leasing a kept region
// opens nothing; ipc_opens() counts real opens.) open_mappings() counts the
// mappings open now: IPC mappings and CUDA VMM imports together.
//
// CUDA VMM imports (import_vmm) are not cached: each call imports its fds afresh and reserves
// exactly the bytes it maps, rounded up to the allocation granularity (PyTorch reserves about
// 9/8 of the GPU per import and runs out of address space after a few dozen);
// vmm_reserved_bytes() is the address space live imports hold. Devices are also known by
// UUID (device_by_uuid, uuid_of), read once at create().
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
// goes); a VMM import owns its handles, reservation and mappings (released with the last
// shared_ptr; the caller's fds stay the caller's). Release paths are noexcept and tolerate a
// CUDA runtime that is already unloading.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "tensorreg/common/error.hpp"
#include "tensorreg/memory/byte_source.hpp"
#include "tensorreg/registration/device_memory.hpp"

namespace tensorreg::cuda {

namespace detail {
struct provider_state;  // private to src/cuda/device_memory_provider.cpp
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
    /// Where tree_hash_on_device() and copy_to_host() hash device bytes. `measured` picks the
    /// place with the lower predicted time (src/devices/hash_placement.hpp) from speeds
    /// measured once per device and process on first use: the GPU hash takes about the same
    /// time whatever the size, the host's grows with it, so large buffers go to the GPU and
    /// small ones stay on the host (benchmarks/RESULTS.md has the figures). `host` and `gpu`
    /// force it (tests).
    enum class hash_placement { measured, host, gpu };
    hash_placement placement = hash_placement::measured;
    /// Threads tree_hash_on_device() predicts the host hashes with (0: one per hardware
    /// thread, the engine's default); copy_to_host() counts its pool instead.
    unsigned host_hash_threads = 0;
    /// Most bytes of idle replica memory copy_to_host() keeps for reuse (src/devices/
    /// replica_pool.hpp): replicas it made return there, still resident and registered with
    /// CUDA (page-locked), when their last holder drops them, unless their fd was handed to
    /// another process; the next copy of the same size then DMAs straight into one at the copy
    /// engine's speed instead of waiting for a new memfd's pages to fault in, which on hosts
    /// with slow first touch is the bound (benchmarks/RESULTS.md). This is
    /// host memory the process holds beyond the stable cache's budget. 0 turns the pool off
    /// (new memfds through pinned staging, never registered); replica_pool_auto means
    /// min(16 GiB, 1/8 of physical memory).
    static constexpr std::uint64_t replica_pool_auto = ~std::uint64_t{0};
    std::uint64_t replica_pool_bytes = replica_pool_auto;
    /// Largest snapshot (snapshot_to_device) after which a spare buffer of the same size is
    /// allocated ahead, on another thread while the copy runs, for the next snapshot of that
    /// size on that device: a weight-sync loop then never waits for cudaMalloc, which for
    /// large buffers costs about what the copy does. One spare per device at most, never
    /// exported before a snapshot takes it; it is device memory held beyond the artifacts.
    /// 0 (the default): no spares.
    std::uint64_t snapshot_spare_bytes = 0;
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
  [[nodiscard]] result<std::shared_ptr<const memory::byte_source>> open_ipc(std::int32_t owner_pid,
                                                                            std::int32_t device_id,
                                                                            std::string_view ipc_handle,
                                                                            std::uint64_t min_bytes) override;

  /// cudaMalloc of `bytes` (zero-filled) on `device_id`, exported with cudaIpcGetMemHandle.
  /// `bytes` of the result is a device_source owning the memory.
  /// Errors: INVALID_ARGUMENT (bytes 0), FAILED_PRECONDITION (no device `device_id`),
  /// RESOURCE_EXHAUSTED (out of device memory), INTERNAL for other CUDA failures.
  [[nodiscard]] result<registration::device_buffer> allocate(std::int32_t device_id, std::uint64_t bytes) override;
  [[nodiscard]] result<registration::device_buffer> copy_from_host(std::int32_t device_id,
                                                                   const memory::byte_source& host) override;

  /// Mappings open right now: IPC mappings (distinct (owner pid, handle) keys with a live
  /// holder) plus live VMM imports (each import_vmm() result until its last holder goes).
  [[nodiscard]] std::size_t open_mappings() const override;

  /// Imports the CUDA VMM allocations behind `fds` (POSIX fds of cuMemExportToShareableHandle)
  /// of `owner_pid` and maps them back to back on `device_id` (chunk i: allocation i, which
  /// must be chunk_bytes[i] bytes), in a reservation of exactly sum(chunk_bytes) rounded up
  /// to the device's allocation granularity, readable by `device_id` (read-only where the
  /// driver grants it, else read-write). The result is a device_source of sum(chunk_bytes)
  /// bytes. Every call imports afresh (an allocation imported twice is mapped twice); the fds
  /// are not closed or kept. Imports and releases of one provider run one at a time.
  /// Errors: INVALID_ARGUMENT (no chunks; fds and chunk sizes of different counts; a size of 0
  /// or not a multiple of the granularity; an fd that does not import, e.g. not a CUDA
  /// export; a chunk size other than its allocation's: the driver maps whole allocations
  /// only), FAILED_PRECONDITION (no device `device_id`;
  /// memory of another device or of the host; a driver without the VMM API),
  /// RESOURCE_EXHAUSTED (address space or memory), INTERNAL for other driver failures.
  [[nodiscard]] result<std::shared_ptr<const memory::byte_source>> import_vmm(
      std::int32_t owner_pid, std::int32_t device_id, std::span<const int> fds,
      std::span<const std::uint64_t> chunk_bytes) override;

  /// The ordinal of the device whose UUID is `uuid` ("GPU-" + 36 characters, or the bare 36;
  /// any case). Errors: INVALID_ARGUMENT (not a UUID), FAILED_PRECONDITION "... no CUDA device
  /// GPU-... is visible to the daemon".
  [[nodiscard]] result<std::int32_t> device_by_uuid(std::string_view uuid) const override;

  /// "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" (lower case) of `device_id`; empty when there
  /// is no such device.
  [[nodiscard]] std::string uuid_of(std::int32_t device_id) const override;

  /// Address space reserved by live VMM imports, in bytes.
  [[nodiscard]] std::uint64_t vmm_reserved_bytes() const override;

  /// Hashes `canonical` on its GPU when options::placement says the GPU is the faster place for
  /// its size (or forces it) and every segment
  /// (through nested segmented views) reads device memory of one device: the DATA bytes are
  /// gathered into a zeroed scratch buffer with device-to-device copies (PAD stays zero), then
  /// the GPU tree hash runs there. nullopt otherwise, or when the scratch does not fit on the
  /// device (the host then hashes through staging).
  /// Errors (inside the optional): the GPU hash's, and CUDA errors of the gather.
  [[nodiscard]] std::optional<result<hash::digest>> tree_hash_on_device(
      const memory::segmented_view& canonical) override;

  /// Copies `source` into a memfd (recycled from the replica pool, see
  /// options::replica_pool_bytes, else new) on the GPU side (src/cuda/bulk_copy.hpp) when all its
  /// bytes are device memory of one device and options::placement picks the GPU for that
  /// size: the bytes are snapshotted device-to-device into scratch, then the snapshot is
  /// copied to the host while, with `want_digest`, the GPU tree-hashes the same snapshot (so
  /// the digest is that of the replica whatever the client does meanwhile). nullopt
  /// otherwise, or when the scratch does not fit on the device (the host path then copies).
  /// Errors (inside the optional): CUDA errors, RESOURCE_EXHAUSTED (no host memory).
  [[nodiscard]] std::optional<result<registration::host_copy>> copy_to_host(const memory::byte_source& source,
                                                                            bool want_digest,
                                                                            thread_pool& pool) override;

  /// A new device buffer holding `source` (registration::device_memory::snapshot_to_device):
  /// cudaMalloc of source.size() bytes on the source's device (or the spare made ahead, see
  /// options::snapshot_spare_bytes), the device runs copied into it and the gaps zeroed on the
  /// provider's own stream for that device by one launch of a batched copy kernel over a table
  /// of chunks (its tables kept for the next snapshot; runs that continue each other are merged
  /// first), then one synchronize; exported with cudaIpcGetMemHandle. Where that launch cannot
  /// be made, the runs are copied by one cudaMemcpyBatchAsync where the driver has it, else one
  /// cudaMemcpyAsync each, and the gaps zeroed by memsets. Snapshots of one device run one at a
  /// time. nullopt when `source` is not all device memory of one device.
  /// Errors (inside the optional): RESOURCE_EXHAUSTED (out of device memory), INTERNAL and
  /// others for CUDA failures.
  [[nodiscard]] std::optional<result<registration::device_buffer>> snapshot_to_device(
      const memory::byte_source& source) override;

  /// Driver opens of CUDA IPC handles (cache hits not counted) and VMM imports since create().
  [[nodiscard]] std::uint64_t ipc_opens() const override;
  [[nodiscard]] std::uint64_t vmm_imports() const override;

  /// Does on every device what a first commit would otherwise pay for, so that it costs what
  /// later ones do: starts the CUDA context, measures the placement speeds (unless
  /// options::placement forces a site), loads the GPU tree hash kernels with a 1 MiB hash on the
  /// device's hasher, allocates a pinned staging buffer and the snapshot stream, and loads the
  /// snapshot's batched copy kernel with a small copy. Idempotent; the daemon calls it before
  /// it reports ready (tensorregd --no-warm-start skips it).
  /// Errors: the first CUDA failure (what it did not reach then happens on first use instead).
  [[nodiscard]] status warm_up();

  /// How many canonical buffers tree_hash_on_device() and copy_to_host() have hashed on a GPU.
  [[nodiscard]] std::uint64_t device_hashes() const noexcept;

  /// How many snapshots snapshot_to_device() has written with one launch of the batched copy
  /// kernel (the others went through per-run copies).
  [[nodiscard]] std::uint64_t snapshot_kernel_copies() const noexcept;

  /// Idle replica memory kept for reuse now, and its bound (options::replica_pool_bytes
  /// resolved), in bytes.
  [[nodiscard]] std::uint64_t replica_pool_idle_bytes() const;
  [[nodiscard]] std::uint64_t replica_pool_max_bytes() const noexcept;

  /// Number of CUDA devices this provider sees.
  [[nodiscard]] std::int32_t device_count() const noexcept;

 private:
  explicit device_memory_provider(std::shared_ptr<detail::provider_state> state) noexcept;
  std::shared_ptr<detail::provider_state> state_;
};

}  // namespace tensorreg::cuda
