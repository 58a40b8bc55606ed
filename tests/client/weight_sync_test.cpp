// tensorreg::client's weight-sync helper and the background hash (registration.md §4.8)
// against a real tensorregd: versions usable by cgid at once, their mi2 ids after, older
// versions revoked.
#include "tensorreg/client/weight_sync.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

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

// ---- the next version over the same memory (RepublishLease, wire-format.md §20) ----------------

namespace {

// The daemon's counts, read over their own connection.
client::daemon_stats stats_of(connection& c) {
  auto s = c.stats();
  REQUIRE(s);
  return *s;
}

std::vector<std::string> ids_listed(connection& c) {
  auto listed = c.list();
  REQUIRE(listed);
  std::vector<std::string> out;
  for (const auto& a : *listed) out.push_back(a.descriptor.artifact_id);
  return out;
}

}  // namespace

TEST_CASE("weight sync: publish_again republishes the newest lease in place, and with one version kept ends the old",
          "[client][weight_sync][republish]") {
  daemon_process d;
  testing::temp_dir dir;
  auto step = bundle_of(dir, 21);
  auto observer = connect(d);

  client::weight_sync_options o;
  o.keep_versions = 1;
  auto producer = client::weight_sync_producer::create(connect(d), "again", o);
  REQUIRE(producer);
  auto v1 = producer->publish(*step);
  REQUIRE(v1);
  auto h1 = producer->wait_hashed();
  REQUIRE(h1);
  CHECK(*h1 == offline_id(*step));

  for (std::uint64_t k = 2; k <= 4; ++k) {
    INFO("version " << k);
    auto v = producer->publish_again();
    REQUIRE(v);
    CHECK(v->k == k);
    CHECK(v->cgid == "cgid:weight-sync~again~" + std::to_string(k));
    // The daemon hashed the region's bytes for it: the bundle's, read back in place.
    auto hashed = producer->wait_hashed();
    REQUIRE(hashed);
    CHECK(*hashed == offline_id(*step));
    auto idx = observer.index(v->cgid);
    REQUIRE(idx);
    CHECK(idx->index_json == step->index().json());
    // The version before went in the same call; the region stays, registered once.
    CHECK(ids_listed(observer) == std::vector<std::string>{v->cgid});
    auto before = observer.index("cgid:weight-sync~again~" + std::to_string(k - 1));
    REQUIRE_FALSE(before);
    CHECK(before.error().code == errc::not_found);
    const auto s = stats_of(observer);
    CHECK(s.leases == 1);
    CHECK(s.regions == 1);
    CHECK(s.pending_registrations == 0);
  }
  // The producer's end releases the last lease and, with it, the region.
  producer = fail(errc::cancelled, "done");
  const auto s = stats_of(observer);
  CHECK(s.leases == 0);
  CHECK(s.regions == 0);
}

TEST_CASE("weight sync: publish_again with several versions kept shares the region until the last goes",
          "[client][weight_sync][republish]") {
  daemon_process d;
  testing::temp_dir dir;
  auto step = bundle_of(dir, 22);
  auto observer = connect(d);

  client::weight_sync_options o;
  o.keep_versions = 2;
  auto producer = client::weight_sync_producer::create(connect(d), "kept", o);
  REQUIRE(producer);
  REQUIRE(producer->publish(*step));
  REQUIRE(producer->publish_again());
  auto v3 = producer->publish_again();
  REQUIRE(v3);
  CHECK(v3->k == 3);
  // Version 1 was revoked as keep() does; its region is still read by 2 and 3.
  CHECK(ids_listed(observer) == std::vector<std::string>{"cgid:weight-sync~kept~2", "cgid:weight-sync~kept~3"});
  auto s = stats_of(observer);
  CHECK(s.leases == 2);
  CHECK(s.regions == 1);
  auto consumer = client::weight_sync_consumer::create(connect(d), "kept");
  REQUIRE(consumer);
  auto verified = consumer->wait_verified(*v3, milliseconds(10000));
  REQUIRE(verified);
  CHECK(*verified == offline_id(*step));
  producer = fail(errc::cancelled, "done");
  s = stats_of(observer);
  CHECK(s.leases == 0);
  CHECK(s.regions == 0);
}

