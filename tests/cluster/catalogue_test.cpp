#include "tensorreg/cluster/catalogue.hpp"

#include <catch2/catch.hpp>
#include <thread>

#include "cluster/etcd_process.hpp"
#include "support/temp_dir.hpp"

using namespace tensorreg;
using namespace tensorreg::cluster;
using namespace std::chrono_literals;

namespace {

catalogue_options options_for(const std::string& url, const std::string& host_id, std::chrono::seconds ttl = 10s) {
  catalogue_options options;
  options.url = *parse_cluster_url(url);
  options.self = host_record{host_id, host_id + ".example", "10.1.0.1:7000", std::uint64_t{1} << 30, "", std::nullopt};
  options.lease_ttl = ttl;
  options.connect_timeout = 300ms;
  options.request_timeout = 1000ms;
  return options;
}

const std::string artifact = "mi2:example-artifact";

// How long a test waits for etcd to expire a lease it stopped renewing. The TTL is 2 s, but etcd
// revokes through its raft log: in the ASan pass on a loaded host an 8 s wait once ran out. A
// passing wait ends as soon as the lease is gone.
constexpr auto lease_expiry_within = 30s;

template <typename Predicate>
bool eventually(Predicate done, std::chrono::milliseconds within) {
  const auto give_up = std::chrono::steady_clock::now() + within;
  while (std::chrono::steady_clock::now() < give_up) {
    if (done()) return true;
    std::this_thread::sleep_for(100ms);
  }
  return done();
}

// An etcd of its own and two catalogues on it, host-a (lease `ttl_a`) and host-b, registered
// unless told not to, and a plain client of the same etcd. The caller checks
// testing::find_etcd() first.
struct two_hosts {
  testing::temp_dir dir;
  testing::etcd_process etcd{dir.path()};
  cluster_url url;
  std::unique_ptr<catalogue> a, b;
  std::unique_ptr<etcd_client> client;

  explicit two_hosts(const std::string& prefix, bool registered = true, std::chrono::seconds ttl_a = 10s)
      : url(*parse_cluster_url(etcd.url(prefix))) {
    auto made_a = catalogue::create(options_for(etcd.url(prefix), "host-a", ttl_a));
    auto made_b = catalogue::create(options_for(etcd.url(prefix), "host-b"));
    REQUIRE(made_a);
    REQUIRE(made_b);
    a = std::move(*made_a);
    b = std::move(*made_b);
    if (registered) {
      REQUIRE(a->refresh());
      REQUIRE(b->refresh());
    }
    auto made_client = etcd_client::create({url.endpoint()});
    REQUIRE(made_client);
    client = std::move(*made_client);
  }
};

}  // namespace

TEST_CASE("catalogue: refuses a bad host id and a short lease before contacting etcd", "[cluster][catalogue]") {
  auto bad = catalogue::create(options_for("etcd://127.0.0.1:1/t", "a/b"));
  REQUIRE_FALSE(bad);
  CHECK(bad.error().code == errc::invalid_argument);
  CHECK(bad.error().message == "cannot join cluster: host id 'a/b' is empty or has characters outside [A-Za-z0-9-._]");
  auto short_lease = catalogue::create(options_for("etcd://127.0.0.1:1/t", "a", 1s));
  REQUIRE_FALSE(short_lease);
  CHECK(short_lease.error().message == "cannot join cluster: lease ttl 1 s is below 2 s");
}

