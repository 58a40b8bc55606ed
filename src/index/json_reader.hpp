// Private to tensorreg::index: strict parsing of untrusted JSON with nlohmann-json.
#pragma once

#include <string_view>

#include <nlohmann/json.hpp>

#include "tensorreg/common/error.hpp"

namespace tensorreg::index::detail {

/// Parses `text` as one JSON value, refusing what nlohmann would otherwise let through: a key
/// repeated in one object (nlohmann keeps the last). Never throws.
/// `what` names the document in messages ("index", "safetensors header of 'x'").
/// Errors: INVALID_ARGUMENT "cannot parse <what>: ..." for a syntax error, ill-formed UTF-8
/// (nlohmann's lexer refuses it, as it refuses lone surrogate escapes) or a duplicate key.
[[nodiscard]] result<nlohmann::json> parse_json_strict(std::string_view text, std::string_view what);

}  // namespace tensorreg::index::detail
