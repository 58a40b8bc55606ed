// src/registration/materialize.hpp — copy a canonical buffer into daemon-owned host memory,
// hashing what was written.
//
// Used wherever the engine keeps its own copy (a stable_dram commit from its staging memfd,
// the local stable tier from a LIP lease). Each 4 MiB leaf is copied and then hashed from the
// copy, so the id describes exactly the bytes kept, even if a client scribbles on its own
// memory meanwhile. Leaves run in parallel on the pool.
#pragma once

#include <memory>
#include <optional>

#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/memory/byte_source.hpp"
#include "tensorreg/memory/shared_memory.hpp"

namespace tensorreg::registration::detail {

struct materialized {
  std::shared_ptr<const memory::shared_memory> replica;
  std::optional<hash::digest> data_digest;  ///< set when asked for
};

/// Copies all of `source` into a new memfd and, if `want_digest`, tree-hashes the copy.
/// Errors: RESOURCE_EXHAUSTED (no memory), whatever reading `source` returns.
[[nodiscard]] result<materialized> materialize(const memory::byte_source& source, bool want_digest,
                                               thread_pool& pool);

}  // namespace tensorreg::registration::detail
