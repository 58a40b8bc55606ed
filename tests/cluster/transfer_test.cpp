#include "tensorreg/cluster/transfer.hpp"

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <cstring>
#include <future>
#include <optional>
#include <thread>

#include "cluster/etcd_process.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/identity/artifact_id.hpp"

using namespace tensorreg;
using namespace tensorreg::cluster;
using namespace std::chrono_literals;

namespace {

// An artifact of 10 full leaves and a short one, its bytes, id and leaf digests.
struct test_artifact {
  std::vector<std::byte> bytes;
  std::string id;
  std::vector<hash::digest> leaves;

  explicit test_artifact(std::uint64_t size = 10 * hash::leaf_bytes + 12345, std::uint32_t seed = 7) : bytes(size) {
    std::uint32_t x = seed;
    for (auto& b : bytes) {
      x = x * 1664525U + 1013904223U;
      b = static_cast<std::byte>(x >> 24);
    }
    rehash();
  }

  // After its bytes changed: its leaves and id again.
  void rehash() {
    memory::host_bytes_view view(bytes);
    leaves = *hash::leaf_digests(view);
    identity::mi2_id mi2;
    mi2.index = hash::sha256(std::string_view("test index"));
    mi2.data = hash::tree_root(leaves);
    id = mi2.to_string();
  }
};

std::unique_ptr<transfer_server> serve(const test_artifact& artifact, bool corrupt = false, std::uint64_t stall = 0) {
  transfer_server_options options;
  options.open_bytes = [&artifact](const std::string& id) -> result<std::shared_ptr<const memory::byte_source>> {
    if (id != artifact.id) return fail(errc::not_found, "not here");
    return std::make_shared<memory::host_bytes_view>(artifact.bytes);
  };
  options.corrupt_leaves = corrupt;
  options.stall_after_leaves = stall;
  auto server = transfer_server::create(std::move(options));
  REQUIRE(server);
  REQUIRE((*server)->publish(artifact.id, artifact.bytes.size(), artifact.leaves));
  return std::move(*server);
}

struct pulled {
  result<pull_report> report = fail(errc::unknown, "not run");
  std::vector<std::byte> bytes;
};

pulled pull(const std::string& id, const std::vector<pull_source>& sources, pull_options options = {}) {
  pulled out;
  out.report = pull_artifact(
      id, sources,
      [&](std::uint64_t total) -> result<std::span<std::byte>> {
        out.bytes.resize(total);
        return std::span<std::byte>(out.bytes);
      },
      options);
  return out;
}

}  // namespace

TEST_CASE("transfer: a pull from one source gives the artifact's bytes", "[cluster][transfer]") {
  test_artifact artifact;
  auto server = serve(artifact);
  auto got = pull(artifact.id, {{"a", server->address()}});
  REQUIRE(got.report);
  CHECK(got.report->total_size == artifact.bytes.size());
  CHECK(got.bytes == artifact.bytes);
  CHECK(got.report->leaves_by_source.at("a") == artifact.leaves.size());
  CHECK(got.report->corrupt_sources.empty());
  CHECK(server->stats().leaves_served == artifact.leaves.size());
  CHECK(server->stats().manifests_served == 1);
}

TEST_CASE("transfer: leaves are striped across every source", "[cluster][transfer]") {
  test_artifact artifact;
  auto a = serve(artifact);
  auto b = serve(artifact);
  auto c = serve(artifact);
  pull_options options;
  options.leaves_in_flight_per_source = 2;
  auto got = pull(artifact.id, {{"a", a->address()}, {"b", b->address()}, {"c", c->address()}}, options);
  REQUIRE(got.report);
  CHECK(got.bytes == artifact.bytes);
  std::uint64_t total = 0;
  for (const auto& [name, n] : got.report->leaves_by_source) total += n;
  CHECK(total == artifact.leaves.size());
  CHECK(got.report->leaves_by_source.size() == 3);
}

