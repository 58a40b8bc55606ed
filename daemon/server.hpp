// daemon/server.hpp — tensorregd's event loop: the listening socket, the sessions, signals.
//
// The server owns an io_context (one I/O thread), the Unix socket acceptor, a signal_set for
// SIGINT/SIGTERM, the registry of live sessions, a worker pool on which requests are handled
// (hashing, copying and disk never run on the I/O thread) and a small control pool for the
// requests that never block (dispatcher::lane_of), so that List, Abort or Revoke are answered
// at once however many commits keep the workers busy; GetStats, GetServerConfig and KeepAlive,
// a few table reads, are answered on the I/O thread itself. Each session keeps
// reading frames while earlier ones are in flight (docs/wire-format.md §5): it hands each to
// its lane as it arrives, keeps a Feed stream's frames in order, and writes each answer when
// it is ready, one whole frame at a time; answers made on the pools come back to the I/O thread
// through an eventfd, so that a pool thread never wakes it while holding a lock it needs. Past
// max_in_flight_per_connection requests in flight it stops reading until one is answered
// (backpressure: the client's writes block).
//
// Binding (create(), through listen_unix() of unix_socket.hpp): the socket directory must be
// ours and 0700 (made so when missing), the socket is 0660 from the start; a live daemon
// already answering on the path, or anything but a socket there, makes create() fail with a
// clear message; a stale socket file (nobody listening) is replaced. Callers print "ready"
// only after create() returns.
//
// Shutdown (SIGTERM/SIGINT or stop()): stop accepting, let every session finish the requests
// it is handling and write their answers, close the sessions, remove the socket file if it is
// still ours (a newer daemon's on the same path stays); run() then returns.
//
// Limits: at most max_sessions connections, max_sessions_per_uid of one uid (more are answered
// RESOURCE_EXHAUSTED and closed); idle connections and frames that stall half-sent are closed
// (idle_timeout, frame_timeout); when the process runs out of fds, accepting pauses briefly
// instead of spinning.
//
// Logging: connections accepted and closed (peer pid, uid) at debug; connections refused over
// max_sessions and bad frames at warn; an exception that ends a session at error; idle and
// stalled connections closed at info; accepting paused for lack of fds at warn; the I/O
// thread's scheduling (io_rt_priority, or why not) at debug.
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
#include "unix_socket.hpp"

namespace tensorreg::daemon {

struct server_options {
  std::string socket_path;
  /// Who else may connect (unix_socket.hpp): a group for a system-wide daemon.
  socket_access access{};
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
  /// Request worker threads; 0 = four per hardware thread, at least 16. Requests mostly wait
  /// on the engine's hashing pool, which is what shares the cores between clients.
  unsigned workers = 0;
  /// Threads for control requests (GetStats, List, KeepAlive, Abort, Revoke, …); at least 1.
  unsigned control_workers = 2;
  /// Real-time priority (SCHED_FIFO, 1-99) asked for the I/O thread, which answers GetStats and
  /// KeepAlive itself and reads and writes every frame: a fair-share thread, even at nice -10,
  /// waits for its turn behind the busy threads of a loaded host each time a frame arrives,
  /// while a SCHED_FIFO one runs at once. Its work per wake-up is small and bounded (no hashing,
  /// copying or waiting; DECISIONS §4), so it cannot keep a core from the rest of the host.
  /// Needs CAP_SYS_NICE (or RLIMIT_RTPRIO): when refused, the thread gets io_nice instead and
  /// the refusal is logged at debug. Threads the I/O thread starts later do not inherit it.
  /// 0 = fair-share scheduling only.
  int io_rt_priority = 1;
  /// Nice value asked for the I/O thread when it does not run SCHED_FIFO (see io_rt_priority).
  /// Lowering a nice value needs CAP_SYS_NICE (or RLIMIT_NICE): without it the thread keeps its
  /// nice value and the refusal is logged at debug. 0 = leave it.
  int io_nice = -10;
  /// Most requests of one connection in flight at once; past it the session reads no more
  /// frames until one is answered (backpressure, not an error). 0 counts as 1.
  std::size_t max_in_flight_per_connection = 64;
  /// Where connection events are logged; must outlive the server; null = none.
  logger* log = &null_logger();
};

class server {
 public:
  /// Binds and listens. Errors: FAILED_PRECONDITION (another tensorregd is live on the path,
  /// an unsafe socket directory, something other than a socket at the path),
  /// INVALID_ARGUMENT (path too long), UNAVAILABLE / PERMISSION_DENIED (cannot create the
  /// directory or bind), RESOURCE_EXHAUSTED (no fd left for its eventfd).
  [[nodiscard]] static result<std::unique_ptr<server>> create(server_options options, dispatcher& dispatch);

  /// Serves on a socket already listening at options.socket_path: one a predecessor handed
  /// over (daemon/takeover.hpp). Errors: UNAVAILABLE (asio cannot take the fd).
  [[nodiscard]] static result<std::unique_ptr<server>> adopt(server_options options, dispatcher& dispatch,
                                                             listening_socket listening);

  ~server();
  server(const server&) = delete;
  server& operator=(const server&) = delete;

  /// Serves until a signal or stop(). Returns the number of sessions served.
  std::size_t run();

  /// Asks the server to shut down as on SIGTERM. Safe from any thread.
  void stop();

  /// Shuts down as stop() does, but for a successor: the listening socket stays open (connections
  /// keep queueing in its backlog) and its file stays. Safe from any thread.
  void hand_over();
  /// After run() returned from hand_over(): the listening fd (empty otherwise).
  [[nodiscard]] unique_fd take_listener();

  [[nodiscard]] const std::string& socket_path() const noexcept;

 private:
  struct impl;
  explicit server(std::unique_ptr<impl> i) noexcept;
  std::unique_ptr<impl> impl_;
};

}  // namespace tensorreg::daemon
