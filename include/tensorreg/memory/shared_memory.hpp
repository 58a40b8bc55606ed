// tensorreg/memory/shared_memory.hpp — host memory that other processes can map: a memfd.
//
// `shared_memory` owns a memfd and a MAP_SHARED mapping of it. The engine creates one for a
// daemon-managed HOST_SHARED region or a stable-DRAM publish buffer (create()), or adopts a
// client's memfd handed over with SCM_RIGHTS (adopt_sealed()). Its fd can be passed to other
// processes, which then see the same bytes.
//
// Memory of another process is mapped only when its memfd is sealed against shrinking
// (adopt_sealed()): a shrunk file turns reads of the lost pages into SIGBUS. Every visit() is
// guarded besides (src/memory/sigbus_guard.hpp): a read that faults anyway answers DATA_LOSS,
// and the memory answers DATA_LOSS from then on. Memory whose bytes are final is sealed
// read-only for good (seal_read_only()), so no fd of it, reopened or not, can change them.
//
// Memory whose fd left the process (duplicate_fd(), or an fd reopened from fd() and handed out
// by its owner, who then calls mark_exported()) may be mapped by a reader for as long as that
// reader likes: it is marked exported, and whoever recycles memfds (src/devices/replica_pool.hpp)
// must never reuse such memory for other bytes.
//
// Thread-safety: the object is immutable after creation (but for the exported mark, which is
// atomic and only ever set); concurrent visits are safe. Writers
// of mutable_bytes() must coordinate with readers themselves (the engine only reads ranges a
// client has declared written). Ownership: move-only; the mapping and fd close on destruction.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "tensorreg/common/unique_fd.hpp"
#include "tensorreg/memory/byte_source.hpp"

namespace tensorreg::memory {

/// The most threads for which a memfd's fresh pages are best filled by pwrite(), one thread at
/// a time (the memfd's inode lock admits one writer), rather than through a mapping whose page
/// faults run on every thread at once. Faults cost more than the copy on some VMs; beyond this
/// many threads the parallel faults win anyway (benchmarks/RESULTS.md, session 18).
inline constexpr unsigned max_pwrite_fill_threads = 4;

class shared_memory final : public byte_source {
 public:
  /// Creates a zero-filled memfd of `size` bytes named `name` (visible in /proc/<pid>/fd),
  /// mapped read-write.
  /// Errors: INVALID_ARGUMENT (size 0), RESOURCE_EXHAUSTED (the kernel refused the memory).
  [[nodiscard]] static result<shared_memory> create(std::uint64_t size, const std::string& name);

  /// Takes ownership of `fd` (a memfd or any mappable file) and maps its first `size` bytes,
  /// read-only unless `writable`.
  /// Errors: INVALID_ARGUMENT (bad fd, size 0, or the file is shorter than `size`),
  /// PERMISSION_DENIED (the fd does not allow the mapping asked for).
  [[nodiscard]] static result<shared_memory> adopt(unique_fd fd, std::uint64_t size, bool writable);

  /// adopt(fd, size, false) for memory another process owns: `fd` must be a memfd sealed
  /// against shrinking (F_SEAL_SHRINK), so that no page of the mapping can vanish under a reader.
  /// Errors: FAILED_PRECONDITION (the fd cannot carry seals, e.g. a regular file or a memfd made
  /// without MFD_ALLOW_SEALING; or F_SEAL_SHRINK is missing; the message names the seal), and
  /// adopt()'s.
  [[nodiscard]] static result<shared_memory> adopt_sealed(unique_fd fd, std::uint64_t size);

  /// Takes ownership of `fd` and of `mapping`, a read-write MAP_SHARED mapping of its first
  /// mapping.size() bytes that the caller made (a spare whose page tables are already filled in:
  /// populated_reserve), so that nothing is mapped or faulted in again.
  /// REQUIRES: `fd` valid, mapping non-empty, page-aligned and mapped as said.
  [[nodiscard]] static shared_memory adopt_mapping(unique_fd fd, std::span<std::byte> mapping) noexcept;

