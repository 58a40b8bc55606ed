// BeginRegisterArtifact (registration.md §4.2; DECISIONS §5.1, §5.8, §5.13).
#include "tensorreg/registration/engine.hpp"

#include <catch2/catch.hpp>

#include <unistd.h>

#include <regex>
#include <set>

#include "support/engine_helpers.hpp"
#include "tensorreg/hash/sha256.hpp"

namespace {

using namespace tensorreg;
using namespace tensorreg::registration;
using tensorreg::testing::fake_clock;
namespace t = tensorreg::testing;

const std::int32_t me = static_cast<std::int32_t>(::getpid());

begin_request stable_request() { return t::stable_begin(t::small_model(), me); }

std::string key_of(const std::string& json) { return hash::to_hex(hash::sha256(std::string_view(json))); }

}  // namespace

TEST_CASE("engine begin: owner_pid must be positive", "[registration][engine_begin]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  for (std::int32_t pid : {0, -1}) {
    auto r = stable_request();
    r.owner_pid = pid;
    CHECK_ERROR(e->begin(r), errc::invalid_argument, "cannot begin registration: owner_pid is required (>0)");
    auto l = t::lip_begin(40, pid);
    CHECK_ERROR(e->begin(l), errc::invalid_argument, "cannot begin registration: owner_pid is required (>0)");
  }
}

TEST_CASE("engine begin: total_size 0 is rejected for every plan", "[registration][engine_begin]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto r = stable_request();
  r.total_size = 0;
  CHECK_ERROR(e->begin(r), errc::invalid_argument, "cannot begin registration: total_size must be > 0");
  CHECK_ERROR(e->begin(t::lip_begin(0, me)), errc::invalid_argument,
              "cannot begin registration: total_size must be > 0");
}

TEST_CASE("engine begin: a negative device_id is rejected outside the lease plan", "[registration][engine_begin]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto r = stable_request();
  r.device_id = -1;
  CHECK_ERROR(e->begin(r), errc::invalid_argument, "cannot begin registration: device_id must be >= 0, got -1");
}

TEST_CASE("engine begin: schema_version must be empty or v3", "[registration][engine_begin]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto r = stable_request();
  r.tensor_index_data->schema_version = "v2";
  CHECK_ERROR(e->begin(r), errc::invalid_argument,
              "cannot begin registration: schema_version 'v2' is not supported (only \"v3\")");
  r.tensor_index_data->schema_version = "";
  REQUIRE_OK(e->begin(r));
}

TEST_CASE("engine begin: an index encoding other than json is rejected by name", "[registration][engine_begin]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto r = stable_request();
  r.tensor_index_data->encoding = "cbor";
  CHECK_ERROR(e->begin(r), errc::invalid_argument,
              "cannot begin registration: index encoding 'cbor' is not supported (only \"json\")");
  r.tensor_index_data->encoding = "";
  REQUIRE_OK(e->begin(r));
}

TEST_CASE("engine begin: an index is required", "[registration][engine_begin]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto r = stable_request();
  r.tensor_index_data.reset();
  CHECK_ERROR(e->begin(r), errc::invalid_argument,
              "cannot begin registration: no tensor index: set tensor_index_key or tensor_index_data");
}

TEST_CASE("engine begin: a key and inline data together are rejected", "[registration][engine_begin]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto r = stable_request();
  r.tensor_index_key = key_of(t::small_model_json);
  CHECK_ERROR(e->begin(r), errc::invalid_argument,
              "cannot begin registration: set only one of tensor_index_key and tensor_index_data");
}

TEST_CASE("engine begin: an unknown tensor_index_key is NOT_FOUND", "[registration][engine_begin]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto r = stable_request();
  r.tensor_index_data.reset();
  const auto key = key_of(t::small_model_json);
  r.tensor_index_key = key;
  CHECK_ERROR(e->begin(r), errc::not_found, "cannot begin registration: unknown tensor_index_key " + key);
}

TEST_CASE("engine begin: a malformed tensor_index_key is INVALID_ARGUMENT", "[registration][engine_begin]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  for (const std::string& key : {std::string("abc"), std::string(64, 'g'), std::string(66, 'a'), std::string()}) {
    CAPTURE(key);
    auto r = stable_request();
    r.tensor_index_data.reset();
    r.tensor_index_key = key;
    CHECK_ERROR(e->begin(r), errc::invalid_argument,
                "cannot begin registration: tensor_index_key must be a 32-byte sha256 hex string");
  }
}

