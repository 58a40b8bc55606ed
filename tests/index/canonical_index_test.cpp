#include "tensorreg/index/canonical_index.hpp"

#include <openssl/sha.h>
#include <catch2/catch.hpp>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace {

using tensorreg::errc;
using tensorreg::index::canonical_index;
using tensorreg::index::entry;
using tensorreg::index::tensor_desc;

constexpr std::uint64_t u64_max = std::numeric_limits<std::uint64_t>::max();
constexpr std::int64_t i64_min = std::numeric_limits<std::int64_t>::min();

entry weights_entry(std::string name, std::uint64_t offset = 0, std::uint64_t size = 16) {
  return entry{std::move(name), offset, size, {2, 2}, {2, 1}, "torch.float32", 0};
}

tensor_desc desc(std::string name, std::string storage, std::uint64_t nbytes, std::int64_t storage_offset = 0) {
  return tensor_desc{std::move(name), "torch.float32", {2, 2}, {2, 1}, std::move(storage), nbytes, storage_offset};
}

std::string sha256_hex(const std::string& bytes) {
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size(), digest);
  static constexpr char hex[] = "0123456789abcdef";
  std::string out;
  for (const unsigned char b : digest) {
    out += hex[b >> 4];
    out += hex[b & 0xF];
  }
  return out;
}

// Each entry [0,16,[2,2],[2,1],"torch.float32",0] under every name: the canonical bytes,
// as /usr/bin/python3 json.dumps(..., separators=(",", ":"), sort_keys=True) wrote them.
std::string same_entry_json(const std::vector<std::string>& escaped_names) {
  std::string out = "{";
  for (const auto& n : escaped_names) {
    if (out.size() > 1) out += ',';
    out += "\"" + n + "\":[0,16,[2,2],[2,1],\"torch.float32\",0]";
  }
  return out + "}";
}

std::vector<entry> aliases_named(const std::vector<std::string>& names) {
  std::vector<entry> out;
  for (const auto& n : names) out.push_back(weights_entry(n));
  return out;
}

void require_invalid(const tensorreg::result<canonical_index>& r, const std::string& message) {
  REQUIRE_FALSE(r);
  CHECK(r.error().code == errc::invalid_argument);
  CHECK(r.error().message == message);
}

}  // namespace

// ---- the emitter -------------------------------------------------------------------------------

TEST_CASE("canonical_index: emits the exact bytes of the registration.md 3.4 vectors", "[index][canonical_index]") {
  const auto one = canonical_index::from_entries({weights_entry("weights")}, 16);
  REQUIRE(one);
  CHECK(one->json() == R"({"weights":[0,16,[2,2],[2,1],"torch.float32",0]})");

  const auto accented = canonical_index::from_entries({weights_entry("\xc3\xa9")}, 16);
  REQUIRE(accented);
  CHECK(accented->json() == R"({"\u00e9":[0,16,[2,2],[2,1],"torch.float32",0]})");

  const auto two = canonical_index::from_entries({weights_entry("b", 16), weights_entry("a", 0)}, 32);
  REQUIRE(two);
  CHECK(two->json() == R"({"a":[0,16,[2,2],[2,1],"torch.float32",0],"b":[16,16,[2,2],[2,1],"torch.float32",0]})");
}

TEST_CASE("canonical_index: bytes hash to the digests behind the 3.4 index multihashes", "[index][canonical_index]") {
  // The SHA-256 digests inside bciqj5lw…, bciqehoc… and bciqbiys… (computed with hashlib).
  CHECK(sha256_hex(canonical_index::from_entries({weights_entry("weights")}, 16)->json()) ==
        "9eaec4637a6b06963abac3374800d89a2b64a72160281d1d8067c7ae0d78ac91");
  CHECK(sha256_hex(canonical_index::from_entries({weights_entry("\xc3\xa9")}, 16)->json()) ==
        "43b850fdba25a285d7263300daf0ad9c4ac551c0559f9ab0b1b5bdb65e321573");
  CHECK(sha256_hex(canonical_index::from_entries({weights_entry("a"), weights_entry("b", 16)}, 32)->json()) ==
        "146248bde772873735c911ade1b615bdb44c87552dbebf21320b276fc612659f");
}

