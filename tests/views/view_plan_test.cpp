#include "tensorreg/views/view_plan.hpp"

#include <catch2/catch.hpp>

#include <random>
#include <string>
#include <vector>

#include "tensorreg/hash/multihash.hpp"

namespace {

using tensorreg::errc;
using tensorreg::identity::narrow_op;
using tensorreg::identity::transpose_op;
using tensorreg::index::canonical_index;
using namespace tensorreg::views;

// registration.md §3.4: the two-tensor index and upstream's golden view_id over it.
constexpr std::string_view two_tensor_index =
    R"({"a":[0,16,[2,2],[2,1],"torch.float32",0],"b":[16,16,[2,2],[2,1],"torch.float32",0]})";
constexpr const char* golden_view_id = "bciqd3js2h75e5gw6cagg5kp3d6xc7laeqca263wrnmirudisjlwuwwa";

canonical_index parsed(std::string_view json) {
  auto idx = canonical_index::parse(json, std::nullopt);
  REQUIRE(idx);
  return *idx;
}

view_request golden_request() {
  view_request r;
  r.spec["a"] = {transpose_op{0, 1}};
  r.spec["b"] = {narrow_op{1, 0, 1}};
  r.place = placement::server;
  r.kind = registration_kind::piece;
  r.canonical_size_bytes = 32;
  return r;
}

view_request transpose_both() {
  view_request r;
  r.spec["a"] = {transpose_op{0, 1}};
  r.spec["b"] = {transpose_op{1, 0}};
  r.place = placement::server;
  r.kind = registration_kind::canonical;
  return r;
}

}  // namespace

TEST_CASE("view_plan: the golden view_id of registration.md §3.4 is computed for a piece", "[views][view_plan]") {
  const auto idx = parsed(two_tensor_index);
  auto plan = view_plan::create(golden_request(), idx, registration_facts{24, true});
  REQUIRE(plan);
  CHECK(plan->view_id() == golden_view_id);
  // a transposed at 0 (16 bytes), b narrowed to [2,1] at 16 (8 bytes).
  REQUIRE(plan->tensors().size() == 2);
  CHECK(plan->tensors()[0].view_offset == 0);
  CHECK(plan->tensors()[0].shape == std::vector<std::int64_t>{2, 2});
  CHECK(plan->tensors()[0].canonical_stride == std::vector<std::int64_t>{1, 2});
  CHECK(plan->tensors()[1].view_offset == 16);
  CHECK(plan->tensors()[1].nbytes == 8);
  CHECK(plan->view_size() == 24);
  CHECK(plan->canonical_ranges() == std::vector<byte_range>{{0, 20}, {24, 4}});
  CHECK(plan->covered_bytes() == 24);
  CHECK_FALSE(plan->full_coverage());
  CHECK(plan->index_json() == R"({"a":[0,16,[2,2],[2,1],"torch.float32",0],"b":[16,8,[2,1],[1,1],"torch.float32",0]})");
  CHECK(plan->index_multihash() == tensorreg::hash::encode_multihash(tensorreg::hash::sha256(two_tensor_index)));
}

TEST_CASE("view_plan: a provided view_id is checked against the spec", "[views][view_plan]") {
  const auto idx = parsed(two_tensor_index);
  auto r = golden_request();
  r.view_id = golden_view_id;
  CHECK(view_plan::create(r, idx, registration_facts{24, true}));
  r.view_id = "bciqwrong";
  auto bad = view_plan::create(r, idx, registration_facts{24, true});
  REQUIRE_FALSE(bad);
  CHECK(bad.error().code == errc::invalid_argument);
  CHECK_THAT(bad.error().message, Catch::StartsWith("cannot register view: view_id does not match view spec"));
}

