// The pending registration's phases and their transitions, and the pending table's tombstones,
// driven directly through a scripted plan (no engine).
#include "registration/pending_registration.hpp"

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "support/engine_helpers.hpp"
#include "support/fake_clock.hpp"

namespace {

using namespace tensorreg;
using namespace tensorreg::registration;
using namespace tensorreg::registration::detail;
using std::chrono::milliseconds;
using tensorreg::testing::fake_clock;

// A plan whose Feed work can be held open, and that counts what it is asked to do.
class scripted_plan final : public plan {
 public:
  struct script {
    std::mutex mutex;
    std::condition_variable changed;
    bool hold_feed = false;  // feed work blocks until released
    int feeds_inside = 0;    // feed work running now
    int feeds_done = 0;
    int releases = 0;
  };

  explicit scripted_plan(std::shared_ptr<script> s) : script_(std::move(s)) {}

  [[nodiscard]] std::string_view name() const noexcept override { return "scripted"; }
  [[nodiscard]] result<feed_work> feed(feed_request& request, const registration_facts& /*facts*/,
                                       regions::region_registry& /*regions*/, const std::string& what) override {
    if (std::holds_alternative<std::monostate>(request.payload)) {
      return fail(errc::invalid_argument, what + ": scripted rejection");
    }
    return feed_work([s = script_] {
      std::unique_lock lock(s->mutex);
      ++s->feeds_inside;
      s->changed.notify_all();
      s->changed.wait(lock, [&] { return !s->hold_feed; });
      --s->feeds_inside;
      ++s->feeds_done;
      s->changed.notify_all();
      return status{};
    });
  }
  [[nodiscard]] result<commit_response> commit(commit_context& /*ctx*/) override { return commit_response{}; }
  void release(regions::region_registry& /*regions*/) noexcept override {
    std::lock_guard lock(script_->mutex);
    ++script_->releases;
  }

 private:
  std::shared_ptr<script> script_;
};

struct rig {
  fake_clock clock;
  regions::region_registry regions{clock};
  std::shared_ptr<scripted_plan::script> script = std::make_shared<scripted_plan::script>();
  pending_registration p;

  explicit rig(std::uint32_t ttl_ms = 0)
      : p(registration_facts{"reg_1", 42, 0, 40, "", {}}, ttl_ms, ttl_deadline(clock, ttl_ms),
          std::make_unique<scripted_plan>(script)) {}

  status feed() {
    feed_request r;
    r.registration_id = "reg_1";
    r.payload = view_chunk{0, 0, "x"};
    return p.feed(std::move(r), clock, regions);
  }
};

}  // namespace

TEST_CASE("pending_registration: begins open, and a commit that succeeds closes it",
          "[registration][pending_registration]") {
  rig r;
  CHECK(r.p.phase() == pending_phase::open);
  REQUIRE_OK(r.p.begin_commit());
  CHECK(r.p.phase() == pending_phase::committing);
  CHECK(r.p.committing_plan().name() == "scripted");
  const auto end = r.p.finish_commit(commit_outcome::ok);
  CHECK_FALSE(end.stays_open);
  CHECK_FALSE(end.drop);
  CHECK(r.p.phase() == pending_phase::committed);
  CHECK(pending_phase_name(r.p.phase()) == "committed");
}

TEST_CASE("pending_registration: a second commit while one runs is FAILED_PRECONDITION",
          "[registration][pending_registration]") {
  rig r;
  REQUIRE_OK(r.p.begin_commit());
  CHECK_ERROR(r.p.begin_commit(), errc::failed_precondition,
              "cannot commit registration 'reg_1': a commit is already running");
  CHECK(r.p.phase() == pending_phase::committing);
}

