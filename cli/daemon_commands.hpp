// cli/daemon_commands.hpp — `tensorreg` commands that talk to tensorregd.
//
// status, put, lease, ls, show, index ID, revoke, deregister, stats, view (a view of an
// artifact, registration.md §7), persist (a copy in --persist-dir, registration.md §1.6), get
// and pull (make an artifact local: from disk or the cluster), publish (replicas on the
// members of the daemon's cluster, docs/cluster.md §5), cluster ls
// (cli/cluster_commands.hpp). Human-readable tables by
// default, `--json` for scripts; `--socket PATH` picks the daemon.
#pragma once

#include <string>
#include <vector>

namespace tensorreg::cli {

/// Runs `command` with `args` against the daemon. Returns the exit code.
int run_daemon_command(const std::string& command, const std::vector<std::string>& args);

/// Whether `command` is one of the daemon commands.
[[nodiscard]] bool is_daemon_command(const std::string& command);

}  // namespace tensorreg::cli
