// tensorreg/persistence/resident_state.hpp — a daemon's resident memory, handed to its successor.
//
// Provides `resident_state`: the catalogue of the stable DRAM entries a daemon holds (each
// artifact's descriptor, canonical index, cache policy, owner uid, whether the persist directory
// holds it, and the name of the memfd holding its canonical bytes) and of its leases of client
// memfds (registration id, owner, segments, the names of the memfds), its byte encoding (a
// versioned binary layout, docs/architecture.md §14.3), and the checks a receiver makes before
// it maps a memfd it was handed. Both ways a daemon's memory outlives the daemon use it: the
// takeover handoff (`tensorregd --takeover`: the catalogue and the memfds travel over
// SCM_RIGHTS) and the systemd fd store (the catalogue in a sealed memfd of its own, every memfd
// stored under its name, picked up after a crash). The engine exports and adopts it
// (registration/engine.hpp, export_resident() and adopt_resident()).
//
// Nothing in a received state is trusted: decode() checks every length against the bytes left
// and every enum against its list; a memfd is mapped only if it is sealed against writes,
// growing and shrinking and is exactly as long as its entry says; an mi2 entry's bytes are
// hashed again in the background and dropped (DATA_LOSS, never served again) when they are not
// the id's.
//
// Thread-safety: free functions without shared state. Ownership: values; named_fd owns its fd.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tensorreg/common/error.hpp"
#include "tensorreg/common/unique_fd.hpp"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/memory/byte_source.hpp"
#include "tensorreg/memory/shared_memory.hpp"
#include "tensorreg/persistence/durable_store.hpp"

namespace tensorreg::persistence {

/// The encoding's format version this code writes and reads.
inline constexpr std::uint32_t resident_state_version = 1;

/// One stable DRAM entry.
struct resident_entry {
  /// Ids, sizes and the cache policy the entry is admitted with. For retention ttl,
  /// `record.cache.ttl_ms` is the time that was left of the TTL when the state was taken.
  artifact_record record;
  std::shared_ptr<const index::canonical_index> index;
  /// The uid whose commit made the entry (DECISIONS §8); nullopt when none was recorded.
  std::optional<std::uint32_t> owner_uid;
  /// Whether the persist directory held the artifact when the state was taken.
  bool persisted = false;
  /// The name of the memfd holding the canonical bytes (fd_name_of(artifact_id)).
  std::string fd_name;
};

/// `length` bytes at `offset` of a lease's canonical buffer come from its source `source` at
/// `source_offset`.
struct resident_segment {
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
  std::uint32_t source = 0;  ///< an index into resident_lease::sources
  std::uint64_t source_offset = 0;
};

/// A memfd of client memory a lease reads (a HOST_SHARED region's).
struct resident_source {
  std::string fd_name;  ///< lease_source_name()
  std::uint64_t size = 0;
};

/// A lease-in-place of live client memory held in memfds (registration.md §4.4).
struct resident_lease {
  /// The artifact it holds: record and index (owner_uid, persisted unused).
  resident_entry artifact;
  std::string registration_id;
  std::int32_t owner_pid = 0;
  std::int32_t device_id = 0;
  std::uint64_t epoch = 0;
  std::optional<std::uint64_t> ttl_left_ms;  ///< nullopt: no expiry
  std::vector<resident_segment> segments;
  std::vector<resident_source> sources;
};

struct resident_state {
  std::vector<resident_entry> entries;  ///< most recently used first
  std::vector<resident_lease> leases;
};

/// An fd with the name it travels under.
struct named_fd {
  std::string name;
  unique_fd fd;
};

/// A state's bytes and the memfds its entries name, as a daemon hands them on.
struct resident_export {
  std::string state;  ///< encode_resident_state()
  std::vector<named_fd> fds;
};

/// The name an artifact's memfd travels under: "m-" and the first 40 hex digits of the SHA-256
/// of its id. Stable, unique in practice, and a valid systemd FDNAME (no ':', at most 255).
[[nodiscard]] std::string fd_name_of(std::string_view artifact_id);

/// The name a lease's source `index` travels under: "l-", 32 hex digits of the SHA-256 of the
/// registration id, "-" and the index.
[[nodiscard]] std::string lease_source_name(std::string_view registration_id, std::size_t index);

/// The binary layout of docs/architecture.md §14.3.
[[nodiscard]] std::string encode_resident_state(const resident_state& state);

/// Parses encode_resident_state()'s output, checking every length, enum and index.
/// Errors: INVALID_ARGUMENT naming the field and offset (truncated or malformed bytes, an
/// unknown version, an index that is not canonical for its total_size, a bad artifact id).
[[nodiscard]] result<resident_state> decode_resident_state(std::span<const std::byte> bytes);
[[nodiscard]] result<resident_state> decode_resident_state(std::string_view bytes);

/// Maps a memfd handed over for `entry`, read-only, after checking that it carries the seals
/// F_SEAL_SHRINK, F_SEAL_GROW and F_SEAL_WRITE (or F_SEAL_FUTURE_WRITE, which a recycled replica
/// has) and is exactly `entry.record.total_size` bytes long.
/// Errors: FAILED_PRECONDITION naming the artifact and the missing seal or the sizes, and
/// shared_memory::adopt()'s.
[[nodiscard]] result<std::shared_ptr<const memory::shared_memory>> map_handed_memfd(const resident_entry& entry,
                                                                                    unique_fd fd);

/// Whether `bytes` are the canonical bytes an mi2 entry's id names (the tree root of their
/// leaves' SHA-256 is the data multihash); `cancelled` is polled between leaves. OK without
/// checking for a cgid entry, whose id names no bytes.
/// Errors: DATA_LOSS naming the artifact, CANCELLED, and the reads' errors.
[[nodiscard]] status verify_resident_bytes(const resident_entry& entry, const memory::byte_source& bytes,
                                           const std::atomic<bool>* cancelled = nullptr);

/// The state's bytes in a new memfd, sealed read-only: the catalogue fd of the systemd fd store.
/// Errors: RESOURCE_EXHAUSTED (no memory), FAILED_PRECONDITION (cannot seal).
[[nodiscard]] result<unique_fd> state_memfd(std::string_view bytes);

/// Reads a whole catalogue fd (from offset 0; at most 1 GiB). Errors: INVALID_ARGUMENT (not a
/// readable file, too large), UNAVAILABLE (a read fails).
[[nodiscard]] result<std::string> read_state_fd(int fd);

}  // namespace tensorreg::persistence
