// engine::republish (RepublishLease): the next version of a lease-in-place lease over the same
// memory and layout, in one step. What the new lease holds (the previous one's index, bytes and
// layout token, its own region references), how its id is made, every refusal with nothing left
// pending, and the device layout tokens readers use to skip opening a layout again.
#include "tensorreg/registration/engine.hpp"

#include <catch2/catch.hpp>

#include <unistd.h>

#include <cstring>
#include <map>
#include <memory>
#include <span>
#include <string>

#include "support/engine_helpers.hpp"
#include "support/fake_device_memory.hpp"

namespace {

using namespace tensorreg;
using namespace tensorreg::registration;
using tensorreg::testing::fake_clock;
using tensorreg::testing::fake_device_memory;
namespace t = tensorreg::testing;

const std::int32_t me = static_cast<std::int32_t>(::getpid());

// Writes the model's storages into the HOST_SHARED region where t::region_entries() puts them
// (s0 at 0, s1 at 64).
void fill(const regions::region_info& region, const t::model& m) {
  auto fd = region.memory->duplicate_fd();
  REQUIRE_OK(fd);
  auto writer = memory::shared_memory::adopt(std::move(*fd), region.size_bytes, true);
  REQUIRE_OK(writer);
  auto bytes = writer->mutable_bytes();
  const auto& s0 = m.storage("s0").bytes;
  const auto& s1 = m.storage("s1").bytes;
  std::memcpy(bytes.data(), s0.data(), s0.size());
  std::memcpy(bytes.data() + 64, s1.data(), s1.size());
}

// The small model with other bytes in its storages (the trainer's next step).
t::model stepped(std::uint32_t seed) {
  auto m = t::small_model();
  for (auto& s : m.storages) s.bytes = t::pattern(s.bytes.size(), seed);
  return m;
}

// One version the ordinary way: Begin → Feed → Commit of `m` over `entries`; sets `*id` to its
// registration id.
commit_response commit_version(engine& e, const t::model& m, const std::map<std::string, storage_entry>& entries,
                               const std::string& cgid, std::string* id, std::int32_t device_id = 0) {
  auto b = t::lip_begin(m.total_size(), me);
  b.client_artifact_id = cgid;
  b.device_id = device_id;
  auto begun = e.begin(std::move(b));
  REQUIRE_OK(begun);
  *id = begun->registration_id;
  REQUIRE_OK(e.feed(t::lip_feed(begun->registration_id, m, entries)));
  auto committed = e.commit(begun->registration_id);
  REQUIRE_OK(committed);
  return *committed;
}

republish_request again(const std::string& previous, const std::string& cgid, bool revoke_previous = false) {
  republish_request r;
  r.previous_registration_id = previous;
  r.client_artifact_id = cgid;
  r.owner_pid = me;
  r.revoke_previous = revoke_previous;
  return r;
}

std::string read_artifact(engine& e, const std::string& artifact_id) {
  auto bytes = e.open_bytes(artifact_id);
  REQUIRE_OK(bytes);
  std::string seen((*bytes)->size(), '\0');
  REQUIRE_OK((*bytes)->read(0, std::as_writable_bytes(std::span<char>(seen))));
  return seen;
}

// A trainer's HOST_SHARED region holding the small model, with its first version committed.
struct host_fixture {
  fake_clock clock;
  std::unique_ptr<engine> e = t::make_engine(clock);
  t::model m = t::small_model();
  regions::region_info region;
  std::string first;  // registration id of the first version
  commit_response first_commit;

  explicit host_fixture(const std::string& cgid = "cgid:wsync~republish~1") {
    auto r = e->register_region(t::host_region(me));
    REQUIRE_OK(r);
    region = *r;
    fill(region, m);
    first_commit = commit_version(*e, m, t::region_entries(region), cgid, &first);
  }
};

}  // namespace