TEST_CASE("engine begin: a key from an earlier committed registration works, in either case",
          "[registration][engine_begin]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto first = t::register_stable(*e, m, me);
  REQUIRE_OK(first);

  auto key = key_of(t::small_model_json);
  for (bool upper : {false, true}) {
    if (upper)
      std::transform(key.begin(), key.end(), key.begin(), [](char c) { return static_cast<char>(std::toupper(c)); });
    auto r = stable_request();
    r.tensor_index_data.reset();
    r.tensor_index_key = key;
    auto begun = e->begin(r);
    REQUIRE_OK(begun);
    REQUIRE_OK(t::feed_chunks(*e, begun->registration_id, m.canonical(), 64));
    auto committed = e->commit(begun->registration_id);
    REQUIRE_OK(committed);
    CHECK(committed->descriptor.artifact_id == first->descriptor.artifact_id);
    CHECK(committed->existed);
  }
}

TEST_CASE("engine begin: the key of an index rebuilt by a LIP commit works for a stable put",
          "[registration][engine_begin]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto leased = t::register_lip(*e, m, me);
  REQUIRE_OK(leased);
  auto r = stable_request();
  r.tensor_index_data.reset();
  r.tensor_index_key = key_of(t::small_model_json);
  auto begun = e->begin(r);
  REQUIRE_OK(begun);
  REQUIRE_OK(t::feed_chunks(*e, begun->registration_id, m.canonical(), 40));
  auto put = e->commit(begun->registration_id);
  REQUIRE_OK(put);
  CHECK(put->descriptor.artifact_id == leased->descriptor.artifact_id);
}

TEST_CASE("engine begin: a known key under a total_size too small for its entries is rejected",
          "[registration][engine_begin]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  REQUIRE_OK(t::register_stable(*e, t::small_model(), me));
  auto r = stable_request();
  r.tensor_index_data.reset();
  r.tensor_index_key = key_of(t::small_model_json);
  r.total_size = 48;  // a larger buffer: the tail is PAD
  REQUIRE_OK(e->begin(r));
  r.total_size = 32;
  CHECK_CODE(e->begin(r), errc::invalid_argument);
}

TEST_CASE("engine begin: bad index JSON is INVALID_ARGUMENT", "[registration][engine_begin]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  struct bad {
    std::string json;
    std::string message;
  };
  const std::vector<bad> cases = {
      {"not json", "cannot parse index: invalid json near byte 2"},
      {"[]", "cannot parse index: top level must be a json object"},
      {R"({"a":[0,16,[2,2],[2,1],"torch.float32"]})", "cannot parse index entry 'a': has 5 fields, expected 6"},
      {R"({"a":[0,64,[4,4],[4,1],"torch.float32",0]})",  // ends past total_size 40
       "cannot build byte range map: tensor 'a' ends at 64, past total_size 40"},
      {R"({"a":[0,16,[4],[1],"torch.float32",0],"b":[8,16,[4],[1],"torch.float32",0]})",
       "cannot build byte range map: tensor 'a' [0, 16) and tensor 'b' [8, 24) overlap without being aliases"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.json);
    auto r = stable_request();
    r.tensor_index_data->bytes = c.json;
    CHECK_ERROR(e->begin(r), errc::invalid_argument, c.message);
  }
  CHECK(e->stats().pending_registrations == 0);
}

TEST_CASE("engine begin: an empty tensor dict is INVALID_ARGUMENT", "[registration][engine_begin]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto r = stable_request();
  r.tensor_index_data->bytes = "{}";
  auto got = e->begin(r);
  REQUIRE_FALSE(got);
  CHECK(got.error().code == errc::invalid_argument);
  CHECK_THAT(got.error().message, Catch::Contains("empty tensor dict"));
}

TEST_CASE("engine begin: a malformed cgid is INVALID_ARGUMENT", "[registration][engine_begin]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  for (const std::string& id :
       {std::string("cgid:"), std::string("cgid:a:b"), std::string("mi2:whatever"), "cgid:" + std::string(200, 'x')}) {
    CAPTURE(id);
    auto r = stable_request();
    r.client_artifact_id = id;
    auto expected = identity::validate_cgid(id);
    REQUIRE_FALSE(expected);
    CHECK_ERROR(e->begin(r), errc::invalid_argument, "cannot begin registration: " + expected.error().message);
  }
}

TEST_CASE("engine begin: an invalid policy is INVALID_ARGUMENT", "[registration][engine_begin]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  SECTION("profile plus explicit tiers") {
    policy::store_policy p;
    p.profile = policy::profile::warm;
    p.should.push_back({policy::tier::stable_dram, policy::scope::local, 1, policy::retention::best_effort, {}});
    auto r = stable_request();
    r.policy = p;
    auto expected = policy::resolve(p);
    REQUIRE_FALSE(expected);
    CHECK_ERROR(e->begin(r), errc::invalid_argument, "cannot begin registration: " + expected.error().message);
  }
  SECTION("an unspecified tier") {
    policy::store_policy p;
    p.may.push_back({});
    auto r = t::lip_begin(40, me);
    r.policy = p;
    auto expected = policy::resolve(p);
    REQUIRE_FALSE(expected);
    CHECK_ERROR(e->begin(r), errc::invalid_argument, "cannot begin registration: " + expected.error().message);
  }
}

