#include "tensorreg/cluster/node.hpp"

#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <future>
#include <thread>
#include <tuple>

#include "cluster/etcd_process.hpp"
#include "support/engine_helpers.hpp"
#include "support/temp_dir.hpp"
#include "tensorreg/metrics/registry.hpp"
#include "tensorreg/persistence/durable_store.hpp"

using namespace tensorreg;
using namespace tensorreg::cluster;
using namespace std::chrono_literals;
namespace t = tensorreg::testing;

namespace {

// Three leaves and a bit: a 12 MiB + 8 B float32 tensor.
t::model leafy_model() {
  t::model m;
  const std::size_t n = (12u << 20) + 8;
  m.storages = {{"a", t::pattern(n, 21)}};
  m.tensors = {{"w", "a", {static_cast<std::int64_t>(n / 4)}, {1}, "torch.float32", 0, n}};
  return m;
}

std::unique_ptr<node> join(registration::engine& e, const std::string& url, const std::string& host_id,
                           std::chrono::milliseconds withdraw_check_every = 50ms) {
  node_options options;
  options.url = *parse_cluster_url(url);
  options.self = host_record{host_id, host_id, "127.0.0.1:0", 0, "", std::nullopt};
  options.lease_ttl = 3s;
  options.withdraw_check_every = withdraw_check_every;
  options.pull.request_timeout = 5s;
  auto n = node::create(e, std::move(options));
  REQUIRE_OK(n);
  return std::move(*n);
}

std::string read_all(const memory::byte_source& source) {
  std::string out(source.size(), '\0');
  REQUIRE(source.read(0, std::as_writable_bytes(std::span<char>(out))));
  return out;
}

template <typename Predicate>
bool eventually(Predicate done, std::chrono::milliseconds within) {
  const auto give_up = std::chrono::steady_clock::now() + within;
  while (std::chrono::steady_clock::now() < give_up) {
    if (done()) return true;
    std::this_thread::sleep_for(50ms);
  }
  return done();
}

// Whether `n` lists `count` members within 5 s.
bool sees_members(node& n, std::size_t count) {
  return eventually(
      [&] {
        auto hosts = n.members().hosts();
        return hosts && hosts->size() == count;
      },
      5s);
}

// An engine whose stable budget is `bytes`.
std::unique_ptr<registration::engine> engine_with_budget(t::fake_clock& clock, std::uint64_t bytes) {
  auto o = t::deterministic_options(clock);
  o.stable_bytes = bytes;
  return t::make_engine(std::move(o));
}

// etcd and two members of one cluster, each with an engine of its own, both registered.
struct two_members {
  t::temp_dir dir;
  t::etcd_process etcd{dir.path()};
  t::fake_clock clock;
  std::unique_ptr<registration::engine> engine_a = t::make_engine(clock);
  std::unique_ptr<registration::engine> engine_b = t::make_engine(clock);
  std::unique_ptr<node> a;
  std::unique_ptr<node> b;

  two_members(const std::string& cluster, const std::string& name_a, const std::string& name_b,
              std::chrono::milliseconds withdraw_check_every = 50ms)
      : a(join(*engine_a, etcd.url(cluster), name_a, withdraw_check_every)),
        b(join(*engine_b, etcd.url(cluster), name_b, withdraw_check_every)) {
    REQUIRE(eventually([&] { return a->members().registered() && b->members().registered(); }, 5s));
  }
};

// One member alone on an etcd of its own, which a case may stop (etcd.reset()).
struct solo_member {
  t::temp_dir dir;
  std::unique_ptr<t::etcd_process> etcd = std::make_unique<t::etcd_process>(dir.path());
  const std::string endpoint = etcd->endpoint();
  t::fake_clock clock;
  std::unique_ptr<registration::engine> engine = t::make_engine(clock);
  std::unique_ptr<node> n;

  explicit solo_member(const std::string& cluster) : n(join(*engine, etcd->url(cluster), "solo")) {}
};

}  // namespace

