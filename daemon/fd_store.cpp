// tensorregd and the systemd fd store (daemon/fd_store.hpp, docs/architecture.md §14.4).
#include "fd_store.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <utility>

#include "src/common/log.hpp"

#if TENSORREG_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

namespace tensorreg::daemon {
namespace {

constexpr std::string_view kStatePrefix = "tr-state-";

#if TENSORREG_HAVE_SYSTEMD
bool send_fds(const std::string& state, const int* fds, unsigned count) {
  return ::sd_pid_notify_with_fds(0, 0, state.c_str(), fds, count) > 0;
}
#else
bool send_fds(const std::string&, const int*, unsigned) { return false; }
#endif

}  // namespace

bool systemd_support() noexcept { return TENSORREG_HAVE_SYSTEMD != 0; }

bool under_service_manager() noexcept {
  const char* path = std::getenv("NOTIFY_SOCKET");
  return systemd_support() && path != nullptr && *path != '\0';
}

bool notify(const std::string& state) noexcept {
  if (!under_service_manager()) return false;
  return send_fds(state, nullptr, 0);
}

stored_fds take_stored_fds() {
  stored_fds out;
#if TENSORREG_HAVE_SYSTEMD
  char** names = nullptr;
  const int n = ::sd_listen_fds_with_names(1, &names);
  if (n <= 0) return out;
  std::optional<std::pair<std::uint64_t, unique_fd>> newest;
  for (int i = 0; i < n; ++i) {
    unique_fd fd(SD_LISTEN_FDS_START + i);
    ::fcntl(fd.get(), F_SETFD, FD_CLOEXEC);
    std::string name = names != nullptr && names[i] != nullptr ? names[i] : "";
    out.names.insert(name);
    if (std::string_view(name).starts_with(kStatePrefix)) {
      std::uint64_t number = 0;
      const auto digits = name.substr(kStatePrefix.size());
      for (char c : digits) number = c >= '0' && c <= '9' ? number * 10 + static_cast<std::uint64_t>(c - '0') : number;
      out.next_state_number = std::max(out.next_state_number, number + 1);
      if (!newest || number > newest->first) newest.emplace(number, std::move(fd));
      continue;
    }
    out.memfds.push_back(persistence::named_fd{std::move(name), std::move(fd)});
  }
  if (names != nullptr) {
    for (int i = 0; i < n; ++i) std::free(names[i]);
    std::free(names);
  }
  if (newest) {
    auto bytes = persistence::read_state_fd(newest->second.get());
    if (bytes) {
      out.state = std::move(*bytes);
    } else {
      out.problems.push_back(bytes.error().message);
    }
  }
#endif
  return out;
}

fd_store_sync::fd_store_sync(registration::engine& engine, logger& log, std::chrono::milliseconds period,
                             std::set<std::string> already, std::uint64_t next_state_number)
    : engine_(engine), log_(log), period_(period), stored_(std::move(already)), next_state_(next_state_number) {
  // The catalogues stored before are replaced by the first sync, and then removed.
  sync_now();
  thread_ = std::thread([this] { run(); });
}

fd_store_sync::~fd_store_sync() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void fd_store_sync::run() {
  std::unique_lock lock(mutex_);
  while (!stopping_) {
    wake_.wait_for(lock, period_);
    if (stopping_) break;
    if (engine_.resident_generation() == synced_generation_) continue;
    lock.unlock();
    sync_now();
    lock.lock();
  }
}

void fd_store_sync::sync_now() {
  std::lock_guard lock(mutex_);
  if (!under_service_manager()) return;
  const auto generation = engine_.resident_generation();
  auto exported = engine_.export_resident();
  if (!exported) {
    tensorreg::log(log_, log_level::warn, "cannot update the systemd fd store: {}", exported.error().message);
    return;
  }
  // 1. New memfds first, then the catalogue that names them, then what left: a crash at any
  // point leaves a catalogue whose memfds are all stored (extra memfds are closed at adoption).
  std::set<std::string> now;
  std::size_t added = 0;
  for (const auto& f : exported->fds) {
    now.insert(f.name);
    if (stored_.count(f.name) != 0) continue;
    const int fd = f.fd.get();
    if (!send_fds("FDSTORE=1\nFDNAME=" + f.name, &fd, 1)) {
      tensorreg::log(log_, log_level::warn, "cannot store the memfd {} in the systemd fd store", f.name);
      continue;
    }
    stored_.insert(f.name);
    ++added;
  }
  auto state_fd = persistence::state_memfd(exported->state);
  if (!state_fd) {
    tensorreg::log(log_, log_level::warn, "cannot update the systemd fd store: {}", state_fd.error().message);
    return;
  }
  const std::string state_name = std::string(kStatePrefix) + std::to_string(next_state_++);
  const int sfd = state_fd->get();
  if (!send_fds("FDSTORE=1\nFDNAME=" + state_name, &sfd, 1)) {
    tensorreg::log(log_, log_level::warn, "cannot store the catalogue in the systemd fd store");
    return;
  }
  std::size_t removed = 0;
  for (auto it = stored_.begin(); it != stored_.end();) {
    if (now.count(*it) != 0) {
      ++it;
      continue;
    }
    (void)send_fds("FDSTOREREMOVE=1\nFDNAME=" + *it, nullptr, 0);
    it = stored_.erase(it);
    ++removed;
  }
  if (state_name_) (void)send_fds("FDSTOREREMOVE=1\nFDNAME=" + *state_name_, nullptr, 0);
  state_name_ = state_name;
  synced_generation_ = generation;
  tensorreg::log(log_, log_level::debug, "systemd fd store: {} memfds stored, {} removed, catalogue {}", added, removed,
                 state_name);
}

}  // namespace tensorreg::daemon
