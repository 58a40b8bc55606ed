// src/cuda/speed_probe.hpp — the measured inputs of devices/hash_placement.hpp for a CUDA
// device of this process (private to src/cuda/).
//
// measured_speeds(device) measures, once per device and process, on first use: the GPU tree
// hash of one 4 MiB leaf (one GPU thread hashes a leaf, so that is the flat time of any hash up
// to one leaf per thread in flight), a pinned D2H and a D2D copy of 64 MiB, and one host core's
// SHA-256 and memcpy (into fresh pages) rates over 16 MiB, and the rate at which all hardware
// threads together write a new 256 MiB memfd (its first touch). Most of the time goes to the leaf
// hash; later calls return the cached numbers. host_threads is left 0 for the caller
// (devices::choose_site sets it).
//
// Thread-safety: safe from any thread; concurrent first calls for one device measure once.
// Ownership: measurement buffers are freed before returning.
#pragma once

#include "devices/hash_placement.hpp"
#include "tensorreg/common/error.hpp"

namespace tensorreg::cuda::detail {

/// Speeds of `device` and this host (host_threads = 0). Failures are not cached: a later call
/// measures again.
/// Errors: CUDA errors of the measurement (RESOURCE_EXHAUSTED when its 128 MiB do not fit).
[[nodiscard]] result<devices::hash_speeds> measured_speeds(int device);

}  // namespace tensorreg::cuda::detail
