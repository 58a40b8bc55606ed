// tensorreg/persistence/durable_store.hpp — artifacts kept in a directory (--persist-dir).
//
// Provides `durable_store`: one directory per artifact under a root directory, each holding the
// canonical index (`index.json`), the canonical bytes (`data.bin`) and a `MANIFEST` (format
// version, ids, sizes, per-leaf SHA-256 and XXH3-128 of the 4 MiB leaves of hash/tree_hash.hpp,
// and the stable-cache policy to restore it with). The layout and the crash-safety argument
// are in docs/architecture.md §14:
//
//   <root>/<encoded artifact id>/{MANIFEST,index.json,data.bin}   published artifacts
//   <root>/.tmp-<random>/                                          writes in progress, removed at open
//   <root>/quarantine/<encoded artifact id>.<ns>/                   damaged copies, never served
//
// write() builds an artifact under `.tmp-<random>`, fsyncs every file and the directory, renames
// it into place and fsyncs the root: an artifact is visible whole or not at all. open() scans the
// root, removes leftovers of interrupted writes and checks every manifest against its files'
// sizes, its index bytes and its id (an mi2 id names the SHA-256 of the index and the tree root
// of the leaves), quarantining what fails. load() reads an artifact into a caller's buffer and
// checks every leaf (its XXH3-128 by default, its SHA-256 if asked); verify() checks every
// leaf's SHA-256 without a buffer. open_data() hands a reader that loads the bytes itself a
// read-only fd of the data file and the manifest's leaf checks, as open() found them. Every
// damage found is
// DATA_LOSS naming the file or the leaf, and the artifact's directory is moved to quarantine/.
//
// A root may be shared with other daemons (store_options::shared): each names its temporary
// directories with a tag of its own, finds the others' copies when it looks for one it does
// not list (discover()), and takes a copy they removed as gone, not damaged.
//
// Every system call that can fail asks the fault seam first (common/fault_injection.hpp: open,
// write, fsync, rename, read), so tests can make a disk full or failing at any step.
//
// Thread-safety: every member function may be called from any number of threads at once. One
// mutex guards the table of published artifacts; file I/O runs outside it. Writing the same id
// twice at once is safe (the second finds the first published and succeeds). The mutex is a
// leaf: contains() may be called with other locks held (the stable cache's spill predicate).
//
// Ownership: the store owns nothing but its table and the root's path; loads write into memory
// the caller owns. Nothing is left open between calls but the fds open_data() hands its caller.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tensorreg/common/error.hpp"
#include "tensorreg/common/priority_inheriting_mutex.hpp"
#include "tensorreg/common/unique_fd.hpp"
#include "tensorreg/hash/fingerprint.hpp"
#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/memory/byte_source.hpp"
#include "tensorreg/policy/store_policy.hpp"

namespace tensorreg {
class thread_pool;
}

