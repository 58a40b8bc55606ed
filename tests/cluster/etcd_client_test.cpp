#include "tensorreg/cluster/etcd_client.hpp"

#include <algorithm>
#include <catch2/catch.hpp>
#include <condition_variable>
#include <future>
#include <mutex>
#include <thread>

#include "cluster/etcd_process.hpp"
#include "support/temp_dir.hpp"

using namespace tensorreg;
using namespace tensorreg::cluster;

TEST_CASE("cluster url: etcd://host:port/prefix parses and bad ones are named", "[cluster][etcd_client]") {
  auto url = parse_cluster_url("etcd://10.0.0.1:2380/models/prod/");
  REQUIRE(url);
  CHECK(url->host == "10.0.0.1");
  CHECK(url->port == 2380);
  CHECK(url->prefix == "/models/prod");
  CHECK(url->endpoint() == "http://10.0.0.1:2380");

  auto bare = parse_cluster_url("etcd://etcd.local");
  REQUIRE(bare);
  CHECK(bare->port == 2379);
  CHECK(bare->prefix == "/tensorreg");

  auto scheme = parse_cluster_url("http://10.0.0.1:2379/x");
  REQUIRE_FALSE(scheme);
  CHECK(scheme.error().code == errc::invalid_argument);
  CHECK(scheme.error().message == "cannot parse cluster url 'http://10.0.0.1:2379/x': it must start with etcd://");
  auto port = parse_cluster_url("etcd://h:99999/x");
  REQUIRE_FALSE(port);
  CHECK(port.error().message == "cannot parse cluster url 'etcd://h:99999/x': port '99999' is not in 1..65535");
  auto prefix = parse_cluster_url("etcd://h:1/a b");
  REQUIRE_FALSE(prefix);
  CHECK(prefix.error().message.find("prefix '/a b' has a character outside") != std::string::npos);
}

TEST_CASE("etcd client: base64 round-trips every byte and refuses bad text", "[cluster][etcd_client]") {
  std::string all;
  for (int i = 0; i < 256; ++i) all += static_cast<char>(i);
  for (std::size_t n : {0, 1, 2, 3, 4, 255, 256}) {
    auto text = base64_encode(std::string_view(all).substr(0, n));
    CHECK(text.size() % 4 == 0);
    auto back = base64_decode(text);
    REQUIRE(back);
    CHECK(*back == all.substr(0, n));
  }
  CHECK(base64_encode("foo") == "Zm9v");
  CHECK(base64_encode("fo") == "Zm8=");
  auto bad = base64_decode("Zm9");
  REQUIRE_FALSE(bad);
  CHECK(bad.error().code == errc::invalid_argument);
  CHECK(bad.error().message == "cannot decode base64: length 3 is not a multiple of 4");
  CHECK_FALSE(base64_decode("Zm!v"));
}

TEST_CASE("etcd client: an endpoint where nothing listens is UNAVAILABLE, naming it", "[cluster][etcd_client]") {
  const auto port = testing::free_local_port();
  auto client = etcd_client::create(
      {"http://127.0.0.1:" + std::to_string(port), std::chrono::milliseconds(300), std::chrono::milliseconds(500)});
  REQUIRE(client);
  auto put = (*client)->put("/k", "v");
  REQUIRE_FALSE(put);
  CHECK(put.error().code == errc::unavailable);
  CHECK(put.error().message.starts_with("cluster catalogue at http://127.0.0.1:" + std::to_string(port) +
                                        " unreachable: "));
  auto bad = etcd_client::create({"https://x:1", {}, {}});
  REQUIRE_FALSE(bad);
  CHECK(bad.error().code == errc::invalid_argument);
}

