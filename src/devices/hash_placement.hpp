// src/devices/hash_placement.hpp — where device bytes are hashed (and copied): on their
// GPU or on the host, chosen by predicted time from measured speeds.
//
// The GPU tree hash runs one leaf per thread, so it takes about the time of one 4 MiB leaf on
// one GPU thread whatever the size, as long as the leaves fit the threads in flight; the host
// hashes at one core's SHA-256 rate times its threads, after staging the bytes over PCIe. So
// small buffers hash faster on the host and large ones on the GPU; where the crossover lies
// depends on the machine, hence a model fed with numbers measured on it
// (src/cuda/speed_probe.hpp measures them) instead of a size constant. Pure arithmetic: no
// CUDA, tested on the CPU.
//
// Thread-safety: stateless functions. Ownership: plain values.
#pragma once

#include <cstdint>
#include <optional>
#include <utility>

#include "tensorreg/common/error.hpp"

namespace tensorreg::devices {

/// Speeds of one GPU and this host, in seconds and bytes per second.
struct hash_speeds {
  double gpu_flat_seconds = 0;            ///< one GPU tree hash of up to gpu_parallel_leaves leaves
  std::uint64_t gpu_parallel_leaves = 0;  ///< leaves the GPU hashes at once (one per thread)
  double host_core_hash_rate = 0;         ///< SHA-256 bytes/s of one host core
  double host_core_copy_rate = 0;         ///< memcpy bytes/s of one host core (0: not counted)
  unsigned host_threads = 0;              ///< threads hashing on the host
  double d2h_rate = 0;                    ///< device → pinned host copy, bytes/s
  double d2d_rate = 0;                    ///< device → device copy (gather, snapshot), bytes/s
  /// All host threads together writing memory a new memfd hands out for the first time,
  /// bytes/s: page faults and zeroing, which need not scale with threads (a VM's do not), so a
  /// fresh replica is written no faster than this however it is filled. 0: not measured, not
  /// counted.
  double host_fresh_write_rate = 0;
};

enum class hash_site { host, gpu };

/// The choice and the two predictions it was made from (seconds).
struct hash_plan {
  hash_site site = hash_site::host;
  double host_seconds = 0;
  double gpu_seconds = 0;
};

/// Predicted GPU tree hash time of `bytes`: flat per round of gpu_parallel_leaves leaves.
[[nodiscard]] double gpu_hash_seconds(const hash_speeds& s, std::uint64_t bytes) noexcept;

/// Hashing `bytes` of device memory where they are (tree_hash_on_device):
///   host = staged D2H overlapped with hashing: bytes / min(d2h, threads × core hash rate);
///   gpu  = (a gather into one buffer when `gather`) + the GPU hash.
/// Any speed that is not positive (unmeasured) makes the host the choice.
[[nodiscard]] hash_plan plan_hash(const hash_speeds& s, std::uint64_t bytes, bool gather) noexcept;

/// Copying `bytes` of device memory into host memory, hashed when `want_digest`
/// (device_memory::copy_to_host):
///   host = staged D2H overlapped with each thread's copy + hash of its leaves, into a fresh
///          memfd: no faster than host_fresh_write_rate;
///   gpu  = a snapshot on the device, then the D2H of the snapshot concurrent with its GPU hash;
///          the D2H lands in a recycled replica at the link's rate when `replica_ready` (an idle
///          pooled arena of that size exists), else in a fresh memfd, no faster than
///          host_fresh_write_rate either.
[[nodiscard]] hash_plan plan_copy(const hash_speeds& s, std::uint64_t bytes, bool want_digest,
                                  bool replica_ready = false) noexcept;

/// The site forced by `forced`, else the choice of `plan` (plan_hash or plan_copy bound to the
/// size) on the speeds `measure()` returns (a result<hash_speeds>), with `host_threads` set;
/// the host when they cannot be measured. `measure` is called only when nothing is forced, so
/// a forced site never pays for a measurement.
template <typename Measure, typename Plan>
[[nodiscard]] hash_site choose_site(std::optional<hash_site> forced, unsigned host_threads, Measure&& measure,
                                    Plan&& plan) {
  if (forced) return *forced;
  result<hash_speeds> speeds = std::forward<Measure>(measure)();
  if (!speeds) return hash_site::host;
  speeds->host_threads = host_threads;
  return std::forward<Plan>(plan)(*speeds).site;
}

}  // namespace tensorreg::devices
