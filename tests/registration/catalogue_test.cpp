// The catalogue of committed artifacts: holders, revoke, expiry, owner death, and
// quiesce → drain → remove with its condition-variable drain, driven directly (no engine).
#include "registration/catalogue.hpp"

#include <catch2/catch.hpp>

#include <chrono>
#include <thread>

#include "registration/plans/plan.hpp"
#include "support/engine_helpers.hpp"
#include "support/fake_clock.hpp"
#include "tensorreg/hash/multihash.hpp"

namespace {

using namespace tensorreg;
using namespace tensorreg::registration;
using namespace tensorreg::registration::detail;
using std::chrono::milliseconds;
using tensorreg::testing::fake_clock;
namespace t = tensorreg::testing;

struct rig {
  fake_clock clock;
  regions::region_registry regions{clock};
  catalogue cat{regions, 0, clock};
  std::shared_ptr<const index::canonical_index> idx =
      std::make_shared<const index::canonical_index>(t::small_model().index());

  // An artifact held by a GPU replica on device 0 whose bytes are `seed`'s pattern.
  artifact& replica(const std::string& cgid, std::uint32_t seed = 1) {
    registration_facts facts{"reg_" + cgid, 7, 0, 40, cgid, {}};
    auto& a = cat.add(describe(facts, *idx, std::nullopt), idx);
    a.gpu_replicas.emplace(0, device_buffer{std::make_shared<t::owned_bytes>(t::pattern(40, seed)), "ipc"});
    return a;
  }
  // An artifact held by a join only.
  artifact& joined(const std::string& cgid, const std::string& registration_id, std::int32_t owner,
                   std::optional<clock::time_point> expires = std::nullopt) {
    registration_facts facts{registration_id, owner, 0, 40, cgid, {}};
    auto& a = cat.add(describe(facts, *idx, std::nullopt), idx);
    cat.add_join(a, join{registration_id, owner, expires});
    return a;
  }
};

regions::register_request host_region(std::int32_t owner) {
  regions::register_request r;
  r.kind = regions::memory_kind::host_shared;
  r.owner_pid = owner;
  r.size_bytes = 4096;
  r.host_shared = regions::host_shared_spec{"", true, regions::host_shared_class::scratch};
  return r;
}

}  // namespace

TEST_CASE("catalogue: an artifact is held while something holds it, and gone after", "[registration][catalogue]") {
  rig r;
  CHECK(r.cat.state_of("cg:a") == artifact_state::gone);
  r.joined("cg:a", "reg_1", 7);
  CHECK(r.cat.state_of("cg:a") == artifact_state::held);
  auto summary = r.cat.get("cg:a");
  REQUIRE_OK(summary);
  CHECK(summary->joined_refs == 1);
  CHECK(r.cat.holds_registration("reg_1"));
  auto index = r.cat.index_of("cg:a");
  REQUIRE_OK(index);
  CHECK((*index)->json() == t::small_model_json);
  CHECK(r.cat.find_index(std::string(64, '0')) == nullptr);

  const auto gone = r.cat.revoke("reg_1");
  REQUIRE(gone.has_value());
  CHECK(gone->artifact_id == "cg:a");
  CHECK(gone->owner_pid == 7);
  CHECK_FALSE(gone->is_lease);
  CHECK_FALSE(r.cat.revoke("reg_1").has_value());
  CHECK(r.cat.state_of("cg:a") == artifact_state::gone);
  CHECK_ERROR(r.cat.get("cg:a"), errc::not_found, "cannot find artifact cg:a: not held here");
  CHECK(r.cat.list().empty());
}

TEST_CASE("catalogue: the index store answers by the index digest after the artifact is gone",
          "[registration][catalogue]") {
  rig r;
  auto& a = r.joined("cg:a", "reg_1", 7);
  auto key = hash::decode_multihash(a.descriptor.index_multihash);
  REQUIRE(key.has_value());
  (void)r.cat.revoke("reg_1");
  auto known = r.cat.find_index(hash::to_hex(*key));
  REQUIRE(known != nullptr);
  CHECK(known->json() == t::small_model_json);
}