TEST_CASE("pending_registration: feed and commit of a closed registration are NOT_FOUND",
          "[registration][pending_registration]") {
  SECTION("committed") {
    rig r;
    REQUIRE_OK(r.p.begin_commit());
    (void)r.p.finish_commit(commit_outcome::failed);
    CHECK(r.p.phase() == pending_phase::committed);
    CHECK_ERROR(r.feed(), errc::not_found, "cannot feed registration 'reg_1': no such registration");
    CHECK_ERROR(r.p.begin_commit(), errc::not_found, "cannot commit registration 'reg_1': no such registration");
  }
  SECTION("dropped") {
    rig r;
    REQUIRE(r.p.request_drop());
    CHECK(r.p.phase() == pending_phase::dropped);
    CHECK_ERROR(r.feed(), errc::not_found, "cannot feed registration 'reg_1': no such registration");
    CHECK_ERROR(r.p.begin_commit(), errc::not_found, "cannot commit registration 'reg_1': no such registration");
    CHECK_FALSE(r.p.request_drop());  // dropped once only
  }
}

TEST_CASE("pending_registration: feed while committing is FAILED_PRECONDITION",
          "[registration][pending_registration]") {
  rig r;
  REQUIRE_OK(r.p.begin_commit());
  CHECK_ERROR(r.feed(), errc::failed_precondition, "cannot feed registration 'reg_1': it is being committed");
}

TEST_CASE("pending_registration: a plan's feed rejection is passed on and runs no work",
          "[registration][pending_registration]") {
  rig r;
  feed_request bad;
  bad.registration_id = "reg_1";
  CHECK_ERROR(r.p.feed(std::move(bad), r.clock, r.regions), errc::invalid_argument,
              "cannot feed registration 'reg_1': scripted rejection");
  CHECK(r.script->feeds_done == 0);
  REQUIRE_OK(r.feed());
  CHECK(r.script->feeds_done == 1);
}

TEST_CASE("pending_registration: a retryable commit failure reopens it", "[registration][pending_registration]") {
  rig r;
  REQUIRE_OK(r.p.begin_commit());
  const auto end = r.p.finish_commit(commit_outcome::retryable);
  CHECK(end.stays_open);
  CHECK_FALSE(end.drop);
  CHECK(r.p.phase() == pending_phase::open);
  REQUIRE_OK(r.feed());
  REQUIRE_OK(r.p.begin_commit());
}

TEST_CASE("pending_registration: a drop asked while committing is deferred to the commit's end",
          "[registration][pending_registration]") {
  SECTION("the commit closes it: the caller undoes what it published") {
    rig r;
    REQUIRE_OK(r.p.begin_commit());
    CHECK_FALSE(r.p.request_drop());
    CHECK(r.p.phase() == pending_phase::committing);
    const auto end = r.p.finish_commit(commit_outcome::ok);
    CHECK_FALSE(end.stays_open);
    CHECK(end.drop);
    CHECK(r.p.phase() == pending_phase::committed);
    CHECK_FALSE(r.p.request_drop());
  }
  SECTION("a retryable failure reopens it, and the drop then goes through once") {
    rig r;
    REQUIRE_OK(r.p.begin_commit());
    CHECK_FALSE(r.p.request_drop());
    const auto end = r.p.finish_commit(commit_outcome::retryable);
    CHECK(end.stays_open);
    CHECK(end.drop);
    CHECK(r.p.request_drop());
    CHECK(r.p.phase() == pending_phase::dropped);
    r.p.release(r.regions);
    CHECK(r.script->releases == 1);
  }
}

TEST_CASE("pending_registration: expiry follows the TTL, which Feed and KeepAlive extend, but never while committing",
          "[registration][pending_registration]") {
  rig r(1000);
  CHECK_FALSE(r.p.expired(r.clock.now()));
  r.clock.advance(milliseconds(900));
  REQUIRE_OK(r.feed());  // every Feed message is a keep-alive
  r.clock.advance(milliseconds(900));
  CHECK_FALSE(r.p.expired(r.clock.now()));
  REQUIRE_OK(r.p.keep_alive(42, 7, 5000, r.clock));
  CHECK(r.p.ttl_ms() == 5000);
  CHECK(r.p.epoch() == 7);
  r.clock.advance(milliseconds(4900));
  CHECK_FALSE(r.p.expired(r.clock.now()));
  r.clock.advance(milliseconds(100));
  CHECK(r.p.expired(r.clock.now()));
  REQUIRE_OK(r.p.begin_commit());
  CHECK_FALSE(r.p.expired(r.clock.now()));
}

