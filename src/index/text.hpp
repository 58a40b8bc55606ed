// Private helpers of tensorreg::index: UTF-8 decoding, names in messages, checked arithmetic.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace tensorreg::index::detail {

/// Decodes one well-formed UTF-8 sequence at `s[i]` and advances `i` past it; nullopt (and `i`
/// unchanged) for an ill-formed sequence: overlong forms, surrogates and values past U+10FFFF
/// are ill-formed, as in RFC 3629.
inline std::optional<char32_t> decode_utf8(std::string_view s, std::size_t& i) noexcept {
  const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char b0 = byte(i);
  if (b0 < 0x80) {
    ++i;
    return static_cast<char32_t>(b0);
  }
  std::size_t len = 0;
  char32_t cp = 0;
  unsigned char lo = 0x80;
  unsigned char hi = 0xBF;  // bounds of the second byte, which rule out overlongs and surrogates
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    len = 2;
    cp = b0 & 0x1Fu;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    len = 3;
    cp = b0 & 0x0Fu;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    len = 4;
    cp = b0 & 0x07u;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return std::nullopt;
  }
  if (s.size() - i < len) return std::nullopt;
  for (std::size_t k = 1; k < len; ++k) {
    const unsigned char b = byte(i + k);
    if (k == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) return std::nullopt;
    cp = (cp << 6) | (b & 0x3Fu);
  }
  i += len;
  return cp;
}

/// A name for an error message, in single quotes. Control bytes and bytes of ill-formed UTF-8
/// are written as \xNN so that a hostile name cannot break a log line.
inline std::string quote_name(std::string_view name) {
  static constexpr char hex[] = "0123456789abcdef";
  std::string out;
  out.reserve(name.size() + 2);
  out += '\'';
  std::size_t i = 0;
  while (i < name.size()) {
    const std::size_t start = i;
    const auto cp = decode_utf8(name, i);
    if (cp && *cp >= 0x20 && *cp != 0x7F) {
      out.append(name.substr(start, i - start));
      continue;
    }
    const auto b = static_cast<unsigned char>(name[start]);
    out += "\\x";
    out += hex[b >> 4];
    out += hex[b & 0xF];
    i = start + 1;
  }
  out += '\'';
  return out;
}

/// a + b, or nullopt when it does not fit in 64 bits.
inline std::optional<std::uint64_t> checked_add(std::uint64_t a, std::uint64_t b) noexcept {
  std::uint64_t r = 0;
  if (__builtin_add_overflow(a, b, &r)) return std::nullopt;
  return r;
}

/// a * b, or nullopt when it does not fit in 64 bits.
inline std::optional<std::uint64_t> checked_mul(std::uint64_t a, std::uint64_t b) noexcept {
  std::uint64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) return std::nullopt;
  return r;
}

/// `v` rounded up to a multiple of `align` (a power of two), or nullopt on overflow.
inline std::optional<std::uint64_t> align_up(std::uint64_t v, std::uint64_t align) noexcept {
  const auto bumped = checked_add(v, align - 1);
  if (!bumped) return std::nullopt;
  return *bumped & ~(align - 1);
}

}  // namespace tensorreg::index::detail
