// tensorreg/hash/sha256.hpp — SHA-256 digests (content ids, tree-hash leaves and nodes).
//
// Provides `digest`, the one-shot `sha256()`, the incremental `sha256_hasher`, and hex
// conversion (`to_hex`, `digest_from_hex`, the form of a `tensor_index_key`). SHA-256 is the
// standard function: the digest of empty input is e3b0c442…7852b855 (DECISIONS §7), never
// 32 zero bytes. The implementation is OpenSSL's EVP (SHA-NI where the CPU has it); no
// OpenSSL type appears in this header.
//
// Thread-safety: the free functions are safe to call from any thread. A `sha256_hasher` is a
// plain value: one thread at a time; distinct hashers are independent.
// Ownership: a hasher owns its OpenSSL context; it is move-only.
#pragma once

#include <array>
#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "tensorreg/common/error.hpp"

namespace tensorreg::hash {

/// A SHA-256 digest.
using digest = std::array<std::byte, 32>;

/// SHA-256 of `bytes`. Never fails (an OpenSSL failure is a broken invariant and aborts).
[[nodiscard]] digest sha256(std::span<const std::byte> bytes);

/// SHA-256 of the bytes of `text` (convenience for canonical JSON and other ASCII payloads).
[[nodiscard]] digest sha256(std::string_view text);

/// Incremental SHA-256: update() any number of times, then finish(). finish() leaves the
/// hasher ready for a new message, so one hasher can hash many leaves.
class sha256_hasher {
 public:
  sha256_hasher();
  ~sha256_hasher();
  sha256_hasher(sha256_hasher&&) noexcept;
  sha256_hasher& operator=(sha256_hasher&&) noexcept;
  sha256_hasher(const sha256_hasher&) = delete;
  sha256_hasher& operator=(const sha256_hasher&) = delete;

  /// Appends `bytes` to the message. REQUIRES: not moved from.
  void update(std::span<const std::byte> bytes);

  /// Returns the digest of everything appended since construction or the last finish()/reset(),
  /// and starts a new message. REQUIRES: not moved from.
  [[nodiscard]] digest finish();

  /// Discards what was appended and starts a new message. REQUIRES: not moved from.
  void reset();

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

/// Lower-case hex of a digest (64 characters).
[[nodiscard]] std::string to_hex(const digest& d);

/// Parses 64 hex digits (upper or lower case) into a digest, as a `tensor_index_key` is given.
/// Errors: INVALID_ARGUMENT "tensor_index_key must be a 32-byte sha256 hex string" (followed
/// by the offending value) for any other length or a non-hex character.
[[nodiscard]] result<digest> digest_from_hex(std::string_view hex);

}  // namespace tensorreg::hash
