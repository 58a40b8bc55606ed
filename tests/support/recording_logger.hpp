// tests/support/recording_logger.hpp — a logger that keeps every line, for asserting on logs.
#pragma once

#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tensorreg/common/logger.hpp"

namespace tensorreg::testing {

class recording_logger final : public logger {
 public:
  struct line {
    log_level level;
    std::string text;
  };

  explicit recording_logger(log_level min_level = log_level::trace) : min_level_(min_level) {}

  [[nodiscard]] bool enabled(log_level level) const noexcept override {
    return level != log_level::off && level >= min_level_;
  }
  void write(log_level level, std::string_view text) noexcept override {
    const std::lock_guard lock(mutex_);
    lines_.push_back({level, std::string(text)});
  }

  [[nodiscard]] std::vector<line> lines() const {
    const std::lock_guard lock(mutex_);
    return lines_;
  }
  /// Lines at `level` that contain every one of `parts`.
  template <typename... Parts>
  [[nodiscard]] std::size_t count(log_level level, const Parts&... parts) const {
    std::size_t n = 0;
    for (const auto& l : lines()) {
      if (l.level == level && (... && (l.text.find(parts) != std::string::npos))) ++n;
    }
    return n;
  }

 private:
  log_level min_level_;
  mutable std::mutex mutex_;
  std::vector<line> lines_;
};

}  // namespace tensorreg::testing