TEST_CASE("canonical_index: escapes strings exactly as python json.dumps with ensure_ascii",
          "[index][canonical_index]") {
  // python: json.dumps({'q"\\\b\f\n\r\t\x01\x1f/': e}, ...) — '/' stays as is.
  const auto controls = canonical_index::from_entries(aliases_named({"q\"\\\b\f\n\r\t\x01\x1f/"}), 16);
  REQUIRE(controls);
  CHECK(controls->json() == same_entry_json({R"(q\"\\\b\f\n\r\t\u0001\u001f/)"}));

  // python: names '中文', '\uffff', '\U0010ffff' — BMP as one escape, astral as a surrogate pair.
  const auto wide = canonical_index::from_entries(
      aliases_named({"\xe4\xb8\xad\xe6\x96\x87", "\xef\xbf\xbf", "\xf4\x8f\xbf\xbf"}), 16);
  REQUIRE(wide);
  CHECK(wide->json() == same_entry_json({R"(\u4e2d\u6587)", R"(\uffff)", R"(\udbff\udfff)"}));

  std::string out;
  tensorreg::index::append_json_string(out, "torch.float32");
  CHECK(out == "\"torch.float32\"");
}

TEST_CASE("canonical_index: keys sort by code point, not by their escaped text", "[index][canonical_index]") {
  // python: names 'z', 'é', 'A', '😀', '\x7f' → A, z, \u007f, \u00e9, \ud83d\ude00.
  const auto idx = canonical_index::from_entries(aliases_named({"z", "\xc3\xa9", "A", "\xf0\x9f\x98\x80", "\x7f"}), 16);
  REQUIRE(idx);
  CHECK(idx->json() == same_entry_json({"A", "z", R"(\u007f)", R"(\u00e9)", R"(\ud83d\ude00)"}));
  REQUIRE(idx->entries().size() == 5);
  CHECK(idx->entries()[0].name == "A");
  CHECK(idx->entries()[4].name == "\xf0\x9f\x98\x80");
}

TEST_CASE("canonical_index: integers keep their sign and full 64-bit range", "[index][canonical_index]") {
  // A zero-size entry may sit at the very last offset: it ends exactly at total_size.
  const entry e{"x", u64_max, 0, {-1, std::numeric_limits<std::int64_t>::max()}, {i64_min}, "t", 5};
  const auto idx = canonical_index::from_entries({e}, u64_max);
  REQUIRE(idx);
  CHECK(idx->json() == R"({"x":[18446744073709551615,0,[-1,9223372036854775807],[-9223372036854775808],"t",5]})");
  const auto back = canonical_index::parse(idx->json(), u64_max);
  REQUIRE(back);
  CHECK(back->entries() == idx->entries());
}

TEST_CASE("canonical_index: utf-8 validation follows RFC 3629", "[index][canonical_index]") {
  using tensorreg::index::is_valid_utf8;
  CHECK(is_valid_utf8(""));
  CHECK(is_valid_utf8("plain"));
  CHECK(is_valid_utf8("\xc3\xa9\xe4\xb8\xad\xf0\x9f\x98\x80\xf4\x8f\xbf\xbf"));
  CHECK_FALSE(is_valid_utf8("\xff"));
  CHECK_FALSE(is_valid_utf8("\xc0\xaf"));          // overlong '/'
  CHECK_FALSE(is_valid_utf8("\xe0\x80\xaf"));      // overlong
  CHECK_FALSE(is_valid_utf8("\xed\xa0\x80"));      // surrogate U+D800
  CHECK_FALSE(is_valid_utf8("\xf4\x90\x80\x80"));  // past U+10FFFF
  CHECK_FALSE(is_valid_utf8("\xc3"));              // truncated
  CHECK_FALSE(is_valid_utf8("a\x80z"));            // stray continuation
}

// ---- build (SDK layout) --------------------------------------------------------------------

