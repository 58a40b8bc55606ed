#include "client/raw_connection.hpp"

#include <poll.h>

#include <chrono>
#include <cstdlib>
#include <limits>
#include <thread>

#include "client/wire_convert.hpp"
#include "daemon/framing.hpp"
#include "daemon/unix_socket.hpp"

namespace tensorreg::client::raw {

using daemon::connect_unix;
using daemon::default_socket_path;
using daemon::encode_frame;
using daemon::frame_decoder;
using daemon::receive_some;
using daemon::send_all;
using wire_convert::status_error;

result<std::unique_ptr<connection>> connection::connect(std::string socket_path) {
  if (const char* env = std::getenv("TENSORREG_SOCKET"); socket_path.empty() && env != nullptr && env[0] != '\0') {
    socket_path = env;  // as the CLI and the daemon take it (a system-wide daemon's /run/tensorreg)
  }
  if (socket_path.empty()) socket_path = default_socket_path();
  std::unique_ptr<connection> c(new connection(std::move(socket_path)));
  std::lock_guard lock(c->mutex_);
  TENSORREG_TRY(c->ensure_connected_locked());
  return c;
}

status connection::ensure_connected_locked() {
  // Between calls nothing may arrive but the daemon's last word on an idle connection (or its
  // end): that connection is finished, so the call goes out on a new one instead of failing.
  if (socket_ && inbox_.empty()) {
    pollfd p{socket_.get(), POLLIN, 0};
    if (::poll(&p, 1, 0) != 0) socket_.reset();
  }
  if (socket_) return {};
  TENSORREG_TRY_ASSIGN(socket_, connect_unix(socket_path_));
  inbox_.clear();
  inbox_fds_.clear();
  return {};
}

status connection::send_locked(const wire::Request& request, std::span<const int> fds) {
  std::string payload;
  if (!request.SerializeToString(&payload)) return fail(errc::internal, "cannot serialise request");
  TENSORREG_TRY_ASSIGN(auto framed, encode_frame(payload, std::numeric_limits<std::uint32_t>::max()));
  auto sent = send_all(socket_.get(), std::as_bytes(std::span(framed.data(), framed.size())), fds);
  if (!sent) {
    socket_.reset();  // the next call reconnects
    lost_ = true;
  }
  return sent;
}

result<connection::reply> connection::receive_locked(std::uint64_t request_id) {
  frame_decoder decoder(std::numeric_limits<std::uint32_t>::max());
  std::vector<std::byte> buffer(64 * 1024);
  std::vector<unique_fd> fds;
  for (;;) {
    if (auto frame = decoder.next()) {
      reply out;
      if (!out.response.ParseFromString(frame->payload)) {
        socket_.reset();
        return fail(errc::data_loss, "cannot parse the daemon's answer");
      }
      if (out.response.request_id() != request_id && out.response.request_id() != 0) {
        socket_.reset();
        return fail(errc::data_loss, "cannot match the daemon's answer: request " + std::to_string(request_id) +
                                         " got the answer to " + std::to_string(out.response.request_id()));
      }
      if (!decoder.at_frame_boundary() || decoder.ready_frames() != 0) {
        socket_.reset();  // answers are one at a time: anything more is a protocol error
        return fail(errc::data_loss, "cannot read the daemon's answer: unexpected extra bytes");
      }
      out.fds = std::move(fds);
      if (out.response.request_id() == 0) socket_.reset();  // connection-level error: the daemon closes
      if (auto e = status_error(out.response.status())) return tl::unexpected(std::move(*e));
      return out;
    }
    auto got = receive_some(socket_.get(), buffer);
    if (!got || got->bytes == 0) {
      socket_.reset();
      lost_ = true;
      return fail(
          errc::unavailable,
          got ? std::string("cannot read the daemon's answer: the daemon closed the connection") : got.error().message);
    }
    for (auto& fd : got->fds) fds.push_back(std::move(fd));
    if (auto fed = decoder.feed(std::span<const std::byte>(buffer.data(), got->bytes)); !fed) {
      socket_.reset();
      return tl::unexpected(fed.error());
    }
  }
}

bool connection::is_idempotent(const wire::Request& request) noexcept {
  switch (request.body_case()) {
    case wire::Request::kGetServerConfig:
    case wire::Request::kGetArtifactIndexById:
    case wire::Request::kQueryPersistenceStatus:
    case wire::Request::kWaitPersistenceStatus:
    case wire::Request::kListArtifacts:
    case wire::Request::kGetStats:
    case wire::Request::kGetArtifactMemfd:
    case wire::Request::kOpenArtifactDevice:
    case wire::Request::kOpenPersistedArtifact: return true;
    default: return false;
  }
}

result<connection::reply> connection::call_once_locked(wire::Request& request, std::span<const int> fds) {
  lost_ = false;
  TENSORREG_TRY(ensure_connected_locked());
  request.set_request_id(next_request_id_++);
  TENSORREG_TRY(send_locked(request, fds));
  return receive_locked(request.request_id());
}

status connection::reconnect_locked() {
  // A restarting daemon may not accept at once; a successor taking over accepts from the same
  // listening socket, so connections made meanwhile wait in its backlog.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  for (;;) {
    auto connected = ensure_connected_locked();
    if (connected || std::chrono::steady_clock::now() >= give_up) return connected;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

result<connection::reply> connection::call(wire::Request request, std::span<const int> fds) {
  std::lock_guard lock(mutex_);
  auto out = call_once_locked(request, fds);
  if (out || !lost_) return out;
  if (!is_idempotent(request)) {
    return fail(errc::unavailable, out.error().message +
                                       "; the request is not idempotent and was not retried: it may or may not "
                                       "have taken effect");
  }
  TENSORREG_TRY(reconnect_locked());
  out = call_once_locked(request, fds);
  if (!out && lost_) return fail(errc::unavailable, out.error().message + " (after one retry on a new connection)");
  return out;
}

result<connection::reply> connection::feed(std::vector<v2::FeedRegisterArtifactStreamRequest> frames) {
  std::size_t k = 0;
  return feed([&]() -> result<std::optional<v2::FeedRegisterArtifactStreamRequest>> {
    if (k == frames.size()) return std::nullopt;
    return std::move(frames[k++]);
  });
}

result<connection::reply> connection::feed(const next_frame& next) {
  std::lock_guard lock(mutex_);
  TENSORREG_TRY(ensure_connected_locked());
  const auto id = next_request_id_++;
  std::optional<error> failed;
  for (;;) {
    auto frame = next();
    if (!frame) {
      failed = std::move(frame).error();
      break;
    }
    if (!*frame) break;
    wire::Request r;
    r.set_request_id(id);
    *r.mutable_feed_register_artifact_stream() = std::move(**frame);
    TENSORREG_TRY(send_locked(r, {}));
  }
  wire::Request end;
  end.set_request_id(id);
  end.set_end_of_stream(true);
  TENSORREG_TRY(send_locked(end, {}));
  auto answer = receive_locked(id);
  if (failed) return tl::unexpected(std::move(*failed));
  return answer;
}

}  // namespace tensorreg::client::raw
