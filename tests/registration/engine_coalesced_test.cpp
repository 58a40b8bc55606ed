// The coalesced plan through a fake device (registration.md §1.2, §4.2.6, §4.5; DECISIONS §5.1).
#include "tensorreg/registration/engine.hpp"

#include <catch2/catch.hpp>

#include <unistd.h>

#include <cstring>

#include "support/engine_helpers.hpp"
#include "support/fake_device_memory.hpp"

namespace {

using namespace tensorreg;
using namespace tensorreg::registration;
using tensorreg::testing::fake_clock;
using tensorreg::testing::fake_device_memory;
namespace t = tensorreg::testing;

const std::int32_t me = static_cast<std::int32_t>(::getpid());

struct rig {
  fake_clock clock;
  std::shared_ptr<fake_device_memory> devices = std::make_shared<fake_device_memory>(2);
  std::unique_ptr<engine> e;
  explicit rig(std::uint64_t stable_bytes = 0) {
    auto options = t::deterministic_options(clock);
    options.devices = devices;
    options.stable_bytes = stable_bytes;
    e = t::make_engine(options);
  }
};

begin_request coalesced_begin(const t::model& m, std::int32_t device = 0) {
  auto r = t::stable_begin(m, me);
  r.plan = coalesced_options{};
  r.device_id = device;
  return r;
}

// Begin, write `bytes` through the daemon's buffer as a client would, commit.
result<commit_response> put(rig& r, const t::model& m, const std::string& bytes, std::int32_t device = 0,
                            std::optional<policy::store_policy> p = std::nullopt) {
  auto req = coalesced_begin(m, device);
  req.policy = std::move(p);
  TENSORREG_TRY_ASSIGN(auto begun, r.e->begin(req));
  const auto& hs = std::get<coalesced_handshake>(begun.handshake);
  auto mem = r.devices->memory_of(hs.daemon_ipc_handle);
  REQUIRE(mem.size() == bytes.size());
  std::memcpy(mem.data(), bytes.data(), bytes.size());
  return r.e->commit(begun.registration_id);
}

policy::store_policy profile(policy::profile p) {
  policy::store_policy out;
  out.profile = p;
  return out;
}

}  // namespace

TEST_CASE("engine coalesced: begin allocates a device buffer of total_size and hands out its handle",
          "[registration][engine_coalesced]") {
  rig r;
  const auto m = t::small_model();
  auto begun = r.e->begin(coalesced_begin(m, 1));
  REQUIRE_OK(begun);
  CHECK(begun->device_id == 1);
  CHECK(begun->total_size == 40);
  const auto* hs = std::get_if<coalesced_handshake>(&begun->handshake);
  REQUIRE(hs != nullptr);
  CHECK(r.devices->memory_of(hs->daemon_ipc_handle).size() == 40);
  CHECK(r.devices->allocations() == 1);
}

TEST_CASE("engine coalesced: begin on a device the machine lacks fails as the device says",
          "[registration][engine_coalesced]") {
  rig r;
  CHECK_ERROR(r.e->begin(coalesced_begin(t::small_model(), 5)), errc::failed_precondition,
              "cannot allocate device memory: no device 5");
  CHECK(r.e->stats().pending_registrations == 0);
}

TEST_CASE("engine coalesced: commit hashes the normalized buffer, PAD as zero", "[registration][engine_coalesced]") {
  rig r;
  const auto m = t::small_model();
  auto committed = put(r, m, m.canonical_with_pad('\xab'));
  REQUIRE_OK(committed);
  CHECK(committed->descriptor.artifact_id == t::expected_mi2(t::small_model_json, m.canonical()));
  CHECK(committed->descriptor.id_kind == identity::id_kind::mi2);
  CHECK_FALSE(committed->existed);
  REQUIRE(committed->local_stable_tier);
  CHECK(committed->local_stable_tier->status == local_stable_status::skipped);
  auto got = r.e->get(committed->descriptor.artifact_id);
  REQUIRE_OK(got);
  CHECK_FALSE(got->stable_replica);
  CHECK(got->leases == 0);
  // Readers see the canonical bytes: PAD reads as zero whatever the client left there.
  auto bytes = r.e->open_bytes(committed->descriptor.artifact_id);
  REQUIRE_OK(bytes);
  std::string seen(40, '\0');
  REQUIRE_OK((*bytes)->read(0, std::as_writable_bytes(std::span<char>(seen))));
  CHECK(seen == m.canonical());
}

