#include "index/json_reader.hpp"

#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

#include "index/text.hpp"

namespace tensorreg::index::detail {

result<nlohmann::json> parse_json_strict(std::string_view text, std::string_view what) {
  const std::string prefix = "cannot parse " + std::string(what) + ": ";
  // One key set per open object; nlohmann reports each key before its value.
  std::vector<std::unordered_set<std::string>> open_objects;
  std::optional<std::string> duplicate;
  bool duplicate_at_top = false;
  const auto callback = [&](int /*depth*/, nlohmann::json::parse_event_t event, nlohmann::json& parsed) -> bool {
    switch (event) {
      case nlohmann::json::parse_event_t::object_start: open_objects.emplace_back(); break;
      case nlohmann::json::parse_event_t::object_end:
        if (!open_objects.empty()) open_objects.pop_back();
        break;
      case nlohmann::json::parse_event_t::key:
        if (!open_objects.empty() && !duplicate && !open_objects.back().insert(parsed.get<std::string>()).second) {
          duplicate = parsed.get<std::string>();
          duplicate_at_top = open_objects.size() == 1;
        }
        break;
      default: break;
    }
    return true;
  };
  nlohmann::json value;
  try {
    value = nlohmann::json::parse(text.begin(), text.end(), callback, /*allow_exceptions=*/true,
                                  /*ignore_comments=*/false);
  } catch (const nlohmann::json::parse_error& e) {
    const std::string message = e.what();
    if (message.find("UTF-8") != std::string::npos || message.find("surrogate") != std::string::npos) {
      return fail(errc::invalid_argument, prefix + "ill-formed utf-8 in a string near byte " + std::to_string(e.byte));
    }
    return fail(errc::invalid_argument, prefix + "invalid json near byte " + std::to_string(e.byte));
  } catch (const nlohmann::json::exception& e) {
    return fail(errc::invalid_argument, prefix + "invalid json (" + e.what() + ")");
  }
  if (duplicate) {
    return fail(errc::invalid_argument,
                prefix + (duplicate_at_top ? "duplicate tensor name " : "duplicate key ") + quote_name(*duplicate));
  }
  return value;
}

}  // namespace tensorreg::index::detail
