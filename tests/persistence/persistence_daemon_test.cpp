// The real tensorregd with --persist-dir: SIGKILL and restart, after and during persistence.
// First include is the client these cases drive the daemon with.
#include "client/raw_connection.hpp"

#include <signal.h>
#include <stdlib.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <filesystem>
#include <map>
#include <random>
#include <thread>

#include "support/daemon_process.hpp"
#include "support/safetensors_writer.hpp"
#include "support/temp_dir.hpp"
#include "tensorreg/client/connection.hpp"
#include "tensorreg/index/safetensors_bundle.hpp"
#include "tensorreg/persistence/durable_store.hpp"

namespace {

namespace fs = std::filesystem;
namespace wire = tensorreg::wire::v1;
namespace common = tensorcast::common::v1;
using raw_connection = tensorreg::client::raw::connection;
using tensorreg::testing::daemon_process;
using tensorreg::testing::temp_dir;

fs::path model_file(const fs::path& dir, std::uint32_t seed, std::size_t bytes) {
  const auto path = dir / ("model-" + std::to_string(seed) + ".safetensors");
  tensorreg::testing::write_safetensors(
      path, {{"w", "F32", {static_cast<std::int64_t>(bytes / 4)}, tensorreg::testing::pattern_bytes(bytes, seed)}});
  return path;
}

std::unique_ptr<tensorreg::index::safetensors_bundle> bundle_of(const fs::path& path) {
  auto b = tensorreg::index::safetensors_bundle::open({path.string()});
  REQUIRE(b);
  return std::move(*b);
}

std::string canonical_bytes(const tensorreg::index::safetensors_bundle& b) {
  std::string out(b.canonical().size(), '\0');
  REQUIRE(b.canonical().read(0, std::as_writable_bytes(std::span(out.data(), out.size()))));
  return out;
}

std::string persisted_bytes(tensorreg::client::connection& c, const std::string& id) {
  auto got = c.get(id);
  REQUIRE(got);
  auto bytes = got->memory.bytes();
  return {reinterpret_cast<const char*>(bytes.data()), static_cast<std::size_t>(got->descriptor.total_size)};
}

// QueryPersistenceStatus by artifact, then WaitPersistenceStatus until it ends.
common::PersistenceState wait_persisted(const std::string& socket, const std::string& id) {
  auto raw = raw_connection::connect(socket);
  REQUIRE(raw);
  wire::Request query;
  query.mutable_query_persistence_status()->set_artifact_id(id);
  auto queried = (*raw)->call(query);
  REQUIRE(queried);
  wire::Request wait;
  wait.mutable_wait_persistence_status()->set_task_id(queried->response.query_persistence_status().task_id());
  auto waited = (*raw)->call(wait);
  REQUIRE(waited);
  return waited->response.wait_persistence_status().status().state();
}

std::vector<tensorreg::client::tier> tiers_of(tensorreg::client::connection& c, const std::string& id) {
  auto listed = c.list();
  REQUIRE(listed);
  for (const auto& a : *listed) {
    if (a.descriptor.artifact_id == id) return a.tiers;
  }
  return {};
}

}  // namespace

TEST_CASE("tensorregd: put, persist, SIGKILL, restart, get gives the same id and bytes", "[persistence][daemon][e2e]") {
  temp_dir dir;
  const auto persist = (dir.path() / "persist").string();
  auto bundle = bundle_of(model_file(dir.path(), 61, (std::size_t{6} << 20) + 12));
  std::string id;
  {
    daemon_process d({"--persist-dir", persist});
    auto c = tensorreg::client::connection::connect(d.socket_path());
    REQUIRE(c);
    tensorreg::client::put_options o;
    o.profile = "durable";
    auto put = c->put(*bundle, o);
    REQUIRE(put);
    id = put->descriptor.artifact_id;
    CHECK(wait_persisted(d.socket_path(), id) == common::PERSISTENCE_STATE_SUCCESS);
    CHECK(d.stop(SIGKILL) == 128 + SIGKILL);
  }
  daemon_process d({"--persist-dir", persist});
  auto c = tensorreg::client::connection::connect(d.socket_path());
  REQUIRE(c);
  using tensorreg::client::tier;
  CHECK(tiers_of(*c, id) == std::vector<tier>{tier::shared_disk});
  CHECK(wait_persisted(d.socket_path(), id) == common::PERSISTENCE_STATE_SUCCESS);
  CHECK(persisted_bytes(*c, id) == canonical_bytes(*bundle));  // loaded back on demand
  CHECK(tiers_of(*c, id) == std::vector<tier>{tier::stable_dram, tier::shared_disk});
  auto index = c->index(id);
  REQUIRE(index);
  CHECK(index->index_json == bundle->index().json());
}

