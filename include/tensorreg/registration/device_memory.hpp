// tensorreg/registration/device_memory.hpp — how the engine reaches device (GPU) memory.
//
// The engine never calls CUDA itself. Everything it needs from a GPU goes through this
// interface, which tensorreg/cuda/ implements; with no implementation (engine_options::devices
// null: a machine with no GPU, or a build without CUDA) every CUDA-only request fails
// FAILED_PRECONDITION with a message that names the missing device, and everything else works.
//
// Thread-safety: implementations must allow concurrent calls. Ownership: returned sources
// keep their mapping open until the last shared_ptr to them is released.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include <optional>
#include <span>
#include <vector>

#include "tensorreg/common/error.hpp"
#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/memory/byte_source.hpp"
#include "tensorreg/memory/segmented_view.hpp"
#include "tensorreg/memory/shared_memory.hpp"

namespace tensorreg::registration {

/// A daemon-owned device buffer (coalesced plan) with the IPC handle clients map it by.
struct device_buffer {
  std::shared_ptr<const memory::byte_source> bytes;
  std::string ipc_handle;
  std::int32_t device_id = -1;  ///< the device it is on (-1: not said)
};

/// A host copy of device bytes made by copy_to_host().
struct host_copy {
  std::shared_ptr<const memory::shared_memory> replica;
  std::optional<hash::digest> data_digest;  ///< set when asked for
};

class device_memory {
 public:
  virtual ~device_memory() = default;

  /// Opens (or finds in its cache) the allocation behind `ipc_handle` of `owner_pid` on
  /// `device_id`, readable for at least `min_bytes` bytes from its base.
  /// Errors: FAILED_PRECONDITION (no such device, device mismatch), INVALID_ARGUMENT
  /// (malformed or stale handle), OUT_OF_RANGE (allocation too small).
  [[nodiscard]] virtual result<std::shared_ptr<const memory::byte_source>> open_ipc(std::int32_t owner_pid,
                                                                                    std::int32_t device_id,
                                                                                    std::string_view ipc_handle,
                                                                                    std::uint64_t min_bytes) = 0;

  /// Allocates `bytes` on `device_id` and exports it.
  /// Errors: FAILED_PRECONDITION (no such device), RESOURCE_EXHAUSTED.
  [[nodiscard]] virtual result<device_buffer> allocate(std::int32_t device_id, std::uint64_t bytes) = 0;

  /// A new buffer on `device_id` holding a copy of `host` (host memory: an artifact's stable
  /// DRAM replica), exported like allocate()'s. The copy no longer reads `host` once this
  /// returns. Errors: FAILED_PRECONDITION (no such device; no GPU: the default),
  /// RESOURCE_EXHAUSTED, INVALID_ARGUMENT (0 bytes), CUDA errors, `host`'s read errors.
  [[nodiscard]] virtual result<device_buffer> copy_from_host(std::int32_t device_id, const memory::byte_source& host) {
    (void)host;
    return fail(errc::failed_precondition, "cannot copy an artifact to CUDA device " + std::to_string(device_id) +
                                               ": no GPU is available to this engine");
  }

  /// Mappings open right now (for stats).
  [[nodiscard]] virtual std::size_t open_mappings() const = 0;

  /// CUDA IPC handles opened (driver opens, not cache hits) and CUDA VMM imports made since
  /// this object was created (GetStats, docs/wire-format.md §14): a client that re-leases the
  /// regions it keeps makes neither grow.
  [[nodiscard]] virtual std::uint64_t ipc_opens() const { return 0; }
  [[nodiscard]] virtual std::uint64_t vmm_imports() const { return 0; }

  /// A daemon-owned device copy of `source` (a snapshot lease, registration.md §5.4) when all
  /// its bytes are device memory of one device this implementation reaches (through nested
  /// segmented views; gaps read as zero): a new buffer of exactly source.size() bytes on that
  /// device, filled device-to-device and exported like allocate()'s. Once this returns, the
  /// copy no longer reads `source`. nullopt means "not device memory of one device" (the
  /// default: no GPU); the caller then copies on the host.
  /// Errors (inside the optional): RESOURCE_EXHAUSTED (no device memory), CUDA errors.
  [[nodiscard]] virtual std::optional<result<device_buffer>> snapshot_to_device(const memory::byte_source& source) {
    (void)source;
    return std::nullopt;
  }

