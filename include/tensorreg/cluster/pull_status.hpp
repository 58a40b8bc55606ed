// tensorreg/cluster/pull_status.hpp — a pull from the cluster under way, as node::pulls() tells
// it and GetStats answers it (docs/wire-format.md §14).
//
// A header of its own, with no etcd or UCX behind it, so that the daemon's dispatcher can name
// it in a build without the cluster.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace tensorreg::cluster {

struct pull_status {
  std::string artifact_id;
  std::uint64_t total_bytes = 0;  ///< 0 until the manifest is verified
  std::uint64_t verified_bytes = 0;
  std::vector<std::string> sources;  ///< host ids, partial sources included
  double seconds = 0;                ///< since the pull began
};

}  // namespace tensorreg::cluster
