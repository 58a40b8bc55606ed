// tensorreg/identity/view_id.hpp — the identity of a view over an artifact (registration.md
// §3.6).
//
// Provides the view-spec types (`narrow_op`, `transpose_op`, `view_op`, `view_spec`), the
// exact payload that is hashed (`view_payload`), `compute_view_id` and `check_view_id`.
// view_id = multihash(SHA-256(payload)); the payload is
//   u32le version (1) · u32le tensor count ·
//   per tensor, in byte order of names: u32le name length · name · u32le op count · ops ·
//   the ASCII index multihash,
// where narrow = 0x00 · i32le dim · i64le start · u64le length and
// transpose = 0x01 · i32le dim0 · i32le dim1 (the u32 dims are written as their 32 bits).
// Only the identity lives here: whether the ops make sense for the tensors (one narrow, no
// mixing, bounds) is checked by view normalization.
//
// Thread-safety: pure functions over values. Ownership: values only.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "tensorreg/common/error.hpp"

namespace tensorreg::identity {

/// narrow(dim, start, length): elements [start, start + length) along `dim`.
struct narrow_op {
  std::uint32_t dim = 0;
  std::int64_t start = 0;
  std::uint64_t length = 0;

  friend bool operator==(const narrow_op&, const narrow_op&) = default;
};

/// transpose(dim0, dim1): swaps two dimensions.
struct transpose_op {
  std::uint32_t dim0 = 0;
  std::uint32_t dim1 = 0;

  friend bool operator==(const transpose_op&, const transpose_op&) = default;
};

using view_op = std::variant<narrow_op, transpose_op>;

/// Tensor name → its ops, in order. std::string's ordering is byte order (unsigned chars), as
/// the payload requires.
using view_spec = std::map<std::string, std::vector<view_op>, std::less<>>;

/// Version written at the head of the payload.
inline constexpr std::uint32_t view_payload_version = 1;

/// The exact bytes hashed into a view_id.
/// REQUIRES: fewer than 2^32 tensors, names and ops per tensor (compute_view_id checks this).
[[nodiscard]] std::string view_payload(const view_spec& spec, std::string_view index_multihash);

/// multihash(SHA-256(view_payload(spec, index_multihash))).
/// Errors: INVALID_ARGUMENT for an empty spec ("empty view spec"), a count or name length
/// that does not fit 32 bits, or an index multihash that does not decode (naming it).
[[nodiscard]] result<std::string> compute_view_id(const view_spec& spec, std::string_view index_multihash);

/// Checks a client-provided view_id against the spec.
/// Errors: as compute_view_id; INVALID_ARGUMENT "view_id does not match view spec" (then the
/// provided and the computed id) when they differ.
[[nodiscard]] status check_view_id(std::string_view provided, const view_spec& spec, std::string_view index_multihash);

}  // namespace tensorreg::identity
