// src/registration/plans/view.hpp — the view plan: a registration that carries
// ViewRegistrationOptions (registration.md §7).
//
// Begin normalizes the view against the canonical index (every §7 rule, views::view_plan).
// Then, by placement:
//   SERVER, CANONICAL: a host canonical buffer (a memfd of total_size bytes) that view_chunk
//     messages are scattered into, transposing on the CPU (DECISIONS §5.22); the first feeds
//     fault the buffer in together before they scatter (page_populator); Commit checks that
//     every view byte came, hashes the buffer (the id a whole registration of the same tensors
//     gets) and keeps it as the artifact's stable DRAM replica.
//   SERVER, either kind: the bytes come as view_chunk messages, or through a staging memfd the
//     client writes and reports ranges of (staging_memfd), copied out by the Feed.
//   SERVER, PIECE: Begin claims in the assembly of the cgid (views::assembly) the canonical
//     bytes no other piece covers or claims, and each Feed writes its share of them into the
//     assembly's buffer at once (views::assembly_stream). The view hash is taken as the bytes
//     land (streamed_view_hash), read back from there; only a piece that shares bytes with
//     earlier ones also keeps a staging copy of its view, for its Commit to compare. Commit adds the piece:
//     overlapping bytes must be equal (ABORTED), bytes in another piece's open claim wait for
//     that one (FAILED_PRECONDITION, retryable), and the piece that completes the canonical
//     buffer seals it under its mi2 id as a stable DRAM replica.
//   CLIENT, CANONICAL: the plan the Begin names (coalesced or stable_dram) takes the client's
//     canonical tensors as always; Commit records the view over what it published.
// Every view commit answers the view's id, index, data hash, coverage and kind, and records
// the view on the artifact.
//
// Private to the engine. Not thread-safe: see plan.hpp for when a plan is called; Feed copies
// run concurrently outside the registration's lock.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "memory/page_populator.hpp"
#include "registration/plans/plan.hpp"
#include "tensorreg/common/function_ref.hpp"
#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/memory/shared_memory.hpp"
#include "tensorreg/views/view_plan.hpp"
#include "views/assembly.hpp"

namespace tensorreg::registration::detail {

/// The view byte ranges a SERVER upload has written. Thread-safe.
class written_ranges {
 public:
  /// Records [offset, offset + length); returns whether any of it had been written before.
  bool add(std::uint64_t offset, std::uint64_t length);
  /// The first byte of `required` not written yet; nullopt when all were.
  [[nodiscard]] std::optional<views::byte_range> first_missing(std::span<const views::byte_range> required) const;
  /// The end of the written bytes that run on without a gap from `offset`; `offset` when that
  /// byte was not written.
  [[nodiscard]] std::uint64_t written_through(std::uint64_t offset) const;

 private:
  mutable std::mutex mutex_;
  std::map<std::uint64_t, std::uint64_t> ends_;  // merged: offset -> end, neither touching the next
};

/// A PIECE's view hash (views::view_data_hash: SHA-256 leaves of view_hash_leaf_bytes, then
/// their tree), taken as its bytes land: each leaf's SHA-256 is carried over the leaf's
/// written prefix whenever a chunk extends it, by whichever feed gets the leaf's lock first
/// (the others go on copying), so that Commit finishes only the leaves' tails. A chunk that
/// rewrites bytes written before spoils it, and Commit hashes the staging whole.
/// Thread-safe.
class streamed_view_hash {
 public:
  explicit streamed_view_hash(std::uint64_t view_size, std::uint64_t leaf_bytes = views::view_hash_leaf_bytes);

  /// Hashes view bytes [from, to) into a hasher: from the staging buffer, or read back from the
  /// canonical bytes they were scattered into.
  using bytes_into = function_ref<void(hash::sha256_hasher&, std::uint64_t from, std::uint64_t to)>;

  /// After view bytes [offset, offset + length) landed and `written` recorded them.
  void advance(bytes_into read, const written_ranges& written, std::uint64_t offset, std::uint64_t length);
  void spoil() noexcept { spoiled_ = true; }
  /// The view hash, once no feed writes any more, each leaf finished over `pool`; nullopt when
  /// spoiled.
  [[nodiscard]] std::optional<hash::digest> finish(bytes_into read, thread_pool& pool);