TEST_CASE("etcd client: put, get, list by prefix, put_if_absent, delete and leases on a real etcd",
          "[cluster][etcd_client]") {
  if (!testing::find_etcd()) {
    WARN("SKIP: no etcd binary (apt-get install etcd-server)");
    return;
  }
  testing::temp_dir dir;
  testing::etcd_process etcd(dir.path());
  auto client_or =
      etcd_client::create({etcd.endpoint(), std::chrono::milliseconds(500), std::chrono::milliseconds(2000)});
  REQUIRE(client_or);
  auto& client = **client_or;

  const std::string binary("v\0\xff", 3);
  REQUIRE(client.put("/p/a", binary));
  REQUIRE(client.put("/p/b", "2"));
  REQUIRE(client.put("/q/c", "3"));
  auto a = client.get("/p/a");
  REQUIRE(a);
  REQUIRE(a->has_value());
  CHECK((*a)->value == binary);
  auto missing = client.get("/p/zz");
  REQUIRE(missing);
  CHECK_FALSE(missing->has_value());

  auto listed = client.list("/p/");
  REQUIRE(listed);
  REQUIRE(listed->size() == 2);
  CHECK((*listed)[0].key == "/p/a");
  CHECK((*listed)[1].key == "/p/b");

  // Several keys in one request, in the order asked; more than one txn's 128 ranges.
  std::vector<std::string> keys{"/p/b", "/nope", "/p/a"};
  for (int i = 0; i < 200; ++i) keys.push_back("/many/" + std::to_string(i));
  auto many = client.get_many(keys);
  REQUIRE(many);
  REQUIRE(many->size() == keys.size());
  REQUIRE((*many)[0]);
  CHECK((*many)[0]->value == "2");
  CHECK_FALSE((*many)[1]);
  REQUIRE((*many)[2]);
  CHECK((*many)[2]->value == binary);
  CHECK(std::none_of(many->begin() + 3, many->end(), [](const auto& kv) { return kv.has_value(); }));
  REQUIRE(client.put("/many/150", "x"));
  many = client.get_many(keys);
  REQUIRE(many);
  REQUIRE((*many)[3 + 150]);
  CHECK((*many)[3 + 150]->key == "/many/150");
  auto none = client.get_many({});
  REQUIRE(none);
  CHECK(none->empty());

  auto first = client.put_if_absent("/i/x", "one");
  REQUIRE(first);
  CHECK(*first);
  auto second = client.put_if_absent("/i/x", "two");
  REQUIRE(second);
  CHECK_FALSE(*second);
  CHECK((*client.get("/i/x"))->value == "one");

  auto lease = client.grant_lease(std::chrono::seconds(5));
  REQUIRE(lease);
  REQUIRE(client.put("/l/k", "v", *lease));
  CHECK((*client.get("/l/k"))->lease == *lease);
  auto ttl = client.keep_alive(*lease);
  REQUIRE(ttl);
  CHECK(ttl->count() >= 4);
  REQUIRE(client.revoke_lease(*lease));
  CHECK_FALSE((*client.get("/l/k")).has_value());
  auto gone = client.keep_alive(*lease);
  REQUIRE_FALSE(gone);
  CHECK(gone.error().code == errc::not_found);
  CHECK(gone.error().message.find("expired or was revoked") != std::string::npos);
  auto orphan = client.put("/l/k2", "v", *lease);
  REQUIRE_FALSE(orphan);
  CHECK(orphan.error().code == errc::not_found);
  CHECK(orphan.error().message.find("lease not found") != std::string::npos);

  auto deleted = client.delete_prefix("/p/");
  REQUIRE(deleted);
  CHECK(*deleted == 2);
  CHECK((*client.list("/p/")).empty());
  CHECK((*client.list("/q/")).size() == 1);
}

TEST_CASE("etcd watch: a put under the prefix is seen at once, stop ends it, no etcd is UNAVAILABLE",
          "[cluster][etcd_client]") {
  using namespace std::chrono_literals;
  const auto port = testing::free_local_port();
  auto nowhere = etcd_watch::create("http://127.0.0.1:" + std::to_string(port), "/w/", 300ms);
  REQUIRE(nowhere);
  auto refused = (*nowhere)->run([] {});
  REQUIRE_FALSE(refused);
  CHECK(refused.error().code == errc::unavailable);
  CHECK(refused.error().message.starts_with("cluster catalogue at http://127.0.0.1:" + std::to_string(port) +
                                            " unreachable: watch: "));
  CHECK_FALSE(etcd_watch::create("https://x:1", "/w/", 300ms));

  if (!testing::find_etcd()) {
    WARN("SKIP: no etcd binary (apt-get install etcd-server)");
    return;
  }
  testing::temp_dir dir;
  testing::etcd_process etcd(dir.path());
  auto client = etcd_client::create({etcd.endpoint(), 500ms, 2000ms});
  REQUIRE(client);
  auto watch = etcd_watch::create(etcd.endpoint(), "/w/", 500ms);
  REQUIRE(watch);
  std::mutex mutex;
  std::condition_variable seen;
  int calls = 0;
  std::promise<status> ended;
  auto ending = ended.get_future();
  std::thread watcher([&] {
    ended.set_value((*watch)->run([&] {
      {
        std::lock_guard lock(mutex);
        ++calls;
      }
      seen.notify_all();
    }));
  });
  const auto wait_for_calls = [&](int n) {
    std::unique_lock lock(mutex);
    return seen.wait_for(lock, 5s, [&] { return calls >= n; });
  };
  CHECK(wait_for_calls(1));  // the watch is in place
  REQUIRE((*client)->put("/x/elsewhere", "1"));
  REQUIRE((*client)->put("/w/a", "1"));
  CHECK(wait_for_calls(2));
  {
    std::lock_guard lock(mutex);
    CHECK(calls == 2);  // the key outside the prefix woke nobody
  }
  REQUIRE((*client)->delete_key("/w/a"));
  CHECK(wait_for_calls(3));
  (*watch)->stop();
  REQUIRE(ending.wait_for(3s) == std::future_status::ready);
  CHECK(ending.get());  // stopped: OK
  watcher.join();
  CHECK((*watch)->run([] {}));  // after stop(): at once
}
