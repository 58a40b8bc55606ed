// tensorreg/common/random.hpp — unguessable ids from the OS's random source (getrandom).
//
// Thread-safety: safe from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace tensorreg {

/// `n_bytes` random bytes as 2·n_bytes lower-case hex digits.
[[nodiscard]] std::string random_hex(std::size_t n_bytes);

/// A random 64-bit value.
[[nodiscard]] std::uint64_t random_u64();

}  // namespace tensorreg
