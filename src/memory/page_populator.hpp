// src/memory/page_populator.hpp — faults a writable mapping's pages in ahead of scattered
// writes, slice by slice, on whichever threads come to help.
//
// A fresh memfd page costs a fault and a zeroing on its first write. Writes that land all over a
// buffer (a transposed view's chunk writes a few hundred bytes on each of thousands of pages)
// pay that fault on every page, from every writer at once, in the same page tables; faulting
// the buffer in first, contiguous slices on separate threads, costs a fraction of it
// (benchmarks/RESULTS.md, view upload). Each run(allowance) claims slices until it has
// populated `allowance` bytes or none is left, so the first writers populate the buffer
// together and later ones find it done. The allowance keeps what a writer makes resident in
// proportion to what it writes: a client that sends one chunk of a huge buffer must not make
// the daemon commit all of it.
//
// Populating never changes bytes: a page already there (written or not) is left as it is, so
// run() may overlap writes to the same buffer. Where the kernel lacks MADV_POPULATE_WRITE
// (before Linux 5.14) it does nothing and the writes fault as before.
//
// Thread-safety: run() may be called concurrently from any number of threads.
// Ownership: borrows the mapping, which must outlive every run().
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <span>

namespace tensorreg::memory {

/// Faults [p, p + length) in for writing (MADV_POPULATE_WRITE); false where the kernel cannot,
/// or a page could not be had (the write then faults it, or fails, itself).
bool populate_for_write(std::byte* p, std::uint64_t length) noexcept;

class page_populator {
 public:
  static constexpr std::uint64_t slice_bytes = std::uint64_t{4} << 20;

  explicit page_populator(std::span<std::byte> mapping) noexcept : mapping_(mapping) {}
  page_populator(const page_populator&) = delete;
  page_populator& operator=(const page_populator&) = delete;

  /// Populates slices no other run() has claimed, about `allowance` bytes of them (at least one
  /// slice when any is left), fewer when none is left or a populate fails (then the rest is left
  /// to the writes' own faults).
  void run(std::uint64_t allowance) noexcept;

  /// Whether every slice has been claimed (some may still be being populated).
  [[nodiscard]] bool claimed_all() const noexcept { return next_.load(std::memory_order_relaxed) >= mapping_.size(); }

 private:
  std::span<std::byte> mapping_;
  std::atomic<std::uint64_t> next_{0};
};

}  // namespace tensorreg::memory