namespace tensorreg::persistence {

/// The MANIFEST's format version this code writes and reads.
inline constexpr std::uint32_t manifest_version = 1;

/// What a write is told about the artifact besides its bytes.
struct artifact_record {
  std::string artifact_id;
  std::string id_kind;  ///< "MI2" or "CGID"
  std::string index_multihash;
  std::string data_multihash;  ///< empty for a cgid artifact
  std::string schema_version = "v3";
  std::string encoding = "json";
  std::uint64_t total_size = 0;
  /// The stable-cache policy a restored copy is admitted with (registration.md §6.3).
  policy::cache_policy cache{};
};

/// One leaf's checks, as the MANIFEST keeps them.
struct leaf_check {
  hash::digest sha256{};
  hash::fingerprint128 xxh3{};
};

/// A published artifact as open() or write() found it.
struct stored_artifact {
  artifact_record record;
  std::shared_ptr<const index::canonical_index> index;
  std::vector<leaf_check> leaves;
  std::string directory;  ///< absolute path of its directory
};

/// A copy open() or load() moved to quarantine/, and why.
struct quarantined_artifact {
  std::string name;  ///< the directory's name under the root
  std::string reason;
};

/// What a load compares each leaf with.
enum class leaf_check_kind {
  /// XXH3-128 fingerprints: damage (a flipped byte, a torn write) is found at memory speed.
  /// The SHA-256 leaves, which fold to the id, are checked at open and by verify().
  xxh3,
  /// SHA-256: the bytes are proven to be the id's at load, at hashing speed.
  sha256,
};

struct store_options {
  /// Bytes per write()/read() call; larger calls keep the disk busy with fewer syscalls.
  std::uint64_t chunk_bytes = std::uint64_t{64} << 20;
  /// Sleeps this long after each chunk of a write (tests: to kill a daemon mid-write).
  std::chrono::microseconds chunk_pause{0};
  /// Threads hashing leaves while a write or load runs (null = one helper thread per call).
  thread_pool* hash_pool = nullptr;
  /// What load() checks every leaf against.
  leaf_check_kind load_check = leaf_check_kind::xxh3;
  /// Chunks a load() reads at once, each on its own thread (1: one sequential reader).
  unsigned load_readers = 4;
  /// The root is shared with other daemons (a filesystem several hosts mount: docs/cluster.md
  /// §8): discover() finds what they published after open(), a copy they removed is gone
  /// (NOT_FOUND) rather than damaged, and open() removes only this writer's leftovers and
  /// those older than `stale_leftovers_after`.
  bool shared = false;
  /// Names this daemon's temporary directories in a shared root (its host id); any string.
  std::string writer_tag;
  std::chrono::seconds stale_leftovers_after{24 * 3600};
};

/// Progress of a write or verification: bytes done of total.
using progress_fn = std::function<void(std::uint64_t done, std::uint64_t total)>;

class durable_store {
 public:
  /// Opens `root` (created 0700 when missing; a symbolic link, a non-directory, a directory of
  /// another uid or one others may enter are refused), removes leftovers of interrupted writes
  /// and deletions (`.tmp-*`) and checks every artifact's manifest, quarantining the damaged.
  /// Errors: FAILED_PRECONDITION (refused root), UNAVAILABLE / PERMISSION_DENIED (cannot create
  /// or read it).
  [[nodiscard]] static result<std::unique_ptr<durable_store>> open(const std::string& root, store_options options = {});

  durable_store(const durable_store&) = delete;
  durable_store& operator=(const durable_store&) = delete;
  ~durable_store();

  [[nodiscard]] const std::string& root() const noexcept { return root_; }

  /// Writes `bytes` (the artifact's canonical bytes, `record.total_size` of them) and `index`
  /// as a published artifact. An id already published is left as it is (OK). `progress` is
  /// called after each chunk; `cancelled` is polled between chunks.
  /// Errors: INVALID_ARGUMENT (sizes disagree, bad id), RESOURCE_EXHAUSTED (ENOSPC, EDQUOT),
  /// UNAVAILABLE (any other I/O error; the message names the file, the call and strerror),
  /// CANCELLED; DATA_LOSS when the bytes do not hash to the id's data multihash. Nothing is
  /// left visible on failure.
  [[nodiscard]] status write(const artifact_record& record, const index::canonical_index& index,
                             const memory::byte_source& bytes, const progress_fn& progress = {},
                             const std::atomic<bool>* cancelled = nullptr);

  /// Whether `artifact_id` is published (and not quarantined). Quick; a leaf lock.
  [[nodiscard]] bool contains(std::string_view artifact_id) const;
  /// Whether `artifact_id` is published, looking in a shared root for a copy another daemon
  /// published since open() (its manifest checked as open() checks one) when this store does
  /// not list it. A private root answers what contains() does, without I/O. Call it with no
  /// lock held.
  /// Errors: DATA_LOSS (a damaged copy: quarantined), UNAVAILABLE (cannot read it).
  [[nodiscard]] result<bool> discover(std::string_view artifact_id);
  /// In a shared root, brings the list up to date with the directory: lists the copies other
  /// daemons published since (manifests checked; damaged ones quarantined) and forgets those
  /// they removed. Nothing in a private root. Call it with no lock held.
  /// Errors: UNAVAILABLE (cannot read the root).
  [[nodiscard]] status rescan();
  /// The published artifact, or nullopt.
  [[nodiscard]] std::optional<stored_artifact> find(std::string_view artifact_id) const;
  /// Every published artifact, by id.
  [[nodiscard]] std::vector<stored_artifact> list() const;