  /// Imports CUDA VMM allocations of `owner_pid` (POSIX fds from cuMemExportToShareableHandle;
  /// the caller keeps its fds, the import dups what it needs) and maps them back to back on
  /// `device_id`: chunk i covers chunk_bytes[i] bytes, which must be its whole allocation's size
  /// (the driver maps whole allocations only: a smaller or larger size fails INVALID_ARGUMENT). The returned source reads the whole
  /// range, sum(chunk_bytes) bytes, and unmaps and releases it with its last holder. Address
  /// space reserved is exactly that sum rounded up to the device's granularity
  /// (docs/wire-format.md §12).
  /// Errors: INVALID_ARGUMENT (no chunks, fds and sizes of different counts, a size of 0 or not
  /// a multiple of the granularity, an fd that does not import), FAILED_PRECONDITION (no such
  /// device; the memory lives on another device), RESOURCE_EXHAUSTED (address space).
  [[nodiscard]] virtual result<std::shared_ptr<const memory::byte_source>> import_vmm(
      std::int32_t owner_pid, std::int32_t device_id, std::span<const int> fds,
      std::span<const std::uint64_t> chunk_bytes) {
    (void)owner_pid, (void)fds, (void)chunk_bytes;
    return fail(errc::failed_precondition, "cannot import CUDA VMM memory on device " + std::to_string(device_id) +
                                               ": no GPU is available to this engine");
  }

  /// This provider's ordinal of the GPU whose UUID is `uuid` ("GPU-" + 36 characters as
  /// nvidia-smi prints it, or the bare 36; case-insensitive).
  /// Errors: INVALID_ARGUMENT (not a UUID), FAILED_PRECONDITION (no such device visible here).
  [[nodiscard]] virtual result<std::int32_t> device_by_uuid(std::string_view uuid) const {
    return fail(errc::failed_precondition,
                "cannot find CUDA device " + std::string(uuid) + ": no GPU is available to this engine");
  }

  /// "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" of `device_id`, lower case; empty when unknown.
  [[nodiscard]] virtual std::string uuid_of(std::int32_t device_id) const {
    (void)device_id;
    return {};
  }

  /// Virtual address space reserved for VMM imports now, in bytes (stats and tests).
  [[nodiscard]] virtual std::uint64_t vmm_reserved_bytes() const { return 0; }

  /// The data tree hash of `canonical` computed on a GPU, when all its bytes are device memory
  /// of one device this provider reaches (gaps read as zero) and the GPU is the faster place
  /// to hash that many bytes. nullopt means "hash it on the host" (the default: no GPU).
  /// The digest equals hash::tree_hash(canonical) bit for bit.
  /// Errors (inside the optional): what the GPU hash returns.
  [[nodiscard]] virtual std::optional<result<hash::digest>> tree_hash_on_device(
      const memory::segmented_view& canonical) {
    (void)canonical;
    return std::nullopt;
  }

  /// A daemon-owned host copy (a memfd of exactly its size: new, or one the implementation
  /// recycled, every byte rewritten) of `source`, read as a canonical buffer, made by
  /// the GPU when all its bytes are device memory of one device this provider reaches (through
  /// nested segmented views; gaps read as zero) and that is the faster place to copy and hash
  /// them. With `want_digest`, data_digest is the tree hash of exactly the bytes of the
  /// replica, even if the device memory changes during the call. nullopt means "copy it on the
  /// host" (the default: no GPU); `pool` is the engine's, for host-side parts of the copy.
  /// Errors (inside the optional): RESOURCE_EXHAUSTED (no host memory), CUDA errors.
  [[nodiscard]] virtual std::optional<result<host_copy>> copy_to_host(const memory::byte_source& source,
                                                                      bool want_digest, thread_pool& pool) {
    (void)source, (void)want_digest, (void)pool;
    return std::nullopt;
  }
};

}  // namespace tensorreg::registration