TEST_CASE("canonical_index: build lays storages out in name order at 8-byte offsets", "[index][canonical_index]") {
  const std::vector<tensor_desc> tensors = {desc("b", "s1", 10), desc("d", "s3", 3), desc("a", "s2", 4),
                                            desc("c", "s1", 10, 1)};
  const auto idx = canonical_index::build(tensors);
  REQUIRE(idx);
  const auto& es = idx->entries();
  REQUIRE(es.size() == 4);
  CHECK(es[0].name == "a");
  CHECK((es[0].offset == 0 && es[0].size == 4));
  CHECK(es[1].name == "b");
  CHECK((es[1].offset == 8 && es[1].size == 10));
  CHECK(es[2].name == "c");  // alias of b: same storage, same offset and size
  CHECK((es[2].offset == 8 && es[2].size == 10 && es[2].storage_offset == 1));
  CHECK(es[3].name == "d");
  CHECK((es[3].offset == 24 && es[3].size == 3));
  CHECK(idx->total_size() == 27);  // max end; not rounded up
  CHECK(idx->json() == R"({"a":[0,4,[2,2],[2,1],"torch.float32",0],"b":[8,10,[2,2],[2,1],"torch.float32",0],)"
                       R"("c":[8,10,[2,2],[2,1],"torch.float32",1],"d":[24,3,[2,2],[2,1],"torch.float32",0]})");
}

TEST_CASE("canonical_index: build of no tensors is an empty tensor dict", "[index][canonical_index]") {
  require_invalid(canonical_index::build({}), "cannot build canonical index: empty tensor dict");
}

TEST_CASE("canonical_index: build refuses duplicate names", "[index][canonical_index]") {
  const std::vector<tensor_desc> tensors = {desc("w", "s1", 8), desc("w", "s2", 8)};
  require_invalid(canonical_index::build(tensors), "cannot build canonical index: duplicate tensor name 'w'");
}

TEST_CASE("canonical_index: build refuses one storage with two sizes", "[index][canonical_index]") {
  const std::vector<tensor_desc> tensors = {desc("a", "s1", 8), desc("b", "s1", 16)};
  require_invalid(canonical_index::build(tensors),
                  "cannot build canonical index: storage 's1' has 16 bytes for tensor 'b' but 8 "
                  "bytes for tensor 'a'");
}

TEST_CASE("canonical_index: build refuses a name that is not utf-8", "[index][canonical_index]") {
  const std::vector<tensor_desc> tensors = {desc("bad\xff", "s1", 8)};
  require_invalid(canonical_index::build(tensors),
                  "cannot build canonical index: tensor name 'bad\\xff' is not valid utf-8");
}

TEST_CASE("canonical_index: build refuses a negative storage_offset", "[index][canonical_index]") {
  const std::vector<tensor_desc> tensors = {desc("a", "s1", 8, -1)};
  require_invalid(canonical_index::build(tensors),
                  "cannot build canonical index: storage_offset -1 of tensor 'a' is negative");
}

TEST_CASE("canonical_index: build refuses a layout past 2^64", "[index][canonical_index]") {
  const std::vector<tensor_desc> tensors = {desc("a", "s1", u64_max - 3), desc("b", "s2", 1)};
  require_invalid(canonical_index::build(tensors),
                  "cannot build canonical index: storage of tensor 'b' (1 bytes after offset "
                  "18446744073709551612) ends past 2^64");
}

TEST_CASE("canonical_index: build refuses a layout of only empty storages", "[index][canonical_index]") {
  const std::vector<tensor_desc> tensors = {desc("a", "s1", 0), desc("b", "s2", 0)};
  require_invalid(canonical_index::build(tensors), "cannot build canonical index: total_size must be > 0");
}

// ---- from_entries ----------------------------------------------------------------------------

TEST_CASE("canonical_index: from_entries accepts padding, unaligned total_size and aliases",
          "[index][canonical_index]") {
  std::vector<entry> es = {weights_entry("b", 24, 8), weights_entry("a", 0, 16), weights_entry("a_view", 0, 16)};
  const auto idx = canonical_index::from_entries(es, 37);
  REQUIRE(idx);
  CHECK(idx->total_size() == 37);
  CHECK(idx->entries()[0].name == "a");
  CHECK(idx->entries()[1].name == "a_view");
  CHECK(idx->entries()[2].name == "b");
  REQUIRE(idx->find("a_view") != nullptr);
  CHECK(idx->find("a_view")->offset == 0);
  CHECK(idx->find("b")->offset == 24);
  CHECK(idx->find("c") == nullptr);
  CHECK(idx->find("") == nullptr);
}

TEST_CASE("canonical_index: from_entries of no entries is an empty tensor dict", "[index][canonical_index]") {
  require_invalid(canonical_index::from_entries({}, 16), "cannot build canonical index: empty tensor dict");
}

