// daemon/takeover.hpp — handing a running tensorregd's memory and socket to its successor.
//
// Provides both sides of `tensorregd --takeover` (docs/architecture.md §14.2). The running
// daemon listens on a control socket next to its main socket (`<socket>.takeover`, in the same
// 0700 directory) with a `takeover_listener`; a successor started with --takeover connects
// (request_handoff()), both check the other's SO_PEERCRED (only the same uid, or root, may take
// over: check_takeover_peer()), the running daemon stops accepting, finishes the requests in
// flight, and sends (hand_over()) the listening fds of both sockets, every stable memfd in
// batches of at most max_fds_per_frame, and its resident state last. The successor adopts them,
// serves on the same listening socket (connections that arrive meanwhile wait in its backlog)
// and acknowledges; only then does the old daemon exit, removing neither socket file. Without
// the acknowledgement (the successor died or refused), the old daemon serves on.
//
// Messages on the control socket: a 16-byte header (u32 magic "TRHO", u32 kind, u64 length,
// host byte order) and `length` bytes; the fds of a message arrive with its first byte.
//
// Thread-safety: takeover_listener's members may be called from any thread; the free
// functions use only their arguments. Ownership: a listener owns its listening fd and thread.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "tensorreg/common/error.hpp"
#include "tensorreg/common/logger.hpp"
#include "tensorreg/common/unique_fd.hpp"
#include "tensorreg/persistence/resident_state.hpp"
#include "unix_socket.hpp"

namespace tensorreg::daemon {

/// The control socket of the daemon serving `socket_path`: `<socket_path>.takeover`.
[[nodiscard]] std::string takeover_path(const std::string& socket_path);

/// Whether `peer` may take over (or hand over to) a daemon running as `daemon_uid`: the same
/// uid, or root. Errors: PERMISSION_DENIED naming both uids.
[[nodiscard]] status check_takeover_peer(const peer_credentials& peer, uid_t daemon_uid);

/// Everything the running daemon hands on.
struct handoff_payload {
  persistence::resident_export resident;
  unique_fd listener;          ///< the main socket's listening fd
  unique_fd control_listener;  ///< the control socket's listening fd
};

/// What the successor received.
struct received_handoff {
  std::string state;                       ///< the resident state's bytes (not decoded yet)
  std::vector<persistence::named_fd> fds;  ///< the stable memfds, by name
  unique_fd listener;
  unique_fd control_listener;
  unique_fd connection;  ///< to the old daemon, for acknowledge()
  pid_t predecessor = 0;
};

/// The successor's side: connects to `takeover_path(socket_path)`, asks, and receives.
/// Errors: UNAVAILABLE (no daemon listening, connection lost, nothing within `timeout`),
/// PERMISSION_DENIED (refused by the old daemon, or it runs as another uid), DATA_LOSS /
/// INVALID_ARGUMENT (a malformed message).
[[nodiscard]] result<received_handoff> request_handoff(const std::string& socket_path,
                                                       std::chrono::milliseconds timeout);

/// Tells the old daemon that everything was adopted (it exits) or, with an error, that the
/// successor gives up (it serves on). Errors: UNAVAILABLE (the old daemon is gone).
[[nodiscard]] status acknowledge(int connection, const status& outcome);

/// The old daemon's side: sends the payload to `successor` and waits up to `ack_timeout` for
/// the acknowledgement. Errors: UNAVAILABLE (successor gone or silent), ABORTED (the successor
/// gave up; the message is its reason).
[[nodiscard]] status hand_over(int successor, handoff_payload payload, std::chrono::milliseconds ack_timeout);

/// The running daemon's control socket: accepts connections on a thread of its own, answers
/// peers that may not take over PERMISSION_DENIED, and on the first valid request keeps the
/// connection, calls `on_request` (on its thread) and accepts nothing more.
class takeover_listener {
 public:
  /// Binds `path` (unix_socket.hpp's listen_unix(): same directory rules, the same `access`
  /// as the main socket's, since both live in one directory).
  /// Errors: listen_unix()'s.
  [[nodiscard]] static result<std::unique_ptr<takeover_listener>> create(const std::string& path, uid_t daemon_uid,
                                                                         std::function<void()> on_request, logger& log,
                                                                         const socket_access& access = {});
  /// Listens on an fd a predecessor handed over, bound to `path`.
  [[nodiscard]] static result<std::unique_ptr<takeover_listener>> adopt(const std::string& path, unique_fd listening,
                                                                        uid_t daemon_uid,
                                                                        std::function<void()> on_request, logger& log);
  ~takeover_listener();
  takeover_listener(const takeover_listener&) = delete;
  takeover_listener& operator=(const takeover_listener&) = delete;

  /// The successor's connection, once a valid request came (empty before).
  [[nodiscard]] unique_fd take_successor();
  /// Stops the thread and gives up the listening fd (to hand it on), leaving the socket file.
  [[nodiscard]] unique_fd release_listener();

 private:
  takeover_listener(std::string path, listening_socket bound, uid_t uid, std::function<void()> on_request, logger& log);
  void run();
  void stop_thread();

  std::string path_;
  listening_socket bound_;
  uid_t uid_;
  std::function<void()> on_request_;
  logger& log_;
  unique_fd wake_read_, wake_write_;  // a pipe that stops the thread
  std::mutex mutex_;                  // guards successor_ and released_
  unique_fd successor_;
  bool released_ = false;
  std::thread thread_;
};

}  // namespace tensorreg::daemon