  struct totals_result {
    std::size_t artifacts = 0;
    std::uint64_t bytes = 0;  ///< the artifacts' total_size
  };
  /// How many artifacts are published and their bytes, without copying their records.
  [[nodiscard]] totals_result totals() const;

  /// Reads the artifact's canonical bytes into `out` (exactly total_size bytes) and checks
  /// every leaf against the manifest (store_options::load_check) as it arrives. Errors: NOT_FOUND (not published),
  /// INVALID_ARGUMENT (`out` of another size), DATA_LOSS naming the leaf or file (the artifact
  /// is quarantined), UNAVAILABLE (I/O error).
  [[nodiscard]] status load(std::string_view artifact_id, std::span<std::byte> out);

  /// A published artifact's data file, opened for reading, and its record, index and leaf
  /// checks as open() or write() found them (no file but data.bin is read again).
  struct opened_data {
    std::shared_ptr<const stored_artifact> artifact;
    unique_fd data;  ///< data.bin, O_RDONLY | O_CLOEXEC, artifact->record.total_size bytes
  };
  /// Opens the artifact's data file read-only for a reader that loads and checks the bytes
  /// itself (docs/architecture.md §14). Only its size is checked here.
  /// Errors: NOT_FOUND (not published), DATA_LOSS (quarantined since the store was opened,
  /// with the reason; or data.bin is no longer total_size bytes: quarantined now),
  /// UNAVAILABLE / PERMISSION_DENIED (cannot open it).
  [[nodiscard]] result<opened_data> open_data(std::string_view artifact_id);

  /// Reads and checks every leaf's SHA-256, without a destination. Errors: as load().
  [[nodiscard]] status verify(std::string_view artifact_id, const progress_fn& progress = {});

  /// Removes a published artifact (renamed to `.tmp-del-*` first, so no half-removed copy is
  /// ever visible). Errors: NOT_FOUND, UNAVAILABLE.
  [[nodiscard]] status remove(std::string_view artifact_id);

  /// Copies open(), load() and verify() moved to quarantine/ since the store was opened.
  [[nodiscard]] std::vector<quarantined_artifact> quarantined() const;

  /// The directory name of an artifact id (characters outside [A-Za-z0-9.~-] as %XX).
  [[nodiscard]] static std::string directory_name(std::string_view artifact_id);

 private:
  durable_store(std::string root, store_options options);
  [[nodiscard]] status scan();
  // The prefix of this store's temporary directories (`.tmp-`, or `.tmp-<tag>_` when shared).
  [[nodiscard]] std::string temporary_prefix() const;
  // Whether a temporary directory found by open() is a leftover to remove: every one in a
  // private root; in a shared root this writer's and those not touched for a long time.
  [[nodiscard]] bool leftover(const std::string& name, const std::string& path) const;
  // After a read of `a` failed: in a shared root, when another daemon removed its directory,
  // forgets it and answers NOT_FOUND; nullopt otherwise.
  [[nodiscard]] std::optional<error> removed_by_another(const stored_artifact& a, const std::string& what);
  [[nodiscard]] status read_checked(const stored_artifact& a, std::span<std::byte> out, const progress_fn& progress);
  void quarantine(const std::string& artifact_id, const std::string& name, const std::string& reason);

  std::string root_;
  store_options options_;
  mutable priority_inheriting_mutex mutex_;  // a leaf; guards the two tables below (GetStats takes it)
  std::map<std::string, std::shared_ptr<const stored_artifact>, std::less<>> published_;
  std::vector<quarantined_artifact> quarantined_;
};

}  // namespace tensorreg::persistence
