// src/memory/sigbus_guard.hpp — reads of a shared mapping that can never kill the process.
//
// A MAP_SHARED mapping of a file raises SIGBUS when a page past the file's end is touched: a
// client that shrinks its memfd under the daemon's mapping would otherwise take the daemon
// down. Client memfds must be sealed against shrinking (shared_memory::adopt_sealed), and every
// read of a mapping is armed with this guard regardless.
//
// `sigbus_guard` arms, for the calling thread, the address range about to be read. The process
// SIGBUS handler (installed by ensure_sigbus_handler(), which shared_memory calls whenever it
// maps memory) sees a fault inside an armed range, maps
// zero pages from the faulting page to the range's end, records the fault and returns: the
// read resumes on zeros, the reader finishes without unwinding through foreign frames (hash
// code, locks) and then reports the fault as an error. A fault outside every armed range goes
// to the previous handler, or ends the process as SIGBUS would have.
//
// The zero pages stay in place: memory that faulted once is broken for good, and its owner
// must stop reading it (shared_memory does).
//
// Thread-safety: a guard belongs to the thread that made it; guards nest (LIFO) per thread.
// Cost: two thread-local stores and a compiler fence per armed range; nothing per byte.
#pragma once

#include <atomic>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <span>

namespace tensorreg::memory::detail {

/// Installs the SIGBUS handler unless it is the one in place; the handler it replaces gets
/// every fault outside armed ranges. Someone else may have replaced ours since (a test
/// framework does, per test), so this checks every time; call it when mapping, not per read.
void ensure_sigbus_handler() noexcept;

class sigbus_guard {
 public:
  /// Arms the guard for `bytes` on this thread until destruction. A fault sets `broken` (when
  /// given) before the zero pages go in, so that another thread reading the same memory, which
  /// may then read those zeros without faulting, can tell that its read is void too.
  explicit sigbus_guard(std::span<const std::byte> bytes, std::atomic<bool>* broken = nullptr) noexcept;
  ~sigbus_guard();
  sigbus_guard(const sigbus_guard&) = delete;
  sigbus_guard& operator=(const sigbus_guard&) = delete;

  /// Whether a read inside the range faulted since the guard was armed.
  [[nodiscard]] bool faulted() const noexcept { return faulted_ != 0; }
  /// Offset in the range of the first fault. REQUIRES: faulted().
  [[nodiscard]] std::uint64_t fault_offset() const noexcept { return fault_offset_; }

 private:
  friend struct sigbus_handler;
  std::uintptr_t begin_;
  std::uintptr_t end_;
  sigbus_guard* outer_;
  std::atomic<bool>* broken_;
  volatile std::sig_atomic_t faulted_ = 0;
  std::uint64_t fault_offset_ = 0;
};

}  // namespace tensorreg::memory::detail
