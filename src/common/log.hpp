// src/common/log.hpp — formatting front end of the logger seam, private to the project.
//
// `log(sink, level, fmt, args...)` formats with fmt only when the level is enabled, so a debug
// line costs one virtual call when debug is off.
#pragma once

#include <fmt/format.h>

#include <utility>

#include "tensorreg/common/logger.hpp"

namespace tensorreg {

template <typename... Args>
void log(logger& sink, log_level level, fmt::format_string<Args...> format, Args&&... args) noexcept {
  if (!sink.enabled(level)) return;
  try {
    sink.write(level, fmt::format(format, std::forward<Args>(args)...));
  } catch (...) {
    // Out of memory while formatting a log line: drop the line, never the operation.
  }
}

}  // namespace tensorreg
