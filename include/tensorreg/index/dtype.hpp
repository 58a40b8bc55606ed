// tensorreg/index/dtype.hpp — the dtypes the canonical index knows.
//
// Provides the torch dtype table with element sizes (registration.md §2.4, extended by
// DECISIONS §5.18) and the map from safetensors dtype names ("F32", "BOOL", …) to torch dtype
// strings ("torch.float32", "torch.uint8", …).
//
// A dtype outside the table is not an error for the index itself (DECISIONS §5.12): the index
// keeps it as an opaque string, and only operations that need an element size (views) refuse it.
//
// Thread-safety: the tables are immutable statics; every function is safe to call concurrently.
// Ownership: returned string_views point into static storage and never dangle.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

#include "tensorreg/common/error.hpp"

namespace tensorreg::index {

/// Element size in bytes of a torch dtype string ("torch.float32" → 4), or nullopt when the
/// dtype is not in the known table. The match is exact and case-sensitive, as torch writes it.
/// Errors: none.
[[nodiscard]] std::optional<std::uint32_t> element_size(std::string_view dtype) noexcept;

/// What a safetensors dtype becomes in the canonical index.
struct safetensors_dtype {
  std::string_view torch_name;  ///< "torch.float32"; static storage
  std::uint32_t element_size = 0;

  friend bool operator==(const safetensors_dtype&, const safetensors_dtype&) = default;
};

/// Maps the safetensors dtype of one tensor ("F32") to its torch dtype and element size.
/// BOOL maps to torch.uint8 as upstream writes it, so content ids match (DECISIONS §5.18).
/// `tensor_name` is used only to name the tensor in the error message.
/// Errors: INVALID_ARGUMENT for any dtype outside the map, naming the tensor and the dtype.
[[nodiscard]] result<safetensors_dtype> map_safetensors_dtype(std::string_view tensor_name, std::string_view dtype);

}  // namespace tensorreg::index
