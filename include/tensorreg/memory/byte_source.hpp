// tensorreg/memory/byte_source.hpp — the one interface through which every byte is read.
//
// Host pointers, memfd mappings, daemon-owned buffers and (under tensorreg/cuda/) device
// mappings all implement `byte_source`. Hashing, copying and the stable cache see only this
// interface, so every rule is testable without a GPU.
//
// A source hands out its bytes as consecutive *pieces*: host-readable spans that together
// cover the requested range exactly. Host-resident sources hand out spans of their own
// memory (so hashing reads in place, with no copy); others stage through a buffer.
//
// Thread-safety: `size()` and `visit()` are const and may be called concurrently from many
// threads on disjoint or overlapping ranges; implementations must allow that.
// Ownership: a source does not own what it views unless its type says so (`*_view` never owns).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "tensorreg/common/error.hpp"
#include "tensorreg/common/function_ref.hpp"

namespace tensorreg {
class thread_pool;
}

namespace tensorreg::memory {

/// Receives one piece of a visited range. A non-OK return stops the visit and is returned.
using piece_sink = function_ref<status(std::span<const std::byte>)>;

class byte_source {
 public:
  virtual ~byte_source() = default;

  /// Number of readable bytes: valid offsets are [0, size()).
  [[nodiscard]] virtual std::uint64_t size() const noexcept = 0;

  /// Calls `sink` with consecutive pieces covering exactly [offset, offset + length).
  /// Pieces are valid only during the call. `length == 0` calls nothing and succeeds.
  /// Errors: OUT_OF_RANGE if the range is not inside [0, size()); whatever the sink or the
  /// underlying memory returns (DATA_LOSS, UNAVAILABLE, ...).
  [[nodiscard]] virtual status visit(std::uint64_t offset, std::uint64_t length, piece_sink sink) const = 0;

  /// Copies [offset, offset + out.size()) into `out`. Errors: as visit().
  [[nodiscard]] status read(std::uint64_t offset, std::span<std::byte> out) const;

 protected:
  /// OUT_OF_RANGE unless [offset, offset + length) lies inside [0, size()).
  [[nodiscard]] status check_range(std::uint64_t offset, std::uint64_t length) const;
};

/// A non-owning view of host memory. The memory must outlive the view and stay unchanged
/// while it is being read.
class host_bytes_view final : public byte_source {
 public:
  explicit host_bytes_view(std::span<const std::byte> bytes) noexcept : bytes_(bytes) {}

  [[nodiscard]] std::uint64_t size() const noexcept override { return bytes_.size(); }
  [[nodiscard]] status visit(std::uint64_t offset, std::uint64_t length, piece_sink sink) const override;

 private:
  std::span<const std::byte> bytes_;
};

/// `size` zero bytes, handed out from one shared read-only zero page (no allocation per use).
class zero_source final : public byte_source {
 public:
  explicit zero_source(std::uint64_t size) noexcept : size_(size) {}

  [[nodiscard]] std::uint64_t size() const noexcept override { return size_; }
  [[nodiscard]] status visit(std::uint64_t offset, std::uint64_t length, piece_sink sink) const override;

 private:
  std::uint64_t size_;
};

/// Copies all of `source` into `dst` in consecutive chunks of `chunk_bytes` (the last may be
/// short), spread over `pool` and the calling thread. After a chunk is in place,
/// `on_chunk(chunk_index, offset, length)` runs on the thread that copied it (concurrently
/// with other chunks': it must synchronise what it shares).
/// REQUIRES: dst.size() >= source.size(), chunk_bytes > 0.
/// Errors: the first error of source.visit().
[[nodiscard]] status copy_in_chunks(const byte_source& source, std::span<std::byte> dst, std::uint64_t chunk_bytes,
                                    thread_pool& pool,
                                    function_ref<void(std::size_t, std::uint64_t, std::uint64_t)> on_chunk);

/// A shared block of zero bytes (at least 1 MiB) for sources that must hand out zeros.
[[nodiscard]] std::span<const std::byte> zero_block() noexcept;

/// Hands `length` zero bytes to `sink` in pieces of the shared zero block.
[[nodiscard]] status visit_zeros(std::uint64_t length, piece_sink sink);

}  // namespace tensorreg::memory