TEST_CASE("engine republish: a cgid lease under a new cgid shares its index and bytes, and holds its own references",
          "[registration][republish]") {
  host_fixture f;
  const auto v1 = f.first_commit.descriptor;
  REQUIRE(v1.artifact_id == "cgid:wsync~republish~1");

  auto v2 = f.e->republish(again(f.first, "cgid:wsync~republish~2"));
  REQUIRE_OK(v2);
  CHECK(v2->registration_id != f.first);
  CHECK_FALSE(v2->revoked_previous);
  CHECK(v2->commit.descriptor.artifact_id == "cgid:wsync~republish~2");
  CHECK(v2->commit.descriptor.id_kind == identity::id_kind::cgid);
  CHECK(v2->commit.descriptor.total_size == f.m.total_size());
  CHECK(v2->commit.descriptor.index_multihash == v1.index_multihash);
  CHECK(v2->commit.descriptor.index_multihash == t::index_multihash_of(t::small_model_json));
  auto idx = f.e->index_of("cgid:wsync~republish~2");
  REQUIRE_OK(idx);
  CHECK((*idx)->json() == t::small_model_json);
  CHECK(read_artifact(*f.e, "cgid:wsync~republish~2") == f.m.canonical());
  // Both versions are held, each by its own lease.
  CHECK(f.e->get("cgid:wsync~republish~1"));
  CHECK(f.e->get("cgid:wsync~republish~2"));
  CHECK(f.e->stats().leases == 2);
  CHECK(f.e->stats().pending_registrations == 0);
  // Each lease holds a reference on the region.
  CHECK_ERROR(f.e->unregister_region(f.region.id, me, false), errc::failed_precondition,
              "cannot unregister region '" + f.region.id + "': 2 references are held (use force)");

  // The memory is leased in place: the next step's bytes, written where they were, are read.
  const auto next = stepped(7);
  fill(f.region, next);
  auto v3 = f.e->republish(again(v2->registration_id, "cgid:wsync~republish~3", true));
  REQUIRE_OK(v3);
  CHECK(v3->revoked_previous);
  CHECK(v3->commit.descriptor.index_multihash == v1.index_multihash);
  CHECK(read_artifact(*f.e, "cgid:wsync~republish~3") == next.canonical());
  CHECK_ERROR(f.e->get("cgid:wsync~republish~2"), errc::not_found,
              "cannot find artifact cgid:wsync~republish~2: not held here");
  CHECK(f.e->stats().leases == 2);  // v1 and v3
  // The revoked lease is gone for republish too.
  CHECK_ERROR(f.e->republish(again(v2->registration_id, "cgid:wsync~republish~4")), errc::not_found,
              "cannot republish lease '" + v2->registration_id +
                  "': no such lease (never committed, revoked, expired, or its owner exited)");

  // The first lease ends; the republished one still holds the region.
  REQUIRE(f.e->revoke(f.first, "test"));
  CHECK(read_artifact(*f.e, "cgid:wsync~republish~3") == next.canonical());
  CHECK_ERROR(f.e->unregister_region(f.region.id, me, false), errc::failed_precondition,
              "cannot unregister region '" + f.region.id + "': 1 references are held (use force)");
  // Its end lets the region go without force: every reference taken was given back.
  REQUIRE(f.e->revoke(v3->registration_id, "test"));
  auto gone = f.e->unregister_region(f.region.id, me, false);
  REQUIRE_OK(gone);
  CHECK(*gone);
  const auto s = f.e->stats();
  CHECK(s.leases == 0);
  CHECK(s.artifacts == 0);
  CHECK(s.regions == 0);
  CHECK(s.pending_registrations == 0);
}

