// src/hash/quote.hpp — caller-supplied text in the hash area's error messages.
//
// Private to src/hash. Single quotes, cut at 96 bytes so that a huge input cannot bloat a
// message or a log line.
#pragma once

#include <string>
#include <string_view>

namespace tensorreg::hash::detail {

inline std::string quoted(std::string_view value) {
  constexpr std::size_t max_shown = 96;
  std::string out = "'";
  out.append(value.substr(0, max_shown));
  if (value.size() > max_shown) out.append("...");
  out.push_back('\'');
  return out;
}

}  // namespace tensorreg::hash::detail
