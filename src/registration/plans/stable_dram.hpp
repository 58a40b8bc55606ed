// src/registration/plans/stable_dram.hpp — the stable_dram plan: the bytes are copied into
// daemon-owned host memory kept by the stable DRAM cache (registration.md §4.2, §4.3.10, §4.5).
//
// Provides `stable_upload` (the staging memfd of one registration and which of its ranges are
// written) and `stable_dram`, the plan over it or over a daemon-owned device staging buffer
// (stage_on_gpu).
//
// A put from files (wire-format.md §18) hands no memfd out: the engine reads the client's files
// into its staging memfd at Commit, hashing each leaf as it lands, and keeps that memfd.
//
// A memfd-publish upload whose client no longer maps the memfd writable is kept as it is: at
// Commit the engine seals the memfd against writes (which the kernel refuses while any writable
// shared mapping of it exists, so a sealed memfd can no longer change under the hash), hashes
// it in place and admits it as the replica, with no second copy. Otherwise (the client still
// maps it, streamed chunks, or PAD bytes that are not zero) Commit copies it as before.
//
// The engine stages a stable_dram upload in a memfd of total_size bytes. A client fills it
// either by streamed chunks (the engine copies each chunk in) or by writing the memfd itself
// and reporting written ranges (memfd publish); the two modes do not mix (§4.3.10). Ranges
// must lie inside the buffer (OUT_OF_RANGE) and never overlap (FAILED_PRECONDITION); they may
// come in any order and concurrently.
//
// Thread-safety: stable_upload's reserve/complete are guarded by an internal mutex; chunk
// copies run outside it into ranges reserved for them, so concurrent chunks proceed in
// parallel. The plan itself is called as plan.hpp says.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "registration/plans/plan.hpp"
#include "registration/source_files.hpp"
#include "tensorreg/index/byte_range_map.hpp"
#include "tensorreg/memory/shared_memory.hpp"

namespace tensorreg::registration::detail {

class stable_upload {
 public:
  enum class mode { none, chunks, memfd_ranges };

  explicit stable_upload(std::shared_ptr<memory::shared_memory> staging) noexcept : staging_(std::move(staging)) {}

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
  /// How the client filled the upload so far (none before its first chunk or range).
  [[nodiscard]] mode filled_by() const;

 private:
  [[nodiscard]] status reserve(std::uint64_t offset, std::uint64_t length, mode wanted);

  std::shared_ptr<memory::shared_memory> staging_;
  mutable std::mutex mutex_;
  mode mode_ = mode::none;
  std::map<std::uint64_t, std::uint64_t> written_;  // offset → length, disjoint
  std::uint64_t bytes_written_ = 0;
  bool complete_ = false;
};

/// The stable_dram plan. Begin checks the index and the budget and stages the upload: a memfd
/// the client writes (streamed chunks or memfd publish), or with stage_on_gpu a device buffer
/// it writes through its IPC handle. Commit copies the normalized buffer into a private host
/// replica, hashing it as it is made, or adopts the sealed memfd itself (see above), and admits
/// that to the stable DRAM cache.
class stable_dram final : public plan {
 public:
  /// Errors: INVALID_ARGUMENT, NOT_FOUND (the index, as engine::begin), FAILED_PRECONDITION
  /// (stage_on_gpu without a GPU), RESOURCE_EXHAUSTED (over the stable budget, no memory).
  [[nodiscard]] static result<std::unique_ptr<stable_dram>> begin(const begin_request& request,
                                                                  const stable_dram_options& options,
                                                                  const begin_context& ctx, begin_response& response);

  [[nodiscard]] std::string_view name() const noexcept override { return "stable_dram"; }
  [[nodiscard]] result<feed_work> feed(feed_request& request, const registration_facts& facts,
                                       regions::region_registry& regions, const std::string& what) override;
  /// Errors: FAILED_PRECONDITION (bytes missing: retryable; the artifact is being deregistered),
  /// RESOURCE_EXHAUSTED (the cache did not keep it), copy errors.
  [[nodiscard]] result<commit_response> commit(commit_context& ctx) override;
  void release(regions::region_registry& regions) noexcept override;

 private:
  explicit stable_dram(std::shared_ptr<const index::canonical_index> idx) noexcept : index_(std::move(idx)) {}

  /// Commit of a put from files: reads them into the staging memfd and hashes each leaf from
  /// there while it is still in cache (one read, one copy). When the catalogue knows the index
  /// already, the content is likely held: the files are hashed first through a small buffer and
  /// copied only if the id turns out new.
  [[nodiscard]] result<commit_response> commit_from_files(commit_context& ctx);
  /// Publishes `copy` (its replica and digest) under the catalogue lock, or joins the artifact
  /// already held. With `nothing_copied` (the replica is the unwritten staging memfd) it only
  /// joins: nullopt when the artifact is no longer held, so the caller must copy first.
  [[nodiscard]] result<std::optional<commit_response>> publish(commit_context& ctx, const materialized& copy,
                                                               bool nothing_copied);

  std::shared_ptr<const index::canonical_index> index_;
  std::optional<source_files> files_;            // a put from files (wire-format.md §18)
  std::shared_ptr<stable_upload> upload_;        // memfd staging; null with stage_on_gpu
  std::optional<device_buffer> device_staging_;  // stage_on_gpu
  // The stable budget held for this upload from Begin until its entry is admitted or it ends,
  // so that uploads in flight never hold more host memory than the budget.
  stable::budget_reservation reservation_;
};

}  // namespace tensorreg::registration::detail