 private:
  struct leaf {
    std::mutex mutex;
    std::atomic<int> wanted{0};  // feeds that extended the leaf since its hasher last looked
    hash::sha256_hasher hasher;
    std::uint64_t hashed = 0;  // bytes of the leaf in `hasher`
  };
  std::uint64_t size_;
  std::uint64_t leaf_bytes_;
  std::vector<std::unique_ptr<leaf>> leaves_;
  std::atomic<bool> spoiled_{false};
};

/// Where a SERVER upload's view bytes go as they arrive (view_chunk messages, or ranges of the
/// client's staging memfd): a Feed's copy runs on its own, outside the registration's lock, so
/// it holds what it writes into.
struct view_landing {
  std::shared_ptr<const views::view_plan> view;
  // CANONICAL: the canonical buffer; PIECE: the view bytes (none when the piece's stream claims
  // all of its bytes: they are read back from the assembly's buffer)
  std::shared_ptr<memory::shared_memory> buffer;
  std::shared_ptr<written_ranges> written;
  std::shared_ptr<streamed_view_hash> streamed;    // PIECE
  std::shared_ptr<views::assembly_stream> stream;  // PIECE: its claim on the assembly
  // CANONICAL: the first feeds fault the canonical buffer in, in slices, before they scatter
  // into it (memory/page_populator.hpp).
  std::shared_ptr<memory::page_populator> populator;

  /// View bytes [offset, offset + bytes.size()), inside the view: scattered into the canonical
  /// buffer (CANONICAL), or written to the piece's staging copy and its claim on the assembly
  /// (PIECE), the view hash carried on.
  [[nodiscard]] status land(std::uint64_t offset, std::span<const std::byte> bytes) const;
};

class view_registration final : public plan {
 public:
  /// Errors: INVALID_ARGUMENT (every §7 rule, the index, device_id), NOT_FOUND (unknown index
  /// key), UNIMPLEMENTED (a PIECE with placement CLIENT, a view over lease-in-place),
  /// RESOURCE_EXHAUSTED (stable budget, memory), and the CLIENT plan's own Begin errors.
  [[nodiscard]] static result<std::unique_ptr<plan>> begin(const begin_request& request, const begin_context& ctx,
                                                           begin_response& response);

  [[nodiscard]] std::string_view name() const noexcept override { return "view"; }
  /// SERVER: view_chunk only (OUT_OF_RANGE past the view size; overlapping chunks are fine).
  /// CLIENT: the inner plan's rules, and view_chunk is FAILED_PRECONDITION.
  [[nodiscard]] result<feed_work> feed(feed_request& request, const registration_facts& facts,
                                       regions::region_registry& regions, const std::string& what) override;
  /// Errors: FAILED_PRECONDITION ("view bytes incomplete", or a piece's bytes that another
  /// piece still writes: both retryable; a sealed assembly; the artifact is being
  /// deregistered), ABORTED (a piece conflicting with an earlier one),
  /// RESOURCE_EXHAUSTED (the stable cache did not keep it), the hash's and the inner plan's.
  [[nodiscard]] result<commit_response> commit(commit_context& ctx) override;
  void release(regions::region_registry& regions) noexcept override;

 private:
  view_registration() = default;

  [[nodiscard]] result<commit_response> commit_client(commit_context& ctx);
  [[nodiscard]] result<commit_response> commit_canonical(commit_context& ctx);
  [[nodiscard]] result<commit_response> commit_piece(commit_context& ctx);
  [[nodiscard]] status check_complete(commit_context& ctx) const;
  [[nodiscard]] result<view_record> record_over(std::span<const std::byte> canonical, thread_pool& pool) const;

  std::shared_ptr<const index::canonical_index> index_;
  std::shared_ptr<const views::view_plan> view_;
  std::unique_ptr<plan> inner_;  // CLIENT placement
  view_landing landing_;         // SERVER
  // SERVER with staging_memfd: the memfd the client writes view bytes into
  std::shared_ptr<memory::shared_memory> client_staging_;
  stable::budget_reservation reservation_;  // SERVER CANONICAL
};

}  // namespace tensorreg::registration::detail