TEST_CASE("canonical_index: from_entries refuses total_size 0", "[index][canonical_index]") {
  require_invalid(canonical_index::from_entries({weights_entry("a", 0, 0)}, 0),
                  "cannot build canonical index: total_size must be > 0");
}

TEST_CASE("canonical_index: from_entries refuses an entry past total_size", "[index][canonical_index]") {
  require_invalid(canonical_index::from_entries({weights_entry("a", 8, 16)}, 20),
                  "cannot build byte range map: tensor 'a' ends at 24, past total_size 20");
}

TEST_CASE("canonical_index: from_entries refuses an entry whose end overflows", "[index][canonical_index]") {
  require_invalid(canonical_index::from_entries({weights_entry("a", u64_max - 1, 16)}, u64_max),
                  "cannot build byte range map: tensor 'a' at offset 18446744073709551614 with "
                  "size 16 ends past 2^64");
}

TEST_CASE("canonical_index: from_entries refuses overlapping entries naming both", "[index][canonical_index]") {
  require_invalid(canonical_index::from_entries({weights_entry("a", 0, 16), weights_entry("b", 8, 16)}, 32),
                  "cannot build byte range map: tensor 'a' [0, 16) and tensor 'b' [8, 24) overlap without "
                  "being aliases");
  require_invalid(canonical_index::from_entries({weights_entry("outer", 0, 32), weights_entry("inner", 8, 8)}, 32),
                  "cannot build byte range map: tensor 'outer' [0, 32) and tensor 'inner' [8, 16) overlap "
                  "without being aliases");
}

TEST_CASE("canonical_index: from_entries refuses duplicate names", "[index][canonical_index]") {
  require_invalid(canonical_index::from_entries({weights_entry("a", 0, 8), weights_entry("a", 8, 8)}, 16),
                  "cannot build canonical index: duplicate tensor name 'a'");
}

TEST_CASE("canonical_index: from_entries refuses a dtype that is not utf-8", "[index][canonical_index]") {
  entry e = weights_entry("a");
  e.dtype = "torch.\xc0";
  require_invalid(canonical_index::from_entries({e}, 16),
                  "cannot build canonical index: dtype 'torch.\\xc0' of tensor 'a' is not valid "
                  "utf-8");
}

// ---- parse ---------------------------------------------------------------------------------------

TEST_CASE("canonical_index: parse re-emits any equivalent json canonically", "[index][canonical_index]") {
  const std::string messy =
      " {\n  \"b\" : [ 16 , 16, [2,2], [2, 1], \"torch.float32\", -0 ],\n"
      "  \"\\u0061\": [0,16,[2,2],[2,1],\"torch.float32\",0] }\n";
  const auto idx = canonical_index::parse(messy, std::nullopt);
  REQUIRE(idx);
  CHECK(idx->json() == R"({"a":[0,16,[2,2],[2,1],"torch.float32",0],"b":[16,16,[2,2],[2,1],"torch.float32",0]})");
  CHECK(idx->total_size() == 32);

  // Raw UTF-8 and its escape give the same bytes.
  const auto raw = canonical_index::parse("{\"\xc3\xa9\":[0,16,[2,2],[2,1],\"torch.float32\",0]}", 16);
  const auto esc = canonical_index::parse(R"({"\u00e9":[0,16,[2,2],[2,1],"torch.float32",0]})", 16);
  REQUIRE(raw);
  REQUIRE(esc);
  CHECK(raw->json() == esc->json());
  CHECK(*raw == *esc);
  CHECK(raw->entries()[0].name == "\xc3\xa9");
}

TEST_CASE("canonical_index: parse takes total_size when given, else the largest end", "[index][canonical_index]") {
  const std::string json = R"({"a":[8,16,[4],[1],"torch.float32",0]})";
  CHECK(canonical_index::parse(json, std::nullopt)->total_size() == 24);
  CHECK(canonical_index::parse(json, 100)->total_size() == 100);
  require_invalid(canonical_index::parse(json, 20),
                  "cannot build byte range map: tensor 'a' ends at 24, past total_size 20");
}

TEST_CASE("canonical_index: parse of {} is an empty tensor dict", "[index][canonical_index]") {
  require_invalid(canonical_index::parse("{}", std::nullopt), "cannot parse index: empty tensor dict");
  require_invalid(canonical_index::parse(" { } ", 16), "cannot parse index: empty tensor dict");
}