TEST_CASE("catalogue: a lease's region references are released when it is revoked", "[registration][catalogue]") {
  rig r;
  auto region = r.regions.register_region(host_region(7));
  REQUIRE_OK(region);
  REQUIRE_OK(r.regions.acquire(region->id, 7));
  registration_facts facts{"reg_l", 7, 0, 40, "cg:l", {}};
  auto& a = r.cat.add(describe(facts, *r.idx, std::nullopt), r.idx);
  lease l;
  l.registration_id = "reg_l";
  l.owner_pid = 7;
  l.region_ids = {region->id};
  r.cat.add_lease(a, std::move(l));
  REQUIRE(r.cat.find_lease("reg_l") != nullptr);
  CHECK_CODE(r.regions.unregister(region->id, 7, false), errc::failed_precondition);  // referenced

  const auto gone = r.cat.revoke("reg_l");
  REQUIRE(gone.has_value());
  CHECK(gone->is_lease);
  CHECK(gone->region_ids == std::vector<std::string>{region->id});
  auto unregistered = r.regions.unregister(region->id, 7, false);
  REQUIRE_OK(unregistered);
  CHECK(*unregistered);
}

TEST_CASE("catalogue: expire ends leases and joins past their TTL only", "[registration][catalogue]") {
  rig r;
  r.joined("cg:a", "reg_1", 7, r.clock.now() + milliseconds(100));
  r.joined("cg:b", "reg_2", 7, r.clock.now() + milliseconds(300));
  r.joined("cg:c", "reg_3", 7);  // no TTL
  CHECK(r.cat.expire(r.clock.now()).empty());
  r.clock.advance(milliseconds(100));
  auto ended = r.cat.expire(r.clock.now());
  REQUIRE(ended.size() == 1);
  CHECK(ended[0].registration_id == "reg_1");
  CHECK(ended[0].artifact_id == "cg:a");
  CHECK(r.cat.state_of("cg:a") == artifact_state::gone);
  CHECK(r.cat.state_of("cg:b") == artifact_state::held);
  CHECK(r.cat.state_of("cg:c") == artifact_state::held);
}

TEST_CASE("catalogue: release_owner ends every lease and join of that pid", "[registration][catalogue]") {
  rig r;
  r.joined("cg:a", "reg_1", 7);
  r.joined("cg:b", "reg_2", 8);
  auto ended = r.cat.release_owner(7);
  REQUIRE(ended.size() == 1);
  CHECK(ended[0].registration_id == "reg_1");
  CHECK(ended[0].owner_pid == 7);
  CHECK(r.cat.state_of("cg:a") == artifact_state::gone);
  CHECK(r.cat.state_of("cg:b") == artifact_state::held);
}

TEST_CASE("catalogue: quiesce stops new readers, drain with none returns at once, remove makes it gone",
          "[registration][catalogue]") {
  rig r;
  r.replica("cg:a");
  CHECK_ERROR(r.cat.quiesce("cg:x"), errc::not_found, "cannot deregister cg:x: not held here");
  auto gate = r.cat.quiesce("cg:a");
  REQUIRE_OK(gate);
  CHECK(r.cat.state_of("cg:a") == artifact_state::quiesced);
  CHECK_ERROR(r.cat.open_bytes("cg:a"), errc::failed_precondition, "cannot open cg:a: it is being deregistered");
  CHECK_ERROR(r.cat.device_layout_of("cg:a"), errc::failed_precondition,
              "cannot open the GPU memory of cg:a: it is being deregistered");
  REQUIRE_OK(catalogue::drain("cg:a", **gate, true, milliseconds(1000)));
  auto removed = r.cat.remove("cg:a");
  REQUIRE(removed.has_value());
  CHECK(removed->leases == 0);
  CHECK(r.cat.state_of("cg:a") == artifact_state::gone);
  CHECK_FALSE(r.cat.remove("cg:a").has_value());
}

