// src/memory/buffered_reads.hpp — reading a file or memfd through a small buffer of the
// calling thread's instead of through a mapping.
//
// Provides pread_fully(), visit_through_buffer() (the piece loop of mapped_file::visit), and
// `memfd_reads`, a
// byte_source over a memfd (or any file) that pread()s it. Memory this process never mapped
// costs a page fault per 4 KiB page when read through a fresh mapping, which some VMs charge
// dearly for; pread() copies from the page cache with none, into a buffer that stays in a
// core's cache for the hash that follows. A file cut short reads short (DATA_LOSS), never
// SIGBUS.
//
// Thread-safety: visits may run on many threads at once (each reads into its own buffer;
// pread() has no shared file offset). Private to the library.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>

#include "tensorreg/common/error.hpp"
#include "tensorreg/common/function_ref.hpp"
#include "tensorreg/memory/byte_source.hpp"

namespace tensorreg::memory {

/// How a pread_fully() fell short: `got` bytes were read, then the file ended (`error` 0) or a
/// read failed (`error`: its errno).
struct short_read {
  std::size_t got = 0;
  int error = 0;
};

/// pread()s all of `out` from `fd` at `offset`, through short reads and EINTR (each call behind
/// the read fault site). nullopt when every byte was read.
[[nodiscard]] std::optional<short_read> pread_fully(int fd, std::span<std::byte> out, std::uint64_t offset) noexcept;

/// The largest piece the buffered visits hand out.
inline constexpr std::size_t buffered_piece_bytes = 256 * 1024;

/// Calls `sink` with consecutive pieces of [offset, offset + length), each first read by `fill`
/// (offset, the piece's bytes) into a page-aligned buffer of this thread's; a sink that visits
/// again on the same thread gets a buffer of its own. Errors: the first of `fill`'s and the
/// sink's.
[[nodiscard]] status visit_through_buffer(std::uint64_t offset, std::uint64_t length,
                                          function_ref<status(std::uint64_t, std::span<std::byte>)> fill,
                                          piece_sink sink);

/// The first `size` bytes of `fd`, read with pread(). The fd must stay open while the source is
/// used.
class memfd_reads final : public byte_source {
 public:
  /// `what` names the memory in errors ("the put's memfd").
  memfd_reads(int fd, std::uint64_t size, std::string what) noexcept : fd_(fd), size_(size), what_(std::move(what)) {}

  [[nodiscard]] std::uint64_t size() const noexcept override { return size_; }
  /// Pieces of at most buffered_piece_bytes. Errors: OUT_OF_RANGE, DATA_LOSS (the memory ends
  /// early now, or cannot be read; the message names it and the offset).
  [[nodiscard]] status visit(std::uint64_t offset, std::uint64_t length, piece_sink sink) const override;

 private:
  int fd_;
  std::uint64_t size_;
  std::string what_;
};

}  // namespace tensorreg::memory