TEST_CASE("engine coalesced: the same tensors give the same id as the other plans",
          "[registration][engine_coalesced]") {
  rig r;
  const auto m = t::small_model();
  auto coalesced = put(r, m, m.canonical_with_pad('\x01'));
  REQUIRE_OK(coalesced);
  auto stable = t::register_stable(*r.e, m, me);
  REQUIRE_OK(stable);
  auto leased = t::register_lip(*r.e, m, me);
  REQUIRE_OK(leased);
  CHECK(stable->descriptor.artifact_id == coalesced->descriptor.artifact_id);
  CHECK(leased->descriptor.artifact_id == coalesced->descriptor.artifact_id);
  CHECK(r.e->list().size() == 1);
}

TEST_CASE("engine coalesced: a second commit of the same bytes on the same device joins with existed=true",
          "[registration][engine_coalesced]") {
  rig r;
  const auto m = t::small_model();
  auto first = put(r, m, m.canonical());
  REQUIRE_OK(first);
  auto second = put(r, m, m.canonical_with_pad('\x7f'));
  REQUIRE_OK(second);
  CHECK(second->existed);
  CHECK(t::describe(second->descriptor) == t::describe(first->descriptor));
  CHECK(r.e->get(first->descriptor.artifact_id)->joined_refs == 1);
  // Another device holds a replica of its own.
  auto other = put(r, m, m.canonical(), 1);
  REQUIRE_OK(other);
  CHECK_FALSE(other->existed);
  CHECK(r.e->get(first->descriptor.artifact_id)->joined_refs == 1);
}

TEST_CASE("engine coalesced: a cgid commit has no data hash", "[registration][engine_coalesced]") {
  rig r;
  const auto m = t::small_model();
  auto req = coalesced_begin(m);
  req.client_artifact_id = "cgid:coalesced.1";
  auto begun = r.e->begin(req);
  REQUIRE_OK(begun);
  auto committed = r.e->commit(begun->registration_id);
  REQUIRE_OK(committed);
  CHECK(committed->descriptor.artifact_id == "cgid:coalesced.1");
  CHECK(committed->descriptor.data_multihash.empty());
  CHECK(committed->descriptor.id_kind == identity::id_kind::cgid);
}

TEST_CASE("engine coalesced: policy PINNED copies the normalized bytes to the stable tier",
          "[registration][engine_coalesced][policy]") {
  rig r(1 << 20);
  const auto m = t::small_model();
  auto committed = put(r, m, m.canonical_with_pad('\xcd'), 0, profile(policy::profile::pinned));
  REQUIRE_OK(committed);
  REQUIRE(committed->local_stable_tier);
  CHECK(committed->local_stable_tier->status == local_stable_status::ready);
  CHECK(committed->local_stable_tier->message.empty());
  auto got = r.e->get(committed->descriptor.artifact_id);
  REQUIRE_OK(got);
  CHECK(got->stable_replica);
  CHECK(r.e->stats().stable_bytes == 40);
}

