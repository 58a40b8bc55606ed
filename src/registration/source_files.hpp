// src/registration/source_files.hpp — the files a put from files reads its canonical bytes
// from (docs/wire-format.md §18).
//
// Provides `source_files`: the read-only fds a client handed over with its Begin and where each
// of their byte ranges lies in the canonical buffer. The daemon never maps a client's file (one
// that shrinks would turn the lost pages into SIGBUS): it reads with pread(), so a file cut
// short under it fails the read with a clean error instead.
//
// Thread-safety: immutable after check(); read() may run on many threads at once (pread() has
// no shared file offset). Ownership: shares the fds with the Begin request that brought them;
// they close when the last owner goes.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "tensorreg/common/error.hpp"
#include "tensorreg/common/unique_fd.hpp"
#include "tensorreg/index/byte_range_map.hpp"
#include "tensorreg/registration/types.hpp"

namespace tensorreg::registration::detail {

class source_files {
 public:
  /// Checks what a client handed over for a buffer of `total_size` bytes whose DATA ranges are
  /// `map`'s: every fd a regular file open for reading; every segment non-empty, inside
  /// total_size and inside its file as it is now, in canonical order without overlaps; the
  /// segments covering the DATA ranges exactly (PAD stays zero, DECISIONS §5.1).
  /// Errors: INVALID_ARGUMENT naming the fd or segment and what is wrong with it.
  [[nodiscard]] static result<source_files> check(std::vector<std::shared_ptr<const unique_fd>> files,
                                                  std::vector<file_segment> segments, const index::byte_range_map& map);

  /// Reads canonical bytes [offset, offset + out.size()) into `out` with pread(). Bytes no
  /// segment covers are zeroed when `zero_gaps`, else left as they are (a fresh memfd's zeros).
  /// Errors: FAILED_PRECONDITION when a file ends early (it was truncated after Begin) or
  /// cannot be read; the message names the fd, the file offset and the reason.
  [[nodiscard]] status read(std::uint64_t offset, std::span<std::byte> out, bool zero_gaps) const;

  /// Errors: FAILED_PRECONDITION when a file's size is no longer what check() saw (it changed
  /// during the put).
  [[nodiscard]] status check_unchanged() const;

  /// Bytes the segments cover.
  [[nodiscard]] std::uint64_t data_bytes() const noexcept { return data_bytes_; }

 private:
  source_files(std::vector<std::shared_ptr<const unique_fd>> files, std::vector<std::uint64_t> sizes,
               std::vector<file_segment> segments, std::uint64_t data_bytes) noexcept
      : files_(std::move(files)), sizes_(std::move(sizes)), segments_(std::move(segments)), data_bytes_(data_bytes) {}

  std::vector<std::shared_ptr<const unique_fd>> files_;
  std::vector<std::uint64_t> sizes_;  // each file's size at check()
  std::vector<file_segment> segments_;
  std::uint64_t data_bytes_ = 0;
};

}  // namespace tensorreg::registration::detail
