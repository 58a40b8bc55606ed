// tests/support/lip_requests.hpp — hand-made requests of a lease-in-place registration over a
// HOST_SHARED region (registration.md §4, §5), for tests and tools that speak raw frames.
//
// Each builder returns a request that a well-behaved client would send; tests then break one
// field to attack one rule. `lease_bytes()` runs the whole conversation (region, Begin, Feed,
// Commit) over a raw connection and keeps the daemon-managed slab it wrote.
//
// Thread-safety: the builders are pure; lease_bytes() uses the connection as it allows.
// Ownership: a leased_bytes owns its mapping of the region's slab; the daemon's lease and region
// live until revoked and unregistered (or the owner exits).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "client/raw_connection.hpp"
#include "tensorreg/common/error.hpp"
#include "tensorreg/memory/shared_memory.hpp"
#include "tensorreg/wire/v1/frame.pb.h"

namespace tensorreg::testing::lip {

namespace wire = ::tensorreg::wire::v1;
namespace v2 = ::tensorcast::daemon::v2;

/// RegisterRegion of a daemon-managed HOST_SHARED slab of `size` bytes (the answer carries its fd).
[[nodiscard]] wire::Request managed_region(pid_t owner, std::uint64_t size);
/// RegisterRegion of the client's own memfd (sent as fd #0 with the request) under `token`.
[[nodiscard]] wire::Request client_region(pid_t owner, std::uint64_t size, const std::string& token);
/// UnregisterRegion (force: the region goes with its last reference).
[[nodiscard]] wire::Request unregister_region(pid_t owner, const std::string& region_id);
/// Begin of a lease-in-place registration; `profile` 0 leaves the policy unset.
[[nodiscard]] wire::Request begin(pid_t owner, std::uint64_t total_size, std::uint32_t ttl_ms,
                                  tensorcast::common::v1::PolicyProfile profile = {});
/// One feed frame: storage "s0" = [0, length) of `region_id`, one segment over it at artifact
/// offset 0, one alias "weights" of `length` uint8 elements.
[[nodiscard]] v2::FeedRegisterArtifactStreamRequest one_storage(const std::string& registration_id,
                                                                const std::string& region_id, std::uint64_t length);
[[nodiscard]] wire::Request commit(const std::string& registration_id);
[[nodiscard]] wire::Request abort(const std::string& registration_id);
[[nodiscard]] wire::Request revoke(const std::string& registration_id);
[[nodiscard]] wire::Request keep_alive(pid_t owner, const std::string& registration_id, std::uint32_t ttl_ms);
[[nodiscard]] wire::Request deregister(const std::string& artifact_id);
[[nodiscard]] wire::Request get_memfd(const std::string& artifact_id);

/// `n` bytes derived from `seed` (xorshift; the same on every call), for leases whose bytes two
/// processes must agree on.
[[nodiscard]] std::vector<std::byte> pattern(std::uint64_t n, std::uint32_t seed);

/// What lease_bytes() made.
struct leased_bytes {
  std::string region_id;
  std::string registration_id;
  std::string artifact_id;
  std::optional<memory::shared_memory> slab;  ///< the region's memory, mapped writable
};

/// Copies `bytes` into a new daemon-managed region and leases them in place with `ttl_ms`.
/// Errors: the daemon's, from the call that failed; the registration begun is then revoked
/// and the region unregistered.
[[nodiscard]] result<leased_bytes> lease_bytes(client::raw::connection& c, std::span<const std::byte> bytes,
                                               std::uint32_t ttl_ms,
                                               tensorcast::common::v1::PolicyProfile profile = {});

}  // namespace tensorreg::testing::lip
