#include "tensorreg/hash/multihash.hpp"

#include <catch2/catch.hpp>

#include <string>

namespace {

using tensorreg::errc;
using tensorreg::hash::decode_multihash;
using tensorreg::hash::digest;
using tensorreg::hash::encode_multihash;
using tensorreg::hash::sha256;

void check_rejected(const std::string& text, const std::string& reason) {
  INFO("text: " << text);
  const auto decoded = decode_multihash(text);
  REQUIRE_FALSE(decoded.has_value());
  CHECK(decoded.error().code == errc::invalid_argument);
  CHECK(decoded.error().message == "cannot decode multihash '" + text + "': " + reason);
  CHECK_FALSE(tensorreg::hash::is_multihash(text));
}

}  // namespace

// registration.md §3.4: every index vector is the multihash of SHA-256 of the literal bytes.
TEST_CASE("multihash: registration.md index vectors", "[hash][multihash]") {
  CHECK(encode_multihash(sha256(std::string_view("{}"))) == "bciqeie3punk3gz4kcfdk2fxx5bsj5fh3j7bb7z36qmimayhwdsvp7cq");
  CHECK(encode_multihash(sha256(std::string_view(R"({"weights":[0,16,[2,2],[2,1],"torch.float32",0]})"))) ==
        "bciqj5lwemn5gwbuwhk5mgn2iadmjuk3eu4qwaka5dwagpr5obv4kzei");
  // One tensor named é, escaped as the SDK and our emitter write it.
  CHECK(encode_multihash(sha256(std::string_view(R"({"\u00e9":[0,16,[2,2],[2,1],"torch.float32",0]})"))) ==
        "bciqehocq7w5cliuf24tdgag26cwzyswfkhaflh42wcy3lpnwlyzbk4y");
  // The same with é as raw UTF-8 (C3 A9): upstream's LIP rebuild only.
  CHECK(encode_multihash(sha256(std::string_view("{\"\xC3\xA9\":[0,16,[2,2],[2,1],\"torch.float32\",0]}"))) ==
        "bciqckmcqgesy5hqmii2vruux2zgkxpl2ftcvlsass4pw3i72omoob6y");
  CHECK(encode_multihash(sha256(std::string_view(
            R"({"a":[0,16,[2,2],[2,1],"torch.float32",0],"b":[16,16,[2,2],[2,1],"torch.float32",0]})"))) ==
        "bciqbiysixxtxfbzxgxerdlpbwyk33ncmq5ks3pv7eezawj3pyyjglhy");
}

TEST_CASE("multihash: encoding is 56 characters starting with bciq", "[hash][multihash]") {
  CHECK(encode_multihash(digest{}) == "bciqaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa");
  digest ones{};
  ones.fill(std::byte{0xFF});
  const std::string text = encode_multihash(ones);
  CHECK(text.size() == tensorreg::hash::multihash_chars);
  CHECK(text.starts_with("bciq"));
  CHECK(text.find_first_not_of("abcdefghijklmnopqrstuvwxyz234567", 1) == std::string::npos);
}

TEST_CASE("multihash: decode inverts encode", "[hash][multihash]") {
  for (int seed = 0; seed < 64; ++seed) {
    digest d{};
    for (std::size_t i = 0; i < d.size(); ++i) d[i] = static_cast<std::byte>(seed * 37 + static_cast<int>(i) * 11);
    const std::string text = encode_multihash(d);
    const auto back = decode_multihash(text);
    REQUIRE(back.has_value());
    CHECK(*back == d);
    CHECK(tensorreg::hash::is_multihash(text));
  }
}

TEST_CASE("multihash: the decoder accepts only the canonical encoding", "[hash][multihash]") {
  const std::string good = encode_multihash(sha256(std::string_view("{}")));
  REQUIRE(good == "bciqeie3punk3gz4kcfdk2fxx5bsj5fh3j7bb7z36qmimayhwdsvp7cq");

  check_rejected("", "expected multibase prefix 'b' (base32 lower case)");
  check_rejected("B" + good.substr(1), "expected multibase prefix 'b' (base32 lower case)");
  check_rejected("z" + good.substr(1), "expected multibase prefix 'b' (base32 lower case)");
  check_rejected(good.substr(0, 55), "expected 56 characters, got 55");
  check_rejected(good + "a", "expected 56 characters, got 57");
  check_rejected(good + "====", "expected 56 characters, got 60");
  // Upper case, padding, digits outside 2-7 are outside the alphabet.
  check_rejected("bCIQ" + good.substr(4), "character 1 is not in the base32 alphabet [a-z2-7]");
  check_rejected(good.substr(0, 10) + "1" + good.substr(11), "character 10 is not in the base32 alphabet [a-z2-7]");
  check_rejected(good.substr(0, 55) + "=", "character 55 is not in the base32 alphabet [a-z2-7]");
  // The last character carries 2 data bits then 3 zero bits: 'q' = 10000 is canonical, 'r' is not.
  check_rejected(good.substr(0, 55) + "r", "non-zero trailing bits (not the canonical encoding)");
  // Header bytes: 'bciq' decodes to 0x12 0x20; 'baiq' gives 0x02 0x20, 'bcaq' 0x10 0x20.
  check_rejected("baiq" + good.substr(4), "header bytes 0x02 0x20 are not sha2-256 (0x12 0x20)");
  check_rejected("bcaq" + good.substr(4), "header bytes 0x10 0x20 are not sha2-256 (0x12 0x20)");
  check_rejected("bcia" + good.substr(4), "header bytes 0x12 0x00 are not sha2-256 (0x12 0x20)");
}

TEST_CASE("multihash: long rejected values are cut short in the message", "[hash][multihash]") {
  const std::string huge(10000, 'x');
  const auto decoded = decode_multihash(huge);
  REQUIRE_FALSE(decoded.has_value());
  CHECK(decoded.error().code == errc::invalid_argument);
  CHECK(decoded.error().message.size() < 200);
  CHECK(decoded.error().message.find("...'") != std::string::npos);
}