TEST_CASE("catalogue: hosts register, replicas are listed by holder, indexes are stored once", "[cluster][catalogue]") {
  if (!testing::find_etcd()) {
    WARN("SKIP: no etcd binary (apt-get install etcd-server)");
    return;
  }
  testing::temp_dir dir;
  testing::etcd_process etcd(dir.path());
  auto a = catalogue::create(options_for(etcd.url("c1"), "host-a"));
  auto b = catalogue::create(options_for(etcd.url("c1"), "host-b"));
  REQUIRE(a);
  REQUIRE(b);
  REQUIRE((*a)->refresh());
  REQUIRE((*b)->refresh());
  CHECK((*a)->registered());

  auto hosts = (*b)->hosts();
  REQUIRE(hosts);
  REQUIRE(hosts->size() == 2);
  CHECK((*hosts)[0] == (*a)->self());
  CHECK((*hosts)[1].host_id == "host-b");

  REQUIRE((*a)->advertise(artifact, 12345));
  auto holders = (*b)->holders(artifact);
  REQUIRE(holders);
  REQUIRE(holders->hosts.size() == 1);
  CHECK(holders->hosts[0].host_id == "host-a");
  CHECK(holders->hosts[0].transfer_address == "10.1.0.1:7000");
  CHECK(holders->total_size == 12345);
  // A host never lists itself as a source.
  CHECK((*a)->holders(artifact)->hosts.empty());

  const std::string hash(64, 'a');
  CHECK(*(*a)->put_index(hash, "index bytes"));
  CHECK_FALSE(*(*b)->put_index(hash, "other bytes"));
  CHECK(**(*b)->get_index(hash) == "index bytes");
  CHECK_FALSE((*b)->get_index(std::string(64, 'b'))->has_value());
  auto bad_hash = (*b)->put_index("ABC", "x");
  REQUIRE_FALSE(bad_hash);
  CHECK(bad_hash.error().message == "cannot use index hash 'ABC': not 64 lower-case hex digits");
  auto bad_id = (*a)->advertise("mi2:x/../host-b", 1);
  REQUIRE_FALSE(bad_id);
  CHECK(bad_id.error().code == errc::invalid_argument);

  REQUIRE((*a)->withdraw(artifact));
  CHECK((*b)->holders(artifact)->hosts.empty());

  // A catalogue that goes away revokes its lease: the host leaves at once.
  a->reset();
  CHECK((*b)->hosts()->size() == 1);
}

TEST_CASE("catalogue: an expired lease takes the host and its replicas with it", "[cluster][catalogue]") {
  if (!testing::find_etcd()) {
    WARN("SKIP: no etcd binary (apt-get install etcd-server)");
    return;
  }
  testing::temp_dir dir;
  testing::etcd_process etcd(dir.path());
  auto a = catalogue::create(options_for(etcd.url("c2"), "host-a", 2s));
  auto b = catalogue::create(options_for(etcd.url("c2"), "host-b"));
  REQUIRE(a);
  REQUIRE(b);
  REQUIRE((*a)->refresh());
  REQUIRE((*a)->advertise(artifact, 1));
  REQUIRE((*b)->holders(artifact)->hosts.size() == 1);
  // host-a stops renewing (no keep-alive thread, no refresh): a hung or dead host.
  CHECK(eventually(
      [&] {
        auto holders = (*b)->holders(artifact);
        auto hosts = (*b)->hosts();
        return holders && holders->hosts.empty() && hosts && hosts->empty();
      },
      lease_expiry_within));
  // It comes back: its next refresh finds the lease gone and registers again, replicas included.
  REQUIRE((*a)->refresh());
  auto holders = (*b)->holders(artifact);
  REQUIRE(holders);
  REQUIRE(holders->hosts.size() == 1);
  CHECK(holders->hosts[0].host_id == "host-a");
}

TEST_CASE("catalogue: etcd down answers UNAVAILABLE, and back (even empty) the host registers again",
          "[cluster][catalogue][concurrency]") {
  if (!testing::find_etcd()) {
    WARN("SKIP: no etcd binary (apt-get install etcd-server)");
    return;
  }
  testing::temp_dir dir;
  auto etcd = std::make_unique<testing::etcd_process>(dir.path() / "one");
  const auto port = etcd->client_port();
  auto a = catalogue::create(options_for(etcd->url("c3"), "host-a", 3s));
  REQUIRE(a);
  (*a)->start();
  CHECK(eventually([&] { return (*a)->registered(); }, 5s));
  REQUIRE((*a)->advertise(artifact, 7));

  etcd->kill();
  auto refresh = (*a)->refresh();
  REQUIRE_FALSE(refresh);
  CHECK(refresh.error().code == errc::unavailable);
  CHECK(refresh.error().message.starts_with("cluster catalogue at http://127.0.0.1:" + std::to_string(port) +
                                            " unreachable: "));
  CHECK_FALSE((*a)->registered());
  auto hosts = (*a)->hosts();
  REQUIRE_FALSE(hosts);
  CHECK(hosts.error().code == errc::unavailable);
  // Advertised during the outage: remembered, written when etcd returns.
  auto late = (*a)->advertise("mi2:late", 9);
  REQUIRE_FALSE(late);
  CHECK(late.error().code == errc::unavailable);

  // etcd returns on the same port with an empty data directory: every key and lease is gone.
  etcd.reset();
  testing::etcd_process fresh(dir.path() / "two", port);
  auto b = catalogue::create(options_for(fresh.url("c3"), "host-b"));
  REQUIRE(b);
  CHECK(eventually([&] { return (*b)->holders(artifact)->hosts.size() == 1; }, 6s));
  CHECK((*b)->holders("mi2:late")->hosts.size() == 1);
  CHECK((*a)->registered());
}

