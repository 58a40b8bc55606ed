// daemon/server.hpp — tensorregd's event loop: the listening socket, the sessions, signals.
//
// The server owns an io_context (one I/O thread), the Unix socket acceptor, a signal_set for
// SIGINT/SIGTERM, the registry of live sessions, and a worker pool on which every request is
// handled (hashing, copying and disk never run on the I/O thread). Each session reads frames,
// hands them one at a time to the dispatcher on the pool, and writes the answers back.
//
// Binding (create(), through listen_unix() of unix_socket.hpp): the socket directory must be
// ours and 0700 (made so when missing), the socket is 0660 from the start; a live daemon
// already answering on the path, or anything but a socket there, makes create() fail with a
// clear message; a stale socket file (nobody listening) is replaced. Callers print "ready"
// only after create() returns.
//
// Shutdown (SIGTERM/SIGINT or stop()): stop accepting, let every session finish the request
// it is handling and write its answer, close the sessions, remove the socket file if it is
// still ours (a newer daemon's on the same path stays); run() then returns.
//
// Limits: at most max_sessions connections, max_sessions_per_uid of one uid (more are answered
// RESOURCE_EXHAUSTED and closed); idle connections and frames that stall half-sent are closed
// (idle_timeout, frame_timeout); when the process runs out of fds, accepting pauses briefly
// instead of spinning.
//
// Logging: connections accepted and closed (peer pid, uid) at debug; connections refused over
// max_sessions and bad frames at warn; an exception that ends a session at error; idle and
// stalled connections closed at info; accepting paused for lack of fds at warn.
//
// Thread-safety: create() and run() from one thread; stop() from any thread.
// asio appears only in server.cpp (which also holds the session class), never in a header.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "dispatcher.hpp"
#include "tensorreg/common/error.hpp"
#include "tensorreg/common/logger.hpp"

namespace tensorreg::daemon {

struct server_options {
  std::string socket_path;
  std::uint32_t max_frame_bytes = 64u << 20;
  std::size_t max_sessions = 1024;
  /// Most concurrent connections of one uid, so that one user cannot take every session;
  /// 0 = only max_sessions.
  std::size_t max_sessions_per_uid = 256;
  /// A connection with no request in flight and nothing received for this long is closed
  /// (after a DEADLINE_EXCEEDED answer on request 0); 0 = never.
  std::chrono::milliseconds idle_timeout{60'000};
  /// A frame must arrive whole within this long of its first byte, or its connection is closed
  /// the same way; 0 = no limit.
  std::chrono::milliseconds frame_timeout{10'000};
  unsigned workers = 0;  ///< 0 = one per hardware thread
  /// Where connection events are logged; must outlive the server; null = none.
  logger* log = &null_logger();
};

class server {
 public:
  /// Binds and listens. Errors: FAILED_PRECONDITION (another tensorregd is live on the path,
  /// an unsafe socket directory, something other than a socket at the path),
  /// INVALID_ARGUMENT (path too long), UNAVAILABLE / PERMISSION_DENIED (cannot create the
  /// directory or bind).
  [[nodiscard]] static result<std::unique_ptr<server>> create(server_options options, dispatcher& dispatch);

  ~server();
  server(const server&) = delete;
  server& operator=(const server&) = delete;

  /// Serves until a signal or stop(). Returns the number of sessions served.
  std::size_t run();

  /// Asks the server to shut down as on SIGTERM. Safe from any thread.
  void stop();

  [[nodiscard]] const std::string& socket_path() const noexcept;

 private:
  struct impl;
  explicit server(std::unique_ptr<impl> i) noexcept;
  std::unique_ptr<impl> impl_;
};

}  // namespace tensorreg::daemon
