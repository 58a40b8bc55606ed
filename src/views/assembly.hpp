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
// A piece streams (assembly_stream): at its Begin it claims the canonical bytes that no piece
// has covered or claimed, and its Feed writes those straight into the buffer as its chunks
// arrive, hashing each leaf the moment the piece's writes complete it. Its Commit then has
// little left: its other bytes (shared with earlier pieces) are compared or written as any
// piece's are, and the leaves it hashed count once it is added. What it claimed goes back when
// it ends without a commit; a piece whose bytes lie in another's open claim is told to commit
// again once that one has committed or ended (its bytes can only be compared then).
//
// Private to the library (the engine keeps one per cgid in its catalogue).
// Thread-safety: every member may be called from any thread; add_piece() serializes the pieces
// of one assembly (its scatter runs under the assembly's mutex, a leaf lock; its workers take
// no lock); hashing runs outside the mutex, over leaves no piece writes any more. A stream's
// write() runs on any number of threads at once, outside the mutex, into bytes only its piece
// writes.
// Ownership: the assembly owns its buffer until sealed (then the stable cache holds it) or
// released.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
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

class assembly_stream;

class assembly : public std::enable_shared_from_this<assembly> {
 public:
  /// An empty assembly of `idx` (the whole artifact's canonical index); `required` = the bytes
  /// the pieces must cover together (view_plan::required_ranges()).
  /// Errors: RESOURCE_EXHAUSTED (the memfd cannot be made).
  [[nodiscard]] static result<std::shared_ptr<assembly>> create(std::string cgid,
                                                                std::shared_ptr<const index::canonical_index> idx,
                                                                std::vector<byte_range> required);

  [[nodiscard]] const std::string& cgid() const noexcept { return cgid_; }
  [[nodiscard]] const std::shared_ptr<const index::canonical_index>& index() const noexcept { return index_; }

  /// Claims for piece `piece_id` (its Begin) the canonical bytes of `plan` that no piece has
  /// covered or claimed; its Feed writes them through the stream. Claims nothing once the
  /// assembly is complete or when `idx` is not its index (the Commit then says why).
  /// The leaves its writes complete are hashed on `pool` (null: by the writing thread).
  [[nodiscard]] std::shared_ptr<assembly_stream> claim(const std::string& piece_id,
                                                       std::shared_ptr<const view_plan> plan,
                                                       const index::canonical_index& idx, thread_pool* pool = nullptr);

  /// Adds the view bytes of one piece (all of them, linearized as `plan` lays them out).
  /// `stream`: the piece's claim on this assembly (null: none), whose bytes are in the buffer
  /// already; the rest of the piece's bytes are compared or written here.
  /// Returns the assembly as this piece left it, which is what its commit answers: another
  /// piece added meanwhile is not counted. The one caller that gets `complete` seals it
  /// (seal_buffer(), then mark_sealed()).
  /// Errors: INVALID_ARGUMENT (the piece's canonical index is another one), FAILED_PRECONDITION
  /// ("assembly is already sealed", or being sealed; or "has not committed yet": bytes of the
  /// piece lie in another piece's open claim, and `*retry_later` is set: nothing changed, commit
  /// again), ABORTED (a byte the piece shares with an earlier piece differs: the message names
  /// both pieces and the canonical offset).
  /// The scatter, and the faulting in of the pages it writes, run on `pool` (null: the calling
  /// thread alone).
  [[nodiscard]] result<assembly_snapshot> add_piece(const std::string& piece_id, const view_plan& plan,
                                                    std::span<const std::byte> view_bytes,
                                                    const index::canonical_index& idx, thread_pool* pool = nullptr,
                                                    assembly_stream* stream = nullptr, bool* retry_later = nullptr);

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
  /// Past its deadline, and no piece holds a claim on it (an open piece keeps it).
  [[nodiscard]] bool expired(clock::time_point now) const;

 private:
  friend class assembly_stream;

  enum class state { open, sealing, sealed };

  assembly(std::string cgid, std::shared_ptr<const index::canonical_index> idx, std::vector<byte_range> required,
           std::shared_ptr<memory::shared_memory> buffer) noexcept;
  [[nodiscard]] assembly_snapshot snapshot_locked() const;
  // Counts `ranges` (required bytes covered for the first time) against their leaves; queues
  // the leaves left with nothing missing.
  void cover_leaves_locked(std::span<const byte_range> ranges);
  // The same for bytes given as a count per leaf.
  void cover_leaf_counts_locked(std::span<const std::uint64_t> per_leaf);
  void cover_leaf_locked(std::uint64_t leaf, std::uint64_t bytes);
  // The 4 MiB slices under `ranges` of at least `min_length` bytes not faulted in yet, at most
  // `budget` bytes of them, marked as faulted in.
  [[nodiscard]] std::vector<std::uint64_t> claim_slices_locked(std::span<const byte_range> ranges,
                                                               std::uint64_t min_length, std::uint64_t budget);
  // The 4 MiB slices not faulted in yet of which `ranges` touch at least three pages in four,
  // marked as faulted in: a stream's claim, whose writes would fault those pages anyway.
  [[nodiscard]] std::vector<std::uint64_t> claim_written_slices_locked(std::span<const byte_range> ranges);
  // Whether every required byte of `leaf` but `pending` of them is covered (the assembly open).
  [[nodiscard]] bool complete_but(std::uint64_t leaf, std::uint64_t pending) const;
  void release_claim(const std::string& piece_id);
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
  std::shared_ptr<memory::shared_memory> buffer_;  // null once sealed
  std::vector<byte_range> covered_;                // merged
  std::uint64_t covered_required_ = 0;             // of required_bytes_
  // piece id → its canonical ranges
  std::vector<std::pair<std::string, std::shared_ptr<const std::vector<byte_range>>>> pieces_;
  std::string artifact_id_;
  std::optional<clock::time_point> deadline_;
  std::vector<std::uint64_t> missing_;   // per leaf: required bytes no piece has covered yet
  std::vector<std::uint64_t> complete_;  // leaves with nothing missing, not yet handed to a hasher
  std::vector<hash::digest> digests_;    // per leaf, valid where hashed_
  std::vector<char> hashed_;
  std::vector<char> faulted_;             // per 4 MiB slice of the buffer: faulted in, or being
  std::uint64_t prefault_allowance_ = 0;  // bytes pieces brought, not yet faulted in ahead
  std::vector<std::pair<std::string, std::vector<byte_range>>> claims_;  // open streams: piece id → its claim
};

