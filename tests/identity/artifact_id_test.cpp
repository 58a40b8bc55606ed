#include "tensorreg/identity/artifact_id.hpp"

#include <catch2/catch.hpp>

#include <string>

#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/sha256.hpp"

namespace {

using tensorreg::errc;
using tensorreg::hash::sha256;
using tensorreg::identity::byte_artifact_cgid;
using tensorreg::identity::id_kind;
using tensorreg::identity::mi2_id;

constexpr const char* index_mh = "bciqeie3punk3gz4kcfdk2fxx5bsj5fh3j7bb7z36qmimayhwdsvp7cq";  // {}
constexpr const char* data_mh = "bciqggdonfftmim3gsejfisf3wjnu75asusohglnszcv4docydplrbxi";   // 0x00..0x1f

// Built from the rules of registration.md §3.5 (b64u = unpadded base64url); the same id appears
// in upstream's SDK tests.
constexpr const char* sglang_cgid =
    "cgid:byte_artifact~tenantA~sglang~b64u.bWV0YS1sbGFtYS9MbGFtYS0zLjEtOEItSW5zdHJ1Y3Q~b64u.djE~"
    "layout_v1~b64u.cmVxdWVzdC0wMDAxOmJsay00Mg";

byte_artifact_cgid sglang_fields() {
  return {"tenantA", "sglang", "meta-llama/Llama-3.1-8B-Instruct", "v1", "layout_v1", "request-0001:blk-42"};
}

template <typename Result>
void check_invalid(const Result& r, const std::string& message) {
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::invalid_argument);
  CHECK(r.error().message == message);
}

}  // namespace

TEST_CASE("artifact_id: mi2 ids print and parse", "[identity][artifact_id]") {
  std::vector<std::byte> data(32);
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::byte>(i);
  const mi2_id id{sha256(std::string_view("{}")), sha256(data)};
  const std::string text = id.to_string();
  CHECK(text == std::string("mi2:") + index_mh + ":" + data_mh);
  CHECK(text.size() == 117);
  const auto parsed = tensorreg::identity::parse_mi2(text);
  REQUIRE(parsed.has_value());
  CHECK(*parsed == id);
  CHECK(tensorreg::identity::classify_artifact_id(text) == id_kind::mi2);
  CHECK(tensorreg::identity::check_artifact_id(text).value() == id_kind::mi2);
}

TEST_CASE("artifact_id: parse_mi2 rejects malformed ids naming them", "[identity][artifact_id]") {
  const std::string good = std::string("mi2:") + index_mh + ":" + data_mh;
  check_invalid(tensorreg::identity::parse_mi2("mi3:" + good.substr(4)),
                "cannot parse artifact id 'mi3:" + good.substr(4) + "': expected prefix 'mi2:'");
  check_invalid(tensorreg::identity::parse_mi2(std::string("mi2:") + index_mh),
                std::string("cannot parse artifact id 'mi2:") + index_mh +
                    "': expected 'mi2:<index multihash>:<data multihash>', found 1 ':'-separated parts after 'mi2:'");
  check_invalid(tensorreg::identity::parse_mi2(good + ":x"),
                "cannot parse artifact id '" + good +
                    ":x': expected 'mi2:<index multihash>:<data multihash>', found 3 ':'-separated parts after 'mi2:'");
  const std::string bad_data = std::string("mi2:") + index_mh + ":B" + (data_mh + 1);
  check_invalid(tensorreg::identity::parse_mi2(bad_data),
                "cannot parse artifact id '" + bad_data + "': data multihash: cannot decode multihash 'B" +
                    (data_mh + 1) + "': expected multibase prefix 'b' (base32 lower case)");
  const std::string bad_index = std::string("mi2:") + index_mh + "a:" + data_mh;
  check_invalid(tensorreg::identity::parse_mi2(bad_index), "cannot parse artifact id '" + bad_index +
                                                               "': index multihash: cannot decode multihash '" +
                                                               index_mh + "a': expected 56 characters, got 57");
}