TEST_CASE("engine republish: without a cgid the id is the mi2 id of the region's bytes at republish",
          "[registration][republish]") {
  host_fixture f("");
  CHECK(f.first_commit.descriptor.artifact_id == t::expected_mi2(t::small_model_json, f.m.canonical()));
  std::string previous = f.first;
  std::string previous_id = f.first_commit.descriptor.artifact_id;
  for (std::uint32_t step = 1; step <= 3; ++step) {
    INFO("step " << step);
    const auto now = stepped(100 + step);
    fill(f.region, now);
    auto next = f.e->republish(again(previous, "", true));
    REQUIRE_OK(next);
    const auto expected = t::expected_mi2(t::small_model_json, now.canonical());
    CHECK(next->commit.descriptor.artifact_id == expected);
    CHECK(next->commit.descriptor.artifact_id != previous_id);
    CHECK(next->commit.descriptor.id_kind == identity::id_kind::mi2);
    CHECK(next->commit.descriptor.index_multihash == t::index_multihash_of(t::small_model_json));
    CHECK(next->revoked_previous);
    CHECK(read_artifact(*f.e, expected) == now.canonical());
    CHECK_CODE(f.e->get(previous_id), errc::not_found);
    CHECK(f.e->stats().leases == 1);
    previous = next->registration_id;
    previous_id = expected;
  }
  // Bytes unchanged since the last version: the same mi2 id, which that lease still holds.
  CHECK_ERROR(f.e->republish(again(previous, "", true)), errc::already_exists,
              "cannot commit lease of " + previous_id + ": lease already exists for artifact on device 0");
  CHECK(f.e->stats().pending_registrations == 0);
  CHECK(read_artifact(*f.e, previous_id) == stepped(103).canonical());
}

TEST_CASE("engine republish: each refusal has its code and message, leaves nothing pending, keeps the previous lease",
          "[registration][republish]") {
  host_fixture f;
  const auto v1 = f.first_commit.descriptor.artifact_id;
  // After each refusal: nothing pending, no lease added, and the previous lease still serves.
  auto unchanged = [&] {
    const auto s = f.e->stats();
    CHECK(s.pending_registrations == 0);
    CHECK(s.leases == 1);
    CHECK(read_artifact(*f.e, v1) == f.m.canonical());
  };
  const std::string what = "cannot republish lease '" + f.first + "'";

  SECTION("an unknown registration id is NOT_FOUND") {
    CHECK_ERROR(f.e->republish(again("reg-unknown", "cgid:wsync~republish~2")), errc::not_found,
                "cannot republish lease 'reg-unknown': no such lease (never committed, revoked, expired, or its "
                "owner exited)");
    unchanged();
  }
  SECTION("a registration still pending is no lease: NOT_FOUND") {
    auto begun = f.e->begin(t::lip_begin(f.m.total_size(), me));
    REQUIRE_OK(begun);
    CHECK_CODE(f.e->republish(again(begun->registration_id, "cgid:wsync~republish~2")), errc::not_found);
    REQUIRE_OK(f.e->abort(begun->registration_id));
    unchanged();
  }
  SECTION("another owner's lease is PERMISSION_DENIED") {
    auto r = again(f.first, "cgid:wsync~republish~2");
    r.owner_pid = me + 1;
    CHECK_ERROR(f.e->republish(r), errc::permission_denied,
                what + ": owner_pid " + std::to_string(me + 1) + " is not the lease's owner " + std::to_string(me));
    unchanged();
  }
  SECTION("a cgid already leased on the device is ALREADY_EXISTS") {
    CHECK_ERROR(f.e->republish(again(f.first, v1)), errc::already_exists,
                "cannot commit lease of " + v1 + ": lease already exists for artifact on device 0");
    unchanged();
  }
  SECTION("hash_in_background without a cgid is INVALID_ARGUMENT") {
    auto r = again(f.first, "");
    r.hash_in_background = true;
    auto refused = f.e->republish(r);
    REQUIRE_FALSE(refused);
    CHECK(refused.error().code == errc::invalid_argument);
    CHECK_THAT(refused.error().message, Catch::StartsWith("cannot republish lease '" + f.first +
                                                          "': hash_in_background needs a client_artifact_id"));
    unchanged();
  }
  SECTION("a malformed cgid is INVALID_ARGUMENT, as at Begin") {
    CHECK_CODE(f.e->republish(again(f.first, "not-a-cgid")), errc::invalid_argument);
    unchanged();
  }
  SECTION("a region force-unregistered since (retiring) is FAILED_PRECONDITION") {
    auto retired = f.e->unregister_region(f.region.id, me, true);
    REQUIRE_OK(retired);
    CHECK_FALSE(*retired);  // the first lease still holds it
    CHECK_ERROR(f.e->republish(again(f.first, "cgid:wsync~republish~2")), errc::failed_precondition,
                what + ": cannot acquire region '" + f.region.id + "': region is retiring");
    unchanged();
    // The refusal took no reference: the region goes with the first lease.
    REQUIRE(f.e->revoke(f.first, "test"));
    CHECK(f.e->stats().regions == 0);
    return;
  }
  // Then the references balance: a republish that succeeds, and both leases ended, let the
  // region go without force.
  auto v2 = f.e->republish(again(f.first, "cgid:wsync~republish~ok", true));
  REQUIRE_OK(v2);
  CHECK(v2->revoked_previous);
  REQUIRE(f.e->revoke(v2->registration_id, "test"));
  auto gone = f.e->unregister_region(f.region.id, me, false);
  REQUIRE_OK(gone);
  CHECK(*gone);
}

