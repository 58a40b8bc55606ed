#include "tensorreg/identity/artifact_id.hpp"

#include <array>
#include <cstdint>
#include <vector>

#include "common/text.hpp"
#include "tensorreg/hash/multihash.hpp"

namespace tensorreg::identity {
namespace {

using text::quoted;

constexpr std::string_view mi2_prefix = "mi2:";
constexpr std::string_view cgid_prefix = "cgid:";
constexpr std::string_view b64u_prefix = "b64u.";
constexpr std::string_view byte_artifact_tag = "byte_artifact";
constexpr char base64url_alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

bool is_unreserved(char c) noexcept {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
         c == '_' || c == '~';
}

int base64url_value(char c) noexcept {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '-') return 62;
  if (c == '_') return 63;
  return -1;
}

// The character of `text` that the profile forbids in a segment or value, if any.
std::string_view::size_type forbidden_char(std::string_view text) noexcept { return text.find_first_of("|\n\r"); }

std::vector<std::string_view> split(std::string_view text, char separator) {
  std::vector<std::string_view> parts;
  for (;;) {
    const auto at = text.find(separator);
    parts.push_back(text.substr(0, at));
    if (at == std::string_view::npos) return parts;
    text.remove_prefix(at + 1);
  }
}

}  // namespace

std::string_view id_kind_name(id_kind kind) noexcept {
  switch (kind) {
    case id_kind::unspecified: return "UNSPECIFIED";
    case id_kind::mi2: return "MI2";
    case id_kind::cgid: return "CGID";
  }
  return "UNSPECIFIED";
}

std::string mi2_id::to_string() const {
  std::string out(mi2_prefix);
  out += hash::encode_multihash(index);
  out.push_back(':');
  out += hash::encode_multihash(data);
  return out;
}

result<mi2_id> parse_mi2(std::string_view text) {
  const auto context = "cannot parse artifact id " + quoted(text);
  if (!text.starts_with(mi2_prefix)) {
    return fail(errc::invalid_argument, context + ": expected prefix 'mi2:'");
  }
  const auto parts = split(text.substr(mi2_prefix.size()), ':');
  if (parts.size() != 2) {
    return fail(errc::invalid_argument, context + ": expected 'mi2:<index multihash>:<data multihash>', found " +
                                            std::to_string(parts.size()) + " ':'-separated parts after 'mi2:'");
  }
  mi2_id id;
  auto index = hash::decode_multihash(parts[0]);
  if (!index) return tl::unexpected(with_context(std::move(index).error(), context + ": index multihash"));
  auto data = hash::decode_multihash(parts[1]);
  if (!data) return tl::unexpected(with_context(std::move(data).error(), context + ": data multihash"));
  id.index = *index;
  id.data = *data;
  return id;
}

status validate_cgid(std::string_view text) {
  const auto bad = [&](const std::string& reason) {
    return fail(errc::invalid_argument, "invalid cgid " + quoted(text) + ": " + reason);
  };
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (static_cast<unsigned char>(text[i]) >= 0x80) {
      return bad("byte " + std::to_string(i) + " is not ASCII");
    }
  }
  if (!text.starts_with(cgid_prefix)) return bad("expected prefix 'cgid:'");
  if (text.size() < cgid_min_length || text.size() > cgid_max_length) {
    return bad("length " + std::to_string(text.size()) + " is outside " + std::to_string(cgid_min_length) + ".." +
               std::to_string(cgid_max_length));
  }
  for (std::size_t i = cgid_prefix.size(); i < text.size(); ++i) {
    if (!is_unreserved(text[i])) {
      return bad("character " + quoted(text.substr(i, 1)) + " at " + std::to_string(i) + " is not in [A-Za-z0-9-._~]");
    }
  }
  return {};
}

std::string encode_cgid_segment(std::string_view value) {
  std::string out(b64u_prefix);
  out.reserve(b64u_prefix.size() + (value.size() * 4 + 2) / 3);
  std::uint32_t buffer = 0;
  unsigned bits = 0;
  for (const char c : value) {
    buffer = (buffer << 8) | static_cast<unsigned char>(c);
    bits += 8;
    while (bits >= 6) {
      bits -= 6;
      out.push_back(base64url_alphabet[(buffer >> bits) & 0x3FU]);
    }
  }
  if (bits > 0) out.push_back(base64url_alphabet[(buffer << (6 - bits)) & 0x3FU]);
  return out;
}

result<std::string> decode_cgid_segment(std::string_view segment) {
  const auto bad = [&](const std::string& reason) {
    return fail(errc::invalid_argument, "cannot decode cgid segment " + quoted(segment) + ": " + reason);
  };
  if (!segment.starts_with(b64u_prefix)) return bad("expected prefix 'b64u.'");
  const auto body = segment.substr(b64u_prefix.size());
  if (body.size() % 4 == 1) {
    return bad("base64url length " + std::to_string(body.size()) + " is impossible");
  }
  std::string out;
  out.reserve(body.size() * 3 / 4);
  std::uint32_t buffer = 0;
  unsigned bits = 0;
  for (std::size_t i = 0; i < body.size(); ++i) {
    const int v = base64url_value(body[i]);
    if (v < 0) {
      return bad("character " + quoted(body.substr(i, 1)) + " is not in the base64url alphabet");
    }
    buffer = (buffer << 6) | static_cast<std::uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((buffer >> bits) & 0xFFU));
    }
  }
  if ((buffer & ((1U << bits) - 1U)) != 0) {
    return bad("non-zero trailing bits (not the canonical encoding)");
  }
  return out;
}

