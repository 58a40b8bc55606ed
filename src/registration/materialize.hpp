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

#include <atomic>
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

/// Set when the registration a commit works for is revoked or its owner exits, so that the
/// commit's hashing and copying stop at the next leaf or chunk rather than run to the end for
/// nobody; null = never.
using cancel_flag = const std::atomic<bool>*;

/// `inner`, read through a check of `cancel` before each piece. The tree hash visits a source
/// once per leaf and chunked copies once per chunk, so either stops within one of them.
class cancellable_source final : public memory::byte_source {
 public:
  /// REQUIRES: `inner` and `*cancel` outlive this source.
  cancellable_source(const memory::byte_source& inner, cancel_flag cancel) noexcept : inner_(inner), cancel_(cancel) {}
  [[nodiscard]] std::uint64_t size() const noexcept override { return inner_.size(); }
  /// Errors: CANCELLED once the flag is set; otherwise the inner source's.
  [[nodiscard]] status visit(std::uint64_t offset, std::uint64_t length, memory::piece_sink sink) const override;

 private:
  const memory::byte_source& inner_;
  cancel_flag cancel_;
};

/// Whether `cancel` is set. Errors: CANCELLED "the commit was cancelled".
[[nodiscard]] status check_cancel(cancel_flag cancel);

/// Copies all of `source` into a memfd of its size and, if `want_digest`, tree-hashes the
/// copy. `devices` (may be null) gets the first chance (device_memory::copy_to_host, whose
/// memfd may be recycled from its replica pool); the host path always makes a new one.
/// Errors: RESOURCE_EXHAUSTED (no memory), CANCELLED (`cancel` set: checked per 4 MiB chunk on
/// the host path, before and after the device copy), whatever reading `source` or the device
/// copy returns.
[[nodiscard]] result<materialized> materialize(const memory::byte_source& source, bool want_digest, thread_pool& pool,
                                               device_memory* devices, cancel_flag cancel = nullptr);

}  // namespace tensorreg::registration::detail
