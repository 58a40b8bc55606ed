#include "tensorreg/index/dtype.hpp"

#include <catch2/catch.hpp>

#include <string>
#include <utility>
#include <vector>

namespace {

using tensorreg::errc;
using tensorreg::index::element_size;
using tensorreg::index::map_safetensors_dtype;

}  // namespace

TEST_CASE("dtype: every known torch dtype has its element size", "[index][dtype]") {
  const std::vector<std::pair<std::string, std::uint32_t>> table = {
      {"torch.float16", 2},       {"torch.bfloat16", 2},    {"torch.float32", 4}, {"torch.float64", 8},
      {"torch.int8", 1},          {"torch.uint8", 1},       {"torch.int16", 2},   {"torch.int32", 4},
      {"torch.int64", 8},         {"torch.bool", 1},        {"torch.float", 4},   {"torch.double", 8},
      {"torch.float8_e4m3fn", 1}, {"torch.float8_e5m2", 1}, {"torch.uint16", 2},  {"torch.uint32", 4},
      {"torch.uint64", 8},
  };
  for (const auto& [name, size] : table) {
    INFO(name);
    REQUIRE(element_size(name).has_value());
    CHECK(*element_size(name) == size);
  }
}

TEST_CASE("dtype: unknown and differently spelled dtypes have no element size", "[index][dtype]") {
  CHECK_FALSE(element_size("torch.complex64").has_value());
  CHECK_FALSE(element_size("float32").has_value());
  CHECK_FALSE(element_size("TORCH.FLOAT32").has_value());
  CHECK_FALSE(element_size("").has_value());
  CHECK_FALSE(element_size("torch.float32 ").has_value());
}

TEST_CASE("dtype: safetensors dtypes map to torch dtypes and sizes", "[index][dtype]") {
  const std::vector<std::tuple<std::string, std::string, std::uint32_t>> table = {
      {"F16", "torch.float16", 2},
      {"BF16", "torch.bfloat16", 2},
      {"F32", "torch.float32", 4},
      {"F64", "torch.float64", 8},
      {"I8", "torch.int8", 1},
      {"I16", "torch.int16", 2},
      {"I32", "torch.int32", 4},
      {"I64", "torch.int64", 8},
      {"U8", "torch.uint8", 1},
      {"BOOL", "torch.uint8", 1},
      {"F8_E4M3", "torch.float8_e4m3fn", 1},
      {"F8_E5M2", "torch.float8_e5m2", 1},
      {"U16", "torch.uint16", 2},
      {"U32", "torch.uint32", 4},
      {"U64", "torch.uint64", 8},
  };
  for (const auto& [st, torch, size] : table) {
    INFO(st);
    const auto mapped = map_safetensors_dtype("t", st);
    REQUIRE(mapped.has_value());
    CHECK(mapped->torch_name == torch);
    CHECK(mapped->element_size == size);
    // The torch name of every mapping is in the table with the same size, so views agree.
    CHECK(element_size(mapped->torch_name) == size);
  }
}

TEST_CASE("dtype: BOOL maps to torch.uint8 as upstream writes it", "[index][dtype]") {
  CHECK(map_safetensors_dtype("mask", "BOOL").value().torch_name == "torch.uint8");
}

TEST_CASE("dtype: an unmapped safetensors dtype is invalid and names tensor and dtype", "[index][dtype]") {
  for (const char* bad : {"C64", "F4", "f32", "", "torch.float32", "I4"}) {
    INFO(bad);
    const auto mapped = map_safetensors_dtype("layer.w", bad);
    REQUIRE_FALSE(mapped);
    CHECK(mapped.error().code == errc::invalid_argument);
    CHECK(mapped.error().message == std::string("cannot map dtype of safetensors tensor 'layer.w': "
                                                "unsupported dtype '") +
                                        bad + "'");
  }
}
