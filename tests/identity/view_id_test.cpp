#include "tensorreg/identity/view_id.hpp"

#include <catch2/catch.hpp>

#include <string>

#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/sha256.hpp"

namespace {

using tensorreg::errc;
using tensorreg::identity::narrow_op;
using tensorreg::identity::transpose_op;
using tensorreg::identity::view_spec;

// registration.md §3.4: the two-tensor index and upstream's golden view_id over it.
constexpr std::string_view two_tensor_index =
    R"({"a":[0,16,[2,2],[2,1],"torch.float32",0],"b":[16,16,[2,2],[2,1],"torch.float32",0]})";
constexpr const char* golden_view_id = "bciqd3js2h75e5gw6cagg5kp3d6xc7laeqca263wrnmirudisjlwuwwa";

std::string index_multihash() { return tensorreg::hash::encode_multihash(tensorreg::hash::sha256(two_tensor_index)); }

view_spec golden_spec() {
  // Inserted out of order on purpose: the payload sorts by name.
  view_spec spec;
  spec["b"] = {narrow_op{1, 0, 1}};
  spec["a"] = {transpose_op{0, 1}};
  return spec;
}

std::string hex(std::string_view bytes) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string out;
  for (const char c : bytes) {
    const auto v = static_cast<unsigned char>(c);
    out.push_back(digits[v >> 4]);
    out.push_back(digits[v & 0xFU]);
  }
  return out;
}

}  // namespace

TEST_CASE("view_id: payload bytes match registration.md", "[identity][view_id]") {
  const std::string mh = index_multihash();
  REQUIRE(mh == "bciqbiysixxtxfbzxgxerdlpbwyk33ncmq5ks3pv7eezawj3pyyjglhy");
  const std::string payload = tensorreg::identity::view_payload(golden_spec(), mh);
  REQUIRE(payload.size() > mh.size());
  CHECK(hex(std::string_view(payload).substr(0, payload.size() - mh.size())) ==
        "0100000002000000"
        "010000006101000000"
        "010000000001000000"
        "010000006201000000"
        "000100000000000000000000000100000000000000");
  CHECK(payload.ends_with(mh));
}

TEST_CASE("view_id: upstream's golden vector", "[identity][view_id]") {
  const auto id = tensorreg::identity::compute_view_id(golden_spec(), index_multihash());
  REQUIRE(id.has_value());
  CHECK(*id == golden_view_id);
  CHECK(tensorreg::identity::check_view_id(golden_view_id, golden_spec(), index_multihash()).has_value());
}

TEST_CASE("view_id: signed and wide fields are written little-endian", "[identity][view_id]") {
  view_spec spec;
  spec["w"] = {narrow_op{0x01020304, -2, 0x0102030405060708ULL}};
  const std::string payload = tensorreg::identity::view_payload(spec, "");
  CHECK(hex(payload) ==
        "01000000"
        "01000000"
        "01000000"
        "77"
        "01000000"
        "00"
        "04030201"
        "feffffffffffffff"
        "0807060504030201");
}

TEST_CASE("view_id: names sort by bytes, not by escaped text", "[identity][view_id]") {
  view_spec spec;
  spec["\xC3\xA9"] = {transpose_op{0, 1}};  // é
  spec["z"] = {transpose_op{0, 1}};
  spec["Z"] = {transpose_op{0, 1}};
  const std::string payload = tensorreg::identity::view_payload(spec, "");
  const auto at = [&](std::string_view name) { return payload.find(name); };
  CHECK(at("Z") < at("z"));
  CHECK(at("z") < at("\xC3\xA9"));
}

TEST_CASE("view_id: different specs give different ids", "[identity][view_id]") {
  const std::string mh = index_multihash();
  auto spec = golden_spec();
  spec["b"] = {narrow_op{1, 1, 1}};
  const auto other = tensorreg::identity::compute_view_id(spec, mh);
  REQUIRE(other.has_value());
  CHECK(*other != golden_view_id);
  const auto other_index = tensorreg::identity::compute_view_id(
      golden_spec(), tensorreg::hash::encode_multihash(tensorreg::hash::sha256(std::string_view("{}"))));
  REQUIRE(other_index.has_value());
  CHECK(*other_index != golden_view_id);
}

TEST_CASE("view_id: empty spec, bad index multihash and mismatches are rejected", "[identity][view_id]") {
  const std::string mh = index_multihash();
  const auto empty = tensorreg::identity::compute_view_id({}, mh);
  REQUIRE_FALSE(empty.has_value());
  CHECK(empty.error().code == errc::invalid_argument);
  CHECK(empty.error().message == "cannot compute view_id: empty view spec");

  const auto bad_index = tensorreg::identity::compute_view_id(golden_spec(), "not-a-multihash");
  REQUIRE_FALSE(bad_index.has_value());
  CHECK(bad_index.error().code == errc::invalid_argument);
  CHECK(bad_index.error().message ==
        "cannot compute view_id: cannot decode multihash 'not-a-multihash': expected multibase prefix "
        "'b' (base32 lower case)");

  auto spec = golden_spec();
  spec["a"] = {transpose_op{1, 0}};
  const auto mismatch = tensorreg::identity::check_view_id(golden_view_id, spec, mh);
  REQUIRE_FALSE(mismatch.has_value());
  CHECK(mismatch.error().code == errc::invalid_argument);
  CHECK(mismatch.error().message == "view_id does not match view spec: provided '" + std::string(golden_view_id) +
                                        "', computed '" + *tensorreg::identity::compute_view_id(spec, mh) + "'");

  const auto empty_check = tensorreg::identity::check_view_id(golden_view_id, {}, mh);
  REQUIRE_FALSE(empty_check.has_value());
  CHECK(empty_check.error().message == "cannot compute view_id: empty view spec");
}