TEST_CASE("engine coalesced: policy PINNED without room fails RESOURCE_EXHAUSTED and keeps nothing",
          "[registration][engine_coalesced][policy]") {
  rig r(1);
  const auto m = t::small_model();
  auto committed = put(r, m, m.canonical(), 0, profile(policy::profile::pinned));
  REQUIRE_FALSE(committed);
  CHECK(committed.error().code == errc::resource_exhausted);
  CHECK_THAT(committed.error().message, Catch::StartsWith("cannot keep a local stable copy of mi2:"));
  CHECK(r.e->list().empty());
  CHECK(r.e->stats().artifacts == 0);
  CHECK(r.e->stats().pending_registrations == 0);
}

TEST_CASE("engine coalesced: policy WARM without room is DEGRADED and keeps the device replica",
          "[registration][engine_coalesced][policy]") {
  rig r(1);
  const auto m = t::small_model();
  auto committed = put(r, m, m.canonical(), 0, profile(policy::profile::warm));
  REQUIRE_OK(committed);
  REQUIRE(committed->local_stable_tier);
  CHECK(committed->local_stable_tier->status == local_stable_status::degraded);
  auto got = r.e->get(committed->descriptor.artifact_id);
  REQUIRE_OK(got);
  CHECK_FALSE(got->stable_replica);
}

TEST_CASE("engine coalesced: a commit of an artifact being deregistered is FAILED_PRECONDITION",
          "[registration][engine_coalesced]") {
  rig r;
  const auto m = t::small_model();
  auto first = put(r, m, m.canonical());
  REQUIRE_OK(first);
  const auto& id = first->descriptor.artifact_id;
  auto reader = r.e->open_bytes(id);
  REQUIRE_OK(reader);
  CHECK_CODE(r.e->deregister({id, true, 10, me}), errc::deadline_exceeded);
  CHECK_ERROR(put(r, m, m.canonical(), 1), errc::failed_precondition,
              "cannot commit " + id + ": the artifact is being deregistered");
  CHECK(r.e->stats().pending_registrations == 0);
  reader->reset();
  auto out = r.e->deregister({id, true, 10, me});
  REQUIRE_OK(out);
  CHECK(out->removed);
  CHECK(r.e->list().empty());
}

TEST_CASE("engine coalesced: stable_dram with stage_on_gpu copies the device staging buffer to a host replica",
          "[registration][engine_coalesced]") {
  rig r;
  const auto m = t::small_model();
  auto req = t::stable_begin(m, me);
  req.plan = stable_dram_options{.stage_on_gpu = true};
  auto begun = r.e->begin(req);
  REQUIRE_OK(begun);
  const auto& hs = std::get<stable_dram_handshake>(begun->handshake);
  CHECK_FALSE(hs.publish.has_value());  // the bytes come through the GPU, not a memfd
  REQUIRE_FALSE(hs.staging_cuda_ipc_handle.empty());
  auto mem = r.devices->memory_of(hs.staging_cuda_ipc_handle);
  const auto uploaded = m.canonical_with_pad('\xab');
  REQUIRE(mem.size() == uploaded.size());
  std::memcpy(mem.data(), uploaded.data(), uploaded.size());

  // The chunk and memfd paths are for stage_on_gpu=false only (§4.3.4-5).
  feed_request chunk;
  chunk.registration_id = begun->registration_id;
  chunk.payload = view_chunk{0, 0, "x"};
  CHECK_CODE(r.e->feed(std::move(chunk)), errc::failed_precondition);

  auto committed = r.e->commit(begun->registration_id);
  REQUIRE_OK(committed);
  CHECK(committed->descriptor.artifact_id == t::expected_mi2(t::small_model_json, m.canonical()));
  auto held = r.e->get(committed->descriptor.artifact_id);
  REQUIRE_OK(held);
  CHECK(held->stable_replica);  // a host copy, PAD zeroed
  auto bytes = r.e->open_bytes(committed->descriptor.artifact_id);
  REQUIRE_OK(bytes);
  std::string back(m.canonical().size(), '\0');
  REQUIRE_OK((*bytes)->read(0, std::as_writable_bytes(std::span<char>(back))));
  CHECK(back == m.canonical());
}
