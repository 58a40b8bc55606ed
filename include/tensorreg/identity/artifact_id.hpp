// tensorreg/identity/artifact_id.hpp — artifact ids (registration.md §3.1, §3.5).
//
// Provides:
//   * `mi2_id`: the content-addressed id "mi2:<index multihash>:<data multihash>", with its
//     strict parser `parse_mi2`;
//   * CGIDs (client-generated ids): `validate_cgid` for the grammar, and the byte-artifact
//     profile "cgid:byte_artifact~<ns>~<engine>~<model_id_enc>~<model_version_enc>~
//     <layout_id>~<engine_key_enc>" (`parse_byte_artifact_cgid`, `build_byte_artifact_cgid`,
//     and the `b64u.` segment codec);
//   * `id_kind`, `classify_artifact_id` (by prefix) and `check_artifact_id` (full validation).
//
// Thread-safety: pure functions over values. Ownership: values only; nothing keeps a view of
// its input.
#pragma once

#include <string>
#include <string_view>

#include "tensorreg/common/error.hpp"
#include "tensorreg/hash/sha256.hpp"

namespace tensorreg::identity {

/// The kind of an artifact id (upstream's descriptor id_kind: UNSPECIFIED 0, MI2 1, CGID 2).
enum class id_kind { unspecified = 0, mi2 = 1, cgid = 2 };

/// "UNSPECIFIED", "MI2" or "CGID".
[[nodiscard]] std::string_view id_kind_name(id_kind kind) noexcept;

/// A content-addressed id: SHA-256 of the canonical index bytes and tree hash of the data.
struct mi2_id {
  hash::digest index{};
  hash::digest data{};

  /// "mi2:<index multihash>:<data multihash>" (4 + 56 + 1 + 56 = 117 characters).
  [[nodiscard]] std::string to_string() const;

  friend bool operator==(const mi2_id&, const mi2_id&) = default;
};

/// Parses "mi2:<index multihash>:<data multihash>"; only the canonical text of each multihash
/// is accepted (hash/multihash.hpp), so parse_mi2(x)->to_string() == x.
/// Errors: INVALID_ARGUMENT naming the value: wrong prefix, not exactly two ':'-separated
/// multihashes, or a multihash that does not decode (the decoder's reason is included).
[[nodiscard]] result<mi2_id> parse_mi2(std::string_view text);

/// Bounds of the CGID grammar.
inline constexpr std::size_t cgid_min_length = 8;
inline constexpr std::size_t cgid_max_length = 200;

/// Checks the CGID grammar: prefix "cgid:", ASCII only, total length 8..200, and a non-empty
/// suffix over [A-Za-z0-9-._~] (no ':').
/// Errors: INVALID_ARGUMENT naming the value and the first rule it breaks.
[[nodiscard]] status validate_cgid(std::string_view text);

/// The six fields of a byte-artifact CGID, decoded (model_id, model_version and engine_key are
/// carried `b64u.`-encoded in the id; ns, engine and layout_id verbatim).
struct byte_artifact_cgid {
  std::string ns;
  std::string engine;
  std::string model_id;
  std::string model_version;
  std::string layout_id;
  std::string engine_key;

  friend bool operator==(const byte_artifact_cgid&, const byte_artifact_cgid&) = default;
};

/// The prefix of every byte-artifact CGID.
inline constexpr std::string_view byte_artifact_prefix = "cgid:byte_artifact~";

/// Parses the byte-artifact profile: a valid CGID whose suffix splits on '~' into exactly 7
/// segments — "byte_artifact", ns, engine, model_id_enc, model_version_enc, layout_id,
/// engine_key_enc — each non-empty and free of '|', '\n' and '\r'; the three *_enc segments
/// are "b64u." + unpadded base64url (RFC 4648 §5, canonical: no non-zero trailing bits) of a
/// value that is itself non-empty and free of '|', '\n' and '\r'.
/// Errors: INVALID_ARGUMENT naming the value and the segment at fault (or validate_cgid's).
[[nodiscard]] result<byte_artifact_cgid> parse_byte_artifact_cgid(std::string_view text);

/// Builds the byte-artifact CGID of `fields`; the *_enc fields are always `b64u.`-encoded, so
/// parse_byte_artifact_cgid(build(f)) == f.
/// Errors: INVALID_ARGUMENT naming the field: an empty field; a '|', '\n' or '\r' in any
/// field; ns, engine or layout_id outside [A-Za-z0-9-._]; a result longer than 200 characters.
[[nodiscard]] result<std::string> build_byte_artifact_cgid(const byte_artifact_cgid& fields);

/// "b64u." + unpadded base64url of `value`.
[[nodiscard]] std::string encode_cgid_segment(std::string_view value);

/// Inverse of encode_cgid_segment: the value of a "b64u." segment.
/// Errors: INVALID_ARGUMENT naming the segment: no "b64u." prefix, a character outside the
/// base64url alphabet, an impossible length, or non-zero trailing bits.
[[nodiscard]] result<std::string> decode_cgid_segment(std::string_view segment);

/// The kind an id claims by its prefix ("mi2:" or "cgid:"); unspecified otherwise. Does not
/// validate the rest.
[[nodiscard]] id_kind classify_artifact_id(std::string_view text) noexcept;

/// Fully validates an artifact id and returns its kind: parse_mi2 for "mi2:", validate_cgid
/// for "cgid:".
/// Errors: INVALID_ARGUMENT naming the value for an unknown prefix or an invalid id.
[[nodiscard]] result<id_kind> check_artifact_id(std::string_view text);

}  // namespace tensorreg::identity