TEST_CASE("cluster node: an artifact committed on one engine is fetched by id into another",
          "[cluster][node][concurrency]") {
  if (!t::find_etcd()) {
    WARN("SKIP: no etcd binary (apt-get install etcd-server)");
    return;
  }
  two_members cluster("n1", "a", "b");
  auto& engine_a = cluster.engine_a;
  auto& engine_b = cluster.engine_b;
  auto& a = cluster.a;
  auto& b = cluster.b;

  const auto m = leafy_model();
  auto committed = t::register_stable(*engine_a, m, static_cast<std::int32_t>(::getpid()));
  REQUIRE_OK(committed);
  const auto id = committed->descriptor.artifact_id;
  a->committed(id);
  a->drain();
  CHECK(a->server().serves(id));

  // The pull verified every leaf against a manifest that folds to the id: the commit keeps the
  // pulled memfd and takes its data hash from those digests instead of hashing it again.
  const auto hashed_before = metrics::process_counters().bytes_hashed.value();
  REQUIRE_OK(b->fetch(id));
  CHECK(metrics::process_counters().bytes_hashed.value() == hashed_before);
  CHECK(b->server().serves(id));
  auto got = engine_b->open_bytes(id);
  REQUIRE_OK(got);
  CHECK(read_all(**got) == m.canonical());
  CHECK((*engine_b->index_of(id))->json() == m.index().json());
  CHECK(a->server().stats().leaves_served == 4);
  // b advertises its new replica in turn.
  b->drain();
  auto holders = a->members().holders(id);
  REQUIRE_OK(holders);
  REQUIRE(holders->hosts.size() == 1);
  CHECK(holders->hosts[0].host_id == "b");
  // Fetching what is local does nothing.
  REQUIRE_OK(b->fetch(id));
  CHECK(a->server().stats().manifests_served == 1);
}

TEST_CASE("cluster node: an artifact removed here is withdrawn from the catalogue and the server", "[cluster][node]") {
  if (!t::find_etcd()) {
    WARN("SKIP: no etcd binary (apt-get install etcd-server)");
    return;
  }
  two_members cluster("n3", "holder", "other");
  auto& engine = cluster.engine_a;
  auto& n = cluster.a;
  auto& other = cluster.b;
  const auto pid = static_cast<std::int32_t>(::getpid());
  auto kept = t::register_stable(*engine, t::small_model(), pid);
  auto removed = t::register_stable(*engine, leafy_model(), pid);
  REQUIRE_OK(kept);
  REQUIRE_OK(removed);
  const auto kept_id = kept->descriptor.artifact_id;
  const auto removed_id = removed->descriptor.artifact_id;
  n->committed(kept_id);
  n->committed(removed_id);
  n->drain();
  auto advertises = [&](const std::string& id) {
    const auto ids = n->members().advertised();
    return std::find(ids.begin(), ids.end(), id) != ids.end();
  };
  REQUIRE(advertises(removed_id));
  REQUIRE(n->server().serves(removed_id));
  auto holders_seen = [&](const std::string& id) {
    auto holders = other->members().holders(id);
    REQUIRE_OK(holders);
    return holders->hosts.size();
  };
  REQUIRE(holders_seen(removed_id) == 1);

  REQUIRE_OK(engine->deregister(registration::deregister_request{removed_id}));
  CHECK(eventually([&] { return !advertises(removed_id) && !n->server().serves(removed_id); }, 5s));
  CHECK(holders_seen(removed_id) == 0);  // the other member no longer finds it here
  // What is still held stays advertised and served.
  CHECK(advertises(kept_id));
  CHECK(n->server().serves(kept_id));
  CHECK(holders_seen(kept_id) == 1);
}

TEST_CASE("cluster node: an id no member holds is NOT_FOUND, and etcd down is UNAVAILABLE", "[cluster][node]") {
  if (!t::find_etcd()) {
    WARN("SKIP: no etcd binary (apt-get install etcd-server)");
    return;
  }
  solo_member solo("n2");
  // References, not a structured binding: clang 14 cannot capture a binding in a lambda.
  auto& etcd = solo.etcd;
  const auto& endpoint = solo.endpoint;
  auto& engine = solo.engine;
  auto& n = solo.n;
  const auto unknown = t::expected_mi2(t::small_model_json, t::small_model().canonical());
  CHECK_ERROR(n->fetch(unknown), errc::not_found,
              "artifact " + unknown + " not found here nor on any member of the cluster");
  CHECK_CODE(n->fetch("cgid:x~y"), errc::not_found);

  etcd.reset();
  auto down = n->fetch(unknown);
  REQUIRE_FALSE(down);
  CHECK(down.error().code == errc::unavailable);
  CHECK(down.error().message.starts_with("cannot fetch " + unknown + " from the cluster: cluster catalogue at " +
                                         endpoint + " unreachable: "));
  // Local work is untouched.
  REQUIRE_OK(t::register_stable(*engine, t::small_model(), static_cast<std::int32_t>(::getpid())));
}

