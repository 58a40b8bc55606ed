// client/cuda_plan.hpp — the CPU-testable planning of a CUDA register (private).
//
// Two pure steps of connection::register_cuda, mirroring the Python client's _layout.build and
// _device.plan, so that they run in the CPU suite against a fake driver:
//
// plan_layout: the storages of a tensor dict, identified by (device address, nbytes) in the
// order the tensors first name them; the canonical index (names in byte order, each storage at
// the cursor rounded up to 8); each storage's canonical offset; each alias's storage and
// logical length.
//
// plan_device (docs/wire-format.md §12):
// - every non-empty storage is found in its allocation; each allocation is looked up once: its
//   range, then its IPC handle (cudaMalloc memory) or its retained allocation handle (VMM
//   pages), asking first for the kind the previous allocation was (the other call fails), so a
//   run of one kind costs two driver calls an allocation;
// - cudaMalloc memory: one IPC handle per allocation; a VRAM region (RegisterRegion with that
//   handle, the allocation's size) where the allocation backs several storages, else the handle
//   in the storage's own entry; both with mapping_base_offset = storage address - base;
// - VMM memory: the pages covering the storages, merged into runs of address-adjacent pages; a
//   run becomes windows of at most 250 pages (one fd per page, at most 250 a frame), each one
//   VRAM region. A window starts at the first page of the first storage no earlier window holds
//   and takes every following storage that ends inside it, so each storage lies in exactly one;
// - empty storages borrow the source of a non-empty one (length 0 is in bounds anywhere).
//
// Thread-safety: plain functions; a device_plan is used by one thread. Ownership: a
// device_plan owns the VMM handles it retained and releases them when destroyed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tensorreg/client/types.hpp"
#include "tensorreg/common/error.hpp"
#include "tensorreg/common/unique_fd.hpp"
#include "tensorreg/index/canonical_index.hpp"

