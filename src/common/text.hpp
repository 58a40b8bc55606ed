// src/common/text.hpp — caller-supplied text in error messages, and hex digits.
//
// Private to the library. Every area that names a client's input in a message (ids, keys, UUIDs,
// digests) quotes it the same way: single quotes, bytes outside printable ASCII written as \xNN
// so that a hostile value cannot break a log line, cut after `max_shown` bytes with "..." so
// that a huge one cannot bloat it. (Tensor names, which may be UTF-8, use index/text.hpp.)
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace tensorreg::text {

/// Room for a whole mi2 id (two multihashes of up to 100 characters each) in a message.
inline constexpr std::size_t default_max_shown = 220;

[[nodiscard]] inline std::string quoted(std::string_view value, std::size_t max_shown = default_max_shown) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string out = "'";
  for (std::size_t i = 0; i < value.size() && i < max_shown; ++i) {
    const auto c = static_cast<unsigned char>(value[i]);
    if (c < 0x20 || c >= 0x7F) {
      out += "\\x";
      out.push_back(digits[c >> 4]);
      out.push_back(digits[c & 0xFU]);
    } else {
      out.push_back(static_cast<char>(c));
    }
  }
  if (value.size() > max_shown) out.append("...");
  out.push_back('\'');
  return out;
}

/// The value of one hex digit (either case), or -1.
[[nodiscard]] constexpr int hex_value(char c) noexcept {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace tensorreg::text
