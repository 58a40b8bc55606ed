// tests/support/daemon_probe.hpp — what a running tensorregd holds, seen from outside, and
// whether its artifacts still hash to their ids.
//
// snapshot() counts the daemon's open fds (/proc/<pid>/fd), reads its resident memory
// (/proc/<pid>/status) and asks GetStats; leaks() names what differs between two snapshots
// in what must return to a baseline once clients are gone (fds, pending registrations,
// leases, regions, mappings, artifacts, stable bytes). rehash() fetches an artifact's stable
// replica (GetArtifactMemfd) and recomputes its mi2 id with the library's identity code.
// The adversarial suite and the soak compare snapshots before and after their attacks.
//
// Thread-safety: free functions; calls on one client::connection are serialised by it.
// Ownership: nothing is kept.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

#include "tensorreg/client/connection.hpp"
#include "tensorreg/common/error.hpp"

namespace tensorreg::testing {

struct daemon_snapshot {
  std::size_t fds = 0;
  std::uint64_t rss_bytes = 0;
  client::daemon_stats stats;
  std::uint64_t stable_bytes = 0;  ///< canonical bytes of the stable_dram tier
  std::uint64_t stable_artifacts = 0;

  /// "fds 12, rss 40 MiB, artifacts 3, pending 0, ..." for logs and failure messages.
  [[nodiscard]] std::string describe() const;
};

/// Entries of /proc/<pid>/fd; 0 when the process is gone.
[[nodiscard]] std::size_t open_fds(pid_t pid);
/// What each of the process's fds points at ("3 -> socket:[123]"), one per line, for reports.
[[nodiscard]] std::string describe_fds(pid_t pid);
/// VmRSS of /proc/<pid>/status in bytes; 0 when the process is gone.
[[nodiscard]] std::uint64_t resident_bytes(pid_t pid);

/// The daemon `pid` as it is now, its counts asked over `c`.
/// Errors: the GetStats call's.
[[nodiscard]] result<daemon_snapshot> snapshot(pid_t pid, client::connection& c);

/// What `now` holds beyond (or below) `baseline` in fds, pending registrations, leases,
/// regions, open mappings, artifacts and stable bytes, as "pending 0 -> 2; fds 10 -> 11";
/// empty when they agree. Connections and RSS are not compared (they vary by design).
[[nodiscard]] std::string leaks(const daemon_snapshot& baseline, const daemon_snapshot& now);

/// Fetches the stable replica of `artifact_id` and returns the mi2 id its index and bytes
/// hash to now (equal to `artifact_id` unless the bytes changed).
/// Errors: connection::get's; the hash's.
[[nodiscard]] result<std::string> rehash(client::connection& c, std::string_view artifact_id);

/// Calls `done` until it answers true or `within` has passed; returns its last answer.
bool eventually(const std::function<bool()>& done, std::chrono::milliseconds within);

}  // namespace tensorreg::testing