TEST_CASE("cluster node: publish asks another member to pull an artifact held here and waits until it holds it",
          "[cluster][node][concurrency]") {
  if (!t::find_etcd()) {
    WARN("SKIP: no etcd binary (apt-get install etcd-server)");
    return;
  }
  two_members cluster("n4", "a", "b");
  const auto m = leafy_model();
  auto committed = t::register_stable(*cluster.engine_a, m, static_cast<std::int32_t>(::getpid()));
  REQUIRE_OK(committed);
  const auto id = committed->descriptor.artifact_id;
  cluster.a->committed(id);  // queued: publish waits for its own advertisement first

  auto published = cluster.a->publish(id, 2, false, 20s);
  REQUIRE_OK(published);
  CHECK(published->holders == std::vector<std::string>{"a", "b"});
  CHECK(published->asked == std::vector<std::string>{"b"});
  CHECK(published->target == 2);
  CHECK(published->reached);
  // b pulled it (verified, committed) and deleted the ask once it held it.
  auto got = cluster.engine_b->open_bytes(id);
  REQUIRE_OK(got);
  CHECK(read_all(**got) == m.canonical());
  CHECK(eventually([&] { return cluster.b->members().wanted()->empty(); }, 5s));

  // Published again: both hold it, nobody is asked.
  auto again = cluster.a->publish(id, 0, true, 1s);
  REQUIRE_OK(again);
  CHECK(again->holders == std::vector<std::string>{"a", "b"});
  CHECK(again->asked.empty());
  CHECK(again->target == 2);
  CHECK(again->reached);

  // More replicas than members, and every member holds it: answered at once, not reached (no
  // host is left to ask; the timeout is not waited out).
  const auto t0 = std::chrono::steady_clock::now();
  auto too_many = cluster.a->publish(id, 5, false, 5s);
  REQUIRE_OK(too_many);
  CHECK(std::chrono::steady_clock::now() - t0 < 5s);
  CHECK(too_many->holders == std::vector<std::string>{"a", "b"});
  CHECK(too_many->target == 5);
  CHECK(too_many->members == 2);
  CHECK_FALSE(too_many->reached);
}

TEST_CASE("cluster node: publish refuses an id not held here, a cgid, and answers UNAVAILABLE without etcd",
          "[cluster][node]") {
  if (!t::find_etcd()) {
    WARN("SKIP: no etcd binary (apt-get install etcd-server)");
    return;
  }
  solo_member solo("n5");
  // References, not a structured binding: clang 14 cannot capture a binding in a lambda.
  auto& etcd = solo.etcd;
  const auto& endpoint = solo.endpoint;
  auto& engine = solo.engine;
  auto& n = solo.n;
  REQUIRE(eventually([&] { return n->members().registered(); }, 5s));
  const auto unknown = t::expected_mi2(t::small_model_json, t::small_model().canonical());
  CHECK_ERROR(n->publish(unknown, 2, false, 1s), errc::not_found, "cannot publish " + unknown + ": not held here");
  CHECK_ERROR(n->publish("cgid:x~y", 2, false, 1s), errc::invalid_argument,
              "cannot publish cgid:x~y: only mi2 ids are pulled by members (a cgid names no content they can check)");
  auto held = t::register_stable(*engine, t::small_model(), static_cast<std::int32_t>(::getpid()));
  REQUIRE_OK(held);
  const auto id = held->descriptor.artifact_id;
  CHECK_ERROR(n->publish(id, 0, false, 1s), errc::invalid_argument,
              "cannot publish " + id + ": replicas is 0 (give 1 or more, or all)");
  n->committed(id);
  n->drain();
  // Alone in the cluster: all is this host, reached at once.
  auto alone = n->publish(id, 0, true, 1s);
  REQUIRE_OK(alone);
  CHECK(alone->holders == std::vector<std::string>{"solo"});
  CHECK(alone->reached);

  etcd.reset();
  auto down = n->publish(id, 2, false, 1s);
  REQUIRE_FALSE(down);
  CHECK(down.error().code == errc::unavailable);
  CHECK(down.error().message.starts_with("cannot publish " + id + ": cluster catalogue at " + endpoint +
                                         " unreachable: "));
}