result<byte_artifact_cgid> parse_byte_artifact_cgid(std::string_view text) {
  TENSORREG_TRY(validate_cgid(text));
  const auto bad = [&](const std::string& reason) {
    return fail(errc::invalid_argument, "invalid byte_artifact cgid " + quoted(text) + ": " + reason);
  };
  static constexpr std::array<std::string_view, 7> names = {
      "tag", "ns", "engine", "model_id_enc", "model_version_enc", "layout_id", "engine_key_enc"};
  const auto segments = split(text.substr(cgid_prefix.size()), '~');
  if (segments.size() != names.size()) {
    return bad(
        "expected 7 '~'-separated segments (byte_artifact~ns~engine~model_id_enc~"
        "model_version_enc~layout_id~engine_key_enc), found " +
        std::to_string(segments.size()));
  }
  if (segments[0] != byte_artifact_tag) return bad("expected first segment 'byte_artifact'");
  for (std::size_t i = 0; i < segments.size(); ++i) {
    if (segments[i].empty()) return bad("segment " + std::string(names[i]) + " is empty");
    if (forbidden_char(segments[i]) != std::string_view::npos) {
      return bad("segment " + std::string(names[i]) + " contains '|', '\\n' or '\\r'");
    }
  }
  const auto decode = [&](std::size_t i) -> result<std::string> {
    auto value = decode_cgid_segment(segments[i]);
    if (!value) {
      return tl::unexpected(with_context(std::move(value).error(), "invalid byte_artifact cgid " + quoted(text) +
                                                                       ": segment " + std::string(names[i])));
    }
    if (value->empty() || forbidden_char(*value) != std::string_view::npos) {
      return bad("segment " + std::string(names[i]) +
                 " decodes to a value that is empty or contains '|', '\\n' or '\\r'");
    }
    return value;
  };
  byte_artifact_cgid out;
  out.ns = segments[1];
  out.engine = segments[2];
  TENSORREG_TRY_ASSIGN(out.model_id, decode(3));
  TENSORREG_TRY_ASSIGN(out.model_version, decode(4));
  out.layout_id = segments[5];
  TENSORREG_TRY_ASSIGN(out.engine_key, decode(6));
  return out;
}

result<std::string> build_byte_artifact_cgid(const byte_artifact_cgid& fields) {
  const auto check = [](std::string_view name, std::string_view value, bool verbatim) -> status {
    const auto bad = [&](const std::string& reason) {
      return fail(errc::invalid_argument,
                  "cannot build byte_artifact cgid: " + std::string(name) + " " + quoted(value) + " " + reason);
    };
    if (value.empty()) return bad("is empty");
    if (forbidden_char(value) != std::string_view::npos) return bad("contains '|', '\\n' or '\\r'");
    if (verbatim) {
      for (const char c : value) {
        if (!is_unreserved(c) || c == '~') return bad("has a character outside [A-Za-z0-9-._]");
      }
    }
    return {};
  };
  TENSORREG_TRY(check("ns", fields.ns, true));
  TENSORREG_TRY(check("engine", fields.engine, true));
  TENSORREG_TRY(check("model_id", fields.model_id, false));
  TENSORREG_TRY(check("model_version", fields.model_version, false));
  TENSORREG_TRY(check("layout_id", fields.layout_id, true));
  TENSORREG_TRY(check("engine_key", fields.engine_key, false));

  std::string out(byte_artifact_prefix);
  out += fields.ns + '~' + fields.engine + '~' + encode_cgid_segment(fields.model_id) + '~' +
         encode_cgid_segment(fields.model_version) + '~' + fields.layout_id + '~' +
         encode_cgid_segment(fields.engine_key);
  if (out.size() > cgid_max_length) {
    return fail(errc::invalid_argument, "cannot build byte_artifact cgid: length " + std::to_string(out.size()) +
                                            " exceeds " + std::to_string(cgid_max_length));
  }
  return out;
}

id_kind classify_artifact_id(std::string_view text) noexcept {
  if (text.starts_with(mi2_prefix)) return id_kind::mi2;
  if (text.starts_with(cgid_prefix)) return id_kind::cgid;
  return id_kind::unspecified;
}

result<id_kind> check_artifact_id(std::string_view text) {
  switch (classify_artifact_id(text)) {
    case id_kind::mi2: TENSORREG_TRY(parse_mi2(text)); return id_kind::mi2;
    case id_kind::cgid: TENSORREG_TRY(validate_cgid(text)); return id_kind::cgid;
    case id_kind::unspecified: break;
  }
  return fail(errc::invalid_argument, "invalid artifact id " + quoted(text) + ": expected prefix 'mi2:' or 'cgid:'");
}

}  // namespace tensorreg::identity
