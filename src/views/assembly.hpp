// src/views/assembly.hpp — the pieces of one tensor-parallel artifact, assembled into its
// canonical buffer (registration.md §7, PIECE kind).
//
// Provides `assembly`: one canonical buffer per cgid (a memfd of canonical_size bytes, whose
// pages cost memory only once written or faulted in ahead of a piece, never more than the
// pieces have brought), the canonical bytes each piece wrote, and the rule
// that pieces may overlap only where their bytes are equal. When the pieces together cover
// every byte of every canonical tensor, the assembly is complete: the engine then takes the
// buffer's leaf digests (the mi2 id of the whole artifact), publishes it and marks the assembly
// sealed; later pieces are refused. An assembly that stops receiving pieces expires with the
// TTL of its last piece and lets go of its buffer.
//
// The 4 MiB leaves of the data hash (hash/tree_hash.hpp) are hashed as pieces complete them: a
// leaf whose required bytes are all covered never changes again (an overlapping piece must
// bring equal bytes), so each piece's commit hashes the leaves it completed and the seal hashes
// only those of the last piece, not the whole buffer.
//
// Private to the library (the engine keeps one per cgid in its catalogue).
// Thread-safety: every member may be called from any thread; add_piece() serializes the pieces
// of one assembly (its scatter runs under the assembly's mutex, a leaf lock; its workers take
// no lock); hashing runs outside the mutex, over leaves no piece writes any more.
// Ownership: the assembly owns its buffer until sealed (then the stable cache holds it) or
// released.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "tensorreg/common/clock.hpp"
#include "tensorreg/common/error.hpp"
#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/memory/shared_memory.hpp"
#include "tensorreg/views/view_plan.hpp"

namespace tensorreg {
class thread_pool;
}

namespace tensorreg::views {

struct assembly_snapshot {
  std::string cgid;
  std::uint64_t canonical_size = 0;
  std::uint64_t covered_bytes = 0;  ///< of the required bytes
  std::uint32_t pieces = 0;
  bool complete = false;  ///< every required byte is covered: being sealed, or sealed
  bool sealed = false;
  std::string artifact_id;                    ///< once sealed
  std::optional<clock::time_point> deadline;  ///< when it expires (touch()); nullopt: never
};

/// An assembly's leaf digests at its seal.
struct assembly_leaves {
  std::vector<hash::digest> digests;  ///< every leaf's, in order
  std::uint64_t bytes_hashed = 0;     ///< of them, the bytes hashed by this call
};

class assembly {
 public:
  /// An empty assembly of `idx` (the whole artifact's canonical index); `required` = the bytes
  /// the pieces must cover together (view_plan::required_ranges()).
  /// Errors: RESOURCE_EXHAUSTED (the memfd cannot be made).
  [[nodiscard]] static result<std::shared_ptr<assembly>> create(std::string cgid,
                                                                std::shared_ptr<const index::canonical_index> idx,
                                                                std::vector<byte_range> required);

  [[nodiscard]] const std::string& cgid() const noexcept { return cgid_; }
  [[nodiscard]] const std::shared_ptr<const index::canonical_index>& index() const noexcept { return index_; }

  /// Adds the view bytes of one piece (all of them, linearized as `plan` lays them out).
  /// Returns the assembly as this piece left it, which is what its commit answers: another
  /// piece added meanwhile is not counted. The one caller that gets `complete` seals it
  /// (seal_buffer(), then mark_sealed()).
  /// Errors: INVALID_ARGUMENT (the piece's canonical index is another one), FAILED_PRECONDITION
  /// ("assembly is already sealed", or being sealed), ABORTED (a byte the piece shares with an
  /// earlier piece differs: the message names both pieces and the canonical offset).
  /// The scatter, and the faulting in of the pages it writes, run on `pool` (null: the calling
  /// thread alone).
  [[nodiscard]] result<assembly_snapshot> add_piece(const std::string& piece_id, const view_plan& plan,
                                                    std::span<const std::byte> view_bytes,
                                                    const index::canonical_index& idx, thread_pool* pool = nullptr);