TEST_CASE("view_plan: a negative narrow start counts from the end and gives the same view_id", "[views][view_plan]") {
  const auto idx = parsed(two_tensor_index);
  auto r = golden_request();
  r.spec["b"] = {narrow_op{1, -2, 1}};
  auto plan = view_plan::create(r, idx, registration_facts{24, true});
  REQUIRE(plan);
  CHECK(plan->view_id() == golden_view_id);
  CHECK(std::get<narrow_op>(plan->spec().at("b").front()).start == 0);
}

TEST_CASE("view_plan: a full transpose is a CANONICAL view covering the buffer", "[views][view_plan]") {
  const auto idx = parsed(two_tensor_index);
  auto plan = view_plan::create(transpose_both(), idx, registration_facts{32, false});
  REQUIRE(plan);
  CHECK(plan->full_coverage());
  CHECK(plan->canonical_ranges() == std::vector<byte_range>{{0, 32}});
  CHECK(plan->transposes());
  CHECK(plan->kind() == registration_kind::canonical);
}

TEST_CASE("view_plan: tensor_names take tensors without ops", "[views][view_plan]") {
  const auto idx = parsed(two_tensor_index);
  view_request r;
  r.tensor_names = {"b", "a"};
  r.place = placement::client;
  r.kind = registration_kind::canonical;
  auto plan = view_plan::create(r, idx, registration_facts{32, false});
  REQUIRE(plan);
  CHECK(plan->view_size() == 32);
  CHECK(plan->index_json() == two_tensor_index);
  CHECK(plan->spec().at("a").empty());
}

