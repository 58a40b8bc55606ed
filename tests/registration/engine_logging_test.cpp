// The engine's log lines: one per event at info (rejects, evictions, revokes, owner death,
// expiry), naming the registration or artifact id and the owner pid; successes at debug.
#include "tensorreg/registration/engine.hpp"

#include <catch2/catch.hpp>

#include <unistd.h>

#include <chrono>

#include "support/engine_helpers.hpp"
#include "support/recording_logger.hpp"

namespace {

using namespace tensorreg;
using namespace tensorreg::registration;
using std::chrono::milliseconds;
using tensorreg::testing::fake_clock;
using tensorreg::testing::recording_logger;
namespace t = tensorreg::testing;

const std::int32_t me = static_cast<std::int32_t>(::getpid());

struct rig {
  fake_clock clock;
  recording_logger log;
  std::unique_ptr<engine> e;

  explicit rig(std::uint64_t stable_bytes = 0) {
    auto options = t::deterministic_options(clock);
    options.log = &log;
    options.stable_bytes = stable_bytes;
    e = t::make_engine(options);
  }
};

}  // namespace

TEST_CASE("engine logging: a rejected call is one info line with its code, message, id and pid",
          "[registration][engine_logging]") {
  rig r;
  CHECK_CODE(r.e->commit("reg_nope"), errc::not_found);
  CHECK(r.log.count(log_level::info, "commit of registration reg_nope", "rejected", "NOT_FOUND",
                    "cannot commit registration 'reg_nope': no such registration") == 1);
  auto bad = t::lip_begin(40, me);
  bad.total_size = 0;
  CHECK_CODE(r.e->begin(bad), errc::invalid_argument);
  CHECK(r.log.count(log_level::info, "begin", "owner_pid " + std::to_string(me), "rejected", "INVALID_ARGUMENT",
                    "total_size must be > 0") == 1);
  CHECK_CODE(r.e->deregister({"mi2:x", true, 0, me}), errc::not_found);
  CHECK(r.log.count(log_level::info, "deregister of artifact mi2:x", "owner_pid " + std::to_string(me), "NOT_FOUND") ==
        1);

  auto begun = r.e->begin(t::lip_begin(40, me));
  REQUIRE_OK(begun);
  CHECK_CODE(r.e->keep_alive({begun->registration_id, 1000, 1, me + 1}), errc::permission_denied);
  CHECK(r.log.count(log_level::info, "keep-alive of registration " + begun->registration_id, "PERMISSION_DENIED") == 1);
  feed_request empty;
  empty.registration_id = begun->registration_id;
  CHECK_CODE(r.e->feed(empty), errc::invalid_argument);
  CHECK(r.log.count(log_level::info, "feed of registration " + begun->registration_id,
                    "owner_pid " + std::to_string(me), "INVALID_ARGUMENT", "missing feed payload") == 1);
  REQUIRE_OK(r.e->abort(begun->registration_id));
  CHECK_CODE(r.e->abort(begun->registration_id), errc::not_found);
  CHECK(r.log.count(log_level::info, "abort of registration " + begun->registration_id, "NOT_FOUND") == 1);
}

TEST_CASE("engine logging: Begin and Commit successes are debug lines", "[registration][engine_logging]") {
  rig r;
  std::string id;
  auto put = t::register_stable(*r.e, t::small_model(), me, &id);
  REQUIRE_OK(put);
  CHECK(r.log.count(log_level::debug, "began registration " + id, "owner_pid " + std::to_string(me), "stable_dram") ==
        1);
  CHECK(r.log.count(log_level::debug, "committed registration " + id, put->descriptor.artifact_id) == 1);
  CHECK(r.log.count(log_level::info, "rejected") == 0);
}

TEST_CASE("engine logging: an eviction from the stable DRAM cache names the artifact, its bytes and why",
          "[registration][engine_logging]") {
  rig r(40);
  auto first = t::register_stable(*r.e, t::small_model(), me);
  REQUIRE_OK(first);
  t::model other = t::small_model();
  other.storages[1].bytes = t::pattern(20, 99);
  auto second = t::register_stable(*r.e, other, me);
  REQUIRE_OK(second);
  CHECK(r.e->stats().stable_evictions == 1);
  CHECK(r.log.count(log_level::info, "evicted artifact " + first->descriptor.artifact_id, "40 bytes", "capacity") == 1);
}

TEST_CASE("engine logging: a revoke names the registration, the pid and the reason", "[registration][engine_logging]") {
  rig r;
  std::string leased;
  REQUIRE_OK(t::register_lip(*r.e, t::small_model(), me, &leased));
  r.e->revoke(leased, "the client asked");
  CHECK(r.log.count(log_level::info, "lease " + leased, "owner_pid " + std::to_string(me),
                    "revoked: the client asked") == 1);

  auto pending = r.e->begin(t::lip_begin(40, me));
  REQUIRE_OK(pending);
  r.e->revoke(pending->registration_id, "shutting down");
  CHECK(r.log.count(log_level::info, "registration " + pending->registration_id, "owner_pid " + std::to_string(me),
                    "revoked", "shutting down") == 1);
}

TEST_CASE("engine logging: an owner's death names the pid and what was released", "[registration][engine_logging]") {
  rig r;
  std::string leased;
  REQUIRE_OK(t::register_lip(*r.e, t::small_model(), me, &leased));
  auto pending = r.e->begin(t::lip_begin(40, me));
  REQUIRE_OK(pending);
  r.e->release_owner(me);
  CHECK(r.log.count(log_level::info, "owner_pid " + std::to_string(me) + " exited", pending->registration_id, leased) ==
        1);
  CHECK(r.e->stats().pending_registrations == 0);
  CHECK(r.e->stats().leases == 0);
}

TEST_CASE("engine logging: a TTL expiry names the registration and pid", "[registration][engine_logging]") {
  rig r;
  auto pending = r.e->begin(t::lip_begin(40, me, 1000));
  REQUIRE_OK(pending);
  std::string leased;
  REQUIRE_OK(t::register_lip(*r.e, t::small_model(), me, &leased));
  REQUIRE_OK(r.e->keep_alive({leased, 500, 1, me}));
  r.clock.advance(milliseconds(1000));
  r.e->sweep();
  CHECK(r.log.count(log_level::info, "registration " + pending->registration_id, "owner_pid " + std::to_string(me),
                    "expired") == 1);
  CHECK(r.log.count(log_level::info, "lease " + leased, "owner_pid " + std::to_string(me), "expired") == 1);
}
