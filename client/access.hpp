// client/access.hpp — how the library's own files (and the daemon's tests) reach the private
// parts of connection and lease (private).
//
// Thread-safety: as connection and lease.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "client/raw_connection.hpp"
#include "tensorreg/client/connection.hpp"

namespace tensorreg::client {

struct connection_access {
  /// A library connection over an existing raw one (they then share the socket).
  [[nodiscard]] static connection wrap(std::shared_ptr<raw::connection> raw) { return connection(std::move(raw)); }
  [[nodiscard]] static const std::shared_ptr<raw::connection>& raw(const connection& c) noexcept { return c.raw_; }
};

/// The regions a lease reads, shared by the leases republished from it (they read the same
/// memory): unregistered (force) when the last of them lets go.
struct held_regions {
  held_regions(std::shared_ptr<raw::connection> raw, std::vector<std::string> ids) noexcept;
  held_regions(const held_regions&) = delete;
  held_regions& operator=(const held_regions&) = delete;
  ~held_regions();
  std::shared_ptr<raw::connection> raw;
  std::vector<std::string> ids;
};

struct lease_access {
  /// A live lease: keeps `info.registration_id` alive every max(1 s, ttl/2) ±10 % (none when
  /// ttl_ms is 0), and on release revokes it, then unregisters `region_ids`. `keep` is held
  /// until then (the memory the daemon reads).
  [[nodiscard]] static lease make(std::shared_ptr<raw::connection> raw, registered info,
                                  std::vector<std::string> region_ids, std::shared_ptr<void> keep,
                                  std::uint32_t ttl_ms);
  /// The same over `regions`, shared with the leases that read the same memory (republished).
  [[nodiscard]] static lease make(std::shared_ptr<raw::connection> raw, registered info,
                                  std::shared_ptr<const held_regions> regions, std::shared_ptr<void> keep,
                                  std::uint32_t ttl_ms);
  /// The state of `l`; null when moved from.
  [[nodiscard]] static const lease::state* state_of(const lease& l) noexcept { return l.state_.get(); }
  /// Marks `l` released without a call: the daemon ended it (RepublishLease with
  /// revoke_previous). Stops its keep-alive and lets go of its share of the regions.
  static void ended_by_daemon(lease& l) noexcept;
};

/// Unregisters `region_ids` (force), ignoring errors: the cleanup after a failed register.
void release_regions(raw::connection& raw, const std::vector<std::string>& region_ids) noexcept;

/// pwrite()s all of `bytes` at `offset` of the daemon's memfd `fd`, through short writes and
/// EINTR. Errors: RESOURCE_EXHAUSTED (ENOSPC, ENOMEM, or a write of 0 bytes), or the code of
/// the errno, with "cannot write N bytes at offset X of the daemon's memfd: <reason>".
[[nodiscard]] status write_to_memfd(int fd, std::span<const std::byte> bytes, std::uint64_t offset);

}  // namespace tensorreg::client
