// src/registration/plans/snapshot.hpp — snapshot leases (LeaseOptions.in_place = false): at
// commit, the daemon copies a lease's bytes into memory of its own, and the artifact is served
// from that copy (registration.md §5.4; DECISIONS §6).
//
// Provides `snapshot_view`: the copy of a lease's normalized canonical buffer as a lip_view the
// lease then holds instead of the client's memory. Device memory of one device is copied
// device-to-device into one new buffer on that device (device_memory::snapshot_to_device), which
// readers open like the client's memory (OpenArtifactDevice, tier VRAM); anything else (HOST_SHARED
// regions, host bytes, several devices) is copied into a new memfd, sealed against writes. Its
// device half, `snapshot_on_device`, and `view_over` also serve a publish_copy lease
// (lease_in_place.hpp), whose copy becomes a GPU replica instead.
//
// Private to the engine. Thread-safety: free functions; a copy reads `leased` while the caller
// holds what it reads. Ownership: a returned view owns its copy.
#pragma once

#include <memory>
#include <optional>

#include "registration/catalogue.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/memory/segmented_view.hpp"
#include "tensorreg/registration/device_memory.hpp"

namespace tensorreg::registration::detail {

/// A lip_view of all of `copy`'s bytes that keeps `copy` alive.
/// Errors: what building the view returns.
[[nodiscard]] result<lip_view> view_over(std::shared_ptr<const memory::byte_source> copy);

/// `leased` copied into one new buffer on its device (device_memory::snapshot_to_device), counted
/// as bytes copied; nullopt when `devices` is null, `leased` is empty or not device memory of
/// one device `devices` reaches. Once this returns nothing reads `leased` any more.
/// Errors (inside the optional): as snapshot_to_device.
[[nodiscard]] std::optional<result<device_buffer>> snapshot_on_device(const memory::segmented_view& leased,
                                                                      device_memory* devices);

/// A lip_view over a copy of `leased` (a lease's normalized canonical buffer): one device
/// buffer (device_allocations names it, with its IPC handle) when `devices` can snapshot it on
/// its device, else a memfd copied through `pool` (no device_allocations). Once this returns
/// nothing reads `leased` any more.
/// Errors: RESOURCE_EXHAUSTED (no device or host memory for the copy), what reading `leased`
/// or the device copy returns.
[[nodiscard]] result<lip_view> snapshot_view(const memory::segmented_view& leased, device_memory* devices,
                                             thread_pool& pool);

}  // namespace tensorreg::registration::detail
