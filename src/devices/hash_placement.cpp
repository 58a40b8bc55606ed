#include "devices/hash_placement.hpp"

#include <algorithm>

#include "tensorreg/hash/tree_hash.hpp"

namespace tensorreg::devices {
namespace {

bool measured(const hash_speeds& s) noexcept {
  return s.gpu_flat_seconds > 0 && s.gpu_parallel_leaves > 0 && s.host_core_hash_rate > 0 && s.host_threads > 0 &&
         s.d2h_rate > 0 && s.d2d_rate > 0;
}

double seconds(std::uint64_t bytes, double rate) noexcept { return static_cast<double>(bytes) / rate; }

hash_plan pick(double host, double gpu) noexcept { return {gpu < host ? hash_site::gpu : hash_site::host, host, gpu}; }

}  // namespace

double gpu_hash_seconds(const hash_speeds& s, std::uint64_t bytes) noexcept {
  if (s.gpu_parallel_leaves == 0) return 0;
  const std::uint64_t leaves = hash::leaf_count(bytes);
  const std::uint64_t rounds = std::max<std::uint64_t>(1, (leaves + s.gpu_parallel_leaves - 1) / s.gpu_parallel_leaves);
  return s.gpu_flat_seconds * static_cast<double>(rounds);
}

hash_plan plan_hash(const hash_speeds& s, std::uint64_t bytes, bool gather) noexcept {
  if (!measured(s) || bytes == 0) return {};
  const double host_rate = std::min(s.d2h_rate, s.host_core_hash_rate * s.host_threads);
  const double gpu = (gather ? seconds(bytes, s.d2d_rate) : 0.0) + gpu_hash_seconds(s, bytes);
  return pick(seconds(bytes, host_rate), gpu);
}

hash_plan plan_copy(const hash_speeds& s, std::uint64_t bytes, bool want_digest, bool replica_ready) noexcept {
  if (!measured(s) || bytes == 0) return {};
  // Host: every thread stages its leaves, copies them into the replica and hashes the copy, so
  // one thread's rate is the harmonic sum of its copy and hash rates.
  double per_byte = want_digest ? 1.0 / s.host_core_hash_rate : 0.0;
  if (s.host_core_copy_rate > 0) per_byte += 1.0 / s.host_core_copy_rate;
  const double thread_rate = per_byte > 0 ? 1.0 / per_byte : s.d2h_rate;
  // Either side that writes a fresh memfd is bound by its first touch, which need not scale with
  // the threads: one core's rate into fresh pages times the threads overstates the host wherever
  // page faults serialize, and made it win puts it then lost to the GPU path into a recycled
  // replica (DECISIONS §6).
  const double fresh = s.host_fresh_write_rate > 0 ? s.host_fresh_write_rate : s.d2h_rate;
  const double host_rate = std::min({s.d2h_rate, thread_rate * s.host_threads, fresh});
  // GPU: the snapshot (the id must describe the bytes kept), then the D2H of it while the GPU
  // hashes it: the longer of the two.
  const double link = replica_ready ? s.d2h_rate : std::min(s.d2h_rate, fresh);
  const double gpu =
      seconds(bytes, s.d2d_rate) + std::max(seconds(bytes, link), want_digest ? gpu_hash_seconds(s, bytes) : 0.0);
  return pick(seconds(bytes, host_rate), gpu);
}

}  // namespace tensorreg::devices