TEST_CASE("catalogue: writes that failed while etcd was away are made by the next refresh", "[cluster][catalogue]") {
  if (!testing::find_etcd()) {
    WARN("SKIP: no etcd binary (apt-get install etcd-server)");
    return;
  }
  testing::temp_dir dir;
  testing::etcd_process etcd(dir.path());
  auto a = catalogue::create(options_for(etcd.url("c4"), "host-a"));
  REQUIRE(a);
  REQUIRE((*a)->refresh());
  REQUIRE((*a)->advertise(artifact, 7));
  etcd.kill();
  // No refresh sees the outage: only the failed writes tell the catalogue.
  auto late = (*a)->advertise("mi2:late", 9);
  CHECK_FALSE(late);
  const std::string hash(64, 'c');
  auto index = (*a)->put_index(hash, "late index");
  REQUIRE_FALSE(index);
  CHECK(index.error().code == errc::unavailable);
  etcd.restart();
  auto back = (*a)->refresh();
  if (!back) FAIL_CHECK(back.error().message);
  CHECK((*a)->registered());
  auto b = catalogue::create(options_for(etcd.url("c4"), "host-b"));
  REQUIRE(b);
  CHECK((*b)->holders(artifact)->hosts.size() == 1);
  CHECK((*b)->holders("mi2:late")->hosts.size() == 1);
  CHECK(**(*b)->get_index(hash) == "late index");
}

TEST_CASE("catalogue: list_cluster shows every host with its lease health and replicas, writing nothing",
          "[cluster][catalogue]") {
  if (!testing::find_etcd()) {
    WARN("SKIP: no etcd binary (apt-get install etcd-server)");
    return;
  }
  two_hosts h("c5");
  REQUIRE(h.a->advertise(artifact, 12345));
  REQUIRE(h.a->advertise("mi2:other", 7));
  REQUIRE(h.b->advertise(artifact, 12345));
  auto client = etcd_client::create({h.url.endpoint()});
  REQUIRE(client);
  // A replica key left by a host id with no host record (its record deleted by hand).
  REQUIRE(h.client->put(h.url.prefix + "/replicas/mi2:orphan/host-gone", R"({"total_size":3})"));
  const auto keys_before = h.client->list(h.url.prefix + "/");
  REQUIRE(keys_before);

  auto listed = list_cluster(*h.client, h.url);
  REQUIRE(listed);
  REQUIRE(listed->size() == 3);
  const auto& ha = (*listed)[0];
  CHECK(ha.host == h.a->self());
  REQUIRE(ha.lease_left);
  CHECK(ha.lease_left->count() > 0);
  CHECK(ha.lease_left->count() <= 10);
  CHECK(ha.replicas == std::vector<listed_replica>{{"mi2:example-artifact", 12345, replica_state::complete},
                                                   {"mi2:other", 7, replica_state::complete}});
  CHECK((*listed)[1].host.host_id == "host-b");
  CHECK((*listed)[1].replicas.size() == 1);
  const auto& gone = (*listed)[2];
  CHECK(gone.host.host_id == "host-gone");
  CHECK(gone.host.transfer_address.empty());
  CHECK_FALSE(gone.lease_left);
  CHECK(gone.replicas == std::vector<listed_replica>{{"mi2:orphan", 3, replica_state::complete}});
  const auto keys_after = h.client->list(h.url.prefix + "/");
  REQUIRE(keys_after);
  CHECK(keys_after->size() == keys_before->size());

  auto lease_gone = h.client->lease_time_to_live(0x7777);
  REQUIRE_FALSE(lease_gone);
  CHECK(lease_gone.error().code == errc::not_found);
  CHECK(lease_gone.error().message == "lease 7777 expired or was revoked");
}