TEST_CASE("engine begin: lease in_place=false begins a snapshot lease (registration.md §5.4)",
          "[registration][engine_begin]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto r = t::lip_begin(40, me);
  r.plan = lease_options{.in_place = false};
  auto begun = e->begin(r);
  REQUIRE_OK(begun);
  CHECK(std::holds_alternative<lease_handshake>(begun->handshake));
  CHECK(e->stats().pending_registrations == 1);
}

TEST_CASE("engine begin: a view without registration_kind is INVALID_ARGUMENT", "[registration][engine_begin]") {
  // Views are registered since issue #18 (registration.md §7); empty options name no kind.
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto r = stable_request();
  r.has_view = true;
  CHECK_ERROR(e->begin(r), errc::invalid_argument,
              "cannot register view: registration_kind is required (CANONICAL or PIECE), got 0");
}

TEST_CASE("engine begin: the coalesced plan without a GPU is FAILED_PRECONDITION naming the GPU",
          "[registration][engine_begin]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto r = stable_request();
  r.plan = coalesced_options{};
  r.device_id = 3;
  CHECK_ERROR(e->begin(r), errc::failed_precondition,
              "cannot begin coalesced registration: the coalesced plan needs GPU 3 and this engine has no GPU");
  // Coalesced is the default plan.
  begin_request plain = stable_request();
  plain.plan = plan_options{};
  CHECK_CODE(e->begin(plain), errc::failed_precondition);
}

TEST_CASE("engine begin: stable_dram stage_on_gpu without a GPU is FAILED_PRECONDITION",
          "[registration][engine_begin]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto r = stable_request();
  r.plan = stable_dram_options{.stage_on_gpu = true};
  CHECK_ERROR(e->begin(r), errc::failed_precondition,
              "cannot begin stable_dram registration: stage_on_gpu needs GPU 0 and this engine has no GPU");
}

TEST_CASE("engine begin: a stable_dram total_size over the stable budget is RESOURCE_EXHAUSTED",
          "[registration][engine_begin]") {
  fake_clock clock;
  auto options = t::deterministic_options(clock);
  options.stable_bytes = 32;
  auto e = t::make_engine(options);
  CHECK_ERROR(e->begin(stable_request()), errc::resource_exhausted,
              "cannot begin stable_dram registration: total_size 40 exceeds the stable budget of 32 bytes");
}

TEST_CASE("engine begin: registration ids look like reg_<ns>_<pid>_<u64> and are unique",
          "[registration][engine_begin]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const std::regex shape("reg_([0-9]+)_([0-9]+)_([0-9]+)");
  std::set<std::string> seen;
  for (int i = 0; i < 20; ++i) {
    auto begun = e->begin(i % 2 == 0 ? stable_request() : t::lip_begin(40, me));
    REQUIRE_OK(begun);
    std::smatch m;
    REQUIRE(std::regex_match(begun->registration_id, m, shape));
    CHECK(m[2].str() == std::to_string(::getpid()));
    CHECK(seen.insert(begun->registration_id).second);
  }
  CHECK(e->stats().pending_registrations == 20);
}

TEST_CASE("engine begin: the lease plan checks neither the index nor the device", "[registration][engine_begin]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto r = t::lip_begin(4096, me);
  r.device_id = -1;
  r.tensor_index_data = index_data{"not json", "v9", "cbor"};
  auto begun = e->begin(r);
  REQUIRE_OK(begun);
  CHECK(begun->device_id == -1);
  CHECK(begun->total_size == 4096);
  CHECK(std::holds_alternative<lease_handshake>(begun->handshake));
}

TEST_CASE("engine begin: stable_dram hands out a publish memfd of total_size", "[registration][engine_begin]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto begun = e->begin(stable_request());
  REQUIRE_OK(begun);
  CHECK(begun->total_size == 40);
  const auto* hs = std::get_if<stable_dram_handshake>(&begun->handshake);
  REQUIRE(hs != nullptr);
  REQUIRE(hs->publish);
  CHECK(hs->publish->size_bytes == 40);
  CHECK(hs->publish->offset_bytes == 0);
  REQUIRE(hs->publish->memory);
  CHECK(hs->publish->memory->size() == 40);
  CHECK(hs->publish->memory->fd() >= 0);
  CHECK_FALSE(hs->publish_lease_token.empty());
}