TEST_CASE("transfer: a flipped byte is caught at its leaf, refetched elsewhere, and its source reported",
          "[cluster][transfer]") {
  test_artifact artifact;
  auto bad = serve(artifact, /*corrupt=*/true);
  auto good = serve(artifact);
  auto got = pull(artifact.id, {{"bad", bad->address()}, {"good", good->address()}});
  REQUIRE(got.report);
  CHECK(got.bytes == artifact.bytes);
  REQUIRE(got.report->corrupt_sources.size() == 1);
  CHECK(got.report->corrupt_sources[0].starts_with("bad (" + bad->address() + "): leaf "));
  CHECK(got.report->corrupt_sources[0].ends_with(" does not match its digest"));
  CHECK(got.report->leaves_refetched >= 1);
  CHECK(got.report->leaves_by_source.count("bad") == 0);
  CHECK(got.report->leaves_by_source.at("good") == artifact.leaves.size());

  // Alone, a corrupt source fails the pull: nothing unverified is handed over as the artifact.
  auto alone = pull(artifact.id, {{"bad", bad->address()}});
  REQUIRE_FALSE(alone.report);
  CHECK(alone.report.error().code == errc::unavailable);
  CHECK(alone.report.error().message.starts_with("cannot pull " + artifact.id + ": every source failed (bad ("));
}

TEST_CASE("transfer: a source that dies mid-pull leaves the rest to the others", "[cluster][transfer][concurrency]") {
  test_artifact artifact;
  auto dying = serve(artifact, false, /*stall=*/2);
  auto good = serve(artifact);
  const auto dying_address = dying->address();
  pull_options options;
  options.request_timeout = 20s;  // the death, not a timeout, must drop it
  auto pulling = std::async(std::launch::async, [&] {
    return pull(artifact.id, {{"dying", dying_address}, {"good", good->address()}}, options);
  });
  const auto give_up = std::chrono::steady_clock::now() + 10s;
  while (dying->stats().requests_dropped == 0 && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(5ms);
  }
  const bool stalled = dying->stats().requests_dropped > 0;
  dying.reset();  // the process of that member ends: its connections close
  auto got = pulling.get();
  CHECK(stalled);
  REQUIRE(got.report);
  CHECK(got.bytes == artifact.bytes);
  REQUIRE(got.report->failed_sources.size() == 1);
  CHECK(got.report->failed_sources[0].starts_with("dying (" + dying_address + "): "));
  // At most the two leaves it served before it stalled came from it (fewer when it died before
  // they were through); every other leaf came from the good source.
  const auto from_dying = got.report->leaves_by_source.count("dying") ? got.report->leaves_by_source.at("dying") : 0;
  CHECK(from_dying <= 2);
  CHECK(got.report->leaves_by_source.at("good") == artifact.leaves.size() - from_dying);
  CHECK(got.report->leaves_refetched >= 2 - from_dying);
}

TEST_CASE("transfer: a hung source is dropped after the request timeout", "[cluster][transfer]") {
  // Enough leaves that the hung source is asked again after its one answer.
  test_artifact artifact(16 * hash::leaf_bytes);
  auto hung = serve(artifact, false, /*stall=*/1);
  auto good = serve(artifact);
  pull_options options;
  // 2 s, not less: on a loaded 2-core runner the good source's leaves can take over 500 ms
  // too, and then it would be dropped as well.
  options.request_timeout = 2000ms;
  options.leaves_in_flight_per_source = 1;
  auto got = pull(artifact.id, {{"hung", hung->address()}, {"good", good->address()}}, options);
  REQUIRE(got.report);
  CHECK(got.bytes == artifact.bytes);
  REQUIRE(got.report->failed_sources.size() == 1);
  CHECK(got.report->failed_sources[0].find("not answered within 2000 ms") != std::string::npos);
}

TEST_CASE("transfer: an origin is asked one leaf at a time until the first look for sources answers",
          "[cluster][transfer][partial]") {
  // The origin answers one leaf and then nothing, so every request it got is counted: served or
  // dropped. Before the look there may be other pullers sharing it: one request at a time, so
  // the second waits there. After a look that finds nobody else, four at once.
  test_artifact artifact(16 * hash::leaf_bytes);
  auto origin = serve(artifact, false, /*stall=*/1);
  pull_options options;
  options.request_timeout = 1500ms;
  options.find_sources_every = 300ms;
  std::optional<std::uint64_t> requests_before_look;  // set by the first look (one at a time)
  options.find_sources = [&]() -> result<std::vector<pull_source>> {
    const auto stats = origin->stats();
    if (!requests_before_look) requests_before_look = stats.leaves_served + stats.requests_dropped;
    return std::vector<pull_source>{{"origin", origin->address()}};
  };
  auto got = pull(artifact.id, {{"origin", origin->address()}}, options);
  REQUIRE_FALSE(got.report);
  CHECK(got.report.error().code == errc::unavailable);
  CHECK(requests_before_look == std::optional<std::uint64_t>(2));
  CHECK(origin->stats().leaves_served == 1);
  CHECK(origin->stats().requests_dropped == 4);  // the one before the look and three more
}