TEST_CASE("engine republish: a snapshot lease is FAILED_PRECONDITION", "[registration][republish]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto r = t::lip_begin(m.total_size(), me);
  r.plan = lease_options{.in_place = false};
  auto begun = e->begin(r);
  REQUIRE_OK(begun);
  REQUIRE_OK(e->feed(t::lip_feed(begun->registration_id, m)));
  auto committed = e->commit(begun->registration_id);
  REQUIRE_OK(committed);
  CHECK_ERROR(e->republish(again(begun->registration_id, "cgid:wsync~republish~2")), errc::failed_precondition,
              "cannot republish lease '" + begun->registration_id +
                  "': it is a snapshot lease, whose bytes are a copy made at its commit: register again");
  const auto s = e->stats();
  CHECK(s.pending_registrations == 0);
  CHECK(s.leases == 1);
  CHECK(read_artifact(*e, committed->descriptor.artifact_id) == m.canonical());
}

TEST_CASE("engine republish: a cgid lease hashed in the background finds the mi2 id of the shared bytes",
          "[registration][republish]") {
  host_fixture f;
  auto r = again(f.first, "cgid:wsync~republish~bg", true);
  r.hash_in_background = true;
  auto v2 = f.e->republish(r);
  REQUIRE_OK(v2);
  CHECK(v2->commit.descriptor.artifact_id == "cgid:wsync~republish~bg");
  auto hashed = f.e->wait_artifact_hash("cgid:wsync~republish~bg", std::chrono::milliseconds(0));
  REQUIRE_OK(hashed);
  CHECK(hashed->state == hash_state::done);
  CHECK(hashed->mi2_id == t::expected_mi2(t::small_model_json, f.m.canonical()));
}

