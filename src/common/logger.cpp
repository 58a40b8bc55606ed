#include "tensorreg/common/logger.hpp"

#include <spdlog/logger.h>
#include <spdlog/sinks/stdout_sinks.h>

#include <array>
#include <cstdlib>
#include <string>

namespace tensorreg {
namespace {

class null_logger_impl final : public logger {
 public:
  [[nodiscard]] bool enabled(log_level) const noexcept override { return false; }
  void write(log_level, std::string_view) noexcept override {}
};

spdlog::level::level_enum to_spdlog(log_level level) noexcept {
  switch (level) {
    case log_level::trace: return spdlog::level::trace;
    case log_level::debug: return spdlog::level::debug;
    case log_level::info: return spdlog::level::info;
    case log_level::warn: return spdlog::level::warn;
    case log_level::error: return spdlog::level::err;
    case log_level::off: break;
  }
  return spdlog::level::off;
}

// syslog priorities (sd-daemon(3)'s SD_DEBUG … SD_ERR) for lines read by journald.
std::string_view journald_prefix(log_level level) noexcept {
  switch (level) {
    case log_level::trace:
    case log_level::debug: return "<7>";
    case log_level::info: return "<6>";
    case log_level::warn: return "<4>";
    case log_level::error:
    case log_level::off: break;
  }
  return "<3>";
}

class spdlog_logger final : public logger {
 public:
  explicit spdlog_logger(log_level min_level)
      : min_level_(min_level),
        journald_(std::getenv("JOURNAL_STREAM") != nullptr),
        impl_("tensorreg", std::make_shared<spdlog::sinks::stderr_sink_mt>()) {
    // journald stamps each line itself and reads the priority from the <N> prefix.
    impl_.set_pattern(journald_ ? "%v" : "%Y-%m-%dT%H:%M:%S.%e %l %v");
    impl_.set_level(to_spdlog(min_level));
    impl_.flush_on(spdlog::level::trace);
  }

  [[nodiscard]] bool enabled(log_level level) const noexcept override {
    return level != log_level::off && level >= min_level_;
  }

  void write(log_level level, std::string_view line) noexcept override {
    if (!enabled(level)) return;
    try {
      if (journald_) {
        std::string prefixed(journald_prefix(level));
        prefixed.append(line);
        impl_.log(to_spdlog(level), spdlog::string_view_t(prefixed.data(), prefixed.size()));
      } else {
        impl_.log(to_spdlog(level), spdlog::string_view_t(line.data(), line.size()));
      }
    } catch (...) {
      // A log line is never worth an operation.
    }
  }

 private:
  log_level min_level_;
  bool journald_;
  spdlog::logger impl_;
};

constexpr std::array<std::string_view, 6> kLevelNames{"trace", "debug", "info", "warn", "error", "off"};

}  // namespace

std::string_view log_level_name(log_level level) noexcept {
  const auto i = static_cast<std::size_t>(level);
  return i < kLevelNames.size() ? kLevelNames[i] : "off";
}

result<log_level> parse_log_level(std::string_view text) {
  for (std::size_t i = 0; i < kLevelNames.size(); ++i) {
    if (text == kLevelNames[i]) return static_cast<log_level>(i);
  }
  if (text == "warning") return log_level::warn;
  return fail(errc::invalid_argument,
              "cannot parse log level '" + std::string(text) + "': expected trace, debug, info, warn, error or off");
}

logger& null_logger() noexcept {
  static auto* const instance = new null_logger_impl();
  return *instance;
}

std::unique_ptr<logger> stderr_logger(log_level min_level) { return std::make_unique<spdlog_logger>(min_level); }

}  // namespace tensorreg