TEST_CASE("catalogue: a replica advertised while pulling is listed as pulling until advertised whole",
          "[cluster][catalogue]") {
  if (!testing::find_etcd()) {
    WARN("SKIP: no etcd binary (apt-get install etcd-server)");
    return;
  }
  two_hosts h("c6");
  const auto key = h.url.prefix + "/replicas/" + artifact + "/host-a";
  auto value_of = [&]() -> std::string {
    auto kv = h.client->get(key);
    REQUIRE(kv);
    return kv->has_value() ? (*kv)->value : "(none)";
  };
  auto replicas_of_a = [&] {
    auto listed = list_cluster(*h.client, h.url);
    REQUIRE(listed);
    REQUIRE(listed->size() == 2);
    CHECK((*listed)[0].host.host_id == "host-a");
    return (*listed)[0].replicas;
  };

  // The manifest is verified: the pull lists itself, flagged.
  REQUIRE(h.a->advertise(artifact, 12345, replica_state::pulling));
  CHECK(value_of() == R"({"partial":true,"total_size":12345})");
  CHECK(replicas_of_a() == std::vector<listed_replica>{{artifact, 12345, replica_state::pulling}});
  // A partial source is a source all the same (§3.3).
  auto holders = h.b->holders(artifact);
  REQUIRE(holders);
  REQUIRE(holders->hosts.size() == 1);
  CHECK(holders->total_size == 12345);

  // A re-registration (the lease lost) writes the flag again.
  auto kv = h.client->get(key);
  REQUIRE(kv);
  REQUIRE(kv->has_value());
  REQUIRE(h.client->revoke_lease((*kv)->lease));
  CHECK(value_of() == "(none)");
  REQUIRE(h.a->refresh());
  CHECK(value_of() == R"({"partial":true,"total_size":12345})");

  // The pull commits: the same key, rewritten without the flag.
  REQUIRE(h.a->advertise(artifact, 12345));
  CHECK(value_of() == R"({"total_size":12345})");
  CHECK(replicas_of_a() == std::vector<listed_replica>{{artifact, 12345, replica_state::complete}});
}

TEST_CASE("catalogue: list_cluster reads replica values defensively, a host record strictly", "[cluster][catalogue]") {
  if (!testing::find_etcd()) {
    WARN("SKIP: no etcd binary (apt-get install etcd-server)");
    return;
  }
  testing::temp_dir dir;
  testing::etcd_process etcd(dir.path());
  const auto url = *parse_cluster_url(etcd.url("c7"));
  auto client = etcd_client::create({url.endpoint()});
  REQUIRE(client);
  // What a hostile or older member may have written under host id "m" (no host record).
  const std::vector<std::pair<std::string, std::string>> written{
      {"mi2:r1", R"({"total_size":3})"},                   // before the flag: complete
      {"mi2:r2", R"({"total_size":3,"partial":false})"},   // complete
      {"mi2:r3", R"({"total_size":3,"partial":"true"})"},  // not the literal true: complete
      {"mi2:r4", R"({"total_size":3,"partial":1})"},       // complete
      {"mi2:r5", R"({"total_size":"3","partial":true})"},  // a size that is not a number: 0
      {"mi2:r6", R"({"total_size":-3})"},                  // negative: 0
      {"mi2:r7", R"([{"total_size":3,"partial":true}])"},  // not an object: 0, complete
      {"mi2:r8", "not json"},                              // 0, complete
  };
  for (const auto& [id, value] : written) REQUIRE((*client)->put(url.prefix + "/replicas/" + id + "/m", value));
  auto listed = list_cluster(**client, url);
  REQUIRE(listed);
  REQUIRE(listed->size() == 1);
  CHECK((*listed)[0].replicas == std::vector<listed_replica>{{"mi2:r1", 3, replica_state::complete},
                                                             {"mi2:r2", 3, replica_state::complete},
                                                             {"mi2:r3", 3, replica_state::complete},
                                                             {"mi2:r4", 3, replica_state::complete},
                                                             {"mi2:r5", 0, replica_state::pulling},
                                                             {"mi2:r6", 0, replica_state::complete},
                                                             {"mi2:r7", 0, replica_state::complete},
                                                             {"mi2:r8", 0, replica_state::complete}});

  // A host record whose name is not a string is refused, not thrown on.
  REQUIRE((*client)->put(url.prefix + "/hosts/h", R"({"transfer_address":"10.1.0.9:7000","host_name":7})"));
  auto refused = list_cluster(**client, url);
  REQUIRE_FALSE(refused);
  CHECK(refused.error().code == errc::internal);
  CHECK(refused.error().message == "cannot read host record of 'h': not a host record");
}