namespace {

// An engine whose persist directory is `root`, shared as a volume with the other engines on it.
std::unique_ptr<registration::engine> engine_on_volume(const t::fake_clock& clock, const std::string& root,
                                                       const std::string& tag, std::uint64_t stable_bytes = 0) {
  auto o = t::deterministic_options(clock);
  if (stable_bytes != 0) o.stable_bytes = stable_bytes;
  persistence::store_options so;
  so.shared = true;
  so.writer_tag = tag;
  auto store = persistence::durable_store::open(root, so);
  REQUIRE_OK(store);
  o.durable = std::move(*store);
  o.verify_persisted_at_start = false;
  return t::make_engine(std::move(o));
}

std::unique_ptr<node> join_volume(registration::engine& e, const std::string& url, const std::string& host_id,
                                  const std::string& volume) {
  node_options options;
  options.url = *parse_cluster_url(url);
  options.self = host_record{host_id, host_id, "127.0.0.1:0", 0, volume, std::nullopt};
  options.lease_ttl = 3s;
  options.withdraw_check_every = 50ms;
  options.publish_poll_every = 50ms;
  options.disk_load_wait = 20s;
  options.pull.request_timeout = 5s;
  auto n = node::create(e, std::move(options));
  REQUIRE_OK(n);
  return std::move(*n);
}

}  // namespace

TEST_CASE("cluster node: a copy on a shared persist volume is listed, and pulled by a host off the volume",
          "[cluster][node][shared]") {
  if (!t::find_etcd()) {
    WARN("SKIP: no etcd binary (apt-get install etcd-server)");
    return;
  }
  t::temp_dir dir;
  t::etcd_process etcd{dir.path()};
  t::fake_clock clock;
  const auto volume_root = (dir.path() / "volume").string();
  auto engine_w = engine_on_volume(clock, volume_root, "w");
  auto engine_r = engine_on_volume(clock, volume_root, "r");
  auto engine_off = t::make_engine(clock);
  const auto url = etcd.url("vol");
  auto w = join_volume(*engine_w, url, "w", "models");
  auto r = join_volume(*engine_r, url, "r", "models");
  auto off = join(*engine_off, url, "off");
  REQUIRE(eventually([&] { return w->members().registered() && off->members().registered(); }, 5s));

  // Committed and persisted on w, then gone from w's memory: the volume's copy is all there is.
  const auto m = leafy_model();
  auto committed = t::register_stable(*engine_w, m, static_cast<std::int32_t>(::getpid()));
  REQUIRE_OK(committed);
  const auto id = committed->descriptor.artifact_id;
  auto task = engine_w->start_persistence(id);
  REQUIRE_OK(task);
  auto persisted = engine_w->wait_persistence(task->task_id, 0ms);
  REQUIRE_OK(persisted);
  REQUIRE(persisted->state == persistence::task_state::success);
  // The copy is listed under the volume's name, with no lease: it outlives its writer.
  REQUIRE(eventually(
      [&] {
        auto copies = off->members().disk_copies(id);
        return copies && copies->size() == 1;
      },
      5s));
  auto copies = off->members().disk_copies(id);
  REQUIRE_OK(copies);
  // Listed by w, or by r, whose listing rescans the volume and finds it too.
  CHECK((*copies)[0].volume == "models");
  CHECK((*copies)[0].total_size == m.canonical().size());
  CHECK(((*copies)[0].by == "w" || (*copies)[0].by == "r"));
  w.reset();  // w leaves the cluster; its replica key goes with its lease, the disk key stays
  REQUIRE(eventually([&] { return off->members().holders(id)->hosts.empty(); }, 5s));
  CHECK(off->members().disk_copies(id)->size() == 1);

  // off is not on the volume: it asks r, which loads the volume's copy and advertises it, and
  // pulls it from r.
  REQUIRE_OK(off->fetch(id));
  auto got = engine_off->open_bytes(id);
  REQUIRE_OK(got);
  CHECK(read_all(**got) == m.canonical());
  got->reset();  // a reader would keep a deregister below waiting
  CHECK(r->server().serves(id));
  auto r_holds = engine_r->get(id);
  REQUIRE_OK(r_holds);
  CHECK(r_holds->stable_replica);
  // The ask was answered: r deleted it.
  REQUIRE(eventually([&] { return r->members().wanted()->empty(); }, 5s));

  // An id no volume lists and no member holds is NOT_FOUND, as before.
  const auto other = t::expected_mi2(m.index().json(), std::string(m.canonical().size(), 'x'));
  auto nowhere = off->fetch(other);
  REQUIRE_FALSE(nowhere);
  CHECK(nowhere.error().code == errc::not_found);

  // Removed from the volume (deregistered on r), the copy is unlisted.
  registration::deregister_request gone;
  gone.artifact_id = id;
  REQUIRE_OK(engine_r->deregister(gone));
  REQUIRE(eventually([&] { return off->members().disk_copies(id)->empty(); }, 5s));

  // A listing left behind by a member that removed the copy before it listed it: the member
  // asked finds nothing on the volume, unlists it, and the fetch is NOT_FOUND, not a timeout.
  REQUIRE_OK(engine_off->deregister(gone));
  REQUIRE_OK(etcd_client::create({parse_cluster_url(url)->endpoint()})
                 .value()
                 ->put(parse_cluster_url(url)->prefix + "/disk/" + id + "/models", R"({"total_size":1,"by":"w"})"));
  auto stale = off->fetch(id);
  REQUIRE_FALSE(stale);
  CHECK(stale.error().code == errc::not_found);
  CHECK_THAT(stale.error().message, Catch::EndsWith("the copy on persist volume models was removed"));
}

