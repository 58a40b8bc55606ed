#include "tensorreg/persistence/task_table.hpp"

#include <catch2/catch.hpp>
#include <thread>

namespace {
using tensorreg::errc;
using tensorreg::persistence::task_state;
using tensorreg::persistence::task_table;
}  // namespace

TEST_CASE("task_table: a task moves PENDING, RUNNING, SUCCESS and one artifact has one live task",
          "[persistence][task_table]") {
  task_table t;
  auto a = t.start("mi2:a");
  CHECK(a.created);
  CHECK(a.status.state == task_state::pending);
  CHECK(a.status.plan_id == "local-disk");
  auto again = t.start("mi2:a");
  CHECK_FALSE(again.created);
  CHECK(again.status.task_id == a.status.task_id);
  t.set_running(a.status.task_id);
  t.set_progress(a.status.task_id, 0.5);
  CHECK(t.find(a.status.task_id)->state == task_state::running);
  CHECK(t.find(a.status.task_id)->progress == 0.5);
  t.finish(a.status.task_id, task_state::success);
  CHECK(t.newest_of("mi2:a")->state == task_state::success);
  CHECK(t.newest_of("mi2:a")->progress == 1.0);
  // Terminal: never moves again; a new start makes a new task.
  t.finish(a.status.task_id, task_state::failed, "late");
  CHECK(t.find(a.status.task_id)->state == task_state::success);
  auto next = t.start("mi2:a");
  CHECK(next.created);
  CHECK(next.status.task_id != a.status.task_id);
  t.finish(next.status.task_id, task_state::failed, "UNAVAILABLE: cannot write");
  CHECK(t.find(next.status.task_id)->last_error == "UNAVAILABLE: cannot write");
}

TEST_CASE("task_table: wait answers on expiry, on the end, and NOT_FOUND for unknown tasks",
          "[persistence][task_table][concurrency]") {
  task_table t;
  auto a = t.start("mi2:a");
  auto early = t.wait(a.status.task_id, std::chrono::milliseconds(20));
  REQUIRE(early);
  CHECK(early->state == task_state::pending);
  std::thread ender([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    t.finish(a.status.task_id, task_state::success);
  });
  auto waited = t.wait(a.status.task_id, std::chrono::milliseconds(0));
  ender.join();
  REQUIRE(waited);
  CHECK(waited->state == task_state::success);
  auto unknown = t.wait("nope", std::chrono::milliseconds(1));
  REQUIRE_FALSE(unknown);
  CHECK(unknown.error().code == errc::not_found);
  CHECK(unknown.error().message == "cannot wait for persistence task 'nope': no such task");
}

TEST_CASE("task_table: the oldest finished tasks are forgotten past the limit", "[persistence][task_table]") {
  task_table t(2);
  std::vector<std::string> ids;
  for (int i = 0; i < 3; ++i) {
    auto s = t.start("mi2:" + std::to_string(i));
    t.finish(s.status.task_id, task_state::success);
    ids.push_back(s.status.task_id);
  }
  CHECK(t.find(ids[0]).error().code == errc::not_found);
  CHECK(t.newest_of("mi2:0").error().code == errc::not_found);
  CHECK(t.find(ids[2]));
}
