// tensorreg/devices/device_identity.hpp — GPU identity and VMM import arithmetic that needs no
// CUDA: GPU UUIDs in nvidia-smi's text form, finding a device by UUID, and the checks and
// address-space size of a CUDA VMM import (docs/wire-format.md §12).
//
// The CUDA provider (tensorreg/cuda/device_memory_provider.hpp) reads the UUIDs and the granularity
// from the driver and calls these; they live here so the CPU suite tests them without a GPU.
//
// Thread-safety: pure functions and plain values. Ownership: nothing is retained.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "tensorreg/common/error.hpp"

namespace tensorreg::devices {

/// The 16 bytes of a GPU UUID (cudaDeviceProp::uuid, cuDeviceGetUuid).
struct gpu_uuid {
  std::array<std::uint8_t, 16> bytes{};

  friend bool operator==(const gpu_uuid&, const gpu_uuid&) = default;
};

/// Parses "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" (nvidia-smi -L) or the bare 36 characters
/// (torch.cuda.get_device_properties(i).uuid); hex digits and the "GPU-" prefix in any case.
/// Errors: INVALID_ARGUMENT naming the text and what is wrong with it.
[[nodiscard]] result<gpu_uuid> parse_gpu_uuid(std::string_view text);

/// "GPU-" + the 36-character form, lower case: what nvidia-smi prints.
[[nodiscard]] std::string format_gpu_uuid(const gpu_uuid& uuid);

/// The index in `devices` (ordinal i has UUID devices[i]) of the device named by `uuid`.
/// Errors: INVALID_ARGUMENT (not a UUID, as parse_gpu_uuid), FAILED_PRECONDITION "cannot find
/// CUDA device GPU-…: no CUDA device GPU-… is visible to the daemon".
[[nodiscard]] result<std::int32_t> find_device(std::span<const gpu_uuid> devices, std::string_view uuid);

/// `bytes` rounded up to a multiple of `granularity`.
/// Errors: INVALID_ARGUMENT for granularity 0; OUT_OF_RANGE when the result exceeds 2^64 - 1.
[[nodiscard]] result<std::uint64_t> round_up(std::uint64_t bytes, std::uint64_t granularity);

/// Checks a list of CUDA VMM chunks arriving with `fd_count` fds and returns the bytes they
/// hold, sum(chunk_bytes). `what` prefixes every message ("cannot register region").
/// Errors: INVALID_ARGUMENT (no chunks; fds and chunks of different counts; a chunk of 0 bytes;
/// a sum past 2^64 - 1).
[[nodiscard]] result<std::uint64_t> vmm_chunks_total(std::size_t fd_count, std::span<const std::uint64_t> chunk_bytes,
                                                     std::string_view what);

/// Checks a VMM import of `fd_count` fds with sizes `chunk_bytes` on a device of allocation
/// granularity `granularity` (vmm_chunks_total's checks, then the granularity), and returns the
/// virtual address space to reserve for it: sum(chunk_bytes) rounded up to the granularity. `what` prefixes every message ("cannot
/// import CUDA VMM memory of process 7 on device 0").
/// Errors: INVALID_ARGUMENT (no chunks; fds and chunks of different counts; a chunk of 0 bytes
/// or not a multiple of the granularity; a sum past 2^64 - 1), INTERNAL for granularity 0 (the
/// driver's answer, never the caller's).
[[nodiscard]] result<std::uint64_t> vmm_reservation_bytes(std::size_t fd_count,
                                                          std::span<const std::uint64_t> chunk_bytes,
                                                          std::uint64_t granularity, std::string_view what);

}  // namespace tensorreg::devices
