// client/raw_connection.hpp — the protobuf-typed transport under tensorreg::client (private).
//
// `raw::connection` speaks docs/wire-format.md over the daemon's Unix socket: one request, one
// answer, with file descriptors both ways; Feed streams as one call. A daemon error comes back
// as an `error` with the daemon's status code and message. After a broken connection, the next
// call reconnects. A call that was cut off (the daemon restarted, or handed over to a successor:
// `tensorregd --takeover`) is retried once on a new connection when it is idempotent
// (is_idempotent()); any other reports UNAVAILABLE saying it was not retried.
//
// The library (`tensorreg/client/connection.hpp`) builds its requests in wire_convert.cpp and
// sends them through this; the daemon's own tests use it directly to send hand-made (and
// malformed) requests. Not installed: protobuf types never appear in a public header.
//
// Thread-safety: every member function may be called from any thread; calls on one connection
// are serialised by an internal mutex (open several connections for parallel calls).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "tensorreg/common/error.hpp"
#include "tensorreg/common/unique_fd.hpp"
#include "tensorreg/wire/v1/frame.pb.h"

namespace tensorreg::client::raw {

namespace wire = ::tensorreg::wire::v1;
namespace v2 = ::tensorcast::daemon::v2;

class connection {
 public:
  struct reply {
    wire::Response response;
    std::vector<unique_fd> fds;
  };

  /// Connects to `socket_path` (default: default_socket_path()).
  /// Errors: UNAVAILABLE (no daemon there).
  [[nodiscard]] static result<std::unique_ptr<connection>> connect(std::string socket_path = {});

  /// Sends `request` (its request_id is assigned here) with `fds`, waits for its answer.
  /// A non-OK status comes back as an error with the daemon's code and message.
  /// Errors: the daemon's status; UNAVAILABLE (connection lost); DATA_LOSS (malformed answer).
  [[nodiscard]] result<reply> call(wire::Request request, std::span<const int> fds = {});

  /// Sends a whole Feed stream (the frames, then end-of-stream) and waits for its one answer.
  [[nodiscard]] result<reply> feed(std::vector<v2::FeedRegisterArtifactStreamRequest> frames);

  /// The same, each frame sent as soon as `next` makes it (nullopt: the stream is done), so the
  /// daemon applies one while the next is being made. When `next` fails the stream is ended
  /// and answered first, then its error returned.
  using next_frame = std::function<result<std::optional<v2::FeedRegisterArtifactStreamRequest>>()>;
  [[nodiscard]] result<reply> feed(const next_frame& next);

  [[nodiscard]] const std::string& socket_path() const noexcept { return socket_path_; }

  /// Whether a request changes nothing in the daemon, so that call() may send it again after
  /// its connection broke: GetServerConfig, GetArtifactIndexById, Query/WaitPersistenceStatus,
  /// ListArtifacts, GetStats, GetArtifactMemfd, OpenArtifactDevice.
  [[nodiscard]] static bool is_idempotent(const wire::Request& request) noexcept;

 private:
  [[nodiscard]] result<reply> call_once_locked(wire::Request& request, std::span<const int> fds);
  [[nodiscard]] status reconnect_locked();
  explicit connection(std::string path) : socket_path_(std::move(path)) {}
  [[nodiscard]] status ensure_connected_locked();
  [[nodiscard]] status send_locked(const wire::Request& request, std::span<const int> fds);
  [[nodiscard]] result<reply> receive_locked(std::uint64_t request_id);

  std::string socket_path_;
  std::mutex mutex_;
  unique_fd socket_;
  std::uint64_t next_request_id_ = 1;
  std::string inbox_;  // bytes received past the last answer
  std::vector<unique_fd> inbox_fds_;
  bool lost_ = false;  // the last send or receive broke the connection (not a daemon answer)
};

}  // namespace tensorreg::client::raw