TEST_CASE("canonical_index: parse refuses a top level that is not an object", "[index][canonical_index]") {
  for (const char* text : {"[]", "\"x\"", "1", "null", "[[0,16,[2,2],[2,1],\"torch.float32\",0]]"}) {
    INFO(text);
    require_invalid(canonical_index::parse(text, std::nullopt), "cannot parse index: top level must be a json object");
  }
}

TEST_CASE("canonical_index: parse refuses text that is not json", "[index][canonical_index]") {
  for (const char* text :
       {"", "{", "{\"a\":[0,16,[2,2],[2,1],\"t\",0]", "{'a':1}", "{\"a\":[0,16,[2,2],[2,1],\"t\",0]} trailing",
        "{\"a\":[01]}", "{/*c*/\"a\":[0,16,[2,2],[2,1],\"t\",0]}", "NaN"}) {
    INFO(text);
    const auto r = canonical_index::parse(text, std::nullopt);
    REQUIRE_FALSE(r);
    CHECK(r.error().code == errc::invalid_argument);
    CHECK_THAT(r.error().message, Catch::StartsWith("cannot parse index: invalid json near byte "));
  }
}

TEST_CASE("canonical_index: parse refuses ill-formed utf-8 and lone surrogates", "[index][canonical_index]") {
  for (const char* text : {"{\"bad\xff\":[0,16,[2,2],[2,1],\"t\",0]}", "{\"a\":[0,16,[2,2],[2,1],\"\xc0\xaf\",0]}",
                           "{\"\\ud800\":[0,16,[2,2],[2,1],\"t\",0]}", "{\"\\udc00x\":[0,16,[2,2],[2,1],\"t\",0]}"}) {
    INFO(text);
    const auto r = canonical_index::parse(text, std::nullopt);
    REQUIRE_FALSE(r);
    CHECK(r.error().code == errc::invalid_argument);
    CHECK_THAT(r.error().message, Catch::StartsWith("cannot parse index: ill-formed utf-8 in a string"));
  }
}

TEST_CASE("canonical_index: parse refuses duplicate keys", "[index][canonical_index]") {
  require_invalid(canonical_index::parse(R"({"a":[0,8,[2],[1],"torch.float32",0],"a":[8,8,[2],[1],"torch.float32",0]})",
                                         std::nullopt),
                  "cannot parse index: duplicate tensor name 'a'");
  // The same name spelled two ways is still one name.
  require_invalid(canonical_index::parse(R"({"\u00e9":[0,8,[2],[1],"t",0],"é":[8,8,[2],[1],"t",0]})", std::nullopt),
                  "cannot parse index: duplicate tensor name 'é'");
}

TEST_CASE("canonical_index: parse refuses an entry that is not an array of 6 fields", "[index][canonical_index]") {
  require_invalid(canonical_index::parse(R"({"w0":{"offset":0}})", std::nullopt),
                  "cannot parse index entry 'w0': must be an array of 6 fields");
  require_invalid(canonical_index::parse(R"({"w0":[0,16,[2,2],[2,1],"torch.float32"]})", std::nullopt),
                  "cannot parse index entry 'w0': has 5 fields, expected 6");
  require_invalid(canonical_index::parse(R"({"w0":[0,16,[2,2],[2,1],"torch.float32",0,"extra"]})", std::nullopt),
                  "cannot parse index entry 'w0': has 7 fields, expected 6");
}

TEST_CASE(
    "canonical_index: parse refuses offset, size and storage_offset that are not "
    "non-negative integers",
    "[index][canonical_index]") {
  const std::vector<std::string> bad_values = {"-1",   "1.0",   "1e2", "true",
                                               "null", "\"0\"", "[]",  "18446744073709551616"};
  for (const auto& v : bad_values) {
    INFO(v);
    require_invalid(canonical_index::parse("{\"w0\":[" + v + ",16,[2],[1],\"t\",0]}", std::nullopt),
                    "cannot parse index entry 'w0': field 0 (offset) must be a non-negative integer");
    require_invalid(canonical_index::parse("{\"w0\":[0," + v + ",[2],[1],\"t\",0]}", std::nullopt),
                    "cannot parse index entry 'w0': field 1 (size) must be a non-negative integer");
    require_invalid(canonical_index::parse("{\"w0\":[0,16,[2],[1],\"t\"," + v + "]}", std::nullopt),
                    "cannot parse index entry 'w0': field 5 (storage_offset) must be a non-negative integer");
  }
  require_invalid(canonical_index::parse(R"({"w0":[0,16,[2],[1],"t",9223372036854775808]})", std::nullopt),
                  "cannot parse index entry 'w0': field 5 (storage_offset) (9223372036854775808) does not fit "
                  "in int64");
}

