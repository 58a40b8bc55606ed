#include "tensorreg/hash/multihash.hpp"

#include <array>
#include <cstdint>

#include "common/text.hpp"

namespace tensorreg::hash {
namespace {

constexpr char alphabet[] = "abcdefghijklmnopqrstuvwxyz234567";
constexpr std::size_t multihash_bytes = 2 + 32;
// 34 bytes = 272 bits = 54 full base32 characters + 2 bits; the 55th character carries those
// 2 bits followed by 3 zero bits.
constexpr std::size_t base32_chars = (multihash_bytes * 8 + 4) / 5;
static_assert(1 + base32_chars == multihash_chars);
constexpr std::byte sha2_256_code{0x12};
constexpr std::byte sha2_256_length{0x20};

int base32_value(char c) noexcept {
  if (c >= 'a' && c <= 'z') return c - 'a';
  if (c >= '2' && c <= '7') return c - '2' + 26;
  return -1;
}

std::string hex_byte(std::byte b) {
  static constexpr char digits[] = "0123456789abcdef";
  const auto v = std::to_integer<unsigned>(b);
  return std::string{'0', 'x', digits[v >> 4], digits[v & 0xFU]};
}

}  // namespace

std::string encode_multihash(const digest& d) {
  std::array<std::byte, multihash_bytes> bytes{};
  bytes[0] = sha2_256_code;
  bytes[1] = sha2_256_length;
  for (std::size_t i = 0; i < d.size(); ++i) bytes[2 + i] = d[i];

  std::string out;
  out.reserve(multihash_chars);
  out.push_back('b');
  std::uint32_t buffer = 0;
  unsigned bits = 0;
  for (const std::byte b : bytes) {
    buffer = (buffer << 8) | std::to_integer<std::uint32_t>(b);
    bits += 8;
    while (bits >= 5) {
      bits -= 5;
      out.push_back(alphabet[(buffer >> bits) & 0x1FU]);
    }
  }
  if (bits > 0) out.push_back(alphabet[(buffer << (5 - bits)) & 0x1FU]);
  return out;
}

result<digest> decode_multihash(std::string_view text) {
  const auto bad = [&](const std::string& reason) {
    return fail(errc::invalid_argument, "cannot decode multihash " + text::quoted(text, 96) + ": " + reason);
  };
  if (text.empty() || text.front() != 'b') {
    return bad("expected multibase prefix 'b' (base32 lower case)");
  }
  if (text.size() != multihash_chars) {
    return bad("expected " + std::to_string(multihash_chars) + " characters, got " + std::to_string(text.size()));
  }
  std::array<std::byte, multihash_bytes> bytes{};
  std::size_t written = 0;
  std::uint32_t buffer = 0;
  unsigned bits = 0;
  for (std::size_t i = 1; i < text.size(); ++i) {
    const int v = base32_value(text[i]);
    if (v < 0) {
      return bad("character " + std::to_string(i) + " is not in the base32 alphabet [a-z2-7]");
    }
    buffer = (buffer << 5) | static_cast<std::uint32_t>(v);
    bits += 5;
    if (bits >= 8) {
      bits -= 8;
      bytes[written++] = static_cast<std::byte>((buffer >> bits) & 0xFFU);
    }
  }
  TENSORREG_ASSERT(written == multihash_bytes && bits == 3);
  if ((buffer & 0x7U) != 0) return bad("non-zero trailing bits (not the canonical encoding)");
  if (bytes[0] != sha2_256_code || bytes[1] != sha2_256_length) {
    return bad("header bytes " + hex_byte(bytes[0]) + " " + hex_byte(bytes[1]) + " are not sha2-256 (0x12 0x20)");
  }
  digest out{};
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = bytes[2 + i];
  return out;
}

bool is_multihash(std::string_view text) { return decode_multihash(text).has_value(); }

}  // namespace tensorreg::hash