TEST_CASE("transfer: an id the source does not hold, a dead address and a bad id are refused", "[cluster][transfer]") {
  test_artifact artifact(hash::leaf_bytes + 1);
  test_artifact other(100, 99);
  auto server = serve(artifact);
  auto missing = pull(other.id, {{"a", server->address()}});
  REQUIRE_FALSE(missing.report);
  CHECK(missing.report.error().code == errc::unavailable);
  CHECK(missing.report.error().message.find("cannot serve " + other.id + ": this host does not hold it") !=
        std::string::npos);
  CHECK(server->stats().requests_refused == 1);

  const auto nobody = "127.0.0.1:" + std::to_string(testing::free_local_port());
  pull_options options;
  options.request_timeout = 2s;
  auto dead = pull(artifact.id, {{"gone", nobody}}, options);
  REQUIRE_FALSE(dead.report);
  CHECK(dead.report.error().code == errc::unavailable);
  CHECK(dead.report.error().message.find("gone (" + nobody + ")") != std::string::npos);

  auto bad_id = pull("cgid:not-content-addressed", {{"a", server->address()}});
  REQUIRE_FALSE(bad_id.report);
  CHECK(bad_id.report.error().code == errc::invalid_argument);
  auto bad_address = pull(artifact.id, {{"a", "localhost:1"}});
  REQUIRE_FALSE(bad_address.report);
  CHECK(bad_address.report.error().message == "cannot use transfer address 'localhost:1': not IPv4:PORT");
  CHECK(missing.bytes.empty());
}

TEST_CASE("transfer server: refuses to publish leaves that do not match the size", "[cluster][transfer]") {
  test_artifact artifact(hash::leaf_bytes + 1);
  auto server = serve(artifact);
  auto wrong = server->publish("mi2:x", hash::leaf_bytes * 3, artifact.leaves);
  REQUIRE_FALSE(wrong);
  CHECK(wrong.error().code == errc::invalid_argument);
  CHECK(wrong.error().message == "cannot publish mi2:x: 2 leaf digests for total_size 12582912 (expected 3)");
  CHECK(server->serves(artifact.id));
  server->withdraw(artifact.id);
  CHECK_FALSE(server->serves(artifact.id));
}

namespace {

// A partial_artifact of `artifact` on a server of its own: the leaves marked so far are served.
struct partial_server {
  std::shared_ptr<partial_artifact> partial;
  std::unique_ptr<transfer_server> server;

  explicit partial_server(const test_artifact& artifact) {
    partial = std::make_shared<partial_artifact>(artifact.leaves, artifact.bytes, nullptr);
    transfer_server_options options;
    options.open_bytes = [](const std::string&) -> result<std::shared_ptr<const memory::byte_source>> {
      return fail(errc::not_found, "only the partial artifact is served here");
    };
    auto created = transfer_server::create(std::move(options));
    REQUIRE(created);
    server = std::move(*created);
    server->publish_partial(artifact.id, partial);
  }
};

}  // namespace

TEST_CASE("transfer: a partial source serves leaves as they are verified and says not yet before",
          "[cluster][transfer][partial]") {
  test_artifact artifact;
  partial_server source(artifact);
  CHECK(source.server->serves(artifact.id));
  pull_options options;
  options.partial_refresh_every = 20ms;
  std::atomic<bool> manifest_seen{false};
  options.manifest_verified = [&](std::span<const hash::digest> leaves) {
    manifest_seen = leaves.size() == artifact.leaves.size();
  };
  std::vector<std::uint64_t> verified_leaves;
  options.leaf_verified = [&](std::uint64_t leaf) { verified_leaves.push_back(leaf); };
  auto pulling = std::async(std::launch::async, [&] {
    return pull(artifact.id, {{"p", source.server->address()}}, options);
  });
  // Nothing is verified at the source yet: the first requests are answered "not yet". Then its
  // own pull verifies one leaf after the other.
  const auto give_up = std::chrono::steady_clock::now() + 10s;
  while (source.server->stats().not_yet_answers == 0 && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(2ms);
  }
  for (std::uint64_t leaf = 0; leaf < artifact.leaves.size(); ++leaf) {
    source.partial->mark_verified(leaf);
    std::this_thread::sleep_for(5ms);
  }
  auto got = pulling.get();
  REQUIRE(got.report);
  CHECK(got.bytes == artifact.bytes);
  CHECK(manifest_seen);
  CHECK(verified_leaves.size() == artifact.leaves.size());
  CHECK(got.report->leaves_not_yet >= 1);
  CHECK(got.report->failed_sources.empty());
  CHECK(got.report->corrupt_sources.empty());
  CHECK(got.report->leaves_by_source.at("p") == artifact.leaves.size());
  const auto stats = source.server->stats();
  CHECK(stats.not_yet_answers == got.report->leaves_not_yet);
  CHECK(stats.partial_leaves_served == artifact.leaves.size());
  CHECK(source.partial->leaves_served() == artifact.leaves.size());
}

