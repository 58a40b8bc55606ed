#include "host_memory.hpp"

#include <fmt/core.h>
#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <climits>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace tensorreg::daemon {
namespace {

std::optional<std::uint64_t> parse_u64(std::string_view text) {
  std::uint64_t out = 0;
  const auto* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, out);
  if (ec != std::errc{} || ptr != end || text.empty()) return std::nullopt;
  return out;
}

std::string read_all(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string_view trimmed(std::string_view text) {
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.remove_suffix(1);
  return text;
}

std::string gib(std::uint64_t bytes) { return fmt::format("{:.1f} GiB", static_cast<double>(bytes) / (1 << 30)); }

}  // namespace

std::uint64_t lower_by_cgroup_limit(std::uint64_t total, std::string_view cgroup_memory_max) {
  const auto limit = parse_u64(trimmed(cgroup_memory_max));
  return limit && *limit < total ? *limit : total;
}

std::optional<std::uint64_t> usable_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES);
  const long page = ::sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page <= 0) return std::nullopt;
  const auto total = static_cast<std::uint64_t>(pages) * static_cast<std::uint64_t>(page);
  // cgroup v2: "0::/system.slice/tensorregd.service"; its memory.max is the service's MemoryMax=.
  const std::string self = read_all("/proc/self/cgroup");
  const auto at = self.find("0::");
  if (at == std::string::npos) return total;
  const auto line_end = self.find('\n', at);
  const std::string group = self.substr(at + 3, line_end == std::string::npos ? std::string::npos : line_end - at - 3);
  return lower_by_cgroup_limit(total, read_all("/sys/fs/cgroup" + group + "/memory.max"));
}

result<stable_budget> parse_stable_budget(std::string_view text, std::optional<std::uint64_t> memory) {
  const auto bad = [&](std::string_view why) {
    return fail(errc::invalid_argument, fmt::format("cannot use --stable-bytes '{}': {}", text, why));
  };
  stable_budget out;
  if (text.ends_with('%')) {
    const auto percent = parse_u64(text.substr(0, text.size() - 1));
    if (!percent || *percent == 0 || *percent > 100) return bad("a percentage of memory must be 1% to 100%");
    if (!memory) return bad("this host's memory size cannot be read; give a number of bytes");
    // In whole 4 KiB pages: the share of the pages, rounded down.
    out.bytes = *memory / 4096 * *percent / 100 * 4096;
    return out;
  }
  const auto bytes = parse_u64(text);
  if (!bytes) return bad("it needs a number of bytes (0 = unlimited) or a percentage of memory such as 50%");
  out.bytes = *bytes;
  if (memory && out.bytes > *memory) {
    out.note = fmt::format("--stable-bytes {} ({}) is more than this host's memory of {}; using {}", *bytes,
                           gib(*bytes), gib(*memory), gib(*memory));
    out.bytes = *memory;
  }
  return out;
}

void keep_frame_buffers_on_heap(std::uint64_t largest_block, std::uint64_t retained_bytes) noexcept {
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  if (tunables != nullptr && std::string_view(tunables).find("glibc.malloc.") != std::string_view::npos) return;
  const auto clamp = [](std::uint64_t v) { return static_cast<int>(std::min<std::uint64_t>(v, INT_MAX)); };
  // Either may be refused (a sanitizer's allocator ignores both): the daemon works as before.
  static_cast<void>(::mallopt(M_MMAP_THRESHOLD, clamp(largest_block)));
  static_cast<void>(::mallopt(M_TRIM_THRESHOLD, clamp(retained_bytes)));
}

}  // namespace tensorreg::daemon
