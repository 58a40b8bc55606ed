// src/cuda/hash_placement.hpp — the measured inputs of registration/hash_placement.hpp for a
// CUDA device of this process (private to src/cuda/).
//
// measured_speeds(device) measures, once per device and process, on first use: the GPU tree
// hash of one 4 MiB leaf (one GPU thread hashes a leaf, so that is the flat time of any hash up
// to one leaf per thread in flight), a pinned D2H and a D2D copy of 64 MiB, and one host core's
// SHA-256 and memcpy (into fresh pages) rates over 16 MiB. About 0.3 s in all, most of it the
// leaf hash; later calls return the cached numbers. host_threads is left 0 for the caller.
//
// Thread-safety: safe from any thread; concurrent first calls for one device measure once.
// Ownership: measurement buffers are freed before returning.
#pragma once

#include <cstdint>
#include <optional>

#include "registration/hash_placement.hpp"
#include "tensorreg/common/error.hpp"

namespace tensorreg::cuda::detail {

/// Speeds of `device` and this host (host_threads = 0). Failures are not cached: a later call
/// measures again.
/// Errors: CUDA errors of the measurement (RESOURCE_EXHAUSTED when its 128 MiB do not fit).
[[nodiscard]] result<registration::detail::hash_speeds> measured_speeds(int device);

/// The site forced by `forced` (a registration::detail::hash_site), else the plan's choice from
/// measured_speeds(device) with `host_threads`; the host when the speeds cannot be measured.
/// `plan` is plan_hash or plan_copy bound to the size.
template <typename Plan>
[[nodiscard]] registration::detail::hash_site choose_site(std::optional<registration::detail::hash_site> forced,
                                                          int device, unsigned host_threads, Plan&& plan) {
  if (forced) return *forced;
  auto speeds = measured_speeds(device);
  if (!speeds) return registration::detail::hash_site::host;
  speeds->host_threads = host_threads;
  return plan(*speeds).site;
}

}  // namespace tensorreg::cuda::detail