TEST_CASE("view_plan: every rule of registration.md §7 answers its code and message", "[views][view_plan]") {
  const auto idx = parsed(R"({"a":[0,16,[2,2],[2,1],"torch.float32",0],"b":[16,16,[2,2],[2,1],"torch.float32",0],)"
                          R"("c":[32,8,[8],[1],"torch.complex32",0],"d":[40,4,[2,2],[1,-1],"torch.uint8",0]})");
  struct row {
    const char* what;
    std::function<void(view_request&, registration_facts&)> change;
    const char* message;
  };
  const std::vector<row> rows = {
      {"missing registration_kind",
       [](view_request& r, registration_facts&) { r.kind = registration_kind::unspecified; },
       "cannot register view: registration_kind is required (CANONICAL or PIECE), got 0"},
      {"missing placement", [](view_request& r, registration_facts&) { r.place = placement::unspecified; },
       "cannot register view: placement is required (SERVER or CLIENT), got 0"},
      {"no spec and no names",
       [](view_request& r, registration_facts&) {
         r.spec.clear();
         r.tensor_names.clear();
       },
       "cannot register view: set a spec or tensor_names"},
      {"a name twice",
       [](view_request& r, registration_facts&) {
         r.tensor_names = {"a", "a"};
       },
       "cannot register view: tensor 'a' is named twice"},
      {"unknown tensor", [](view_request& r, registration_facts&) { r.spec["zz"] = {}; },
       "cannot register view: tensor 'zz' is not in the canonical index"},
      {"unknown dtype", [](view_request& r, registration_facts&) { r.spec["c"] = {}; },
       "cannot register view: tensor 'c' has dtype 'torch.complex32', whose element size is unknown"},
      {"two narrows",
       [](view_request& r, registration_facts&) {
         r.spec["a"] = {narrow_op{0, 0, 1}, narrow_op{1, 0, 1}};
       },
       "cannot register view: tensor 'a' has 2 narrow ops; at most one is allowed"},
      {"narrow with transpose",
       [](view_request& r, registration_facts&) {
         r.spec["a"] = {narrow_op{0, 0, 1}, transpose_op{0, 1}};
       },
       "cannot register view: tensor 'a' mixes narrow and transpose ops"},
      {"transpose dims equal",
       [](view_request& r, registration_facts&) {
         r.spec["a"] = {transpose_op{1, 1}};
       },
       "cannot register view: tensor 'a': transpose dims must differ, got 1 and 1"},
      {"transpose dim out of range",
       [](view_request& r, registration_facts&) {
         r.spec["a"] = {transpose_op{0, 2}};
       },
       "cannot register view: tensor 'a': transpose dim 2 is out of range for rank 2"},
      {"narrow dim out of range",
       [](view_request& r, registration_facts&) {
         r.spec["a"] = {narrow_op{2, 0, 1}};
       },
       "cannot register view: tensor 'a': narrow dim 2 is out of range for rank 2"},
      {"narrow length 0",
       [](view_request& r, registration_facts&) {
         r.spec["a"] = {narrow_op{0, 0, 0}};
       },
       "cannot register view: tensor 'a': narrow length must be > 0"},
      {"narrow start too negative",
       [](view_request& r, registration_facts&) {
         r.spec["a"] = {narrow_op{0, -3, 1}};
       },
       "cannot register view: tensor 'a': narrow start -3 is out of range for dim 0 of size 2"},
      {"narrow start past the dim",
       [](view_request& r, registration_facts&) {
         r.spec["a"] = {narrow_op{0, 2, 1}};
       },
       "cannot register view: tensor 'a': narrow start 2 is out of range for dim 0 of size 2"},
      {"narrow past the end",
       [](view_request& r, registration_facts&) {
         r.spec["a"] = {narrow_op{1, 1, 2}};
       },
       "cannot register view: tensor 'a': narrow [1, +2) runs past dim 1 of size 2"},
      {"elements outside the storage", [](view_request& r, registration_facts&) { r.spec["d"] = {}; },
       "cannot register view: tensor 'd' reads elements outside its storage of 4 bytes"},
      {"CANONICAL size differs",
       [](view_request& r, registration_facts&) {
         r.spec.erase("b");
         r.spec["a"] = {transpose_op{0, 1}};
         r.canonical_size_bytes = 40;
       },
       "cannot register view: canonical_size_bytes 40 of a CANONICAL view differs from total_size 44"},
      {"CANONICAL not covering", [](view_request& r, registration_facts&) { r.spec.erase("b"); },
       "cannot register view: a CANONICAL view must cover every byte of every canonical tensor; bytes [16, 44) are "
       "not covered"},
      {"PIECE without canonical_size_bytes",
       [](view_request& r, registration_facts&) { r.kind = registration_kind::piece; },
       "cannot register view: a PIECE needs canonical_size_bytes > 0"},
      {"PIECE with ranges",
       [](view_request& r, registration_facts&) {
         r.kind = registration_kind::piece;
         r.canonical_size_bytes = 44;
         r.ranges = {{0, 16}};
       },
       "cannot register view: a PIECE takes no client ranges (1 sent)"},
      {"PIECE without cgid",
       [](view_request& r, registration_facts& f) {
         r.kind = registration_kind::piece;
         r.canonical_size_bytes = 44;
         f.has_cgid = false;
       },
       "cannot register view: a PIECE needs a client_artifact_id"},
      {"PIECE total_size not the view size",
       [](view_request& r, registration_facts& f) {
         r.kind = registration_kind::piece;
         r.canonical_size_bytes = 44;
         f.total_size = 44;
       },
       "cannot register view: total_size 44 of a PIECE must equal its view size 16"},
  };
  for (const auto& row : rows) {
    SECTION(row.what) {
      view_request r;
      r.spec["a"] = {transpose_op{0, 1}};
      r.place = placement::server;
      r.kind = registration_kind::canonical;
      registration_facts f{44, true};
      row.change(r, f);
      auto out = view_plan::create(r, idx, f);
      REQUIRE_FALSE(out);
      CHECK(out.error().code == errc::invalid_argument);
      CHECK_THAT(out.error().message, Catch::StartsWith(row.message));
    }
  }
}