TEST_CASE("cluster node: a volume member that cannot load the copy declines, and the fetch says why",
          "[cluster][node][shared]") {
  if (!t::find_etcd()) {
    WARN("SKIP: no etcd binary (apt-get install etcd-server)");
    return;
  }
  t::temp_dir dir;
  t::etcd_process etcd{dir.path()};
  t::fake_clock clock;
  const auto volume_root = (dir.path() / "volume").string();
  auto engine_w = engine_on_volume(clock, volume_root, "w");
  auto engine_small = engine_on_volume(clock, volume_root, "small", std::uint64_t{4} << 20);
  auto engine_off = t::make_engine(clock);
  const auto url = etcd.url("vol-decline");
  auto w = join_volume(*engine_w, url, "w", "models");
  auto small = join_volume(*engine_small, url, "small", "models");
  auto off = join(*engine_off, url, "off");
  REQUIRE(sees_members(*off, 3));

  // w persists a 12 MiB artifact on the volume and leaves: only small, whose 4 MiB budget
  // cannot take it, is on the volume still.
  auto committed = t::register_stable(*engine_w, leafy_model(), static_cast<std::int32_t>(::getpid()));
  REQUIRE_OK(committed);
  const auto id = committed->descriptor.artifact_id;
  auto task = engine_w->start_persistence(id);
  REQUIRE_OK(task);
  auto persisted = engine_w->wait_persistence(task->task_id, 0ms);
  REQUIRE_OK(persisted);
  REQUIRE(persisted->state == persistence::task_state::success);
  REQUIRE(eventually(
      [&] {
        auto copies = off->members().disk_copies(id);
        return copies && copies->size() == 1;
      },
      5s));
  w.reset();
  REQUIRE(eventually([&] { return off->members().holders(id)->hosts.empty(); }, 5s));

  // off asks small, small declines with its load error, and the fetch answers that at once
  // rather than after disk_load_wait (60 s: "did not load it within").
  auto fetched = off->fetch(id);
  REQUIRE_FALSE(fetched);
  CHECK(fetched.error().code == errc::unavailable);
  INFO(fetched.error().message);
  CHECK(fetched.error().message.starts_with("cannot fetch " + id +
                                            ": no member on persist volume models could load it (small: "));
  CHECK(fetched.error().message.find("4194304") != std::string::npos);  // small's budget, in its error
  CHECK_FALSE(engine_off->get(id));
}

