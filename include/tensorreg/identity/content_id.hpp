// tensorreg/identity/content_id.hpp — the mi2 id of an index and its canonical bytes.
//
// index multihash = SHA-256 of the canonical index JSON; data multihash = the 4 MiB-leaf tree
// hash of the canonical buffer (registration.md §3). What the engine computes at commit, and
// what `tensorreg digest` / `tensorreg index` print.
//
// Thread-safety: stateless; the pool is used as thread_pool allows.
#pragma once

#include <string_view>

#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/identity/artifact_id.hpp"
#include "tensorreg/memory/byte_source.hpp"

namespace tensorreg::identity {

/// The mi2 id of `index_json` (hashed as given) over the bytes of `data`.
/// Errors: whatever reading `data` returns.
[[nodiscard]] result<mi2_id> content_id(std::string_view index_json, const memory::byte_source& data,
                                        thread_pool* pool);

}  // namespace tensorreg::identity
