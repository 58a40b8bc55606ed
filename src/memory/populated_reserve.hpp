// src/memory/populated_reserve.hpp — one memfd whose pages are faulted in ahead of the next
// host put that needs about its size, refilled on a thread of its own.
//
// A put from files or from CPU tensors writes every byte into a fresh memfd. Where the first
// touch of a page is dear (a VM whose guest pages are handed out and zeroed on first write),
// that first touch, not the copy or the hash, sets the put's time. The reserve pays it while
// the daemon is idle: its thread makes a memfd of `bytes`, faults every page in
// (MADV_POPULATE_WRITE, which zeroes them) on idle cores and keeps it, with the mapping whose
// page tables the populate filled in, until a put takes both: the put then neither maps nor
// faults. The put shrinks it, or grows it, to its own size; once no put has taken one for two
// seconds, the reserve makes the next.
//
// The memory was never written by anyone but the kernel's zeroing, so the put that takes it
// gets exactly what a fresh memfd gives: zeros. A spare is made only while the host has at
// least twice its size available (MemAvailable): held memory must never push the host into
// reclaim or the OOM killer. It is held outside the stable cache's budget,
// which is why the daemon makes one only when asked (--populated-reserve).
//
// Thread-safety: take() and the accessors may be called from any thread, and never wait for
// the refill thread (which runs at idle priority): the spare is handed over through atomics.
// Ownership: owns its thread and the spare memfd; the destructor stops and joins the thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>

#include "tensorreg/common/unique_fd.hpp"
#include "tensorreg/memory/shared_memory.hpp"

namespace tensorreg::memory {

/// MemAvailable of /proc/meminfo's text `meminfo`, in bytes; nullopt when it is not there.
[[nodiscard]] std::optional<std::uint64_t> mem_available_bytes(std::string_view meminfo);

class populated_reserve {
 public:
  /// Starts the thread that keeps one populated memfd of `bytes` named `name` ready. It runs
  /// under SCHED_IDLE (nice 19 where that is refused): only on cores nothing else wants, and
  /// pauses between slices while `busy()` (a registration open in the daemon: its hashing and
  /// copying also want the memory bandwidth, and its mmap() and munmap() the lock that a
  /// populate holds). `busy` may be empty; it must stay callable until the destructor returns.
  /// REQUIRES: bytes > 0.
  populated_reserve(std::uint64_t bytes, std::string name, std::function<bool()> busy = {});
  populated_reserve(const populated_reserve&) = delete;
  populated_reserve& operator=(const populated_reserve&) = delete;
  ~populated_reserve();

  /// The spare memfd sized to `size`, sealed against growing and shrinking and mapped
  /// read-write (through the populated mapping), as shared_memory::create() gives; nullopt when none is ready, or when `size`
  /// is under half of it (shrinking would free more than the put uses: a fresh memfd costs
  /// such a put less than the refill). Taking it starts the next refill once puts pause.
  [[nodiscard]] std::optional<shared_memory> take(std::uint64_t size);

  /// The bytes of the spare that is ready now (0 while none is).
  [[nodiscard]] std::uint64_t ready_bytes() const;
  /// How many puts took a spare.
  [[nodiscard]] std::uint64_t taken() const;

 private:
  // A populated memfd and its read-write mapping of all its bytes.
  struct spare {
    unique_fd fd;
    std::span<std::byte> mapping;
    ~spare();
  };

  void refill_loop();
  // Makes and populates one spare; null when stopping or when the memory could not be had.
  [[nodiscard]] std::unique_ptr<spare> make_spare();

  const std::uint64_t bytes_;
  const std::string name_;
  const std::function<bool()> busy_;
  std::atomic<spare*> spare_{nullptr};  // owned; null while a refill runs or after one failed
  std::atomic<std::uint64_t> taken_{0};
  // When a put last took the spare (steady_clock ticks): the refill waits for a quiet spell.
  std::atomic<std::chrono::steady_clock::rep> last_take_{0};
  std::atomic<bool> stopping_{false};
  // Only to sleep the refill thread: take() does not lock it, so a wake-up may be missed, and
  // the refill's waits are timed.
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  std::thread refiller_;
};

}  // namespace tensorreg::memory