TEST_CASE("cluster node: publish asks a member with room before one whose budget is full", "[cluster][node]") {
  if (!t::find_etcd()) {
    WARN("SKIP: no etcd binary (apt-get install etcd-server)");
    return;
  }
  t::temp_dir dir;
  t::etcd_process etcd{dir.path()};
  t::fake_clock clock;
  auto engine_a = t::make_engine(clock);
  auto engine_b = engine_with_budget(clock, std::uint64_t{4} << 20);  // "b" sorts first by id, and has no room
  auto engine_c = engine_with_budget(clock, std::uint64_t{64} << 20);
  const auto url = etcd.url("room");
  auto a = join(*engine_a, url, "a");
  auto b = join(*engine_b, url, "b");
  auto c = join(*engine_c, url, "c");
  REQUIRE(sees_members(*a, 3));
  auto hosts = a->members().hosts();
  REQUIRE_OK(hosts);
  CHECK_FALSE((*hosts)[0].free_bytes.has_value());  // a: no budget, nothing said
  CHECK((*hosts)[1].free_bytes == std::uint64_t{4} << 20);
  CHECK((*hosts)[2].free_bytes == std::uint64_t{64} << 20);

  const auto m = leafy_model();  // 12 MiB: fits c, not b
  auto committed = t::register_stable(*engine_a, m, static_cast<std::int32_t>(::getpid()));
  REQUIRE_OK(committed);
  const auto id = committed->descriptor.artifact_id;
  a->committed(id);
  auto published = a->publish(id, 2, false, 20s);
  REQUIRE_OK(published);
  CHECK(published->asked == std::vector<std::string>{"c"});
  CHECK(published->reached);
  CHECK(engine_c->get(id));
  CHECK_FALSE(engine_b->get(id));
  // c's room counts what it could evict: the replica it pulled (cache policy) is room still.
  CHECK(engine_c->stable_room() == std::uint64_t{64} << 20);
  CHECK_FALSE(engine_a->stable_room().has_value());
}

TEST_CASE("cluster node: publish follows the members while it waits", "[cluster][node]") {
  if (!t::find_etcd()) {
    WARN("SKIP: no etcd binary (apt-get install etcd-server)");
    return;
  }
  t::temp_dir dir;
  t::etcd_process etcd{dir.path()};
  t::fake_clock clock;
  // a holds the artifact (12 MiB); b is a member whose 4 MiB budget cannot hold it (its pulls
  // fail); c has room, and joins when the section says.
  struct members_abc {
    std::unique_ptr<registration::engine> engine_a, engine_b, engine_c;
    std::unique_ptr<node> a, b, c;
    std::string id;
  };
  const auto start = [&](const std::string& cluster) {
    members_abc m{t::make_engine(clock),
                  engine_with_budget(clock, std::uint64_t{4} << 20),
                  engine_with_budget(clock, std::uint64_t{64} << 20),
                  nullptr,
                  nullptr,
                  nullptr,
                  ""};
    m.a = join(*m.engine_a, etcd.url(cluster), "a");
    m.b = join(*m.engine_b, etcd.url(cluster), "b");
    REQUIRE(sees_members(*m.a, 2));
    auto committed = t::register_stable(*m.engine_a, leafy_model(), static_cast<std::int32_t>(::getpid()));
    REQUIRE_OK(committed);
    m.id = committed->descriptor.artifact_id;
    m.a->committed(m.id);
    return m;
  };

  SECTION("with all, a member that joins is asked and one that leaves is not waited for") {
    auto m = start("follow-all");
    auto publishing = std::async(std::launch::async, [&] { return m.a->publish(m.id, 0, true, 30s); });
    // c joins once b is asked: the publish has read the members without c.
    REQUIRE(eventually(
        [&] {
          auto asks = m.b->members().wanted();
          return asks && !asks->empty();
        },
        10s));
    m.c = join(*m.engine_c, etcd.url("follow-all"), "c");
    CHECK(eventually([&] { return m.engine_c->get(m.id).has_value(); }, 15s));  // asked once it joined
    CHECK(publishing.wait_for(500ms) == std::future_status::timeout);           // b has no replica yet
    m.b.reset();                                                                // b leaves: its lease goes
    REQUIRE(publishing.wait_for(15s) == std::future_status::ready);
    auto published = publishing.get();
    REQUIRE_OK(published);
    CHECK(published->holders == std::vector<std::string>{"a", "c"});
    CHECK(published->asked == std::vector<std::string>{"b", "c"});
    CHECK(published->target == 2);
    CHECK(published->members == 2);
    CHECK(published->reached);
    CHECK_FALSE(m.engine_b->get(m.id));
  }

  SECTION("an asked member whose pull fails declines, and one that has joined is asked instead") {
    auto m = start("follow-replicas");
    auto publishing = std::async(std::launch::async, [&] { return m.a->publish(m.id, 2, false, 30s); });
    // b, the only member to ask, cannot hold 12 MiB in its 4 MiB: its pull fails and it marks
    // the ask declined. c joins after that; the publish asks it.
    REQUIRE(eventually(
        [&] {
          const std::vector<std::string> b{"b"};
          auto asks = m.a->members().asks_of(b, m.id);
          return asks && asks->size() == 1 && (*asks)[0] && !(*asks)[0]->declined.empty();
        },
        10s));
    m.c = join(*m.engine_c, etcd.url("follow-replicas"), "c");
    REQUIRE(publishing.wait_for(20s) == std::future_status::ready);
    auto published = publishing.get();
    REQUIRE_OK(published);
    CHECK(published->holders == std::vector<std::string>{"a", "c"});
    CHECK(published->asked == std::vector<std::string>{"b", "c"});
    REQUIRE(published->declined.size() == 1);
    CHECK(published->declined[0].host_id == "b");
    INFO(published->declined[0].reason);
    CHECK(published->declined[0].reason.find("exceeds the stable budget of 4194304 bytes") != std::string::npos);
    CHECK(published->target == 2);
    CHECK(published->members == 3);
    CHECK(published->reached);
    CHECK(m.engine_c->get(m.id));
    CHECK_FALSE(m.engine_b->get(m.id));
    CHECK(m.b->members().registered());  // b stayed: it was replaced for its decline alone
  }
}

