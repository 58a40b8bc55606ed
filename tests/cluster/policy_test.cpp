// A daemon's dispatcher over a real cluster node (docs/cluster.md §5, Policies): a commit whose
// policy asks for stable copies on other hosts is answered READY once a second member holds a
// complete replica, and DEGRADED when the members are too few.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <string>
#include <thread>

#include "cluster/etcd_process.hpp"
#include "daemon/dispatcher.hpp"
#include "support/engine_helpers.hpp"
#include "support/temp_dir.hpp"
#include "support/two_tensor_artifact.hpp"
#include "tensorcast/common/v1/common.pb.h"
#include "tensorcast/daemon/v2/store_daemon.pb.h"
#include "tensorreg/cluster/node.hpp"
#include "tensorreg/wire/v1/frame.pb.h"

using namespace tensorreg;
using namespace std::chrono_literals;
namespace t = tensorreg::testing;
namespace wv1 = tensorreg::wire::v1;
namespace v2 = tensorcast::daemon::v2;
namespace common = tensorcast::common::v1;

namespace {

std::unique_ptr<cluster::node> join(registration::engine& e, const std::string& url, const std::string& host_id) {
  cluster::node_options options;
  options.url = *cluster::parse_cluster_url(url);
  options.self = cluster::host_record{host_id, host_id, "127.0.0.1:0", 0, "", std::nullopt};
  options.lease_ttl = 3s;
  options.withdraw_check_every = 50ms;
  options.pull.request_timeout = 5s;
  auto n = cluster::node::create(e, std::move(options));
  REQUIRE_OK(n);
  return std::move(*n);
}

// What tensorregd's cluster_adapter (daemon/main.cpp) does: the dispatcher's view of a node.
class adapter final : public daemon::cluster_hooks {
 public:
  explicit adapter(cluster::node& n) : node_(n) {}
  void committed(const std::string& id) override { node_.committed(id); }
  status fetch(const std::string& id) override { return node_.fetch(id); }
  std::vector<cluster::pull_status> pulls() const override { return node_.pulls(); }
  result<cluster::publish_status> publish(const std::string& id, std::uint32_t replicas, bool all,
                                          std::chrono::milliseconds timeout) override {
    return node_.publish(id, replicas, all, timeout);
  }

 private:
  cluster::node& node_;
};

// A daemon (dispatcher, engine, node) and a second member with an engine and a node.
struct daemon_and_member {
  t::temp_dir dir;
  t::etcd_process etcd{dir.path()};
  t::fake_clock clock;
  std::unique_ptr<registration::engine> engine_a = t::make_engine(clock);
  std::unique_ptr<registration::engine> engine_b = t::make_engine(clock);
  std::unique_ptr<cluster::node> a;
  std::unique_ptr<cluster::node> b;
  std::unique_ptr<adapter> hooks;
  std::unique_ptr<daemon::dispatcher> dispatch;
  daemon::dispatcher::connection_ptr conn;
  std::uint64_t next_id = 1;

  explicit daemon_and_member(const std::string& cluster)
      : a(join(*engine_a, etcd.url(cluster), "a")), b(join(*engine_b, etcd.url(cluster), "b")) {
    hooks = std::make_unique<adapter>(*a);
    daemon::dispatcher_options options;
    options.cluster = hooks.get();
    options.replica_timeout = 2s;
    dispatch = std::make_unique<daemon::dispatcher>(*engine_a, std::move(options));
    conn = dispatch->open_connection({::getpid(), ::getuid(), ::getgid()});
    const auto give_up = std::chrono::steady_clock::now() + 5s;
    while (!(a->members().registered() && b->members().registered()) && std::chrono::steady_clock::now() < give_up) {
      std::this_thread::sleep_for(50ms);
    }
    REQUIRE((a->members().registered() && b->members().registered()));
  }

  wv1::Response call(wv1::Request r) {
    if (r.request_id() == 0) r.set_request_id(next_id++);
    auto out = dispatch->handle(*conn, daemon::frame_in{r.SerializeAsString(), {}});
    REQUIRE(out);
    wv1::Response response;
    REQUIRE(response.ParseFromString(out->payload));
    return response;
  }