TEST_CASE("catalogue: list_cluster of an unreachable etcd is UNAVAILABLE, naming it", "[cluster][catalogue]") {
  const auto url = *parse_cluster_url("etcd://127.0.0.1:1/t");
  auto client = etcd_client::create({url.endpoint(), 300ms, 1000ms});
  REQUIRE(client);
  auto listed = list_cluster(**client, url);
  REQUIRE_FALSE(listed);
  CHECK(listed.error().code == errc::unavailable);
  CHECK_THAT(listed.error().message, Catch::Contains("http://127.0.0.1:1"));
}

TEST_CASE("catalogue: an ask for a replica is listed by the host asked, deleted by it, and bound to the asker's lease",
          "[cluster][catalogue]") {
  if (!testing::find_etcd()) {
    WARN("SKIP: no etcd binary (apt-get install etcd-server)");
    return;
  }
  two_hosts h("c8", false, 2s);

  // No lease to write it under: refused before etcd is asked.
  auto unregistered = h.a->ask("host-b", artifact, 12345);
  REQUIRE_FALSE(unregistered);
  CHECK(unregistered.error().code == errc::unavailable);
  CHECK(unregistered.error().message ==
        "cannot ask host host-b for " + artifact + ": host host-a is not registered at " + h.url.endpoint());
  REQUIRE(h.a->refresh());
  REQUIRE(h.b->refresh());
  auto bad_host = h.a->ask("host-b/../x", artifact, 1);
  REQUIRE_FALSE(bad_host);
  CHECK(bad_host.error().code == errc::invalid_argument);
  CHECK(bad_host.error().message ==
        "cannot ask host 'host-b/../x' for " + artifact + ": a host id is [A-Za-z0-9-._], 1 to 128 characters");
  CHECK(h.a->ask("host-b", "a/b", 1).error().code == errc::invalid_argument);

  REQUIRE(h.a->ask("host-b", artifact, 12345));
  const auto key = h.url.prefix + "/wanted/host-b/" + artifact;
  auto kv = h.client->get(key);
  REQUIRE(kv);
  REQUIRE(kv->has_value());
  CHECK((*kv)->value == R"({"by":"host-a","total_size":12345})");
  CHECK((*kv)->lease != 0);
  // Only the host asked lists it.
  auto for_b = h.b->wanted();
  REQUIRE(for_b);
  CHECK(*for_b == std::vector<wanted_replica>{{artifact, 12345, "host-a", ""}});
  auto for_a = h.a->wanted();
  REQUIRE(for_a);
  CHECK(for_a->empty());

  // Values a hostile or older member wrote are read defensively; a key that is not one id
  // segment is skipped.
  REQUIRE(h.client->put(h.url.prefix + "/wanted/host-b/mi2:w1", R"({"total_size":"3","by":7})"));
  REQUIRE(h.client->put(h.url.prefix + "/wanted/host-b/mi2:w2", "not json"));
  REQUIRE(h.client->put(h.url.prefix + "/wanted/host-b/mi2:w3/x", R"({"total_size":3,"by":"m"})"));
  for_b = h.b->wanted();
  REQUIRE(for_b);
  CHECK(*for_b ==
        std::vector<wanted_replica>{{artifact, 12345, "host-a", ""}, {"mi2:w1", 0, "", ""}, {"mi2:w2", 0, "", ""}});

  // A host whose pull failed marks the ask declined, under the asker's lease still; the asker
  // reads it back. A second decline with the same reason writes nothing.
  auto declined = h.b->decline_wanted(artifact, "not enough room");
  REQUIRE(declined);
  CHECK(*declined);
  kv = h.client->get(key);
  REQUIRE(kv);
  REQUIRE(kv->has_value());
  CHECK((*kv)->value == R"({"by":"host-a","declined":"not enough room","total_size":12345})");
  const auto revision = (*kv)->mod_revision;
  CHECK((*kv)->lease != 0);
  REQUIRE(h.b->decline_wanted(artifact, "not enough room"));
  CHECK((*h.client->get(key))->mod_revision == revision);
  const std::vector<std::string> hosts{"host-c", "host-b"};
  auto read_back = h.a->asks_of(hosts, artifact);
  REQUIRE(read_back);
  REQUIRE(read_back->size() == 2);
  CHECK_FALSE((*read_back)[0]);  // nothing asked of host-c
  REQUIRE((*read_back)[1]);
  CHECK(*(*read_back)[1] == wanted_replica{artifact, 12345, "host-a", "not enough room"});
  const std::vector<std::string> bad{"host-b/x"};
  CHECK(h.a->asks_of(bad, artifact).error().code == errc::invalid_argument);
  CHECK_FALSE(*h.a->decline_wanted(artifact, "x"));  // nothing asked of host-a

  // The host asked deletes its ask once it holds the replica.
  auto dropped = h.b->drop_wanted(artifact);
  REQUIRE(dropped);
  CHECK(*dropped);
  CHECK_FALSE(*h.b->drop_wanted(artifact));
  for_b = h.b->wanted();
  REQUIRE(for_b);
  CHECK(*for_b == std::vector<wanted_replica>{{"mi2:w1", 0, "", ""}, {"mi2:w2", 0, "", ""}});

  // An asker that dies takes its asks with it: host-a stops renewing its lease.
  REQUIRE(h.a->ask("host-b", artifact, 12345));
  REQUIRE(h.b->wanted()->size() == 3);
  CHECK(eventually(
      [&] {
        auto wanted = h.b->wanted();
        return wanted && wanted->size() == 2;
      },
      lease_expiry_within));
}