TEST_CASE("weight sync: publish_again with nothing to republish says so, and publish registers afresh",
          "[client][weight_sync][republish]") {
  daemon_process d;
  testing::temp_dir dir;
  auto step = bundle_of(dir, 23);
  auto observer = connect(d);
  client::weight_sync_options o;
  o.keep_versions = 1;
  auto producer = client::weight_sync_producer::create(connect(d), "lost", o);
  REQUIRE(producer);

  auto early = producer->publish_again();
  REQUIRE_FALSE(early);
  CHECK(early.error().code == errc::failed_precondition);
  CHECK(early.error().message == "cannot publish 'lost' again: nothing published yet (publish the tensors first)");

  auto v1 = producer->publish(*step);
  REQUIRE(v1);
  // The lease ends behind the producer's back (as by an expiry or a deregister).
  REQUIRE(observer.deregister(v1->cgid));
  auto lost = producer->publish_again();
  REQUIRE_FALSE(lost);
  CHECK(lost.error().code == errc::not_found);
  CHECK_THAT(lost.error().message, Catch::StartsWith("cannot republish lease '") &&
                                       Catch::EndsWith("': no such lease (never committed, revoked, expired, or "
                                                       "its owner exited)"));
  auto s = stats_of(observer);
  CHECK(s.leases == 0);
  CHECK(s.pending_registrations == 0);
  // Registered afresh: the number the failed call would have had, over a region of its own
  // (the first one goes with the dead lease).
  auto v2 = producer->publish(*step);
  REQUIRE(v2);
  CHECK(v2->k == 2);
  CHECK(ids_listed(observer) == std::vector<std::string>{"cgid:weight-sync~lost~2"});
  s = stats_of(observer);
  CHECK(s.leases == 1);
  CHECK(s.regions == 1);
  auto v3 = producer->publish_again();
  REQUIRE(v3);
  CHECK(v3->k == 3);
}

TEST_CASE("client connection: republish reads the lease's memory again, shares its region, ends it when asked",
          "[client][connection][republish]") {
  daemon_process d;
  testing::temp_dir dir;
  auto bundle = bundle_of(dir, 24);
  auto c = connect(d);
  client::lease_register_options first;
  first.client_artifact_id = "cgid:client-test~1";
  auto v1 = c.register_lease(*bundle, first);
  REQUIRE(v1);

  // A new cgid; "warm" also copies the bytes into the stable cache, where get() reads them.
  client::republish_options o;
  o.client_artifact_id = "cgid:client-test~2";
  o.profile = "warm";
  auto v2 = c.republish(*v1, o);
  REQUIRE(v2);
  CHECK(v2->info().descriptor.artifact_id == "cgid:client-test~2");
  CHECK(v2->info().registration_id != v1->info().registration_id);
  CHECK(v2->region_ids() == v1->region_ids());
  auto replica = c.get("cgid:client-test~2");
  REQUIRE(replica);
  std::vector<std::byte> expected(bundle->index().total_size());
  REQUIRE(bundle->canonical().read(0, expected));
  REQUIRE(replica->memory.size() == expected.size());
  CHECK(std::memcmp(replica->memory.bytes().data(), expected.data(), expected.size()) == 0);
  CHECK(replica->index_json == bundle->index().json());
  auto s = stats_of(c);
  CHECK(s.leases == 2);
  CHECK(s.regions == 1);

  // No cgid: the mi2 id of the bytes, ending v2 in the same call.
  client::republish_options mi2;
  mi2.revoke_previous = true;
  auto v3 = c.republish(*v2, mi2);
  REQUIRE(v3);
  CHECK(v3->info().descriptor.artifact_id == offline_id(*bundle));
  auto ended = v2->check();
  REQUIRE_FALSE(ended);
  CHECK(ended.error().code == errc::failed_precondition);
  REQUIRE(v2->release());  // nothing left to send
  auto again = c.republish(*v2, o);
  REQUIRE_FALSE(again);
  CHECK(again.error().code == errc::failed_precondition);
  CHECK(again.error().message ==
        "cannot republish lease '" + v2->info().registration_id + "': it was released by its holder");
  s = stats_of(c);
  CHECK(s.leases == 2);  // v1 and v3
  CHECK(s.regions == 1);

  // The daemon's refusals come back as they are, and the lease stays as it was.
  client::republish_options taken;
  taken.client_artifact_id = "cgid:client-test~1";  // v1's, leased on that device
  auto refused = c.republish(*v3, taken);
  REQUIRE_FALSE(refused);
  CHECK(refused.error().code == errc::already_exists);
  client::republish_options bad_profile;
  bad_profile.profile = "hot";
  auto unparsed = c.republish(*v3, bad_profile);
  REQUIRE_FALSE(unparsed);
  CHECK(unparsed.error().code == errc::invalid_argument);
  REQUIRE(v3->check());

  // Released in any order, the region goes with the last lease that reads it.
  REQUIRE(v1->release());
  CHECK(stats_of(c).regions == 1);
  REQUIRE(v3->release());
  s = stats_of(c);
  CHECK(s.leases == 0);
  CHECK(s.regions == 0);
}
