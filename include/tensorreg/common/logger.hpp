// tensorreg/common/logger.hpp — the injectable logger seam.
//
// Provides the abstract `logger` (like `clock`, handed to components in their options): the
// engine, the dispatcher and the server write one line per event through it, naming the
// registration or artifact id and the peer pid. `stderr_logger()` is the real one, backed by
// spdlog (journald-friendly: under systemd each line carries its `<N>` priority instead of a
// timestamp); `null_logger()` drops everything; tests record lines with their own.
//
// Thread-safety: `enabled()` and `write()` must be safe to call from any number of threads at
// once; both implementations here are.
// Ownership: components hold a pointer to a logger they do not own; it must outlive them.
// `null_logger()` returns a process-wide object that lives forever.
#pragma once

#include <cstdint>
#include <memory>
#include <string_view>

#include "tensorreg/common/error.hpp"

namespace tensorreg {

enum class log_level : std::uint8_t { trace, debug, info, warn, error, off };

/// "trace", "debug", "info", "warn", "error" or "off".
[[nodiscard]] std::string_view log_level_name(log_level level) noexcept;

/// Parses a level name as log_level_name() writes it ("warning" is accepted for "warn").
/// Errors: INVALID_ARGUMENT naming the text.
[[nodiscard]] result<log_level> parse_log_level(std::string_view text);

/// A sink for one-line events.
class logger {
 public:
  virtual ~logger() = default;

  /// Whether a line at `level` would be written; callers skip formatting when not.
  [[nodiscard]] virtual bool enabled(log_level level) const noexcept = 0;
  /// Writes one line (no trailing newline). Never throws; a failing sink drops the line.
  virtual void write(log_level level, std::string_view line) noexcept = 0;

 protected:
  logger() = default;
  logger(const logger&) = default;
  logger& operator=(const logger&) = default;
};

/// A logger that writes nothing, one per process, never destroyed.
[[nodiscard]] logger& null_logger() noexcept;

/// A logger writing lines at `min_level` and above to stderr through spdlog.
[[nodiscard]] std::unique_ptr<logger> stderr_logger(log_level min_level);

}  // namespace tensorreg
