// fuzz/identity_fuzz.cpp — the id parsers and the view spec identity.
//
// Every input is tried, as text, against each id parser (mi2, CGID, byte-artifact CGID, b64u
// segment, multihash, hex digest): an accepted id must print back to exactly the input.
// The same bytes are then read as a view spec (tensors, narrow/transpose ops, an index
// multihash): a computed view_id must check against its own spec and no other id, and
// content_id over a prefix of the input must give an mi2 id that parses back.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "fuzz/fuzz_check.hpp"
#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/identity/artifact_id.hpp"
#include "tensorreg/identity/content_id.hpp"
#include "tensorreg/identity/view_id.hpp"
#include "tensorreg/memory/byte_source.hpp"

namespace {

namespace id = tensorreg::identity;
namespace hash = tensorreg::hash;
using tensorreg::errc;

void check_rejected(const tensorreg::error& e) {
  FUZZ_CHECK(e.code == errc::invalid_argument, e.message.c_str());
  FUZZ_CHECK(!e.message.empty(), "an error without a message");
}

void text_parsers(std::string_view text) {
  const auto kind = id::classify_artifact_id(text);
  auto checked = id::check_artifact_id(text);
  if (checked)
    FUZZ_CHECK(*checked == kind && kind != id::id_kind::unspecified, "check and classify disagree");
  else
    check_rejected(checked.error());
  (void)id::id_kind_name(kind);

  if (auto mi2 = id::parse_mi2(text)) {
    FUZZ_CHECK(mi2->to_string() == text, "parse_mi2 accepted a non-canonical id");
    FUZZ_CHECK(checked && *checked == id::id_kind::mi2, "check_artifact_id refused a valid mi2 id");
  } else {
    check_rejected(mi2.error());
  }

  if (auto ok = id::validate_cgid(text); ok) {
    FUZZ_CHECK(text.size() >= id::cgid_min_length && text.size() <= id::cgid_max_length, "a CGID out of bounds");
    FUZZ_CHECK(checked && *checked == id::id_kind::cgid, "check_artifact_id refused a valid CGID");
  } else {
    check_rejected(ok.error());
  }

  if (auto fields = id::parse_byte_artifact_cgid(text)) {
    FUZZ_CHECK(id::validate_cgid(text).has_value(), "a byte-artifact CGID that is not a CGID");
    auto built = id::build_byte_artifact_cgid(*fields);
    FUZZ_CHECK(built.has_value(), built ? "" : built.error().message.c_str());
    FUZZ_CHECK(*built == text, "build(parse(x)) differs from x");
  } else {
    check_rejected(fields.error());
  }

  if (auto value = id::decode_cgid_segment(text)) {
    FUZZ_CHECK(id::encode_cgid_segment(*value) == text, "decode_cgid_segment accepted a non-canonical segment");
  } else {
    check_rejected(value.error());
  }
  auto segment = id::encode_cgid_segment(text);
  auto decoded = id::decode_cgid_segment(segment);
  FUZZ_CHECK(decoded.has_value() && *decoded == text, "decode(encode(x)) differs from x");

  if (auto d = hash::decode_multihash(text)) {
    FUZZ_CHECK(hash::encode_multihash(*d) == text, "decode_multihash accepted a non-canonical text");
    FUZZ_CHECK(hash::is_multihash(text), "is_multihash disagrees with decode_multihash");
  } else {
    FUZZ_CHECK(!hash::is_multihash(text), "is_multihash disagrees with decode_multihash");
  }
  if (auto d = hash::digest_from_hex(text)) {
    auto back = hash::digest_from_hex(hash::to_hex(*d));
    FUZZ_CHECK(back.has_value() && *back == *d, "to_hex does not round-trip");
  }
}

id::view_spec read_spec(FuzzedDataProvider& in) {
  id::view_spec spec;
  const auto tensors = in.ConsumeIntegralInRange<int>(0, 4);
  for (int t = 0; t < tensors; ++t) {
    auto& ops = spec[in.ConsumeRandomLengthString(16)];
    const auto n = in.ConsumeIntegralInRange<int>(0, 4);
    for (int o = 0; o < n; ++o) {
      if (in.ConsumeBool()) {
        ops.emplace_back(id::narrow_op{in.ConsumeIntegral<std::uint32_t>(), in.ConsumeIntegral<std::int64_t>(),
                                       in.ConsumeIntegral<std::uint64_t>()});
      } else {
        ops.emplace_back(id::transpose_op{in.ConsumeIntegral<std::uint32_t>(), in.ConsumeIntegral<std::uint32_t>()});
      }
    }
  }
  return spec;
}

void view_ids(FuzzedDataProvider& in) {
  const auto spec = read_spec(in);
  const std::string index_multihash = in.ConsumeBool()
                                          ? hash::encode_multihash(hash::sha256(in.ConsumeRandomLengthString(32)))
                                          : in.ConsumeRandomLengthString(64);
  const auto payload = id::view_payload(spec, index_multihash);
  std::size_t expected = 8 + index_multihash.size();
  for (const auto& [name, ops] : spec) {
    expected += 8 + name.size();
    for (const auto& op : ops) expected += std::holds_alternative<id::narrow_op>(op) ? 21 : 9;
  }
  FUZZ_CHECK(payload.size() == expected, "view_payload's length does not follow the layout");

  auto view = id::compute_view_id(spec, index_multihash);
  if (!view) {
    check_rejected(view.error());
    FUZZ_CHECK(spec.empty() || !hash::is_multihash(index_multihash), view.error().message.c_str());
    return;
  }
  FUZZ_CHECK(hash::is_multihash(*view), "a view_id that is not a multihash");
  FUZZ_CHECK(id::check_view_id(*view, spec, index_multihash).has_value(), "a view_id does not check against its spec");
  const auto other = in.ConsumeRandomLengthString(64);
  auto mismatch = id::check_view_id(other, spec, index_multihash);
  FUZZ_CHECK(mismatch.has_value() == (other == *view), "check_view_id accepted another id");
  if (!mismatch) check_rejected(mismatch.error());
}

void content_ids(FuzzedDataProvider& in) {
  const auto index_json = in.ConsumeRandomLengthString(64);
  const auto data = in.ConsumeRemainingBytes<std::uint8_t>();
  const tensorreg::memory::host_bytes_view source(std::as_bytes(std::span<const std::uint8_t>(data)));
  auto mi2 = id::content_id(index_json, source, nullptr);
  FUZZ_CHECK(mi2.has_value(), "content_id failed over host bytes");
  FUZZ_CHECK(mi2->index == hash::sha256(index_json), "the index multihash is not SHA-256 of the index");
  auto back = id::parse_mi2(mi2->to_string());
  FUZZ_CHECK(back.has_value() && *back == *mi2, "a computed mi2 id does not parse back");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  text_parsers(std::string_view(reinterpret_cast<const char*>(data), size));
  FuzzedDataProvider in(data, size);
  view_ids(in);
  content_ids(in);
  return 0;
}