TEST_CASE("canonical_index: parse refuses shape and stride that are not arrays of integers",
          "[index][canonical_index]") {
  const std::vector<std::string> bad_arrays = {"2", "[2.0]", "[true]", "[\"2\"]", "[[2]]", "null", "[null]", "{}"};
  for (const auto& v : bad_arrays) {
    INFO(v);
    require_invalid(canonical_index::parse("{\"w0\":[0,16," + v + ",[1],\"t\",0]}", std::nullopt),
                    "cannot parse index entry 'w0': field 2 (shape) must be an array of integers");
    require_invalid(canonical_index::parse("{\"w0\":[0,16,[2]," + v + ",\"t\",0]}", std::nullopt),
                    "cannot parse index entry 'w0': field 3 (stride) must be an array of integers");
  }
  require_invalid(canonical_index::parse(R"({"w0":[0,16,[2],[1,9223372036854775808],"t",0]})", std::nullopt),
                  "cannot parse index entry 'w0': field 3 (stride) element 1 (9223372036854775808) does not "
                  "fit in int64");
  const auto negative = canonical_index::parse(R"({"w0":[0,16,[2],[-1],"t",1]})", std::nullopt);
  REQUIRE(negative);
  CHECK(negative->entries()[0].stride == std::vector<std::int64_t>{-1});
  const auto scalar = canonical_index::parse(R"({"w0":[0,4,[],[],"t",0]})", std::nullopt);
  REQUIRE(scalar);
  CHECK(scalar->json() == R"({"w0":[0,4,[],[],"t",0]})");
}

TEST_CASE("canonical_index: parse refuses a dtype that is not a string", "[index][canonical_index]") {
  for (const char* v : {"1", "null", "[\"torch.float32\"]", "true"}) {
    INFO(v);
    require_invalid(canonical_index::parse(std::string("{\"w0\":[0,16,[2],[1],") + v + ",0]}", std::nullopt),
                    "cannot parse index entry 'w0': field 4 (dtype) must be a string");
  }
}

TEST_CASE("canonical_index: parse keeps an unknown dtype as an opaque string", "[index][canonical_index]") {
  const auto idx = canonical_index::parse(R"({"w":[0,16,[2],[1],"torch.complex64\u00e9",0]})", 16);
  REQUIRE(idx);
  CHECK(idx->entries()[0].dtype == "torch.complex64\xc3\xa9");
  CHECK(idx->json() == R"({"w":[0,16,[2],[1],"torch.complex64\u00e9",0]})");
}

TEST_CASE("canonical_index: parse refuses overlapping entries naming both", "[index][canonical_index]") {
  require_invalid(canonical_index::parse(R"({"a":[0,16,[4],[1],"t",0],"b":[12,8,[2],[1],"t",0]})", std::nullopt),
                  "cannot build byte range map: tensor 'a' [0, 16) and tensor 'b' [12, 20) "
                  "overlap without being aliases");
  // Aliases (identical offset and size) are fine.
  CHECK(canonical_index::parse(R"({"a":[0,16,[4],[1],"t",0],"b":[0,16,[2],[1],"t",2]})", std::nullopt));
}

TEST_CASE("canonical_index: parse refuses an entry whose end overflows", "[index][canonical_index]") {
  require_invalid(canonical_index::parse(R"({"a":[18446744073709551615,2,[2],[1],"t",0]})", std::nullopt),
                  "cannot build byte range map: tensor 'a' at offset 18446744073709551615 with size 2 ends "
                  "past 2^64");
}

TEST_CASE("canonical_index: names in messages escape control bytes", "[index][canonical_index]") {
  require_invalid(canonical_index::parse(R"({"a\nb":[0,16,[2],[1],"t"]})", std::nullopt),
                  "cannot parse index entry 'a\\x0ab': has 5 fields, expected 6");
}
