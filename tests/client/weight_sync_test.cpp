// tensorreg::client's weight-sync helper and the background hash (registration.md §4.8)
// against a real tensorregd: versions usable by cgid at once, their mi2 ids after, older
// versions revoked.
#include "tensorreg/client/weight_sync.hpp"

#include <catch2/catch.hpp>

#include <algorithm>

#include "support/client_helpers.hpp"
#include "support/daemon_process.hpp"
#include "support/safetensors_writer.hpp"
#include "support/temp_dir.hpp"

namespace {

using namespace tensorreg;
using client::connection;
using std::chrono::milliseconds;
using testing::connect;
using testing::daemon_process;
using testing::offline_id;

std::unique_ptr<index::safetensors_bundle> bundle_of(const testing::temp_dir& dir, std::uint32_t seed) {
  const auto path = dir.path() / ("step-" + std::to_string(seed) + ".safetensors");
  testing::write_safetensors(path, {{"w", "F32", {4096}, testing::pattern_bytes(16384, seed)},
                                    {"b", "BF16", {3}, testing::pattern_bytes(6, seed + 1)}});
  return index::safetensors_bundle::open({path.string()}).value();
}

}  // namespace

TEST_CASE("client connection: a lease committed with hash_in_background gets its mi2 id from wait_artifact_hash",
          "[client][connection][background_hash]") {
  daemon_process d;
  testing::temp_dir dir;
  auto bundle = bundle_of(dir, 3);
  auto c = connect(d);
  client::lease_register_options o;
  o.client_artifact_id = "cgid:client-test~1";
  o.hash_in_background = true;
  auto held = c.register_lease(*bundle, o);
  REQUIRE(held);
  CHECK(held->info().descriptor.artifact_id == "cgid:client-test~1");
  CHECK(held->info().hash == client::hash_state::pending);

  auto st = c.wait_artifact_hash("cgid:client-test~1");
  REQUIRE(st);
  CHECK(st->state == client::hash_state::done);
  CHECK(st->mi2_id == offline_id(*bundle));
  auto idx = c.index(st->mi2_id);  // the alias
  REQUIRE(idx);
  CHECK(idx->descriptor.artifact_id == "cgid:client-test~1");
  auto listed = c.list();
  REQUIRE(listed);
  REQUIRE(listed->size() == 1);
  CHECK(listed->front().verified_id == st->mi2_id);
  CHECK(listed->front().hash == client::hash_state::done);

  // No cgid: the daemon refuses the option.
  client::lease_register_options bad;
  bad.hash_in_background = true;
  auto refused = c.register_lease(*bundle, bad);
  REQUIRE_FALSE(refused);
  CHECK(refused.error().code == errc::invalid_argument);
  CHECK_THAT(refused.error().message, Catch::Contains("hash_in_background needs a client_artifact_id"));
  auto unknown = c.wait_artifact_hash("cgid:client-test~404", milliseconds(5));
  REQUIRE_FALSE(unknown);
  CHECK(unknown.error().code == errc::not_found);
  CHECK(unknown.error().message == "cannot wait for the hash of cgid:client-test~404: no such artifact");
}

TEST_CASE("weight sync: versions are usable by cgid at once, verified after, and old ones revoked",
          "[client][weight_sync][background_hash]") {
  daemon_process d;
  testing::temp_dir dir;
  auto step1 = bundle_of(dir, 11);
  auto step2 = bundle_of(dir, 12);

  client::weight_sync_options o;
  o.keep_versions = 1;
  auto producer = client::weight_sync_producer::create(connect(d), "policy", o);
  REQUIRE(producer);
  auto consumer = client::weight_sync_consumer::create(connect(d), "policy");
  REQUIRE(consumer);
  auto none = consumer->latest();
  REQUIRE(none);
  CHECK_FALSE(none->has_value());

  auto v1 = producer->publish(*step1);
  REQUIRE(v1);
  CHECK(v1->k == 1);
  CHECK(v1->cgid == "cgid:weight-sync~policy~1");
  auto hashed = producer->wait_hashed();  // before the weights are written again
  REQUIRE(hashed);
  CHECK(*hashed == offline_id(*step1));

  auto v2 = producer->publish(*step2);
  REQUIRE(v2);
  CHECK(v2->k == 2);
  auto seen = consumer->wait_for(2, milliseconds(5000));
  REQUIRE(seen);
  CHECK(seen->cgid == "cgid:weight-sync~policy~2");
  auto latest = consumer->latest();
  REQUIRE(latest);
  REQUIRE(latest->has_value());
  CHECK((*latest)->k == 2);  // keep_versions 1: version 1 was revoked
  auto verified = consumer->wait_verified(*seen);
  REQUIRE(verified);
  CHECK(*verified == offline_id(*step2));

  auto late = consumer->wait_for(3, milliseconds(20));
  REQUIRE_FALSE(late);
  CHECK(late.error().code == errc::deadline_exceeded);
  CHECK(late.error().message == "cannot wait for version 3 of 'policy': not published after 20 ms");
}

TEST_CASE("weight sync: a stream name outside the cgid alphabet is INVALID_ARGUMENT", "[client][weight_sync]") {
  auto bad = client::weight_version_id("a b", 1);
  REQUIRE_FALSE(bad);
  CHECK(bad.error().code == errc::invalid_argument);
  CHECK(bad.error().message == "cannot name weight-sync stream 'a b': use one or more of [A-Za-z0-9-._]");
  auto good = client::weight_version_id("run-7.policy", 42);
  REQUIRE(good);
  CHECK(*good == "cgid:weight-sync~run-7.policy~42");
}
