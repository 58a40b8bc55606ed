#include "cluster_commands.hpp"

#include <fmt/core.h>

#include <nlohmann/json.hpp>

#include "progress.hpp"
#include "tensorreg/common/error.hpp"

#if TENSORREG_HAVE_CLUSTER
#include "tensorreg/cluster/catalogue.hpp"
#include "tensorreg/cluster/etcd_client.hpp"
#endif

namespace tensorreg::cli {

#if TENSORREG_HAVE_CLUSTER

namespace {

using json = nlohmann::ordered_json;

int fail_with(const error& e, int code = 1) {
  fmt::print(stderr, "tensorreg: {} ({})\n", e.message, errc_name(e.code));
  return code;
}

// A replica's STATE: a host that still pulls it serves only the leaves it has verified.
const char* state_name(cluster::replica_state state) {
  return state == cluster::replica_state::pulling ? "pulling" : "replica";
}

std::string health(const cluster::listed_host& h) {
  if (h.lease_left) return fmt::format("alive ({} s left)", h.lease_left->count());
  if (h.host.transfer_address.empty()) return "expired (no host record)";
  return "expired";
}

}  // namespace

int cluster_ls(const std::string& text, bool as_json) {
  auto url = cluster::parse_cluster_url(text);
  if (!url) return fail_with(url.error(), 2);
  auto etcd = cluster::etcd_client::create({url->endpoint()});
  if (!etcd) return fail_with(etcd.error());
  auto hosts = cluster::list_cluster(**etcd, *url);
  if (!hosts) return fail_with(with_context(hosts.error(), "cannot list the cluster " + text));
  auto disk = cluster::list_disk_copies(**etcd, *url);
  if (!disk) return fail_with(with_context(disk.error(), "cannot list the cluster " + text));
  if (as_json) {
    json out = json::array();
    for (const auto& h : *hosts) {
      json replicas = json::array();
      for (const auto& r : h.replicas) {
        replicas.push_back(
            json{{"artifact_id", r.artifact_id}, {"total_size", r.total_size}, {"state", state_name(r.state)}});
      }
      // What the host reads from its shared persist volume (docs/cluster.md §8).
      json on_volume = json::array();
      for (const auto& d : *disk) {
        if (h.host.persist_volume.empty() || d.copy.volume != h.host.persist_volume) continue;
        on_volume.push_back(json{{"artifact_id", d.artifact_id}, {"total_size", d.copy.total_size}, {"by", d.copy.by}});
      }
      out.push_back(json{{"host_id", h.host.host_id},
                         {"host_name", h.host.host_name},
                         {"transfer_address", h.host.transfer_address},
                         {"capacity_bytes", h.host.capacity_bytes},
                         {"free_bytes", h.host.free_bytes ? json(*h.host.free_bytes) : json(nullptr)},
                         {"alive", h.lease_left.has_value()},
                         {"lease_seconds_left", h.lease_left ? h.lease_left->count() : 0},
                         {"replicas", replicas},
                         {"persist_volume", h.host.persist_volume},
                         {"volume_copies", on_volume}});
    }
    fmt::print("{}\n", out.dump());
    return 0;
  }
  fmt::print("cluster {} ({})\n", text, url->endpoint());
  fmt::print("{:<24} {:<24} {:>12} {:>10}  {:<20} {:>8}\n", "HOST", "TRANSFER", "CAPACITY", "FREE", "HEALTH",
             "REPLICAS");
  std::uint64_t alive = 0;
  for (const auto& h : *hosts) {
    alive += h.lease_left ? 1 : 0;
    fmt::print("{:<24} {:<24} {:>12} {:>10}  {:<20} {:>8}\n", h.host.host_id,
               h.host.transfer_address.empty() ? "-" : h.host.transfer_address,
               h.host.capacity_bytes == 0 ? std::string("-") : human_bytes(h.host.capacity_bytes),
               h.host.free_bytes ? human_bytes(*h.host.free_bytes) : std::string("-"), health(h), h.replicas.size());
    for (const auto& r : h.replicas) {
      fmt::print("  {}  {:>10}  {}\n", r.artifact_id, human_bytes(r.total_size), state_name(r.state));
    }
    if (!h.host.persist_volume.empty()) fmt::print("  persist volume {}\n", h.host.persist_volume);
  }
  if (!disk->empty()) fmt::print("persisted on shared volumes:\n");
  for (const auto& d : *disk) {
    fmt::print("  {}  {:>10}  volume {} (listed by {})\n", d.artifact_id, human_bytes(d.copy.total_size), d.copy.volume,
               d.copy.by.empty() ? "-" : d.copy.by);
  }
  fmt::print("{} hosts, {} alive\n", hosts->size(), alive);
  return 0;
}

#else

int cluster_ls(const std::string&, bool) {
  fmt::print(stderr,
             "tensorreg: cannot list the cluster: this tensorreg was built without the cluster (libcurl and UCX; "
             "TENSORREG_CLUSTER) (UNIMPLEMENTED)\n");
  return 1;
}

#endif

}  // namespace tensorreg::cli