  /// Faults in, on a job of `pool`, pages of the buffer that no piece has written yet, as many
  /// as the pieces have written and not had faulted in this way: the pages a later piece
  /// writes are then there before its Commit, and what a piece makes resident stays in
  /// proportion to the bytes it brought. Returns at once.
  void prefault_uncovered(thread_pool& pool);

  /// Hashes the leaves that pieces have completed and nobody has hashed yet, on `pool` (null:
  /// the calling thread), checking `cancelled` (null: never) before each leaf. A leaf left
  /// unhashed by an error is hashed by leaf_digests(). Returns the bytes it hashed (none once
  /// the assembly is complete: the sealing commit hashes what is left).
  /// Errors: CANCELLED, or reading the buffer's (none for a memfd).
  [[nodiscard]] result<std::uint64_t> hash_complete_leaves(thread_pool* pool, const std::atomic<bool>* cancelled);

  /// The buffer of a complete assembly, sealed against writes through any fd for publishing.
  /// Errors: FAILED_PRECONDITION (not complete), the seal's.
  [[nodiscard]] result<std::shared_ptr<memory::shared_memory>> seal_buffer();

  /// Every leaf digest of a complete assembly's buffer, in order (hash::tree_root of them is its
  /// data hash): those hashed as pieces came, the rest hashed now as hash_complete_leaves()
  /// does.
  /// Errors: FAILED_PRECONDITION (not complete, or sealed already), CANCELLED.
  [[nodiscard]] result<assembly_leaves> leaf_digests(thread_pool* pool, const std::atomic<bool>* cancelled);
  /// Records that the buffer was published as `artifact_id`; the assembly lets go of it.
  void mark_sealed(std::string artifact_id);

  [[nodiscard]] assembly_snapshot snapshot() const;
  [[nodiscard]] bool sealed() const;

  /// The assembly expires at `deadline` (nullopt: never); each piece's Begin and Commit move it.
  void touch(std::optional<clock::time_point> deadline);
  [[nodiscard]] bool expired(clock::time_point now) const;

 private:
  enum class state { open, sealing, sealed };

  assembly(std::string cgid, std::shared_ptr<const index::canonical_index> idx, std::vector<byte_range> required,
           std::shared_ptr<memory::shared_memory> buffer) noexcept;
  [[nodiscard]] assembly_snapshot snapshot_locked() const;
  // Counts `ranges` (covered for the first time) against their leaves; queues the leaves left
  // with nothing missing.
  void cover_leaves_locked(std::span<const byte_range> ranges);
  // The 4 MiB slices under `ranges` of at least `min_length` bytes not faulted in yet, at most
  // `budget` bytes of them, marked as faulted in.
  [[nodiscard]] std::vector<std::uint64_t> claim_slices_locked(std::span<const byte_range> ranges,
                                                               std::uint64_t min_length, std::uint64_t budget);
  // Hashes `leaves` of `buffer` and records their digests; returns the bytes hashed.
  [[nodiscard]] result<std::uint64_t> hash_leaves(const memory::shared_memory& buffer,
                                                  std::span<const std::uint64_t> leaves, thread_pool* pool,
                                                  const std::atomic<bool>* cancelled);

  const std::string cgid_;
  const std::shared_ptr<const index::canonical_index> index_;
  const std::vector<byte_range> required_;
  std::uint64_t required_bytes_ = 0;

  mutable std::mutex mutex_;
  state state_ = state::open;
  std::shared_ptr<memory::shared_memory> buffer_;                        // null once sealed
  std::vector<byte_range> covered_;                                      // merged
  std::vector<std::pair<std::string, std::vector<byte_range>>> pieces_;  // piece id → its ranges
  std::string artifact_id_;
  std::optional<clock::time_point> deadline_;
  std::vector<std::uint64_t> missing_;   // per leaf: required bytes no piece has covered yet
  std::vector<std::uint64_t> complete_;  // leaves with nothing missing, not yet handed to a hasher
  std::vector<hash::digest> digests_;    // per leaf, valid where hashed_
  std::vector<char> hashed_;
  std::vector<char> faulted_;             // per 4 MiB slice of the buffer: faulted in, or being
  std::uint64_t prefault_allowance_ = 0;  // bytes pieces brought, not yet faulted in ahead
};

}  // namespace tensorreg::views
