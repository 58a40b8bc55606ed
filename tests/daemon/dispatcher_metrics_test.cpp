// The dispatcher's counters, names and metrics (docs/wire-format.md §14, architecture.md §12).
#include "daemon/dispatcher.hpp"

#include <catch2/catch.hpp>

#include <unistd.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "support/fake_clock.hpp"
#include "support/two_tensor_artifact.hpp"
#include "tensorcast/daemon/v2/store_daemon.pb.h"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/metrics/registry.hpp"
#include "tensorreg/registration/engine.hpp"
#include "tensorreg/wire/v1/frame.pb.h"

namespace {

namespace wire = tensorreg::wire::v1;
using tensorreg::errc;
using tensorreg::daemon::dispatcher;
using tensorreg::daemon::dispatcher_options;
using tensorreg::daemon::frame_in;
using namespace std::chrono_literals;

// The artifact every registration here uses.
namespace two_tensors = tensorreg::testing::two_tensors;
using tensorreg::testing::two_tensors::index_json;
using tensorreg::testing::two_tensors::total;

struct put_result {
  tensorcast::daemon::v2::CommitRegisteredArtifactResponse commit;
  std::string registration_id;
};

// A dispatcher over a fresh engine (stable budget `budget`) with a metrics registry.
struct harness {
  explicit harness(std::uint64_t budget = 0) : engine(make_engine(clock, budget)), dispatch(*engine, options()) {
    conn = dispatch.open_connection({getpid(), getuid(), getgid()});
  }

  dispatcher_options options() {
    dispatcher_options o;
    o.metrics = &metrics;
    return o;
  }

  static std::unique_ptr<tensorreg::registration::engine> make_engine(const tensorreg::testing::fake_clock& c,
                                                                      std::uint64_t budget) {
    tensorreg::registration::engine_options o;
    o.time = &c;
    o.hash_threads = 2;
    o.sweep_interval = 0ms;
    o.watch_owners = false;
    o.stable_bytes = budget;
    auto e = tensorreg::registration::engine::create(std::move(o));
    REQUIRE(e);
    return std::move(*e);
  }

  wire::Response call(wire::Request r) {
    r.set_request_id(next_id++);
    auto out = dispatch.handle(*conn, frame_in{r.SerializeAsString(), {}});
    REQUIRE(out);
    wire::Response a;
    REQUIRE(a.ParseFromString(out->payload));
    return a;
  }

  wire::Response ok(wire::Request r) {
    auto a = call(std::move(r));
    INFO(a.status().message());
    REQUIRE(a.status().code() == 0);
    return a;
  }

