// The ownership rule of DECISIONS §8: engine::check_owner and DeregisterArtifact's
// sole-holder rule.
#include "tensorreg/registration/engine.hpp"

#include <catch2/catch.hpp>

#include <unistd.h>

#include <string>

#include "support/engine_helpers.hpp"

namespace {

using namespace tensorreg;
using namespace tensorreg::registration;
using tensorreg::testing::fake_clock;
namespace t = tensorreg::testing;

const std::int32_t me = static_cast<std::int32_t>(::getpid());
const std::int32_t other = me + 1;

}  // namespace

TEST_CASE("engine ownership: a registration acts only for its owner, pending or committed",
          "[registration][engine_ownership]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto begun = e->begin(t::stable_begin(t::small_model(), me));
  REQUIRE_OK(begun);
  const auto& id = begun->registration_id;
  CHECK(e->check_owner(id, me, "commit registration"));
  CHECK_ERROR(e->check_owner(id, other, "commit registration"), errc::permission_denied,
              "cannot commit registration '" + id + "': it belongs to pid " + std::to_string(me) +
                  ", not to the calling process " + std::to_string(other));
  // Unknown ids pass: the call itself answers NOT_FOUND.
  CHECK(e->check_owner("reg_unknown", other, "abort registration"));

  std::string lease_id;
  REQUIRE_OK(t::register_lip(*e, t::small_model(), me, &lease_id));
  CHECK(e->check_owner(lease_id, me, "revoke registration"));
  CHECK_ERROR(e->check_owner(lease_id, other, "revoke registration"), errc::permission_denied,
              "cannot revoke registration '" + lease_id + "': it belongs to pid " + std::to_string(me) +
                  ", not to the calling process " + std::to_string(other));
}

TEST_CASE("engine ownership: deregister needs the caller to hold every lease and join",
          "[registration][engine_ownership]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto mine = t::register_lip(*e, m, me);  // a lease of this process
  REQUIRE_OK(mine);
  const auto artifact = mine->descriptor.artifact_id;
  REQUIRE_OK(t::register_stable(*e, m, me));       // the stable copy: the daemon's
  auto theirs = t::register_stable(*e, m, other);  // a join of another process
  REQUIRE_OK(theirs);
  REQUIRE(theirs->existed);

  deregister_request r;
  r.artifact_id = artifact;
  r.owner_pid = me;
  CHECK_ERROR(e->deregister(r), errc::permission_denied,
              "cannot deregister " + artifact + ": it is also held (leases or joins) by pid " + std::to_string(other) +
                  ", not only by the calling process " + std::to_string(me));
  auto kept = e->get(artifact);
  REQUIRE_OK(kept);
  CHECK(kept->leases == 1);
  CHECK(kept->joined_refs == 1);
  CHECK_FALSE(kept->quiesced);
  // Nothing was quiesced: the artifact still takes new joins.
  REQUIRE_OK(t::register_stable(*e, m, me));

  SECTION("the embedder (owner_pid 0) may") {
    r.owner_pid = 0;
    auto done = e->deregister(r);
    REQUIRE_OK(done);
    CHECK(done->removed);
  }
  SECTION("the caller may once the others let go") {
    e->release_owner(other);
    auto done = e->deregister(r);
    REQUIRE_OK(done);
    CHECK(done->removed);
    CHECK_CODE(e->get(artifact), errc::not_found);
  }
}

TEST_CASE("engine ownership: an artifact only the stable cache holds may be deregistered by anyone",
          "[registration][engine_ownership]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto committed = t::register_stable(*e, t::small_model(), me);
  REQUIRE_OK(committed);
  deregister_request r;
  r.artifact_id = committed->descriptor.artifact_id;
  r.owner_pid = other;
  auto done = e->deregister(r);
  REQUIRE_OK(done);
  CHECK(done->removed);
}

TEST_CASE("engine ownership: the daemon's copy of an artifact is removed only by the uid that put it, or root",
          "[registration][engine_ownership]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto begun_request = t::stable_begin(m, me);
  begun_request.owner_uid = 1000;
  auto begun = e->begin(begun_request);
  REQUIRE_OK(begun);
  REQUIRE_OK(t::feed_chunks(*e, begun->registration_id, m.canonical(), 16));
  auto committed = e->commit(begun->registration_id);
  REQUIRE_OK(committed);
  const auto artifact = committed->descriptor.artifact_id;

  deregister_request r;
  r.artifact_id = artifact;
  r.owner_pid = other;
  r.owner_uid = 1001;
  CHECK_ERROR(e->deregister(r), errc::permission_denied,
              "cannot deregister " + artifact +
                  ": its stable DRAM copy was put by uid 1000, not by the calling uid 1001 (only that uid or root "
                  "may remove it)");
  auto kept = e->get(artifact);
  REQUIRE_OK(kept);
  CHECK(kept->stable_replica);
  CHECK_FALSE(kept->quiesced);
  CHECK(e->stats().stable_bytes == 40);

  SECTION("the same uid may, from another process") {
    r.owner_uid = 1000;
    auto done = e->deregister(r);
    REQUIRE_OK(done);
    CHECK(done->removed);
  }
  SECTION("root may") {
    r.owner_uid = 0;
    auto done = e->deregister(r);
    REQUIRE_OK(done);
    CHECK(done->removed);
  }
  SECTION("the embedder (no uid) may") {
    r.owner_uid.reset();
    r.owner_pid = 0;
    auto done = e->deregister(r);
    REQUIRE_OK(done);
    CHECK(done->removed);
  }
  CHECK_CODE(e->get(artifact), errc::not_found);
  CHECK(e->stats().stable_bytes == 0);
}

TEST_CASE("engine ownership: holding a lease does not let another uid remove the daemon's copy",
          "[registration][engine_ownership]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto begun_request = t::stable_begin(m, other);
  begun_request.owner_uid = 1000;
  auto begun = e->begin(begun_request);
  REQUIRE_OK(begun);
  REQUIRE_OK(t::feed_chunks(*e, begun->registration_id, m.canonical(), 40));
  REQUIRE_OK(e->commit(begun->registration_id));
  auto leased = t::register_lip(*e, m, me);  // the caller's own lease of the same bytes
  REQUIRE_OK(leased);
  deregister_request r;
  r.artifact_id = leased->descriptor.artifact_id;
  r.owner_pid = me;
  r.owner_uid = 1001;
  CHECK_CODE(e->deregister(r), errc::permission_denied);
  auto kept = e->get(r.artifact_id);
  REQUIRE_OK(kept);
  CHECK(kept->leases == 1);
  CHECK(kept->stable_replica);
}
