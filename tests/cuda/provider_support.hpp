// tests/cuda/provider_support.hpp — what the GPU suites share about the real CUDA provider:
// making one (a failure fails the test) and reading a byte_source back whole.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "support/engine_helpers.hpp"
#include "tensorreg/cuda/device_memory_provider.hpp"
#include "tensorreg/memory/byte_source.hpp"

namespace tensorreg::cuda::testing {

inline std::shared_ptr<device_memory_provider> make_provider(device_memory_provider::options opts = {}) {
  auto p = device_memory_provider::create(opts);
  REQUIRE_OK(p);
  return *p;
}

/// `length` bytes of `s` from `offset`, read through byte_source::read.
inline std::string read_all(const memory::byte_source& s, std::uint64_t offset, std::uint64_t length) {
  std::string out(length, '\0');
  REQUIRE_OK(s.read(offset, std::as_writable_bytes(std::span<char>(out))));
  return out;
}

}  // namespace tensorreg::cuda::testing