TEST_CASE("view_plan: CANONICAL client ranges must equal the coverage", "[views][view_plan]") {
  const auto idx = parsed(two_tensor_index);
  auto r = transpose_both();
  r.ranges = {{16, 16}, {0, 16}};
  CHECK(view_plan::create(r, idx, registration_facts{32, false}));
  r.ranges = {{0, 8}};
  auto out = view_plan::create(r, idx, registration_facts{32, false});
  REQUIRE_FALSE(out);
  CHECK(out.error().code == errc::invalid_argument);
  CHECK_THAT(out.error().message,
             Catch::StartsWith("cannot register view: ranges do not match the view's canonical coverage (1 merged "
                               "ranges, 32 bytes)"));
}

TEST_CASE("view_plan: a full-coverage piece is refused, as upstream's test", "[views][view_plan]") {
  const auto idx = parsed(two_tensor_index);
  auto r = transpose_both();
  r.kind = registration_kind::piece;
  r.canonical_size_bytes = 32;
  auto out = view_plan::create(r, idx, registration_facts{32, true});
  REQUIRE_FALSE(out);
  CHECK(out.error().code == errc::invalid_argument);
  CHECK(out.error().message ==
        "cannot register view: a PIECE must not cover the whole canonical buffer (register it as CANONICAL)");
}

TEST_CASE("view_plan: a hostile spec with too many canonical ranges is refused", "[views][view_plan]") {
  // 2^25 one-byte elements at stride 2: every one a range of its own.
  const auto idx = parsed(R"({"x":[0,67108864,[33554432],[2],"torch.uint8",0]})");
  view_request r;
  r.tensor_names = {"x"};
  r.place = placement::server;
  r.kind = registration_kind::piece;
  r.canonical_size_bytes = 67108864;
  auto out = view_plan::create(r, idx, registration_facts{33554432, true});
  REQUIRE_FALSE(out);
  CHECK(out.error().code == errc::invalid_argument);
  CHECK_THAT(out.error().message, Catch::Contains("covers more than 16777216 separate canonical ranges"));
}

TEST_CASE("view_plan: range helpers merge, find gaps and intersect", "[views][view_plan]") {
  CHECK(merge_ranges({{10, 5}, {0, 4}, {4, 2}, {14, 10}, {30, 0}}) == std::vector<byte_range>{{0, 6}, {10, 14}});
  const std::vector<byte_range> need{{0, 10}, {20, 10}};
  CHECK(first_gap(need, std::vector<byte_range>{{0, 30}}) == std::nullopt);
  CHECK(first_gap(need, std::vector<byte_range>{{0, 5}, {6, 30}}) == byte_range{5, 1});
  CHECK(first_gap(need, std::vector<byte_range>{{0, 10}}) == byte_range{20, 10});
  CHECK(intersect_ranges(std::vector<byte_range>{{0, 10}, {20, 10}}, std::vector<byte_range>{{5, 20}}) ==
        std::vector<byte_range>{{5, 5}, {20, 5}});
}

TEST_CASE("view_plan: union_ranges is merge_ranges of both, for random merged lists", "[views][view_plan]") {
  std::mt19937_64 rng(42);
  const auto random_merged = [&] {
    std::vector<byte_range> out;
    for (std::uint64_t k = rng() % 12; k > 0; --k) out.push_back({rng() % 200, rng() % 20});
    return merge_ranges(std::move(out));
  };
  for (int round = 0; round < 2000; ++round) {
    const auto a = random_merged();
    const auto b = random_merged();
    std::vector<byte_range> both = a;
    both.insert(both.end(), b.begin(), b.end());
    CHECK(union_ranges(a, b) == merge_ranges(both));
  }
  CHECK(union_ranges({}, std::vector<byte_range>{{3, 4}}) == std::vector<byte_range>{{3, 4}});
  CHECK(union_ranges(std::vector<byte_range>{{0, 4}}, std::vector<byte_range>{{4, 4}}) ==
        std::vector<byte_range>{{0, 8}});  // touching ranges become one, as merge_ranges makes them
}