TEST_CASE("engine republish: a republished device lease keeps its layout token; a fresh commit gets another",
          "[registration][republish][devices]") {
  fake_clock clock;
  auto devices = std::make_shared<fake_device_memory>(1);
  auto options = t::deterministic_options(clock);
  options.devices = devices;
  auto e = t::make_engine(options);
  const auto m = t::small_model();
  // A VRAM region by IPC handle, the storages where t::region_entries() puts them.
  const auto handle = devices->export_allocation(0, 4096);
  auto memory = devices->memory_of(handle);
  std::memcpy(memory.data(), m.storage("s0").bytes.data(), m.storage("s0").bytes.size());
  std::memcpy(memory.data() + 64, m.storage("s1").bytes.data(), m.storage("s1").bytes.size());
  regions::register_request rr;
  rr.kind = regions::memory_kind::vram;
  rr.owner_pid = me;
  rr.device_id = 0;
  rr.size_bytes = 4096;
  rr.cuda_ipc_handle = handle;
  auto region = e->register_region(std::move(rr));
  REQUIRE_OK(region);
  std::map<std::string, storage_entry> entries;
  for (auto [id, length, at] : {std::tuple{"s0", 16u, 0u}, std::tuple{"s1", 20u, 64u}}) {
    storage_entry s;
    s.storage_id = id;
    s.device_id = 0;
    s.storage_length = length;
    s.source = region_ref_source{region->id, regions::memory_kind::vram, 0, region->size_bytes};
    s.mapping_base_offset = at;
    entries.emplace(id, s);
  }

  std::string first;
  commit_version(*e, m, entries, "cgid:wsync~gpu~1", &first);
  auto l1 = e->device_layout_of("cgid:wsync~gpu~1");
  REQUIRE_OK(l1);
  const auto token = l1->layout_token;
  CHECK(token != 0);
  CHECK_FALSE(l1->unchanged);
  REQUIRE_FALSE(l1->allocations.empty());
  REQUIRE_FALSE(l1->segments.empty());
  CHECK(l1->allocations[0].cuda_ipc_handle == handle);

  auto v2 = e->republish(again(first, "cgid:wsync~gpu~2"));
  REQUIRE_OK(v2);
  // A reader holding v1's layout is told v2's is the same, and given nothing to open.
  auto known = e->device_layout_of("cgid:wsync~gpu~2", token);
  REQUIRE_OK(known);
  CHECK(known->unchanged);
  CHECK(known->layout_token == token);
  CHECK(known->allocations.empty());
  CHECK(known->segments.empty());
  // Asked afresh, v2's layout is v1's, under the same token.
  auto l2 = e->device_layout_of("cgid:wsync~gpu~2");
  REQUIRE_OK(l2);
  CHECK_FALSE(l2->unchanged);
  CHECK(l2->layout_token == token);
  REQUIRE(l2->allocations.size() == l1->allocations.size());
  for (std::size_t i = 0; i < l1->allocations.size(); ++i) {
    CHECK(l2->allocations[i].device_id == l1->allocations[i].device_id);
    CHECK(l2->allocations[i].size_bytes == l1->allocations[i].size_bytes);
    CHECK(l2->allocations[i].cuda_ipc_handle == l1->allocations[i].cuda_ipc_handle);
  }
  REQUIRE(l2->segments.size() == l1->segments.size());
  for (std::size_t i = 0; i < l1->segments.size(); ++i) {
    CHECK(l2->segments[i].artifact_offset == l1->segments[i].artifact_offset);
    CHECK(l2->segments[i].length == l1->segments[i].length);
    CHECK(l2->segments[i].allocation == l1->segments[i].allocation);
    CHECK(l2->segments[i].allocation_offset == l1->segments[i].allocation_offset);
  }
  // A token this engine never gave is no match.
  auto stranger = e->device_layout_of("cgid:wsync~gpu~2", token + 1000);
  REQUIRE_OK(stranger);
  CHECK_FALSE(stranger->unchanged);
  CHECK_FALSE(stranger->allocations.empty());

  // A version registered the ordinary way over the same memory is a new layout.
  std::string third;
  commit_version(*e, m, entries, "cgid:wsync~gpu~3", &third);
  auto l3 = e->device_layout_of("cgid:wsync~gpu~3");
  REQUIRE_OK(l3);
  CHECK(l3->layout_token != 0);
  CHECK(l3->layout_token != token);
  auto stale = e->device_layout_of("cgid:wsync~gpu~3", token);
  REQUIRE_OK(stale);
  CHECK_FALSE(stale->unchanged);
  CHECK(stale->layout_token == l3->layout_token);
  CHECK(stale->allocations.size() == l3->allocations.size());
  CHECK(stale->segments.size() == l3->segments.size());

  // v2 outlives v1's end (revoke_previous from v2 to v4 too): the mapping stays shared.
  REQUIRE(e->revoke(first, "test"));
  auto v4 = e->republish(again(v2->registration_id, "cgid:wsync~gpu~4", true));
  REQUIRE_OK(v4);
  CHECK(v4->revoked_previous);
  auto l4 = e->device_layout_of("cgid:wsync~gpu~4", token);
  REQUIRE_OK(l4);
  CHECK(l4->unchanged);
  CHECK(read_artifact(*e, "cgid:wsync~gpu~4") == m.canonical());
  REQUIRE(e->revoke(v4->registration_id, "test"));
  REQUIRE(e->revoke(third, "test"));
  auto gone = e->unregister_region(region->id, me, false);
  REQUIRE_OK(gone);
  CHECK(*gone);
  CHECK(e->stats().open_mappings == 0);
}