TEST_CASE("transfer: leaves a partial source has are taken from it, the rest from the origin",
          "[cluster][transfer][partial]") {
  test_artifact artifact;
  partial_server peer(artifact);
  for (std::uint64_t leaf = 0; leaf < 6; ++leaf) peer.partial->mark_verified(leaf);
  auto origin = serve(artifact);
  pull_options options;
  options.order_seed = 42;
  auto got = pull(artifact.id, {{"peer", peer.server->address()}, {"origin", origin->address()}}, options);
  REQUIRE(got.report);
  CHECK(got.bytes == artifact.bytes);
  CHECK(got.report->failed_sources.empty());
  // The peer serves only what it has; what it lacks is asked of the origin.
  const auto from_peer = got.report->leaves_by_source.count("peer") ? got.report->leaves_by_source.at("peer") : 0;
  CHECK(from_peer <= 6);
  CHECK(got.report->leaves_by_source.at("origin") == artifact.leaves.size() - from_peer);
  CHECK(peer.server->stats().partial_leaves_served == from_peer);
  CHECK(peer.server->stats().leaves_served == from_peer);
}

TEST_CASE("transfer: sources found during a pull are added, and a leaf nobody has fails it in time",
          "[cluster][transfer][partial]") {
  test_artifact artifact;
  partial_server empty(artifact);  // still pulling, has nothing yet
  auto origin = serve(artifact);
  pull_options options;
  options.find_sources_every = 50ms;
  options.partial_refresh_every = 20ms;
  int asked = 0;
  options.find_sources = [&]() -> result<std::vector<pull_source>> {
    ++asked;
    return std::vector<pull_source>{{"empty", empty.server->address()}, {"origin", origin->address()}};
  };
  auto got = pull(artifact.id, {{"empty", empty.server->address()}}, options);
  REQUIRE(got.report);
  CHECK(got.bytes == artifact.bytes);
  CHECK(asked >= 1);
  CHECK(got.report->sources_added == std::vector<std::string>{"origin"});
  CHECK(got.report->leaves_by_source.at("origin") == artifact.leaves.size());
  CHECK(got.report->leaves_not_yet >= 1);

  // Alone, a partial source that never gets leaf 3 fails the pull after request_timeout: it is
  // kept (not dropped), but nobody has that leaf.
  partial_server stuck(artifact);
  for (std::uint64_t leaf = 0; leaf < artifact.leaves.size(); ++leaf) {
    if (leaf != 3) stuck.partial->mark_verified(leaf);
  }
  // 2 s, not less: on a loaded 2-core runner a leaf the source has took over 500 ms to come,
  // and the source was dropped for it before leaf 3's wait ran out.
  pull_options short_wait;
  short_wait.request_timeout = 2000ms;
  short_wait.partial_refresh_every = 20ms;
  auto never = pull(artifact.id, {{"stuck", stuck.server->address()}}, short_wait);
  REQUIRE_FALSE(never.report);
  CHECK(never.report.error().code == errc::unavailable);
  CHECK(never.report.error().message == "cannot pull " + artifact.id +
                                            ": for 2000 ms no source had leaf 3 (live sources, all still pulling it: "
                                            "stuck)");
}

