// daemon/fd_store.hpp — tensorregd under systemd: readiness, and the fd store that keeps the
// daemon's memory through a crash (docs/architecture.md §14.4).
//
// Provides `fd_store_sync`, which mirrors the engine's resident state into the service
// manager's file-descriptor store: every stable memfd under its name (`FDSTORE=1`,
// `FDNAME=m-…`, persistence::fd_name_of()), removed when its entry leaves the cache
// (`FDSTOREREMOVE=1`), and the catalogue as a sealed memfd `tr-state-<n>` (a new one stored
// before the previous one is removed, so a crash in between leaves one). `take_stored_fds()`
// picks the fds up at the next start (`sd_listen_fds_with_names`), and `notify()` sends READY=1
// and STATUS= lines. Without NOTIFY_SOCKET (not under systemd) all of it does nothing; built
// without libsystemd, likewise, and create() says so once.
//
// Thread-safety: fd_store_sync runs on a thread of its own; its members may be called from any
// thread. Ownership: it sends duplicates; the engine keeps its own fds.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "tensorreg/common/error.hpp"
#include "tensorreg/common/logger.hpp"
#include "tensorreg/persistence/resident_state.hpp"
#include "tensorreg/registration/engine.hpp"

namespace tensorreg::daemon {

/// Whether this build can talk to systemd (libsystemd was found).
[[nodiscard]] bool systemd_support() noexcept;

/// Whether NOTIFY_SOCKET names a service manager to notify.
[[nodiscard]] bool under_service_manager() noexcept;

/// Sends `state` ("READY=1\nSTATUS=…") to the service manager; false if there is none or the
/// send failed.
bool notify(const std::string& state) noexcept;

/// The fds the service manager handed over at start, from its fd store.
struct stored_fds {
  std::optional<std::string> state;           ///< the newest catalogue's bytes, if any came
  std::vector<persistence::named_fd> memfds;  ///< every other fd, by name
  std::set<std::string> names;                ///< every name that came (all still stored)
  std::uint64_t next_state_number = 0;        ///< above every tr-state-<n> that came
  std::vector<std::string> problems;          ///< catalogue fds that could not be read
};

/// Takes the fds of LISTEN_FDS / LISTEN_FDNAMES (and unsets those variables). Empty when none
/// came. Errors: none (unreadable catalogues are listed in `problems`).
[[nodiscard]] stored_fds take_stored_fds();

/// Mirrors an engine's resident state into the fd store until destroyed.
class fd_store_sync {
 public:
  /// Starts mirroring: the state as it is now at once, then every change, looked for every
  /// `period`. `already` are the names the store holds (take_stored_fds()).
  fd_store_sync(registration::engine& engine, logger& log, std::chrono::milliseconds period,
                std::set<std::string> already, std::uint64_t next_state_number);
  ~fd_store_sync();
  fd_store_sync(const fd_store_sync&) = delete;
  fd_store_sync& operator=(const fd_store_sync&) = delete;

  /// Mirrors the current state now (also what the thread does on a change).
  void sync_now();

 private:
  void run();

  registration::engine& engine_;
  logger& log_;
  const std::chrono::milliseconds period_;
  std::mutex mutex_;  // guards everything below; sync_now() holds it throughout
  std::set<std::string> stored_;
  std::optional<std::string> state_name_;
  std::uint64_t next_state_ = 0;
  std::uint64_t synced_generation_ = ~std::uint64_t{0};
  bool stopping_ = false;
  std::condition_variable wake_;
  std::thread thread_;
};

}  // namespace tensorreg::daemon