  /// Makes the bytes final: the writable mapping is replaced by a read-only one and the memfd is
  /// sealed against writes, growing and shrinking, and against further seals. Afterwards no fd of
  /// it (duplicated, or reopened through /proc/self/fd) can change the bytes. Spans taken from
  /// bytes() or mutable_bytes() before the call are invalid after it.
  /// REQUIRES: no other user of this object while it runs (call it before sharing it).
  /// `busy`: what an EBUSY from the kernel means. It answers EBUSY at once while another
  /// writable mapping exists, and after waiting ~150 ms while pages carry references beyond
  /// their mappings. A memfd that never left the daemon has no other mapping, so only the
  /// kernel's own short-lived references (page migration, LRU batches on a loaded host) can be
  /// in the way, and `retry` tries again for about two seconds; `fail` is for memory another
  /// process may still map (a client's staging memfd), where waiting would gain nothing.
  /// Errors: FAILED_PRECONDITION (another writable shared mapping of the memfd exists, its pages
  /// stay referenced, or it cannot carry seals), RESOURCE_EXHAUSTED (the read-only mapping
  /// cannot be made).
  enum class when_busy { fail, retry };
  [[nodiscard]] status seal_read_only(when_busy busy = when_busy::retry);

  /// Makes the bytes unchangeable through any fd of the memfd (duplicated, or reopened through
  /// /proc/self/fd), and its size fixed, while this object's own mapping stays writable: for
  /// memory that is recycled (src/devices/replica_pool.hpp), which seal_read_only() would make
  /// unusable. Idempotent. Spans stay valid.
  /// Errors: FAILED_PRECONDITION (the memfd cannot carry these seals).
  [[nodiscard]] status seal_against_writes();

  /// Whether no fd of the memfd can change its bytes or size: sealed by seal_read_only() or
  /// seal_against_writes().
  [[nodiscard]] bool sealed_against_writes() const noexcept;

  /// A new read-only descriptor of the memory (a fresh open file description), for a reader in
  /// another process; marks the memory exported. Refuses memory not sealed against writes
  /// (sealed_against_writes()): a reader could reopen the fd read-write.
  /// Errors: FAILED_PRECONDITION (not sealed), RESOURCE_EXHAUSTED (out of fds), INTERNAL (the
  /// reopen failed otherwise).
  [[nodiscard]] result<unique_fd> export_read_only() const;

  shared_memory(shared_memory&& other) noexcept;
  shared_memory& operator=(shared_memory&& other) noexcept;
  shared_memory(const shared_memory&) = delete;
  shared_memory& operator=(const shared_memory&) = delete;
  ~shared_memory() override;

  [[nodiscard]] std::uint64_t size() const noexcept override { return bytes_.size(); }
  [[nodiscard]] status visit(std::uint64_t offset, std::uint64_t length, piece_sink sink) const override;

  [[nodiscard]] int fd() const noexcept { return fd_.get(); }
  [[nodiscard]] bool writable() const noexcept { return writable_; }
  [[nodiscard]] std::span<const std::byte> bytes() const noexcept { return bytes_; }
  /// REQUIRES: writable().
  [[nodiscard]] std::span<std::byte> mutable_bytes() const noexcept;

  /// Gives back the pages that lie wholly inside [offset, offset + length) (a hole punched in
  /// the memfd: they read as zero afterwards, and cost memory again only once written), for
  /// staging bytes that were copied out. Best effort: bytes outside the memory are ignored, and
  /// a kernel that refuses leaves the pages as they are.
  void discard(std::uint64_t offset, std::uint64_t length) const noexcept;

  /// A new descriptor for the same memory, to hand to another process. Marks the memory
  /// exported (even if the dup then fails: the caller meant to share it).
  /// Errors: INTERNAL (dup failed).
  [[nodiscard]] result<unique_fd> duplicate_fd() const;

  /// Records that another process can reach this memory (its fd, or one reopened from fd(),
  /// left the process): it must never be reused for other bytes. Idempotent.
  void mark_exported() const noexcept { exported_.store(true, std::memory_order_release); }
  /// Whether mark_exported() or duplicate_fd() was ever called on this memory.
  [[nodiscard]] bool exported() const noexcept { return exported_.load(std::memory_order_acquire); }

 private:
  shared_memory(unique_fd fd, std::span<std::byte> bytes, bool writable) noexcept
      : fd_(std::move(fd)), bytes_(bytes), writable_(writable) {}
  void unmap() noexcept;
  [[nodiscard]] status check_intact(std::uint64_t offset) const;

  unique_fd fd_;
  std::span<std::byte> bytes_;
  bool writable_ = false;
  mutable std::atomic<bool> exported_{false};
  // A guarded read faulted: the file shrank under the mapping, whose lost pages now read as
  // zeros. Set by the SIGBUS handler (src/memory/sigbus_guard.hpp); never cleared.
  mutable std::atomic<bool> broken_{false};
};

}  // namespace tensorreg::memory
