// tensorreg/cluster/publish_status.hpp — what a publish (node::publish, PublishArtifact,
// docs/cluster.md §5) answers: who holds the artifact now, whom it asked, whether the target
// was reached.
//
// A header of its own, with no etcd or UCX behind it, so that the daemon's dispatcher can name
// it in a build without the cluster.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace tensorreg::cluster {

struct publish_status {
  /// Host ids with a complete replica when the publish ended (this host included), by host id.
  std::vector<std::string> holders;
  /// Host ids this publish asked to pull it, in the order asked.
  std::vector<std::string> asked;
  /// Asked members whose pull failed (they marked their ask declined), with their reason, in
  /// the order seen: each was replaced by the next candidate. They go on trying.
  struct declined_ask {
    std::string host_id;
    std::string reason;
    friend bool operator==(const declined_ask&, const declined_ask&) = default;
  };
  std::vector<declined_ask> declined;
  /// Complete replicas wanted, this host counted: `replicas`, or every member with `all` (the
  /// members when the publish ended).
  std::uint32_t target = 0;
  /// Whether `holders` reached `target` before the timeout.
  bool reached = false;
  /// The members when the publish ended (they are read again while it waits). Once they all
  /// hold it the publish ends, reached or not: no host is left to ask.
  std::uint32_t members = 0;
};

}  // namespace tensorreg::cluster
