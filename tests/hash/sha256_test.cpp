#include "tensorreg/hash/sha256.hpp"

#include <catch2/catch.hpp>

#include <string>
#include <utility>
#include <vector>

namespace {

using tensorreg::errc;
using tensorreg::hash::digest;
using tensorreg::hash::sha256;
using tensorreg::hash::sha256_hasher;
using tensorreg::hash::to_hex;

std::span<const std::byte> bytes_of(std::string_view s) {
  return std::as_bytes(std::span<const char>(s.data(), s.size()));
}

}  // namespace

TEST_CASE("sha256: empty input is the standard digest, not zeros", "[hash][sha256]") {
  CHECK(to_hex(sha256(std::span<const std::byte>{})) ==
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  sha256_hasher hasher;
  CHECK(to_hex(hasher.finish()) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

TEST_CASE("sha256: FIPS 180-2 vectors", "[hash][sha256]") {
  CHECK(to_hex(sha256(std::string_view("abc"))) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  CHECK(to_hex(sha256(std::string_view("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"))) ==
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

TEST_CASE("sha256: incremental hashing equals one-shot for any split", "[hash][sha256]") {
  std::vector<std::byte> data(10007);
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::byte>(i * 7 + 3);
  const digest expected = sha256(data);
  for (const std::size_t step : {1UL, 63UL, 64UL, 65UL, 4096UL, 10007UL}) {
    sha256_hasher hasher;
    for (std::size_t at = 0; at < data.size(); at += step) {
      hasher.update(std::span<const std::byte>(data).subspan(at, std::min(step, data.size() - at)));
    }
    CHECK(hasher.finish() == expected);
  }
}

TEST_CASE("sha256: finish and reset start a new message, hashers move", "[hash][sha256]") {
  sha256_hasher hasher;
  hasher.update(bytes_of("abc"));
  const digest first = hasher.finish();
  hasher.update(bytes_of("abc"));
  CHECK(hasher.finish() == first);

  hasher.update(bytes_of("garbage"));
  hasher.reset();
  hasher.update(bytes_of("abc"));
  CHECK(hasher.finish() == first);

  sha256_hasher moved = std::move(hasher);
  moved.update(bytes_of("abc"));
  CHECK(moved.finish() == first);
  sha256_hasher assigned;
  assigned = std::move(moved);
  assigned.update(bytes_of("abc"));
  CHECK(assigned.finish() == first);
}

TEST_CASE("sha256: hex round trip accepts upper and lower case", "[hash][sha256]") {
  const digest d = sha256(std::string_view("abc"));
  const std::string hex = to_hex(d);
  CHECK(hex.size() == 64);
  REQUIRE(tensorreg::hash::digest_from_hex(hex).has_value());
  CHECK(*tensorreg::hash::digest_from_hex(hex) == d);
  std::string upper = hex;
  for (auto& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  REQUIRE(tensorreg::hash::digest_from_hex(upper).has_value());
  CHECK(*tensorreg::hash::digest_from_hex(upper) == d);
}

TEST_CASE("sha256: digest_from_hex rejects wrong length and non-hex characters", "[hash][sha256]") {
  const std::string good = to_hex(sha256(std::string_view("abc")));
  for (const std::string& bad : {std::string(), good.substr(0, 63), good + "0", good.substr(0, 62) + "g0",
                                 "0x" + good.substr(2), good.substr(0, 40)}) {
    const auto parsed = tensorreg::hash::digest_from_hex(bad);
    REQUIRE_FALSE(parsed.has_value());
    CHECK(parsed.error().code == errc::invalid_argument);
    CHECK(parsed.error().message == "tensor_index_key must be a 32-byte sha256 hex string, got '" + bad + "'");
  }
}
