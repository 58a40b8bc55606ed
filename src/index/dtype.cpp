#include "tensorreg/index/dtype.hpp"

#include <array>
#include <string>
#include <utility>

#include "index/text.hpp"

namespace tensorreg::index {

namespace {

struct torch_dtype {
  std::string_view name;
  std::uint32_t size;
};

// Upstream's view planner knows the first twelve; the rest come with DECISIONS §5.18.
constexpr std::array<torch_dtype, 17> torch_dtypes{{
    {"torch.float16", 2},
    {"torch.bfloat16", 2},
    {"torch.float32", 4},
    {"torch.float64", 8},
    {"torch.int8", 1},
    {"torch.uint8", 1},
    {"torch.int16", 2},
    {"torch.int32", 4},
    {"torch.int64", 8},
    {"torch.bool", 1},
    {"torch.float", 4},
    {"torch.double", 8},
    {"torch.float8_e4m3fn", 1},
    {"torch.float8_e5m2", 1},
    {"torch.uint16", 2},
    {"torch.uint32", 4},
    {"torch.uint64", 8},
}};

struct safetensors_mapping {
  std::string_view safetensors_name;
  safetensors_dtype mapped;
};

constexpr std::array<safetensors_mapping, 15> safetensors_dtypes{{
    {"F16", {"torch.float16", 2}},
    {"BF16", {"torch.bfloat16", 2}},
    {"F32", {"torch.float32", 4}},
    {"F64", {"torch.float64", 8}},
    {"I8", {"torch.int8", 1}},
    {"I16", {"torch.int16", 2}},
    {"I32", {"torch.int32", 4}},
    {"I64", {"torch.int64", 8}},
    {"U8", {"torch.uint8", 1}},
    {"BOOL", {"torch.uint8", 1}},
    {"F8_E4M3", {"torch.float8_e4m3fn", 1}},
    {"F8_E5M2", {"torch.float8_e5m2", 1}},
    {"U16", {"torch.uint16", 2}},
    {"U32", {"torch.uint32", 4}},
    {"U64", {"torch.uint64", 8}},
}};

}  // namespace

std::optional<std::uint32_t> element_size(std::string_view dtype) noexcept {
  for (const auto& d : torch_dtypes) {
    if (d.name == dtype) return d.size;
  }
  return std::nullopt;
}

result<safetensors_dtype> map_safetensors_dtype(std::string_view tensor_name, std::string_view dtype) {
  for (const auto& m : safetensors_dtypes) {
    if (m.safetensors_name == dtype) return m.mapped;
  }
  return fail(errc::invalid_argument, "cannot map dtype of safetensors tensor " + detail::quote_name(tensor_name) +
                                          ": unsupported dtype " + detail::quote_name(dtype));
}

}  // namespace tensorreg::index