  // A stable_dram put of `fill`-valued bytes through one view chunk.
  put_result put(char fill, const std::string& name = {}) {
    wire::Request b;
    auto* begin = b.mutable_begin_register_artifact();
    begin->set_total_size(total);
    begin->set_ttl_ms(60'000);
    begin->set_owner_pid(static_cast<std::int32_t>(getpid()));
    begin->mutable_tensor_index_data()->set_data(index_json());
    begin->mutable_tensor_index_data()->set_schema_version("v3");
    begin->mutable_tensor_index_data()->set_encoding("json");
    begin->mutable_stable_dram();
    if (!name.empty()) begin->set_display_name(name);
    const auto id = ok(b).begin_register_artifact().registration_id();
    const auto stream = next_id++;
    wire::Request f;
    f.set_request_id(stream);
    f.mutable_feed_register_artifact_stream()->set_registration_id(id);
    auto* chunk = f.mutable_feed_register_artifact_stream()->mutable_view_chunk();
    chunk->set_canonical_offset(0);
    chunk->set_data(std::string(total, fill));
    CHECK_FALSE(dispatch.handle(*conn, frame_in{f.SerializeAsString(), {}}));
    wire::Request end;
    end.set_request_id(stream);
    end.set_end_of_stream(true);
    auto ended = dispatch.handle(*conn, frame_in{end.SerializeAsString(), {}});
    REQUIRE(ended);
    wire::Request c;
    c.mutable_commit_registered_artifact()->set_registration_id(id);
    return {ok(c).commit_registered_artifact(), id};
  }

  wire::GetStatsResponse stats() {
    wire::Request r;
    r.mutable_get_stats();
    return ok(r).get_stats();
  }

  tensorreg::testing::fake_clock clock;
  tensorreg::metrics::registry metrics;
  std::unique_ptr<tensorreg::registration::engine> engine;
  dispatcher dispatch;
  dispatcher::connection_ptr conn;
  std::uint64_t next_id = 1;
};

}  // namespace

TEST_CASE("dispatcher metrics: GetStats counts answers, hits, misses and registered bytes", "[daemon][dispatcher]") {
  harness h(64);
  h.put('a');  // new: a miss
  h.put('a');  // held already: a hit
  wire::Request unknown;
  unknown.mutable_get_artifact_index_by_id()->set_artifact_id("mi2:nope");
  CHECK(h.call(unknown).status().code() == static_cast<int>(errc::not_found));  // a miss
  const auto s = h.stats();
  CHECK(s.misses() == 2);
  CHECK(s.hits() == 1);
  CHECK(s.bytes_registered() == total);
  CHECK(s.bytes_hashed() >= 2 * total);
  CHECK(s.requests() == 7);  // 2 × (Begin, Feed stream, Commit) and the index read
  CHECK(s.request_errors() == 1);
  CHECK(s.stable_budget_bytes() == 64);
  CHECK(s.stable_free_bytes() == 64 - total);
  CHECK(s.evictions() == 0);
  CHECK(s.uptime_seconds() >= 0);
  CHECK(h.stats().requests() == 8);  // a GetStats is counted once answered
}

TEST_CASE("dispatcher metrics: a commit that evicts lists what it evicted", "[daemon][dispatcher]") {
  harness h(2 * total);
  const auto first = h.put('a').commit.artifact_descriptor().artifact_id();
  h.put('b');
  const auto third = h.put('c').commit;
  REQUIRE(third.evicted_artifact_ids_size() == 1);
  CHECK(third.evicted_artifact_ids(0) == first);
  const auto s = h.stats();
  CHECK(s.evictions() == 1);
  CHECK(s.evicted_bytes() == total);
}

TEST_CASE("dispatcher metrics: every answer is timed by method and code", "[daemon][dispatcher]") {
  harness h;
  h.put('a');
  wire::Request unknown;
  unknown.mutable_get_artifact_index_by_id()->set_artifact_id("mi2:nope");
  (void)h.call(unknown);
  const std::string text = h.metrics.render();
  CHECK_THAT(text, Catch::Contains(
                       "tensorreg_rpc_duration_seconds_count{method=\"CommitRegisteredArtifact\",code=\"OK\"} 1\n"));
  CHECK_THAT(text, Catch::Contains(
                       "tensorreg_rpc_duration_seconds_count{method=\"GetArtifactIndexById\",code=\"NOT_FOUND\"} 1\n"));
  CHECK_THAT(text, Catch::Contains("tensorreg_bytes_registered_total 24\n"));
  CHECK_THAT(text, Catch::Contains("tensorreg_artifacts 1\n"));
  CHECK_THAT(text, Catch::Contains("tensorreg_clients 1\n"));
  CHECK_THAT(text, Catch::Contains("# TYPE tensorreg_evictions_total counter\n"));
}

TEST_CASE("dispatcher metrics: Revoke says whether the id named something", "[daemon][dispatcher]") {
  harness h;
  h.put('a');
  const auto join = h.put('a');  // a join, held by its registration id
  REQUIRE(join.commit.existed());
  wire::Request r;
  r.mutable_revoke_registered_artifact()->set_registration_id(join.registration_id);
  CHECK(h.ok(r).revoke_registered_artifact().revoked());
  CHECK_FALSE(h.ok(r).revoke_registered_artifact().revoked());  // already gone: still OK
  r.mutable_revoke_registered_artifact()->set_registration_id("reg_unknown");
  CHECK_FALSE(h.ok(r).revoke_registered_artifact().revoked());
}

TEST_CASE("dispatcher metrics: the registration that creates an artifact names it", "[daemon][dispatcher]") {
  harness h;
  const auto a = h.put('a', "first name").commit.artifact_descriptor().artifact_id();
  h.put('a', "second name");  // a join does not rename it
  const auto b = h.put('b').commit.artifact_descriptor().artifact_id();
  wire::Request list;
  list.mutable_list_artifacts();
  const auto listed = h.ok(list).list_artifacts();
  REQUIRE(listed.artifacts_size() == 2);
  for (const auto& s : listed.artifacts()) {
    CHECK(s.name() == (s.artifact_id() == a ? "first name" : ""));
    CHECK((s.artifact_id() == a || s.artifact_id() == b));
  }
}

TEST_CASE("dispatcher metrics: a display_name too long or with control characters is refused", "[daemon][dispatcher]") {
  harness h;
  auto begin = [&](const std::string& name) {
    wire::Request b;
    auto* in = b.mutable_begin_register_artifact();
    in->set_total_size(total);
    in->set_owner_pid(static_cast<std::int32_t>(getpid()));
    in->mutable_tensor_index_data()->set_data(index_json());
    in->mutable_stable_dram();
    in->set_display_name(name);
    return h.call(b);
  };
  auto long_name = begin(std::string(257, 'x'));
  CHECK(long_name.status().code() == static_cast<int>(errc::invalid_argument));
  CHECK(long_name.status().message() == "cannot begin registration: display_name is 257 bytes, more than 256");
  auto control = begin("a\nb");
  CHECK(control.status().code() == static_cast<int>(errc::invalid_argument));
  CHECK(control.status().message() == "cannot begin registration: display_name holds control character 0x0a");
  CHECK(h.stats().pending_registrations() == 0);
}