  // A stable_dram put of the two-tensor artifact (salt `salt`) with one should stable_dram tier
  // of `scope` and `min_replicas`; the commit's answer.
  wv1::Response put(common::PolicyScope scope, std::uint32_t min_replicas, char salt) {
    wv1::Request begin;
    auto* req = begin.mutable_begin_register_artifact();
    req->set_total_size(t::two_tensors::total);
    req->set_ttl_ms(60'000);
    req->set_owner_pid(static_cast<std::int32_t>(::getpid()));
    req->mutable_tensor_index_data()->set_data(t::two_tensors::index_json());
    req->mutable_tensor_index_data()->set_schema_version("v3");
    req->mutable_tensor_index_data()->set_encoding("json");
    req->mutable_stable_dram();
    auto* tier = req->mutable_policy()->add_should();
    tier->set_tier(common::POLICY_TIER_STABLE_DRAM);
    tier->set_scope(scope);
    tier->set_min_replicas(min_replicas);
    auto begun = call(begin);
    INFO(begun.status().message());
    REQUIRE(begun.status().code() == 0);
    const auto id = begun.begin_register_artifact().registration_id();

    const auto stream = next_id++;
    wv1::Request feed;
    feed.set_request_id(stream);
    feed.mutable_feed_register_artifact_stream()->set_registration_id(id);
    auto* chunk = feed.mutable_feed_register_artifact_stream()->mutable_view_chunk();
    chunk->set_canonical_offset(0);
    chunk->set_data(t::two_tensors::bytes(salt));
    CHECK_FALSE(dispatch->handle(*conn, daemon::frame_in{feed.SerializeAsString(), {}}));
    wv1::Request end;
    end.set_request_id(stream);
    end.set_end_of_stream(true);
    REQUIRE(call(end).status().code() == 0);

    wv1::Request commit;
    commit.mutable_commit_registered_artifact()->set_registration_id(id);
    return call(commit);
  }
};

}  // namespace

TEST_CASE("cluster policy: remote 1 is READY once the other member holds it, remote 2 of 2 members DEGRADED",
          "[cluster][policy]") {
  if (!t::find_etcd()) {
    WARN("SKIP: no etcd binary (apt-get install etcd-server)");
    return;
  }
  daemon_and_member d("p1");

  auto done = d.put(common::POLICY_SCOPE_REMOTE, 1, 5);
  INFO(done.status().message());
  REQUIRE(done.status().code() == 0);
  const auto& c = done.commit_registered_artifact();
  const auto id = c.artifact_descriptor().artifact_id();
  REQUIRE(c.has_remote_stable_tier());
  CHECK(c.remote_stable_tier().status() == v2::LOCAL_STABLE_TIER_STATUS_READY);
  CHECK(c.remote_stable_tier().message() == "2 of 2 hosts hold it");
  // The other member holds a complete replica with the same bytes.
  auto held = d.engine_b->get(id);
  REQUIRE_OK(held);
  auto replicas = d.a->members().replicas_of(id);
  REQUIRE_OK(replicas);
  CHECK(replicas->size() == 2);

  // Three hosts other than this one, of two members: DEGRADED once both hold it, without
  // waiting out the 2 s timeout.
  const auto started = std::chrono::steady_clock::now();
  auto short_of = d.put(common::POLICY_SCOPE_REMOTE, 3, 6);
  const auto took = std::chrono::steady_clock::now() - started;
  INFO(short_of.status().message());
  REQUIRE(short_of.status().code() == 0);
  const auto& s = short_of.commit_registered_artifact();
  REQUIRE(s.has_remote_stable_tier());
  CHECK(s.remote_stable_tier().status() == v2::LOCAL_STABLE_TIER_STATUS_DEGRADED);
  CHECK(s.remote_stable_tier().message() == "2 of 4 hosts hold it; the cluster has 2 members");
  CHECK(took < 2s);
}