TEST_CASE("tensorregd: SIGKILL in the middle of persistence never leaves a partial artifact listed",
          "[persistence][daemon][e2e]") {
  temp_dir dir;
  const auto persist = (dir.path() / "persist").string();
  std::map<std::string, std::string> bytes_of;  // every id put, and its canonical bytes
  std::mt19937 rng(1234);
  const std::size_t size = std::size_t{6} << 20;
  // Slowed writes (1 MiB chunks, 2 ms apart): each write takes some 15 ms or more (fsyncs
  // besides), and the kill lands anywhere from before it starts to after it ends.
  ::setenv("TENSORREG_PERSIST_CHUNK_PAUSE_US", "2000", 1);
  for (std::uint32_t round = 0; round < 30; ++round) {
    daemon_process d({"--persist-dir", persist, "--log-level", "warn"});
    auto c = tensorreg::client::connection::connect(d.socket_path());
    REQUIRE(c);
    auto bundle = bundle_of(model_file(dir.path(), 100 + round, size));
    tensorreg::client::put_options o;
    o.profile = "durable";
    auto put = c->put(*bundle, o);
    REQUIRE(put);
    bytes_of[put->descriptor.artifact_id] = canonical_bytes(*bundle);
    std::this_thread::sleep_for(std::chrono::microseconds(std::uniform_int_distribution<int>(0, 120'000)(rng)));
    CHECK(d.stop(SIGKILL) == 128 + SIGKILL);
    fs::remove(dir.path() / ("model-" + std::to_string(100 + round) + ".safetensors"));
  }
  ::unsetenv("TENSORREG_PERSIST_CHUNK_PAUSE_US");

  daemon_process d({"--persist-dir", persist});
  auto c = tensorreg::client::connection::connect(d.socket_path());
  REQUIRE(c);
  auto listed = c->list();
  REQUIRE(listed);
  std::size_t verified = 0;
  for (const auto& a : *listed) {
    const auto& id = a.descriptor.artifact_id;
    REQUIRE(bytes_of.count(id) == 1);
    CHECK(persisted_bytes(*c, id) == bytes_of[id]);  // every leaf checked on the way in
    ++verified;
  }
  INFO("persisted whole before the kill: " << verified << " of 30");
  CHECK(verified > 0);
  CHECK(verified <= 30);
  // Nothing partial left behind, nothing damaged found.
  for (const auto& e : fs::directory_iterator(persist)) {
    CHECK_FALSE(e.path().filename().string().starts_with(".tmp-"));
  }
  CHECK(fs::is_empty(fs::path(persist) / "quarantine"));
  CHECK_THAT(d.output(), Catch::Contains("artifacts, 0 quarantined") && !Catch::Contains("failed verification"));
}

TEST_CASE("tensorregd: daemons sharing a persist volume read each other's copies and removals",
          "[persistence][daemon][e2e][shared]") {
  temp_dir dir;
  const auto persist = (dir.path() / "persist").string();
  auto bundle = bundle_of(model_file(dir.path(), 71, (std::size_t{5} << 20) + 8));
  // Both started before anything is persisted: the reader's start-up scan cannot have seen it.
  daemon_process writer({"--persist-dir", persist, "--persist-volume", "models"});
  daemon_process reader({"--persist-dir", persist, "--persist-volume", "models"});
  daemon_process alone({"--persist-dir", (dir.path() / "private").string()});
  auto w = tensorreg::client::connection::connect(writer.socket_path());
  auto r = tensorreg::client::connection::connect(reader.socket_path());
  REQUIRE(w);
  REQUIRE(r);
  tensorreg::client::put_options o;
  o.profile = "durable";
  auto put = w->put(*bundle, o);
  REQUIRE(put);
  const auto id = put->descriptor.artifact_id;
  REQUIRE(wait_persisted(writer.socket_path(), id) == common::PERSISTENCE_STATE_SUCCESS);

  // The reader never held it: it lists the copy on the shared volume, and loads it from there.
  using tensorreg::client::tier;
  CHECK(tiers_of(*r, id) == std::vector<tier>{tier::shared_disk});
  CHECK(wait_persisted(reader.socket_path(), id) == common::PERSISTENCE_STATE_SUCCESS);
  auto index = r->index(id);
  REQUIRE(index);
  CHECK(index->index_json == bundle->index().json());
  CHECK(persisted_bytes(*r, id) == canonical_bytes(*bundle));
  CHECK(tiers_of(*r, id) == std::vector<tier>{tier::stable_dram, tier::shared_disk});
  // A daemon with a persist directory of its own does not see it.
  auto a = tensorreg::client::connection::connect(alone.socket_path());
  REQUIRE(a);
  auto missing = a->get(id);
  REQUIRE_FALSE(missing);
  CHECK(missing.error().code == tensorreg::errc::not_found);

  // Deregistered on the writer, the copy is gone from the volume; the reader keeps the replica
  // it loaded, and its own deregister finds the disk copy gone, not damaged.
  REQUIRE(w->deregister(id));
  CHECK_FALSE(fs::exists(fs::path(persist) / tensorreg::persistence::durable_store::directory_name(id)));
  CHECK(persisted_bytes(*r, id) == canonical_bytes(*bundle));
  REQUIRE(r->deregister(id));
  auto after = r->get(id);
  REQUIRE_FALSE(after);
  CHECK(after.error().code == tensorreg::errc::not_found);
  CHECK(fs::is_empty(fs::path(persist) / "quarantine"));
}
