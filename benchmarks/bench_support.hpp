// benchmarks/bench_support.hpp — small helpers the CPU benchmarks share: byte counts from the
// command line, the process's CPU time and the median of a run's samples. Header-only; each bench is one translation unit.
#pragma once

#include <time.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace tensorreg::bench {

/// "512", "64K", "16M" or "2G" (either case) as bytes; nullopt for anything else.
inline std::optional<std::uint64_t> parse_bytes(std::string_view text) {
  if (text.empty()) return std::nullopt;
  std::uint64_t mult = 1;
  const char last = text.back();
  if (last == 'K' || last == 'k') mult = 1ULL << 10;
  if (last == 'M' || last == 'm') mult = 1ULL << 20;
  if (last == 'G' || last == 'g') mult = 1ULL << 30;
  if (mult != 1) text.remove_suffix(1);
  try {
    std::size_t used = 0;
    const auto v = std::stoull(std::string(text), &used);
    if (used != text.size()) return std::nullopt;
    return v * mult;
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

/// CPU seconds used by the whole process: on a shared machine, work per CPU second shows what
/// the work itself costs, apart from time lost waiting for a core.
inline double process_cpu_seconds() {
  timespec ts{};
  ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

/// The median of `samples` (the upper one of an even count); REQUIRES: not empty.
inline double median(std::vector<double> samples) {
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

}  // namespace tensorreg::bench