TEST_CASE("transfer server: a partial artifact is replaced by publish and gone after withdraw",
          "[cluster][transfer][partial]") {
  test_artifact artifact;
  partial_server source(artifact);
  CHECK(source.partial->verified_count() == 0);
  source.partial->mark_verified(1);
  source.partial->mark_verified(1);
  source.partial->mark_verified(999);  // ignored
  CHECK(source.partial->verified_count() == 1);
  const auto bitmap = source.partial->verified_bitmap();
  REQUIRE(bitmap.size() == 2);
  CHECK(bitmap[0] == std::byte{0x02});
  CHECK(bitmap[1] == std::byte{0x00});
  CHECK(source.partial->leaf_bytes(1).size() == hash::leaf_bytes);

  // publish() replaces a partial artifact, and a partial one what was published before.
  CHECK(source.partial.use_count() == 2);
  REQUIRE(source.server->publish(artifact.id, artifact.bytes.size(), artifact.leaves));
  CHECK(source.partial.use_count() == 1);  // the server let go of it
  source.server->publish_partial(artifact.id, source.partial);
  CHECK(source.partial.use_count() == 2);
  source.server->withdraw(artifact.id);
  CHECK_FALSE(source.server->serves(artifact.id));
  CHECK(source.partial.use_count() == 1);  // withdraw let go of it
  auto gone = pull(artifact.id, {{"p", source.server->address()}});
  REQUIRE_FALSE(gone.report);
  CHECK(gone.report.error().message.find("cannot serve " + artifact.id + ": this host does not hold it") !=
        std::string::npos);
}

TEST_CASE("transfer: leaves held under another artifact here are copied, not fetched", "[cluster][transfer]") {
  // Version 2 differs from version 1 in two leaves; this host serves version 1.
  test_artifact v1;
  test_artifact v2 = v1;
  v2.bytes[3 * hash::leaf_bytes + 17] ^= std::byte{0x5a};
  v2.bytes[7 * hash::leaf_bytes + 99] ^= std::byte{0xa5};
  v2.rehash();
  REQUIRE(v2.id != v1.id);
  auto here = serve(v1);
  auto remote = serve(v2);
  CHECK(here->holds_leaf(v1.leaves[0]));
  CHECK_FALSE(here->holds_leaf(v2.leaves[3]));

  pull_options options;
  options.holds_local_leaf = [&](const hash::digest& d) { return here->holds_leaf(d); };
  options.copy_local_leaf = [&](const hash::digest& d, std::span<std::byte> into) { return here->copy_leaf(d, into); };
  std::vector<std::uint64_t> verified;
  options.leaf_verified = [&](std::uint64_t leaf) { verified.push_back(leaf); };
  auto got = pull(v2.id, {{"remote", remote->address()}}, options);
  REQUIRE(got.report);
  CHECK(got.bytes == v2.bytes);
  CHECK(got.report->leaves_local == v2.leaves.size() - 2);
  CHECK(got.report->leaves_local_failed == 0);
  CHECK(got.report->leaves_by_source.at("remote") == 2);
  CHECK(remote->stats().leaves_served == 2);
  CHECK(here->stats().leaves_served == 0);  // copied in-process, not served over the network
  CHECK(verified.size() == v2.leaves.size());

  // Withdrawn, its leaves are no longer found.
  here->withdraw(v1.id);
  CHECK_FALSE(here->holds_leaf(v1.leaves[0]));
  std::vector<std::byte> leaf(hash::leaf_bytes);
  CHECK_FALSE(here->copy_leaf(v1.leaves[0], leaf));
}

TEST_CASE("transfer: a local copy that does not match its digest is fetched instead", "[cluster][transfer]") {
  test_artifact artifact;
  auto remote = serve(artifact);
  pull_options options;
  options.holds_local_leaf = [](const hash::digest&) { return true; };
  std::atomic<int> copies{0};
  options.copy_local_leaf = [&](const hash::digest&, std::span<std::byte> into) {
    // Every other copy fails outright; the rest write bytes that are not the leaf.
    if (copies.fetch_add(1) % 2 == 0) return false;
    std::fill(into.begin(), into.end(), std::byte{0x42});
    return true;
  };
  auto got = pull(artifact.id, {{"remote", remote->address()}}, options);
  REQUIRE(got.report);
  CHECK(got.bytes == artifact.bytes);
  CHECK(got.report->leaves_local == 0);
  CHECK(got.report->leaves_local_failed == artifact.leaves.size());
  CHECK(got.report->leaves_by_source.at("remote") == artifact.leaves.size());
}