TEST_CASE("catalogue: replicas_of lists every holder of an id with its state", "[cluster][catalogue]") {
  if (!testing::find_etcd()) {
    WARN("SKIP: no etcd binary (apt-get install etcd-server)");
    return;
  }
  two_hosts h("c9");
  REQUIRE(h.a->advertise(artifact, 7));
  REQUIRE(h.b->advertise(artifact, 7, replica_state::pulling));
  auto listed = h.a->replicas_of(artifact);
  REQUIRE(listed);
  CHECK(*listed ==
        std::vector<replica_holder>{{"host-a", 7, replica_state::complete}, {"host-b", 7, replica_state::pulling}});
  CHECK(h.a->replicas_of("a/b").error().code == errc::invalid_argument);
}

TEST_CASE("catalogue: a host's free bytes are in its record, written again when they move by a step",
          "[cluster][catalogue]") {
  if (!testing::find_etcd()) {
    WARN("SKIP: no etcd binary (apt-get install etcd-server)");
    return;
  }
  testing::temp_dir dir;
  testing::etcd_process etcd(dir.path());
  std::atomic<std::uint64_t> free{std::uint64_t{1} << 30};
  auto o = options_for(etcd.url("free"), "host-a");
  o.free_bytes = [&free]() -> std::optional<std::uint64_t> { return free.load(); };
  o.free_bytes_step = 1 << 20;
  o.self.persist_volume = "models";
  auto a = catalogue::create(o);
  REQUIRE(a);
  REQUIRE((*a)->refresh());
  auto client = etcd_client::create({parse_cluster_url(etcd.url("free"))->endpoint()});
  REQUIRE(client);
  const auto key = parse_cluster_url(etcd.url("free"))->prefix + "/hosts/host-a";
  CHECK((*(*client)->get(key))->value ==
        R"({"capacity_bytes":1073741824,"free_bytes":1073741824,"host_name":"host-a.example",)"
        R"("persist_volume":"models","transfer_address":"10.1.0.1:7000"})");
  const auto free_listed = [&] { return (*a)->hosts()->at(0).free_bytes; };
  CHECK(free_listed() == std::uint64_t{1} << 30);
  // Less than a step: the record stays; more: the next refresh writes it.
  free = (std::uint64_t{1} << 30) - 1000;
  REQUIRE((*a)->refresh());
  CHECK(free_listed() == std::uint64_t{1} << 30);
  free = std::uint64_t{100} << 20;
  REQUIRE((*a)->refresh());
  CHECK(free_listed() == std::uint64_t{100} << 20);
  CHECK((*a)->hosts()->at(0).persist_volume == "models");
  // self() is the host as configured.
  CHECK_FALSE((*a)->self().free_bytes.has_value());

  // A record whose free_bytes or persist_volume is of another type is not a host record.
  REQUIRE((*client)->put(parse_cluster_url(etcd.url("free"))->prefix + "/hosts/host-x",
                         R"({"transfer_address":"10.1.0.9:7000","free_bytes":"lots"})"));
  auto refused = (*a)->hosts();
  REQUIRE_FALSE(refused);
  CHECK(refused.error().message == "cannot read host record of 'host-x': not a host record");
  REQUIRE((*client)->put(parse_cluster_url(etcd.url("free"))->prefix + "/hosts/host-x",
                         R"({"transfer_address":"10.1.0.9:7000","persist_volume":7})"));
  CHECK_FALSE((*a)->hosts());
}
