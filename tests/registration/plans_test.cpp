// The plans alone (no engine): what each accepts at Begin and Feed, and the helpers they share
// (index resolution, descriptors).
#include "registration/plans/plan.hpp"

#include <catch2/catch.hpp>

#include "registration/plans/coalesced.hpp"
#include "registration/plans/lease_in_place.hpp"
#include "registration/plans/stable_dram.hpp"
#include "support/engine_helpers.hpp"
#include "support/fake_clock.hpp"
#include "tensorreg/hash/multihash.hpp"

namespace {

using namespace tensorreg;
using namespace tensorreg::registration;
using namespace tensorreg::registration::detail;
using tensorreg::testing::fake_clock;
namespace t = tensorreg::testing;

begin_context context(std::uint64_t stable_budget = 0) {
  begin_context ctx;
  ctx.stable_budget = stable_budget;
  ctx.resolve_index = [](const begin_request& r) {
    return resolve_index(r, [](const std::string&) { return std::shared_ptr<const index::canonical_index>(); });
  };
  return ctx;
}

feed_request with_payload(decltype(feed_request::payload) payload) {
  feed_request r;
  r.registration_id = "reg_1";
  r.payload = std::move(payload);
  return r;
}

}  // namespace

TEST_CASE("plans: begin_plan picks the plan the request names", "[registration][plans]") {
  const auto m = t::small_model();
  fake_clock clock;
  SECTION("lease-in-place") {
    begin_response response;
    auto p = begin_plan(t::lip_begin(40, 7), context(), response);
    REQUIRE_OK(p);
    CHECK((*p)->name() == "lease-in-place");
    CHECK(std::holds_alternative<lease_handshake>(response.handshake));
  }
  SECTION("stable_dram over a memfd") {
    begin_response response;
    auto p = begin_plan(t::stable_begin(m, 7), context(), response);
    REQUIRE_OK(p);
    CHECK((*p)->name() == "stable_dram");
    const auto* hs = std::get_if<stable_dram_handshake>(&response.handshake);
    REQUIRE(hs != nullptr);
    REQUIRE(hs->publish.has_value());
    CHECK(hs->publish->size_bytes == 40);
    CHECK(hs->publish_lease_token.rfind("publish:", 0) == 0);
  }
}

TEST_CASE("plans: each plan's Begin rules", "[registration][plans]") {
  const auto m = t::small_model();
  begin_response response;
  SECTION("lease-in-place with in_place = false is a snapshot lease") {
    auto r = t::lip_begin(40, 7);
    lease_options options;
    options.in_place = false;
    r.plan = options;
    auto begun = begin_plan(r, context(), response);
    REQUIRE_OK(begun);
    CHECK((*begun)->name() == "lease-in-place");
    CHECK(std::holds_alternative<lease_handshake>(response.handshake));
  }
  SECTION("stable_dram over the budget") {
    CHECK_ERROR(begin_plan(t::stable_begin(m, 7), context(32), response), errc::resource_exhausted,
                "cannot begin stable_dram registration: total_size 40 exceeds the stable budget of 32 bytes");
  }
  SECTION("stable_dram staged on a GPU without one") {
    auto r = t::stable_begin(m, 7);
    stable_dram_options options;
    options.stage_on_gpu = true;
    r.plan = options;
    CHECK_ERROR(begin_plan(r, context(), response), errc::failed_precondition,
                "cannot begin stable_dram registration: stage_on_gpu needs GPU 0 and this engine has no GPU");
  }
  SECTION("coalesced without a GPU") {
    auto r = t::stable_begin(m, 7);
    r.plan = coalesced_options{};
    CHECK_ERROR(begin_plan(r, context(), response), errc::failed_precondition,
                "cannot begin coalesced registration: the coalesced plan needs GPU 0 and this engine has no GPU");
  }
  SECTION("the indexed plans check the device first") {
    auto r = t::stable_begin(m, 7);
    r.device_id = -1;
    CHECK_ERROR(begin_plan(r, context(), response), errc::invalid_argument,
                "cannot begin registration: device_id must be >= 0, got -1");
  }
}