TEST_CASE("catalogue: drain timeout is DEADLINE_EXCEEDED and leaves the artifact quiesced",
          "[registration][catalogue]") {
  rig r;
  r.replica("cg:a");
  auto reader = r.cat.open_bytes("cg:a");
  REQUIRE_OK(reader);
  auto gate = r.cat.quiesce("cg:a");
  REQUIRE_OK(gate);
  CHECK((*gate)->readers() == 1);
  CHECK_ERROR(catalogue::drain("cg:a", **gate, true, milliseconds(20)), errc::deadline_exceeded,
              "cannot deregister cg:a: 1 readers still hold it after 20 ms; it stays quiesced");
  CHECK_ERROR(catalogue::drain("cg:a", **gate, false, milliseconds(1000)), errc::deadline_exceeded,
              "cannot deregister cg:a: 1 readers still hold it after 0 ms; it stays quiesced");
  CHECK(r.cat.state_of("cg:a") == artifact_state::quiesced);
  auto summary = r.cat.get("cg:a");
  REQUIRE_OK(summary);
  CHECK(summary->quiesced);
  reader->reset();
  REQUIRE_OK(catalogue::drain("cg:a", **gate, false, milliseconds(0)));
}

TEST_CASE("catalogue: drain wakes when the last reader lets go, and is `draining` meanwhile",
          "[registration][catalogue][concurrency]") {
  rig r;
  r.replica("cg:a");
  auto first = r.cat.open_bytes("cg:a");
  auto second = r.cat.open_bytes("cg:a");
  REQUIRE_OK(first);
  REQUIRE_OK(second);
  std::string seen(40, '\0');
  REQUIRE_OK((*first)->read(0, std::as_writable_bytes(std::span<char>(seen))));
  CHECK(seen == t::pattern(40, 1));
  auto gate = r.cat.quiesce("cg:a");
  REQUIRE_OK(gate);
  std::shared_ptr<reader_gate> shared = *gate;

  status drained = fail(errc::unknown, "not run");
  const auto started = std::chrono::steady_clock::now();
  std::thread drainer([&] { drained = catalogue::drain("cg:a", *shared, true, milliseconds(10'000)); });
  while (!shared->draining()) std::this_thread::yield();
  CHECK(r.cat.state_of("cg:a") == artifact_state::draining);
  first->reset();
  std::this_thread::sleep_for(milliseconds(30));
  CHECK(shared->draining());  // one reader left
  second->reset();
  drainer.join();
  CHECK(drained);
  // Woken by the last reader, not by the 10 s timeout.
  CHECK(std::chrono::steady_clock::now() - started < std::chrono::seconds(5));
  CHECK(r.cat.state_of("cg:a") == artifact_state::quiesced);
}

TEST_CASE("catalogue: a reader outliving the catalogue stays readable", "[registration][catalogue]") {
  std::shared_ptr<const memory::byte_source> reader;
  {
    rig r;
    r.replica("cg:a", 3);
    auto opened = r.cat.open_bytes("cg:a");
    REQUIRE_OK(opened);
    reader = *opened;
  }
  std::string seen(40, '\0');
  REQUIRE_OK(reader->read(0, std::as_writable_bytes(std::span<char>(seen))));
  CHECK(seen == t::pattern(40, 3));
}

TEST_CASE("catalogue: an artifact held only by its stable replica is gone once the cache drops it",
          "[registration][catalogue]") {
  fake_clock clock;
  regions::region_registry regions{clock};
  catalogue cat{regions, 40, clock};
  auto idx = std::make_shared<const index::canonical_index>(t::small_model().index());
  for (const std::string id : {"cg:a", "cg:b"}) {
    (void)cat.add(describe(registration_facts{"reg", 7, 0, 40, id, {}}, *idx, std::nullopt), idx);
    auto admitted = cat.cache().admit(id, 40, std::make_shared<t::owned_bytes>(t::pattern(40, 2)), {});
    REQUIRE_OK(admitted);
    CHECK(admitted->admitted);
  }
  CHECK(cat.state_of("cg:a") == artifact_state::gone);  // evicted to admit cg:b
  CHECK(cat.state_of("cg:b") == artifact_state::held);
  engine_stats stats;
  cat.add_stats(stats);
  CHECK(stats.artifacts == 1);
  CHECK(stats.stable_evictions == 1);
  CHECK(stats.stable_bytes == 40);
}
