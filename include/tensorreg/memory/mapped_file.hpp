// tensorreg/memory/mapped_file.hpp — a read-only memory mapping of a whole file.
//
// `mapped_file` owns the mapping and an open descriptor of the file (move-only; both released
// on destruction) and is a `byte_source`. A zero-length file maps to an empty source.
//
// visit() does not read through the mapping: it pread()s each piece into a small per-thread
// buffer and hands that out. Touching a page-cached file through a fresh mapping costs a page
// fault per few pages, which made hashing a file far slower than hashing memory; a read into a
// cache-sized buffer costs one copy the cache absorbs. It also makes a file truncated under a
// visit a DATA_LOSS answer rather than a SIGBUS. bytes() still gives the mapping, for readers
// that need addresses (a header parse, a region handed to another process).
//
// Thread-safety: immutable after create(); concurrent visits are safe (each thread reads into
// its own buffer). Readers of bytes() must not let the file be truncated while they read
// (the kernel would then raise SIGBUS).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "tensorreg/common/unique_fd.hpp"
#include "tensorreg/memory/byte_source.hpp"

namespace tensorreg::memory {

class mapped_file final : public byte_source {
 public:
  /// Opens and maps `path` read-only.
  /// Errors: NOT_FOUND (no such file), PERMISSION_DENIED, INVALID_ARGUMENT (not a regular
  /// file), INTERNAL (mmap failed); the message names the path and the OS reason.
  [[nodiscard]] static result<mapped_file> open(const std::string& path);

  mapped_file(mapped_file&& other) noexcept;
  mapped_file& operator=(mapped_file&& other) noexcept;
  mapped_file(const mapped_file&) = delete;
  mapped_file& operator=(const mapped_file&) = delete;
  ~mapped_file() override;

  [[nodiscard]] std::uint64_t size() const noexcept override { return bytes_.size(); }
  /// Pieces are at most piece_bytes long and valid only during the sink's call.
  /// Errors: OUT_OF_RANGE (outside the file as opened), DATA_LOSS (the file became shorter or
  /// unreadable since it was opened; the message names the path, the offset and the reason).
  [[nodiscard]] status visit(std::uint64_t offset, std::uint64_t length, piece_sink sink) const override;

  /// Reads [offset, offset + out.size()) of the file straight into `out` with pread(), no
  /// staging buffer: for a copy whose destination is memory the kernel may have to fault in (a
  /// fresh shared mapping), which then costs one copy and no cache round trip. The kernel writes
  /// `out`, so destination memory that cannot be faulted in (a mapping whose file shrank) fails
  /// the read (EFAULT) instead of raising SIGBUS in the caller.
  /// Errors: OUT_OF_RANGE (outside the file as opened), DATA_LOSS (the file became shorter or
  /// unreadable since it was opened, or `out` could not be written; the message names the path,
  /// the offset and the reason).
  [[nodiscard]] status read_into(std::uint64_t offset, std::span<std::byte> out) const;

  /// The largest piece visit() hands out: small enough to stay in a core's cache between the
  /// read and the consumer (a hash, a copy).
  static constexpr std::size_t piece_bytes = 256 * 1024;

  [[nodiscard]] std::span<const std::byte> bytes() const noexcept { return bytes_; }
  [[nodiscard]] const std::string& path() const noexcept { return path_; }
  /// The file's descriptor, open read-only for as long as this object lives (to hand the very
  /// file opened to another process, e.g. with SCM_RIGHTS).
  [[nodiscard]] int fd() const noexcept { return fd_.get(); }

 private:
  mapped_file(std::string path, unique_fd fd, std::span<const std::byte> bytes) noexcept
      : path_(std::move(path)), fd_(std::move(fd)), bytes_(bytes) {}
  void unmap() noexcept;
  // pread()s all of `out` from `offset`, retrying short reads and EINTR.
  [[nodiscard]] status read_fully(std::uint64_t offset, std::span<std::byte> out) const;

  std::string path_;
  unique_fd fd_;  // read by visit(); open for as long as the mapping
  std::span<const std::byte> bytes_;
};

}  // namespace tensorreg::memory
