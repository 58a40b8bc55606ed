// src/registration/layout_cache.hpp — the canonical index of a lease layout fed before, found
// again without being rebuilt (registration.md §4.5, steps 4–6).
//
// A trainer that re-registers its weights every step feeds the same storage lengths, segments
// and aliases each time; only the regions behind them and the registration id change. Commit
// steps 4–6 (the index rebuild and its validation, the segment rules) are a pure function of
// those tables and total_size, so their outcome is kept under the tables' exact bytes (a
// signature, compared whole: no hash stands in for the tables) and reused when the same tables
// come again, from any client: equal tables give the equal index. Only successes are kept.
// What depends on memory — every storage checked against its region, the references, the
// mappings (§4.3.8, step 7) — is never kept and runs for every registration, so a region
// unregistered, re-registered or of an owner that exited is found by those checks as before.
//
// Bounded by entries and by bytes (signatures are as large as the tables a client sends), least
// recently used out first.
//
// Thread-safety: every member may be called concurrently (one internal mutex, a leaf of the
// engine's lock order). Ownership: entries are shared_ptrs; what find() returns stays valid
// after it is evicted.
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "tensorreg/index/canonical_index.hpp"

namespace tensorreg::registration::detail {

/// What commit steps 4–6 make of one layout.
struct lease_layout {
  std::shared_ptr<const index::canonical_index> index;
  /// encode_multihash(sha256(index->json())): the artifact descriptor's index_multihash.
  std::string index_multihash;
  /// The index's DATA ranges (offset, length), in order: the normalized buffer reads these
  /// (DECISIONS §5.1) and leaves the rest as PAD.
  std::vector<std::pair<std::uint64_t, std::uint64_t>> data_ranges;
};

/// lease_layout of `idx`: its multihash and DATA ranges computed once.
[[nodiscard]] std::shared_ptr<const lease_layout> make_lease_layout(std::shared_ptr<const index::canonical_index> idx);

class layout_cache {
 public:
  /// `max_entries` 0 keeps nothing; an entry larger than a quarter of `max_bytes` is not kept.
  explicit layout_cache(std::size_t max_entries = 16, std::size_t max_bytes = std::size_t{64} << 20);

  /// The layout kept under exactly `signature`, or null.
  [[nodiscard]] std::shared_ptr<const lease_layout> find(std::string_view signature);
  /// Keeps `layout` under `signature` (replacing an equal signature's), evicting as needed.
  void insert(std::string signature, std::shared_ptr<const lease_layout> layout);

  [[nodiscard]] std::size_t size() const;
  [[nodiscard]] std::uint64_t hits() const;
  [[nodiscard]] std::uint64_t misses() const;

 private:
  struct entry {
    std::string signature;
    std::shared_ptr<const lease_layout> layout;
    std::size_t bytes = 0;
  };
  void evict_locked();

  const std::size_t max_entries_;
  const std::size_t max_bytes_;
  mutable std::mutex mutex_;
  std::list<entry> entries_;  // most recently used first
  std::size_t bytes_ = 0;
  std::uint64_t hits_ = 0;
  std::uint64_t misses_ = 0;
};

}  // namespace tensorreg::registration::detail
