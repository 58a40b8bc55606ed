// tensorreg/common/fault_injection.hpp — failures injected where the engine meets the system.
//
// Provides named fault sites (allocation, memfd, mmap, read, write, fsync, rename, ...). Code
// that makes such a call asks `injected_fault(site)` first and, when it returns an errno, fails
// exactly as if the system call had (leveldb's fault-injection Env, reduced to a switch per
// site). Tests arm a site with `scoped_fault` — "the 3rd write fails with ENOSPC" — and then
// check that the failure is answered with a clear error and leaves the engine consistent. A
// daemon started with TENSORREG_FAULTS in its environment arms sites from that text, so
// end-to-end tests can fail a real daemon's calls. The clock is a seam of its own
// (common/clock.hpp): tests move a fake clock instead of failing it.
//
// Disarmed, which is the normal case, a check is one relaxed atomic load.
//
// Thread-safety: checking and arming are safe from any thread. Arming is process-wide: a test
// that arms a site affects every thread that reaches it until the scoped_fault ends.
// Ownership: a scoped_fault disarms its site when destroyed; at most one is live per site.
#pragma once

#include <cstdint>
#include <string_view>

#include "tensorreg/common/error.hpp"

namespace tensorreg {

/// The places a fault can be injected: one per kind of system call the engine depends on.
enum class fault_site : std::uint8_t {
  allocate,      ///< a large buffer allocation (staging, replicas, coalesced copies)
  memfd_create,  ///< creating shared memory
  ftruncate,     ///< sizing shared memory or a file
  mmap,          ///< mapping shared memory or a file
  open,          ///< opening or creating a file
  read,          ///< reading a file
  write,         ///< writing a file
  fsync,         ///< flushing a file or a directory
  rename,        ///< publishing a file under its final name
};

inline constexpr std::size_t fault_site_count = 9;

/// The site's name as written in TENSORREG_FAULTS ("memfd_create", "fsync", ...).
[[nodiscard]] std::string_view to_string(fault_site site) noexcept;

/// The errno to fail this call with, or 0 to go ahead with the real call. Counts the call.
[[nodiscard]] int injected_fault(fault_site site) noexcept;

/// Arms one site for its lifetime: after `skip` calls that go through, the next `times` calls
/// fail with `error`; later calls go through again.
class scoped_fault {
 public:
  scoped_fault(fault_site site, int error, std::uint64_t skip = 0, std::uint64_t times = 1);
  ~scoped_fault();
  scoped_fault(const scoped_fault&) = delete;
  scoped_fault& operator=(const scoped_fault&) = delete;

  /// How many calls this fault has failed so far.
  [[nodiscard]] std::uint64_t fired() const noexcept;

 private:
  fault_site site_;
};

/// Arms sites for the rest of the process from text such as
/// "write:ENOSPC:2:1,fsync:EIO" (site:errno name[:skip[:times]], comma-separated; times 0 =
/// every call after the skipped ones). INVALID_ARGUMENT names the part it cannot read.
[[nodiscard]] status arm_faults(std::string_view spec);

}  // namespace tensorreg
