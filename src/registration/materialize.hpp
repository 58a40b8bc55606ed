// src/registration/materialize.hpp — copy a canonical buffer into daemon-owned host memory,
// hashing what was written.
//
// Used wherever the engine keeps its own copy (a stable_dram commit from its staging memfd or
// its device staging buffer, the local stable tier from a lease or a GPU replica). The id must
// describe exactly the bytes kept, even if a client scribbles on its own memory meanwhile:
//  * device bytes go first to the device provider (device_memory::copy_to_host), which
//    snapshots them on the GPU and copies/hashes the snapshot, when that is the faster place;
//  * otherwise each 4 MiB leaf is copied and then hashed from the copy, leaves in parallel on
//    the pool.
#pragma once

#include <memory>
#include <optional>

#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/memory/byte_source.hpp"
#include "tensorreg/memory/segmented_view.hpp"
#include "tensorreg/memory/shared_memory.hpp"
#include "tensorreg/registration/device_memory.hpp"

namespace tensorreg::registration::detail {

using materialized = host_copy;

/// A byte_source that reads through a segmented_view it owns or keeps alive (the engine's
/// normalized buffers): materialize hands the view to the device provider, which can see
/// device memory through segmented views but not through arbitrary wrappers.
class view_source : public memory::byte_source {
 public:
  [[nodiscard]] virtual const memory::segmented_view& view() const noexcept = 0;
};

/// Copies all of `source` into a memfd of its size and, if `want_digest`, tree-hashes the
/// copy. `devices` (may be null) gets the first chance (device_memory::copy_to_host, whose
/// memfd may be recycled from its replica pool); the host path always makes a new one.
/// Errors: RESOURCE_EXHAUSTED (no memory), whatever reading `source` or the device copy returns.
[[nodiscard]] result<materialized> materialize(const memory::byte_source& source, bool want_digest,
                                               thread_pool& pool, device_memory* devices);

}  // namespace tensorreg::registration::detail
