// tensorreg/hash/multihash.hpp — SHA-256 multihashes in multibase base32 (registration.md §3.1).
//
// Provides `encode_multihash` and the strict `decode_multihash`. The multihash bytes are
// 0x12 (sha2-256), 0x20 (32 bytes), then the digest; the text is multibase `b`: the letter
// 'b' then RFC 4648 base32, lower case, no padding. Every such string is 56 characters long
// and starts with "bciq". Only this canonical encoding decodes.
//
// Thread-safety: pure functions. Ownership: values only.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include "tensorreg/common/error.hpp"
#include "tensorreg/hash/sha256.hpp"

namespace tensorreg::hash {

/// Length of every encoded SHA-256 multihash ("b" + 55 base32 characters).
inline constexpr std::size_t multihash_chars = 56;

/// The multibase text of the SHA-256 multihash of `d` (56 characters, "bciq…").
[[nodiscard]] std::string encode_multihash(const digest& d);

/// Parses the canonical text of a SHA-256 multihash back into its digest.
/// Errors: INVALID_ARGUMENT naming the value, for: a first character other than 'b'; a length
/// other than 56; a character outside [a-z2-7]; non-zero trailing bits in the last character
/// (a non-canonical encoding); header bytes other than 0x12 0x20.
[[nodiscard]] result<digest> decode_multihash(std::string_view text);

/// True if `text` is a canonical SHA-256 multihash (decode_multihash would succeed).
[[nodiscard]] bool is_multihash(std::string_view text);

}  // namespace tensorreg::hash
