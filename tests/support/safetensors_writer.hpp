// tests/support/safetensors_writer.hpp — writes small .safetensors files for tests.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace tensorreg::testing {

struct test_tensor {
  std::string name;
  std::string dtype;  ///< safetensors dtype ("F32", "BF16", ...)
  std::vector<std::int64_t> shape;
  std::string bytes;  ///< exactly product(shape) × element size
};

/// Writes `tensors` (in the given order) to `path` with an 8-byte header length and JSON header.
void write_safetensors(const std::filesystem::path& path, const std::vector<test_tensor>& tensors);

/// `n` bytes derived from `seed` (deterministic, not all equal).
[[nodiscard]] std::string pattern_bytes(std::size_t n, std::uint32_t seed);

}  // namespace tensorreg::testing
