#include "tensorreg/common/fault_injection.hpp"

#include <array>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <mutex>
#include <optional>
#include <string>

namespace tensorreg {
namespace {

constexpr std::array<std::string_view, fault_site_count> site_names = {
    "allocate", "memfd_create", "ftruncate", "mmap", "open", "read", "write", "fsync", "rename"};

// The errnos a fault spec may name: the ones these calls really fail with.
struct errno_name {
  std::string_view name;
  int value;
};
constexpr std::array<errno_name, 11> errno_names = {{{"EIO", EIO},
                                                     {"ENOSPC", ENOSPC},
                                                     {"ENOMEM", ENOMEM},
                                                     {"EMFILE", EMFILE},
                                                     {"ENFILE", ENFILE},
                                                     {"EACCES", EACCES},
                                                     {"EPERM", EPERM},
                                                     {"EINTR", EINTR},
                                                     {"EDQUOT", EDQUOT},
                                                     {"EROFS", EROFS},
                                                     {"ENOENT", ENOENT}}};

struct site_state {
  bool armed = false;
  int error = 0;
  std::uint64_t skip = 0;
  std::uint64_t times = 0;  // 0: every call after the skipped ones
  std::uint64_t fired = 0;
};

// Any site armed at all: the only thing a disarmed check reads.
std::atomic<int> armed_sites{0};
std::mutex state_mutex;
std::array<site_state, fault_site_count> states;

site_state& state_of(fault_site site) { return states[static_cast<std::size_t>(site)]; }

void arm(fault_site site, int error, std::uint64_t skip, std::uint64_t times) {
  std::lock_guard lock(state_mutex);
  auto& state = state_of(site);
  if (!state.armed) armed_sites.fetch_add(1, std::memory_order_relaxed);
  state = site_state{true, error, skip, times, 0};
}

result<std::uint64_t> parse_count(std::string_view text, std::string_view part) {
  std::uint64_t value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size()) {
    return fail(errc::invalid_argument,
                "cannot arm fault '" + std::string(part) + "': '" + std::string(text) + "' is not a count");
  }
  return value;
}

status arm_one(std::string_view part) {
  std::array<std::string_view, 4> fields{};
  std::size_t n = 0;
  for (std::string_view rest = part; n < fields.size();) {
    const auto colon = rest.find(':');
    fields[n++] = rest.substr(0, colon);
    if (colon == std::string_view::npos) break;
    rest.remove_prefix(colon + 1);
    if (n == fields.size()) {
      return fail(errc::invalid_argument,
                  "cannot arm fault '" + std::string(part) + "': expected site:ERRNO[:skip[:times]]");
    }
  }
  std::optional<fault_site> site;
  for (std::size_t i = 0; i < fault_site_count; ++i) {
    if (site_names[i] == fields[0]) site = static_cast<fault_site>(i);
  }
  if (!site) {
    return fail(errc::invalid_argument,
                "cannot arm fault '" + std::string(part) + "': unknown site '" + std::string(fields[0]) + "'");
  }
  int error = 0;
  for (const auto& known : errno_names) {
    if (known.name == fields[1]) error = known.value;
  }
  if (error == 0) {
    return fail(errc::invalid_argument,
                "cannot arm fault '" + std::string(part) + "': unknown errno '" + std::string(fields[1]) + "'");
  }
  std::uint64_t skip = 0;
  std::uint64_t times = 1;
  if (n > 2) {
    TENSORREG_TRY_ASSIGN(skip, parse_count(fields[2], part));
  }
  if (n > 3) {
    TENSORREG_TRY_ASSIGN(times, parse_count(fields[3], part));
  }
  arm(*site, error, skip, times);
  return {};
}

}  // namespace

std::string_view to_string(fault_site site) noexcept { return site_names[static_cast<std::size_t>(site)]; }

int injected_fault(fault_site site) noexcept {
  if (armed_sites.load(std::memory_order_relaxed) == 0) return 0;
  std::lock_guard lock(state_mutex);
  auto& state = state_of(site);
  if (!state.armed) return 0;
  if (state.skip > 0) {
    --state.skip;
    return 0;
  }
  if (state.times != 0 && state.fired >= state.times) return 0;
  ++state.fired;
  return state.error;
}

scoped_fault::scoped_fault(fault_site site, int error, std::uint64_t skip, std::uint64_t times) : site_(site) {
  arm(site, error, skip, times);
}

scoped_fault::~scoped_fault() {
  std::lock_guard lock(state_mutex);
  auto& state = state_of(site_);
  if (state.armed) armed_sites.fetch_sub(1, std::memory_order_relaxed);
  state = site_state{};
}

std::uint64_t scoped_fault::fired() const noexcept {
  std::lock_guard lock(state_mutex);
  return state_of(site_).fired;
}

status arm_faults(std::string_view spec) {
  while (!spec.empty()) {
    const auto comma = spec.find(',');
    TENSORREG_TRY(arm_one(spec.substr(0, comma)));
    if (comma == std::string_view::npos) break;
    spec.remove_prefix(comma + 1);
  }
  return {};
}

}  // namespace tensorreg
