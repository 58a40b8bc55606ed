// tensorreg::client's persistence calls (StartPersistence, QueryPersistenceStatus,
// WaitPersistenceStatus) against a real tensorregd: typed task states, the daemon's codes and
// messages passed through, and the copy on disk reaching a restarted daemon.
#include "tensorreg/client/connection.hpp"

#include <catch2/catch.hpp>

#include <chrono>
#include <filesystem>

#include "support/daemon_process.hpp"
#include "support/safetensors_writer.hpp"
#include "support/temp_dir.hpp"

namespace {

using namespace tensorreg;
using client::connection;
using persistence::task_state;
using testing::daemon_process;

std::unique_ptr<index::safetensors_bundle> small_bundle(const testing::temp_dir& dir, std::uint32_t seed) {
  const auto path = dir.path() / ("model-" + std::to_string(seed) + ".safetensors");
  testing::write_safetensors(path, {{"w", "F32", {4096}, testing::pattern_bytes(16384, seed)},
                                    {"b", "BF16", {3}, testing::pattern_bytes(6, seed + 1)}});
  return index::safetensors_bundle::open({path.string()}).value();
}

connection connect(const daemon_process& d) {
  auto c = connection::connect(d.socket_path());
  REQUIRE(c);
  return std::move(*c);
}

bool holds_tier(connection& c, const std::string& id, client::tier t) {
  auto listed = c.list();
  REQUIRE(listed);
  for (const auto& a : *listed) {
    if (a.descriptor.artifact_id == id) return std::find(a.tiers.begin(), a.tiers.end(), t) != a.tiers.end();
  }
  return false;
}

}  // namespace

TEST_CASE("client connection: start, query and wait for persistence answer typed task states",
          "[client][connection][persistence]") {
  testing::temp_dir dir;
  const auto persist = (dir.path() / "persist").string();
  daemon_process d({"--persist-dir", persist});
  auto bundle = small_bundle(dir, 7);
  auto c = connect(d);
  auto put = c.put(*bundle);
  REQUIRE(put);
  const auto& id = put->descriptor.artifact_id;

  auto started = c.start_persistence(id);
  REQUIRE(started);
  CHECK_FALSE(started->task_id.empty());
  CHECK(started->artifact_id == id);
  CHECK((started->state == task_state::pending || started->state == task_state::running ||
         started->state == task_state::success));

  auto waited = c.wait_persistence(started->task_id, std::chrono::seconds(30));
  REQUIRE(waited);
  CHECK(waited->task_id == started->task_id);
  CHECK(waited->artifact_id == id);
  CHECK(waited->state == task_state::success);
  CHECK(waited->progress == Approx(1.0));
  CHECK(waited->last_error.empty());

  auto queried = c.query_persistence(started->task_id);
  REQUIRE(queried);
  CHECK(queried->state == task_state::success);
  CHECK(queried->artifact_id == id);
  auto by_artifact = c.query_persistence_of(id);
  REQUIRE(by_artifact);
  CHECK(by_artifact->artifact_id == id);
  CHECK(by_artifact->state == task_state::success);
  CHECK(holds_tier(c, id, client::tier::shared_disk));

  // A second start of a persisted artifact is a task that is already done.
  auto again = c.start_persistence(id);
  REQUIRE(again);
  CHECK(again->state == task_state::success);
}

TEST_CASE("client connection: persistence errors carry the daemon's code and message",
          "[client][connection][persistence]") {
  testing::temp_dir dir;
  SECTION("a daemon without --persist-dir refuses with FAILED_PRECONDITION") {
    daemon_process d;
    auto bundle = small_bundle(dir, 8);
    auto c = connect(d);
    auto put = c.put(*bundle);
    REQUIRE(put);
    auto started = c.start_persistence(put->descriptor.artifact_id);
    REQUIRE_FALSE(started);
    CHECK(started.error().code == errc::failed_precondition);
    CHECK_THAT(started.error().message, Catch::Contains("no persist directory") && Catch::Contains("--persist-dir") &&
                                            Catch::Contains(put->descriptor.artifact_id));
  }
  SECTION("unknown artifacts, tasks and profiles") {
    daemon_process d({"--persist-dir", (dir.path() / "persist").string()});
    auto c = connect(d);
    auto unknown = c.start_persistence("mi2:nothing:here");
    REQUIRE_FALSE(unknown);
    CHECK(unknown.error().code == errc::not_found);
    CHECK_THAT(unknown.error().message, Catch::Contains("no such artifact") && Catch::Contains("mi2:nothing:here"));

    auto no_task = c.query_persistence("task-that-never-was");
    REQUIRE_FALSE(no_task);
    CHECK(no_task.error().code == errc::not_found);
    CHECK_THAT(no_task.error().message, Catch::Contains("task-that-never-was"));

    auto no_wait = c.wait_persistence("task-that-never-was", std::chrono::milliseconds(10));
    REQUIRE_FALSE(no_wait);
    CHECK(no_wait.error().code == errc::not_found);

    auto empty = c.wait_persistence("");
    REQUIRE_FALSE(empty);
    CHECK(empty.error().code == errc::invalid_argument);
    CHECK_THAT(empty.error().message, Catch::Contains("the task id is empty"));

    auto bad_profile = c.start_persistence("mi2:nothing:here", {"no-such-profile", ""});
    REQUIRE_FALSE(bad_profile);
    CHECK(bad_profile.error().code == errc::invalid_argument);
    CHECK_THAT(bad_profile.error().message, Catch::Contains("no-such-profile"));
  }
}

TEST_CASE("client connection: a persisted artifact is got back by a restarted daemon",
          "[client][connection][persistence]") {
  testing::temp_dir dir;
  const auto persist = (dir.path() / "persist").string();
  auto bundle = small_bundle(dir, 9);
  std::string id;
  {
    daemon_process d({"--persist-dir", persist});
    auto c = connect(d);
    auto put = c.put(*bundle);
    REQUIRE(put);
    id = put->descriptor.artifact_id;
    auto started = c.start_persistence(id);
    REQUIRE(started);
    auto waited = c.wait_persistence(started->task_id);
    REQUIRE(waited);
    REQUIRE(waited->state == task_state::success);
  }
  daemon_process d({"--persist-dir", persist});
  auto c = connect(d);
  CHECK(holds_tier(c, id, client::tier::shared_disk));
  auto got = c.get(id);
  REQUIRE(got);
  CHECK(got->descriptor.artifact_id == id);
  CHECK(got->memory.size() == bundle->index().total_size());
  CHECK(holds_tier(c, id, client::tier::stable_dram));
}