TEST_CASE("pending_registration: keep-alive from another pid is PERMISSION_DENIED",
          "[registration][pending_registration]") {
  rig r(1000);
  CHECK_ERROR(r.p.keep_alive(43, 1, 5000, r.clock), errc::permission_denied,
              "cannot keep registration 'reg_1' alive: owner_pid 43 is not the registration's owner 42");
  CHECK(r.p.ttl_ms() == 1000);
  CHECK(r.p.epoch() == 0);
}

TEST_CASE("pending_registration: commit waits for a Feed copy running outside the lock",
          "[registration][pending_registration][concurrency]") {
  rig r;
  {
    std::lock_guard lock(r.script->mutex);
    r.script->hold_feed = true;
  }
  // Catch's assertions are not thread-safe: the threads keep their results for the main thread.
  std::atomic<bool> fed{false};
  std::thread feeder([&] { fed = r.feed().has_value(); });
  {
    std::unique_lock lock(r.script->mutex);
    r.script->changed.wait(lock, [&] { return r.script->feeds_inside == 1; });
  }
  std::atomic<bool> committing{false};
  std::atomic<bool> commit_admitted{false};
  std::thread committer([&] {
    commit_admitted = r.p.begin_commit().has_value();
    committing = true;
  });
  std::this_thread::sleep_for(milliseconds(50));
  CHECK_FALSE(committing.load());  // still waiting for the copy
  {
    std::lock_guard lock(r.script->mutex);
    r.script->hold_feed = false;
  }
  r.script->changed.notify_all();
  feeder.join();
  committer.join();
  CHECK(fed.load());
  CHECK(commit_admitted.load());
  CHECK(committing.load());
  CHECK(r.script->feeds_done == 1);
  CHECK(r.p.phase() == pending_phase::committing);
}

TEST_CASE("pending_registration: release after a drop waits for a Feed copy to finish",
          "[registration][pending_registration][concurrency]") {
  rig r;
  {
    std::lock_guard lock(r.script->mutex);
    r.script->hold_feed = true;
  }
  std::atomic<bool> fed{false};  // checked on the main thread: Catch is not thread-safe
  std::thread feeder([&] { fed = r.feed().has_value(); });
  {
    std::unique_lock lock(r.script->mutex);
    r.script->changed.wait(lock, [&] { return r.script->feeds_inside == 1; });
  }
  const bool dropped = r.p.request_drop();
  std::thread releaser([&] { r.p.release(r.regions); });
  std::this_thread::sleep_for(milliseconds(50));
  {
    std::lock_guard lock(r.script->mutex);
    CHECK(r.script->releases == 0);  // the copy still writes into the plan's memory
    r.script->hold_feed = false;
  }
  r.script->changed.notify_all();
  feeder.join();
  releaser.join();
  CHECK(dropped);
  CHECK(fed.load());
  CHECK(r.script->releases == 1);
}

TEST_CASE("pending_table: a tombstone answers once and is forgotten after its life",
          "[registration][pending_registration]") {
  fake_clock clock;
  pending_table table;
  table.bury("reg_a", clock.now());
  table.bury("reg_b", clock.now());
  CHECK(table.buried("reg_a"));
  CHECK(table.unbury("reg_a"));
  CHECK_FALSE(table.unbury("reg_a"));
  clock.advance(pending_table::tombstone_life - milliseconds(1));
  table.forget_tombstones(clock.now());
  CHECK(table.buried("reg_b"));
  clock.advance(milliseconds(1));
  table.forget_tombstones(clock.now());
  CHECK_FALSE(table.buried("reg_b"));
}

TEST_CASE("pending_table: registrations by id", "[registration][pending_registration]") {
  rig r;
  pending_table table;
  auto p = std::make_shared<pending_registration>(registration_facts{"reg_2", 7, 0, 40, "", {}}, 0, std::nullopt,
                                                  std::make_unique<scripted_plan>(r.script));
  table.insert(p);
  CHECK(table.size() == 1);
  CHECK(table.find("reg_2") == p);
  CHECK(table.find("reg_3") == nullptr);
  CHECK(table.all().size() == 1);
  table.erase("reg_2");
  CHECK(table.size() == 0);
}