TEST_CASE("artifact_id: the CGID grammar", "[identity][artifact_id]") {
  CHECK(tensorreg::identity::validate_cgid("cgid:abc").has_value());  // 8 characters: the minimum
  CHECK(tensorreg::identity::validate_cgid("cgid:A-z.0_9~").has_value());
  CHECK(tensorreg::identity::validate_cgid("cgid:" + std::string(195, 'x')).has_value());  // 200
  CHECK(tensorreg::identity::validate_cgid(sglang_cgid).has_value());
  CHECK(tensorreg::identity::classify_artifact_id("cgid:abc") == id_kind::cgid);
  CHECK(tensorreg::identity::check_artifact_id("cgid:abc").value() == id_kind::cgid);

  check_invalid(tensorreg::identity::validate_cgid("cgid:ab"), "invalid cgid 'cgid:ab': length 7 is outside 8..200");
  check_invalid(tensorreg::identity::validate_cgid("cgid:"), "invalid cgid 'cgid:': length 5 is outside 8..200");
  const std::string too_long = "cgid:" + std::string(196, 'x');
  check_invalid(tensorreg::identity::validate_cgid(too_long),
                "invalid cgid '" + too_long + "': length 201 is outside 8..200");
  check_invalid(tensorreg::identity::validate_cgid("CGID:abcdef"),
                "invalid cgid 'CGID:abcdef': expected prefix 'cgid:'");
  check_invalid(tensorreg::identity::validate_cgid("cgid:ab:cd"),
                "invalid cgid 'cgid:ab:cd': character ':' at 7 is not in [A-Za-z0-9-._~]");
  check_invalid(tensorreg::identity::validate_cgid("cgid:ab cd"),
                "invalid cgid 'cgid:ab cd': character ' ' at 7 is not in [A-Za-z0-9-._~]");
  check_invalid(tensorreg::identity::validate_cgid("cgid:ab|cd"),
                "invalid cgid 'cgid:ab|cd': character '|' at 7 is not in [A-Za-z0-9-._~]");
  check_invalid(tensorreg::identity::validate_cgid("cgid:ab\ncd"),
                "invalid cgid 'cgid:ab\\x0acd': character '\\x0a' at 7 is not in [A-Za-z0-9-._~]");
  check_invalid(tensorreg::identity::validate_cgid("cgid:caf\xC3\xA9"),
                "invalid cgid 'cgid:caf\\xc3\\xa9': byte 8 is not ASCII");
}

TEST_CASE("artifact_id: check_artifact_id rejects unknown prefixes and bad ids", "[identity][artifact_id]") {
  CHECK(tensorreg::identity::classify_artifact_id("sha256:abc") == id_kind::unspecified);
  CHECK(tensorreg::identity::classify_artifact_id("") == id_kind::unspecified);
  check_invalid(tensorreg::identity::check_artifact_id("sha256:abc"),
                "invalid artifact id 'sha256:abc': expected prefix 'mi2:' or 'cgid:'");
  check_invalid(tensorreg::identity::check_artifact_id("cgid:a"), "invalid cgid 'cgid:a': length 6 is outside 8..200");
  check_invalid(tensorreg::identity::check_artifact_id("mi2:x:y"),
                "cannot parse artifact id 'mi2:x:y': index multihash: cannot decode multihash 'x': "
                "expected multibase prefix 'b' (base32 lower case)");
  CHECK(tensorreg::identity::id_kind_name(id_kind::mi2) == "MI2");
  CHECK(tensorreg::identity::id_kind_name(id_kind::cgid) == "CGID");
  CHECK(tensorreg::identity::id_kind_name(id_kind::unspecified) == "UNSPECIFIED");
}

TEST_CASE("artifact_id: byte-artifact CGIDs build and parse", "[identity][artifact_id]") {
  const auto built = tensorreg::identity::build_byte_artifact_cgid(sglang_fields());
  REQUIRE(built.has_value());
  CHECK(*built == sglang_cgid);
  const auto parsed = tensorreg::identity::parse_byte_artifact_cgid(sglang_cgid);
  REQUIRE(parsed.has_value());
  CHECK(*parsed == sglang_fields());

  const auto small = tensorreg::identity::parse_byte_artifact_cgid(
      "cgid:byte_artifact~ns~eng~b64u.bW9kZWw~b64u.djE~layout-v1~b64u.azE");
  REQUIRE(small.has_value());
  CHECK(*small == byte_artifact_cgid{"ns", "eng", "model", "v1", "layout-v1", "k1"});
}

TEST_CASE("artifact_id: the b64u segment codec is strict", "[identity][artifact_id]") {
  CHECK(tensorreg::identity::encode_cgid_segment("m") == "b64u.bQ");
  CHECK(tensorreg::identity::encode_cgid_segment("\xFF") == "b64u._w");
  CHECK(tensorreg::identity::decode_cgid_segment("b64u._w").value() == "\xFF");
  CHECK(tensorreg::identity::decode_cgid_segment("b64u.").value().empty());
  for (const std::string_view value : {"a", "ab", "abc", "abcd", "request-0001:blk-42"}) {
    CHECK(tensorreg::identity::decode_cgid_segment(tensorreg::identity::encode_cgid_segment(value)).value() == value);
  }
  check_invalid(tensorreg::identity::decode_cgid_segment("bQ"),
                "cannot decode cgid segment 'bQ': expected prefix 'b64u.'");
  check_invalid(tensorreg::identity::decode_cgid_segment("b64u.bQ=="),
                "cannot decode cgid segment 'b64u.bQ==': character '=' is not in the base64url alphabet");
  check_invalid(tensorreg::identity::decode_cgid_segment("b64u.b+Q"),
                "cannot decode cgid segment 'b64u.b+Q': character '+' is not in the base64url alphabet");
  check_invalid(tensorreg::identity::decode_cgid_segment("b64u.bQ.Z"),
                "cannot decode cgid segment 'b64u.bQ.Z': character '.' is not in the base64url alphabet");
  check_invalid(tensorreg::identity::decode_cgid_segment("b64u.bQabc"),
                "cannot decode cgid segment 'b64u.bQabc': base64url length 5 is impossible");
  check_invalid(tensorreg::identity::decode_cgid_segment("b64u.bR"),
                "cannot decode cgid segment 'b64u.bR': non-zero trailing bits (not the canonical encoding)");
}