TEST_CASE("plans: resolve_index takes inline data or a known key", "[registration][plans]") {
  const auto m = t::small_model();
  const auto idx = std::make_shared<const index::canonical_index>(m.index());
  const std::string key = hash::to_hex(hash::sha256(idx->json()));
  auto lookup = [&](const std::string& hex) { return hex == key ? idx : nullptr; };
  begin_request r;
  r.total_size = 40;
  CHECK_ERROR(resolve_index(r, lookup), errc::invalid_argument,
              "cannot begin registration: no tensor index: set tensor_index_key or tensor_index_data");
  r.tensor_index_key = std::string(64, 'a');
  CHECK_ERROR(resolve_index(r, lookup), errc::not_found,
              "cannot begin registration: unknown tensor_index_key " + std::string(64, 'a'));
  r.tensor_index_key = key;
  auto known = resolve_index(r, lookup);
  REQUIRE_OK(known);
  CHECK(*known == idx);
  r.tensor_index_data = index_data{idx->json(), "v3", "json"};
  CHECK_ERROR(resolve_index(r, lookup), errc::invalid_argument,
              "cannot begin registration: set only one of tensor_index_key and tensor_index_data");
  r.tensor_index_key.reset();
  r.tensor_index_data->encoding = "cbor";
  CHECK_ERROR(resolve_index(r, lookup), errc::invalid_argument,
              "cannot begin registration: index encoding 'cbor' is not supported (only \"json\")");
}

TEST_CASE("plans: each plan refuses the Feed payloads of the others", "[registration][plans]") {
  const std::string what = "cannot feed registration 'reg_1'";
  const auto tables = with_payload(lease_segments{});
  const auto chunk = with_payload(view_chunk{0, 0, "x"});
  CHECK_ERROR(check_feed_shape(tables, what, "stable_dram", false, true), errc::failed_precondition,
              what + ": storage tables and lease segments need a lease-in-place registration, not stable_dram");
  CHECK_ERROR(check_feed_shape(chunk, what, "lease-in-place", true, false), errc::failed_precondition,
              what +
                  ": view_chunk and stable_dram_write_progress need a stable_dram registration with "
                  "stage_on_gpu=false, not lease-in-place");
  REQUIRE_OK(check_feed_shape(tables, what, "lease-in-place", true, false));
  REQUIRE_OK(check_feed_shape(chunk, what, "stable_dram", false, true));

  fake_clock clock;
  regions::region_registry regions{clock};
  begin_response response;
  auto lip = begin_plan(t::lip_begin(40, 7), context(), response);
  REQUIRE_OK(lip);
  auto c = chunk;
  CHECK_ERROR((*lip)->feed(c, registration_facts{"reg_1", 7, 0, 40, "", {}}, regions, what), errc::failed_precondition,
              what +
                  ": view_chunk and stable_dram_write_progress need a stable_dram registration with "
                  "stage_on_gpu=false, not lease-in-place");
}

TEST_CASE("plans: a stable_dram chunk is copied by the work Feed returns, not under the lock",
          "[registration][plans]") {
  const auto m = t::small_model();
  fake_clock clock;
  regions::region_registry regions{clock};
  begin_response response;
  auto p = begin_plan(t::stable_begin(m, 7), context(), response);
  REQUIRE_OK(p);
  const auto& hs = std::get<stable_dram_handshake>(response.handshake);
  auto r = with_payload(view_chunk{4, 0, "abcd"});
  auto work = (*p)->feed(r, registration_facts{"reg_1", 7, 0, 40, "", {}}, regions, "cannot feed");
  REQUIRE_OK(work);
  REQUIRE(static_cast<bool>(*work));
  std::string seen(4, '\0');
  REQUIRE_OK(hs.publish->memory->read(4, std::as_writable_bytes(std::span<char>(seen))));
  CHECK(seen == std::string(4, '\0'));  // nothing copied yet
  REQUIRE_OK((*work)());
  REQUIRE_OK(hs.publish->memory->read(4, std::as_writable_bytes(std::span<char>(seen))));
  CHECK(seen == "abcd");
  // Written ranges are the memfd mode: the two modes do not mix.
  auto progress = with_payload(stable_write_progress{{{20, 4}}, false});
  CHECK_CODE((*p)->feed(progress, registration_facts{"reg_1", 7, 0, 40, "", {}}, regions, "cannot feed"),
             errc::failed_precondition);
}

TEST_CASE("plans: describe gives a cgid as is and an mi2 id from the index and data hashes", "[registration][plans]") {
  const auto m = t::small_model();
  const auto idx = m.index();
  auto cgid = describe(registration_facts{"reg_1", 7, 0, 40, "cg:x", {}}, idx, std::nullopt);
  CHECK(cgid.artifact_id == "cg:x");
  CHECK(cgid.id_kind == identity::id_kind::cgid);
  CHECK(cgid.data_multihash.empty());
  const auto data = hash::sha256("anything");
  auto mi2 = describe(registration_facts{"reg_1", 7, 0, 40, "", {}}, idx, data);
  CHECK(mi2.artifact_id == "mi2:" + t::index_multihash_of(t::small_model_json) + ":" + hash::encode_multihash(data));
  CHECK(mi2.id_kind == identity::id_kind::mi2);
  CHECK(mi2.total_size == 40);
}
