// cli/cluster_commands.hpp — `tensorreg cluster ls`: what the cluster's catalogue lists.
//
// Reads the etcd catalogue of docs/cluster.md §2 with tensorreg::cluster's own client, as an
// observer: it never joins, writes or renews a lease. A build without the cluster (no libcurl
// or UCX: TENSORREG_CLUSTER) says so and exits 1.
//
// Thread-safety: call from one thread. Ownership: nothing is kept between calls.
#pragma once

#include <string>

namespace tensorreg::cli {

/// Prints the hosts of the cluster whose catalogue is `url` ("etcd://host:port/prefix"): host
/// id and name, transfer address, capacity, lease health (alive with the seconds left, or
/// expired) and the artifacts each advertises with their size and state: "replica" (held
/// whole) or "pulling" (a pull under way that serves its verified leaves, docs/cluster.md
/// §3.3); a JSON array with `json`. Returns the exit code (2 for a URL that does not parse, 1
/// when etcd cannot be read).
int cluster_ls(const std::string& url, bool json);

}  // namespace tensorreg::cli
