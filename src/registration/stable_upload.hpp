// src/registration/stable_upload.hpp — the bytes of a pending stable_dram registration.
//
// The engine stages a stable_dram upload in a memfd of total_size bytes. A client fills it
// either by streamed chunks (the engine copies each chunk in) or by writing the memfd itself
// and reporting written ranges (memfd publish); the two modes do not mix (§4.3.10). Ranges
// must lie inside the buffer (OUT_OF_RANGE) and never overlap (FAILED_PRECONDITION); they may
// come in any order and concurrently.
//
// Thread-safety: reserve/complete are guarded by an internal mutex; chunk copies run outside
// it into ranges reserved for them, so concurrent chunks proceed in parallel.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "tensorreg/index/byte_range_map.hpp"
#include "tensorreg/memory/shared_memory.hpp"

namespace tensorreg::registration::detail {

class stable_upload {
 public:
  enum class mode { none, chunks, memfd_ranges };

  explicit stable_upload(std::shared_ptr<memory::shared_memory> staging) noexcept
      : staging_(std::move(staging)) {}

  /// Copies one streamed chunk to `canonical_offset`.
  /// Errors: OUT_OF_RANGE, FAILED_PRECONDITION (overlap, or the upload is in memfd mode).
  [[nodiscard]] status write_chunk(std::uint64_t canonical_offset, std::string_view data);

  /// Records a range the client wrote into the staging memfd.
  /// Errors: OUT_OF_RANGE, FAILED_PRECONDITION (overlap, or the upload is in chunk mode).
  [[nodiscard]] status record_written(std::uint64_t canonical_offset, std::uint64_t length);

  void mark_complete() noexcept;

  /// FAILED_PRECONDITION naming the first DATA byte range of `map` not written yet.
  [[nodiscard]] status check_covers(const index::byte_range_map& map) const;

  [[nodiscard]] const std::shared_ptr<memory::shared_memory>& staging() const noexcept { return staging_; }
  [[nodiscard]] std::uint64_t bytes_written() const;

 private:
  [[nodiscard]] status reserve(std::uint64_t offset, std::uint64_t length, mode wanted);

  std::shared_ptr<memory::shared_memory> staging_;
  mutable std::mutex mutex_;
  mode mode_ = mode::none;
  std::map<std::uint64_t, std::uint64_t> written_;  // offset → length, disjoint
  std::uint64_t bytes_written_ = 0;
  bool complete_ = false;
};

}  // namespace tensorreg::registration::detail