TEST_CASE("artifact_id: byte-artifact parser rejects every broken segment", "[identity][artifact_id]") {
  const std::string p = "cgid:byte_artifact~";
  const auto parse = [](const std::string& s) { return tensorreg::identity::parse_byte_artifact_cgid(s); };

  check_invalid(parse("cgid:byte_artifact~tenant~engine~layout_only"),
                "invalid byte_artifact cgid 'cgid:byte_artifact~tenant~engine~layout_only': expected 7 "
                "'~'-separated segments (byte_artifact~ns~engine~model_id_enc~model_version_enc~layout_id~"
                "engine_key_enc), found 4");
  // Upstream's legacy 6-segment form is not accepted (registration.md §3.5 names 7).
  const std::string legacy = p + "tenant~engine~b64u.bQ~layout_v1~b64u.azQ";
  check_invalid(parse(legacy), "invalid byte_artifact cgid '" + legacy +
                                   "': expected 7 '~'-separated segments (byte_artifact~ns~engine~model_id_enc~"
                                   "model_version_enc~layout_id~engine_key_enc), found 6");
  const std::string wrong_tag = "cgid:byte_blob~ns~eng~b64u.bQ~b64u.djE~l~b64u.azE";
  check_invalid(parse(wrong_tag),
                "invalid byte_artifact cgid '" + wrong_tag + "': expected first segment 'byte_artifact'");
  const std::string empty_ns = p + "~eng~b64u.bQ~b64u.djE~l~b64u.azE";
  check_invalid(parse(empty_ns), "invalid byte_artifact cgid '" + empty_ns + "': segment ns is empty");
  const std::string empty_key = p + "ns~eng~b64u.bQ~b64u.djE~l~";
  check_invalid(parse(empty_key), "invalid byte_artifact cgid '" + empty_key + "': segment engine_key_enc is empty");
  const std::string raw_model = p + "ns~eng~model~b64u.djE~l~b64u.azE";
  check_invalid(parse(raw_model), "invalid byte_artifact cgid '" + raw_model +
                                      "': segment model_id_enc: cannot decode cgid segment 'model': "
                                      "expected prefix 'b64u.'");
  const std::string empty_value = p + "ns~eng~b64u.bQ~b64u.~l~b64u.azE";
  check_invalid(parse(empty_value),
                "invalid byte_artifact cgid '" + empty_value +
                    "': segment model_version_enc decodes to a value that is empty or contains '|', '\\n' or '\\r'");
  const std::string pipe_value = p + "ns~eng~b64u.bQ~b64u.djE~l~b64u.YXxi";  // "a|b"
  check_invalid(parse(pipe_value),
                "invalid byte_artifact cgid '" + pipe_value +
                    "': segment engine_key_enc decodes to a value that is empty or contains '|', '\\n' or '\\r'");
  // The CGID grammar comes first: '|' is not a CGID character at all.
  check_invalid(parse(p + "n|s~eng~b64u.bQ~b64u.djE~l~b64u.azE"),
                "invalid cgid '" + p +
                    "n|s~eng~b64u.bQ~b64u.djE~l~b64u.azE': character '|' at 20 is not in "
                    "[A-Za-z0-9-._~]");
}

TEST_CASE("artifact_id: build_byte_artifact_cgid rejects bad fields", "[identity][artifact_id]") {
  auto f = sglang_fields();
  f.ns = "";
  check_invalid(tensorreg::identity::build_byte_artifact_cgid(f), "cannot build byte_artifact cgid: ns '' is empty");
  f = sglang_fields();
  f.engine = "sg/lang";
  check_invalid(tensorreg::identity::build_byte_artifact_cgid(f),
                "cannot build byte_artifact cgid: engine 'sg/lang' has a character outside [A-Za-z0-9-._]");
  f = sglang_fields();
  f.layout_id = "a~b";
  check_invalid(tensorreg::identity::build_byte_artifact_cgid(f),
                "cannot build byte_artifact cgid: layout_id 'a~b' has a character outside [A-Za-z0-9-._]");
  f = sglang_fields();
  f.engine_key = "a\nb";
  check_invalid(tensorreg::identity::build_byte_artifact_cgid(f),
                "cannot build byte_artifact cgid: engine_key 'a\\x0ab' contains '|', '\\n' or '\\r'");
  f = sglang_fields();
  f.model_id = std::string(150, 'm');
  check_invalid(tensorreg::identity::build_byte_artifact_cgid(f),
                "cannot build byte_artifact cgid: length 290 exceeds 200");
}
