// tests/support/two_tensor_artifact.hpp — the small artifact the dispatcher tests register:
// tensor "a" (4 × float32) at offset 0 and "b" (2 × float32) at 16, 24 canonical bytes.
//
// Thread-safety: pure functions. Ownership: returns values.
#pragma once

#include <cstdint>
#include <string>

namespace tensorreg::testing::two_tensors {

inline constexpr std::uint64_t total = 24;

/// Its canonical index (canonical_index::json()).
[[nodiscard]] std::string index_json();
/// Its canonical bytes: byte i is i * 7 + salt; a different salt gives a different artifact.
[[nodiscard]] std::string bytes(char salt = 3);

}  // namespace tensorreg::testing::two_tensors