/// One piece's claim on an assembly (assembly::claim()): the canonical bytes it alone writes,
/// as its chunks arrive. Dropping the last reference before the piece's commit gives the claim
/// back (its bytes in the buffer are then no piece's, and the next writer overwrites them).
class assembly_stream : public std::enable_shared_from_this<assembly_stream> {
 public:
  assembly_stream(std::shared_ptr<assembly> whole, std::shared_ptr<memory::shared_memory> buffer, std::string piece_id,
                  std::shared_ptr<const view_plan> plan, std::vector<byte_range> claimed,
                  std::vector<std::uint64_t> slices, thread_pool* pool);
  ~assembly_stream();
  assembly_stream(const assembly_stream&) = delete;
  assembly_stream& operator=(const assembly_stream&) = delete;

  [[nodiscard]] const std::vector<byte_range>& claimed() const noexcept { return claimed_; }
  /// Whether the claim holds every canonical byte of the piece (nothing of it is left to compare).
  [[nodiscard]] bool claims_all() const noexcept { return !claimed_.empty() && claimed_ == plan_->canonical_ranges(); }
  /// View bytes [view_offset, +out.size()) read back from the canonical buffer (PAD as zero).
  /// REQUIRES: claims_all(), and those bytes written. Errors: OUT_OF_RANGE as views::gather().
  [[nodiscard]] status read_view(std::uint64_t view_offset, std::span<std::byte> out) const;
  /// The canonical buffer's bytes (those of the claim are the piece's once written).
  [[nodiscard]] std::span<const std::byte> canonical() const noexcept { return buffer_->bytes(); }
  [[nodiscard]] bool of(const assembly& a) const noexcept { return whole_.get() == &a; }

  /// Writes the claimed canonical bytes of view bytes [view_offset, +bytes.size()), first
  /// faulting in up to four times as many bytes of the claim's pages; each leaf these writes
  /// complete (every other required byte of it covered by committed pieces) is hashed on the
  /// pool; while more than twice the pool's threads of them wait, the writing thread hashes
  /// them itself. Errors: OUT_OF_RANGE as views::scatter().
  [[nodiscard]] status write(std::uint64_t view_offset, std::span<const std::byte> bytes);
  /// Completed leaves waiting for a hashing thread.
  [[nodiscard]] std::size_t leaves_queued() const;
  /// Returns once the leaves write() handed to the pool are hashed, hashing those still
  /// queued on the calling thread.
  void wait_for_hashes();
  /// Some view bytes were written twice: what was hashed may not be what stays, so nothing
  /// hashed here is used (the commit and the seal hash those leaves).
  void spoil() noexcept { spoiled_ = true; }

 private:
  friend class assembly;
  void leaf_written(std::uint64_t leaf, std::uint64_t bytes, std::vector<std::uint64_t>& ready);
  void hash_if_complete(std::uint64_t leaf);
  // Hashes the oldest queued leaf if more than `keep` are queued; returns whether it did.
  [[nodiscard]] bool hash_one_queued(std::size_t keep);

  const std::shared_ptr<assembly> whole_;
  const std::shared_ptr<memory::shared_memory> buffer_;
  const std::string piece_id_;
  const std::shared_ptr<const view_plan> plan_;
  const std::vector<byte_range> claimed_;    // merged
  const std::vector<std::uint64_t> slices_;  // 4 MiB slices of the claim to fault in ahead
  std::atomic<std::size_t> next_slice_{0};
  std::vector<std::uint64_t> need_;                        // per leaf: required bytes of the claim
  std::unique_ptr<std::atomic<std::uint64_t>[]> written_;  // per leaf: of those, written
  // Per leaf: its digest, when a write completed it; each set by the one write that completed
  // the leaf, read by the commit once every Feed is done.
  std::vector<hash::digest> digests_;
  std::vector<char> hashed_;
  std::atomic<bool> spoiled_{false};
  thread_pool* const pool_;
  mutable std::mutex hashing_mutex_;
  std::condition_variable hashing_done_;
  std::deque<std::uint64_t> queued_;  // completed leaves no thread has taken yet
  std::size_t hashing_ = 0;           // leaves queued or being hashed
};

}  // namespace tensorreg::views