namespace tensorreg::client::detail {

/// At most this many VMM pages (one fd each) make one region: one frame's fds.
inline constexpr std::size_t max_pages_per_region = 250;

/// CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR in handle_types().
inline constexpr std::uint64_t posix_fd_handle_type = 1;

/// "0x7f0000000000": how messages name a device address.
[[nodiscard]] std::string hex_address(std::uint64_t address);

/// The driver calls the planner needs; the real one lives in cuda_driver.cpp (CUDA builds).
class cuda_driver {
 public:
  virtual ~cuda_driver() = default;
  /// (base, size) of the allocation holding `ptr` (a cudaMalloc block or one VMM page).
  /// Errors: the driver's reason (FAILED_PRECONDITION).
  [[nodiscard]] virtual result<std::pair<std::uint64_t, std::uint64_t>> address_range(std::uint64_t ptr) = 0;
  /// The IPC handle of cudaMalloc memory at `base`; nullopt when the driver refuses it.
  [[nodiscard]] virtual std::optional<std::string> try_ipc_handle(std::uint64_t base) = 0;
  /// Why no IPC handle can be had at `base` (the driver's own reason).
  [[nodiscard]] virtual error ipc_handle_error(std::uint64_t base) = 0;
  /// Retains the VMM allocation handle of the page at `base`; nullopt when it is not VMM memory.
  [[nodiscard]] virtual std::optional<std::uint64_t> retain_allocation(std::uint64_t base) = 0;
  virtual void release(std::uint64_t handle) noexcept = 0;
  /// The shareable handle types the allocation was created with (bit posix_fd_handle_type).
  [[nodiscard]] virtual std::uint64_t handle_types(std::uint64_t handle) = 0;
  /// A POSIX fd of a retained VMM handle. Errors: FAILED_PRECONDITION (the driver's reason).
  [[nodiscard]] virtual result<unique_fd> export_fd(std::uint64_t handle) = 0;
};

/// One storage as the client holds it.
struct storage_span {
  std::uint64_t ptr = 0;
  std::uint64_t nbytes = 0;
  friend bool operator==(const storage_span&, const storage_span&) = default;
};

struct lease_layout {
  index::canonical_index index;
  std::vector<storage_span> storages;            ///< distinct, in the order tensors first name them
  std::vector<std::size_t> canonical_storages;   ///< canonical position -> storages[]
  std::vector<std::uint64_t> canonical_offsets;  ///< canonical position -> artifact offset
  std::vector<std::size_t> alias_storage;        ///< index entry -> canonical position
  std::vector<std::uint64_t> logical_lengths;    ///< index entry -> bytes from first to last element
};

/// The canonical layout of `tensors`.
/// Errors: INVALID_ARGUMENT naming the tensor (unknown dtype, shape/stride rank mismatch, a
/// negative shape, a view that reaches past its storage) and every canonical_index::build rule.
[[nodiscard]] result<lease_layout> plan_layout(std::span<const cuda_tensor> tensors, std::string_view what);

/// One allocation looked up (a cudaMalloc block, or one VMM page).
struct allocation {
  std::uint64_t base = 0;
  std::uint64_t size = 0;
  std::optional<std::uint64_t> vmm_handle;  ///< retained; set for VMM pages
  std::string ipc_handle;                   ///< set for cudaMalloc memory
};

/// One RegisterRegion: an IPC allocation (ipc_handle set) or a window of VMM pages.
struct region {
  std::uint64_t base = 0;
  std::uint64_t size = 0;
  std::string ipc_handle;
  std::vector<allocation> pages;      ///< VMM, in address order; empty for IPC
  std::vector<std::size_t> storages;  ///< positions in the planned spans that reference it
};

/// Where a storage's entry points: a region, or its allocation's own IPC handle.
struct source {
  std::optional<std::size_t> region;
  std::string ipc_handle;
  std::uint64_t mapping_base_offset = 0;
};

class device_plan {
 public:
  device_plan(device_plan&& other) noexcept;
  device_plan& operator=(device_plan&&) = delete;
  device_plan(const device_plan&) = delete;
  device_plan& operator=(const device_plan&) = delete;
  ~device_plan();

  std::vector<region> regions;
  std::vector<source> sources;          ///< one per planned span
  std::vector<allocation> allocations;  ///< every allocation looked up, by base
  std::size_t lone_handles = 0;         ///< storages that carry their allocation's handle

 private:
  friend result<device_plan> plan_device(cuda_driver&, std::span<const storage_span>, std::string_view);
  explicit device_plan(cuda_driver* driver) noexcept : driver_(driver) {}
  cuda_driver* driver_;
};

/// Plans the registration of `spans` (see the file comment).
/// Errors: FAILED_PRECONDITION (memory neither cudaMalloc nor VMM, VMM pages without the POSIX
/// fd handle type, the driver's refusals); UNIMPLEMENTED (a storage over more than 250 pages);
/// DATA_LOSS (a storage that runs past its allocation, every storage empty).
[[nodiscard]] result<device_plan> plan_device(cuda_driver& driver, std::span<const storage_span> spans,
                                              std::string_view what);

/// Address-adjacent pages merged into runs, in address order.
[[nodiscard]] std::vector<std::vector<allocation>> merge_runs(std::vector<allocation> pages);

/// A window of one run: pages [first, last] and the storages it holds.
struct window {
  std::size_t first = 0;
  std::size_t last = 0;
  std::vector<std::size_t> storages;
};
/// One member of a run: the storage `storage` covers pages [first, last] of it.
struct run_member {
  std::size_t first = 0;
  std::size_t last = 0;
  std::size_t storage = 0;
};
/// The windows of one run (at most `limit` pages each, each storage in exactly one).
/// Errors: UNIMPLEMENTED when one storage alone needs more than `limit` pages.
[[nodiscard]] result<std::vector<window>> windows(std::vector<run_member> members, std::size_t limit,
                                                  std::string_view what);

}  // namespace tensorreg::client::detail