TEST_CASE("cluster node: a pull copies the leaves a lease here holds instead of fetching them", "[cluster][node]") {
  if (!t::find_etcd()) {
    WARN("SKIP: no etcd binary (apt-get install etcd-server)");
    return;
  }
  two_members cluster("lease-leaves", "a", "b");
  // b's process leases version 1 in place (its own memory, no stable replica); a holds version
  // 2, whose first two leaves are version 1's.
  const auto v1 = leafy_model();
  auto v2 = v1;
  auto& bytes = v2.storages[0].bytes;
  for (std::size_t i = std::size_t{8} << 20; i < bytes.size(); ++i) bytes[i] = static_cast<char>(~bytes[i]);
  auto leased = t::register_lip(*cluster.engine_b, v1, static_cast<std::int32_t>(::getpid()));
  REQUIRE_OK(leased);
  const auto id1 = leased->descriptor.artifact_id;
  CHECK_FALSE(cluster.engine_b->stable_replica_fd(id1));  // a lease only
  cluster.b->committed(id1);
  cluster.b->drain();
  CHECK(cluster.b->server().serves(id1));

  auto committed = t::register_stable(*cluster.engine_a, v2, static_cast<std::int32_t>(::getpid()));
  REQUIRE_OK(committed);
  const auto id2 = committed->descriptor.artifact_id;
  REQUIRE(id2 != id1);
  cluster.a->committed(id2);
  cluster.a->drain();
  REQUIRE_OK(cluster.b->fetch(id2));
  auto got = cluster.engine_b->open_bytes(id2);
  REQUIRE_OK(got);
  CHECK(read_all(**got) == v2.canonical());
  CHECK(cluster.a->server().stats().leaves_served == 2);  // the two that differ; two copied here
}

TEST_CASE("cluster node: an ask is served when it is written, not at the member's next look", "[cluster][node]") {
  if (!t::find_etcd()) {
    WARN("SKIP: no etcd binary (apt-get install etcd-server)");
    return;
  }
  // Looks a minute apart: only the watch of b's asks can make b pull within the publish's 20 s.
  two_members cluster("watched", "a", "b", 60s);
  auto& engine_a = cluster.engine_a;
  auto& engine_b = cluster.engine_b;
  auto& a = cluster.a;
  auto committed = t::register_stable(*engine_a, leafy_model(), static_cast<std::int32_t>(::getpid()));
  REQUIRE_OK(committed);
  const auto id = committed->descriptor.artifact_id;
  a->committed(id);
  auto published = a->publish(id, 2, false, 20s);
  REQUIRE_OK(published);
  CHECK(published->reached);
  CHECK(published->holders == std::vector<std::string>{"a", "b"});
  CHECK(engine_b->get(id));
}
