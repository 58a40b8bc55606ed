#include "server.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <asio.hpp>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <exception>
#include <filesystem>
#include <list>
#include <thread>

#include "framing.hpp"
#include "src/common/log.hpp"
#include "unix_socket.hpp"

namespace tensorreg::daemon {
namespace {

using stream = asio::local::stream_protocol;

// Frames are read in chunks of this size; a frame's payload grows only as its bytes arrive.
constexpr std::size_t kReadChunk = 64 * 1024;

// The completion of a detached coroutine: what escaped it is logged, never rethrown into the
// I/O thread (the daemon serves the other sessions on).
struct log_exception {
  logger* log;
  std::string_view what;
  void operator()(const std::exception_ptr& e) const noexcept {
    if (!e) return;
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& x) {
      tensorreg::log(*log, log_level::error, "{} ended by an exception: {}", what, x.what());
    } catch (...) {
      tensorreg::log(*log, log_level::error, "{} ended by an exception of unknown type", what);
    }
  }
};

}  // namespace

// One client connection: reads frames, hands each to the dispatcher on the worker pool, writes
// the answer. Frames of one connection are handled strictly in order, one at a time.
class session : public std::enable_shared_from_this<session> {
 public:
  session(stream::socket socket, dispatcher& dispatch, asio::thread_pool& workers, std::uint32_t max_frame_bytes,
          logger& log)
      : socket_(std::move(socket)), dispatch_(dispatch), workers_(workers), decoder_(max_frame_bytes), log_(log) {}

  asio::awaitable<void> run() {
    auto self = shared_from_this();
    auto peer = peer_of(socket_.native_handle());
    if (!peer) {
      tensorreg::log(log_, log_level::warn, "closed a connection: {}", peer.error().message);
      co_return;
    }
    peer_ = *peer;
    tensorreg::log(log_, log_level::debug, "connection accepted from pid {} uid {}", peer_.pid, peer_.uid);
    connection_ = dispatch_.open_connection(*peer);
    socket_.native_non_blocking(true);
    std::vector<std::byte> buffer(kReadChunk);
    while (!stopping_) {
      asio::error_code ec;
      co_await socket_.async_wait(stream::socket::wait_read, asio::redirect_error(asio::use_awaitable, ec));
      if (ec || stopping_) break;
      auto got = receive_some(socket_.native_handle(), buffer);
      if (!got) {
        if (got.error().code == errc::data_loss) {
          // The kernel dropped fds past the cmsg room: the stream cannot be trusted any more,
          // but the client hears why (docs/wire-format.md §7).
          const error bad{errc::invalid_argument,
                          "cannot read frame: more than " + std::to_string(max_fds_per_frame) +
                              " file descriptors arrived with one message (at most " +
                              std::to_string(max_fds_per_frame) + " per frame)"};
          tensorreg::log(log_, log_level::warn, "bad frame from pid {} uid {}, closing its connection: {}: {}",
                         peer_.pid, peer_.uid, errc_name(bad.code), bad.message);
          co_await write(dispatch_.reject(bad));
        }
        break;
      }
      if (got->would_block) continue;
      if (got->bytes == 0) break;  // peer closed
      // SCM_RIGHTS ride on the sendmsg that carries a frame's first byte (DECISIONS §4.1): the
      // decoder gives them to the frame that began in these bytes.
      if (!decoder_.feed(std::span<const std::byte>(buffer.data(), got->bytes), std::move(got->fds))) {
        // Too long or malformed: answer if we can, then close this connection only.
        const auto& bad = decoder_.failure();
        tensorreg::log(log_, log_level::warn, "bad frame from pid {} uid {}, closing its connection: {}: {}", peer_.pid,
                       peer_.uid, errc_name(bad.code), bad.message);
        co_await write(dispatch_.reject(bad));
        break;
      }
      while (auto frame = decoder_.next()) {
        frame_in in{std::move(frame->payload), std::move(frame->fds)};
        auto out = co_await asio::co_spawn(workers_.get_executor(), handle_on_worker(dispatch_, *connection_, std::move(in)),
                                           asio::use_awaitable);
        if (out) {
          const bool close_after = out->close_after;
          if (!co_await write(std::move(*out)) || close_after) {
            stopping_ = true;
            break;
          }
        }
      }
    }
    dispatch_.close_connection(*connection_);
    asio::error_code ignored;
    socket_.shutdown(stream::socket::shutdown_both, ignored);
    socket_.close(ignored);
    tensorreg::log(log_, log_level::debug, "connection from pid {} uid {} closed", peer_.pid, peer_.uid);
  }

  // Runs on a worker thread. The arguments are parameters, not lambda captures, so they live in
  // the coroutine frame and outlive the co_spawn call that starts it.
  static asio::awaitable<std::optional<frame_out>> handle_on_worker(dispatcher& d, dispatcher::connection& c,
                                                                    frame_in in) {
    co_return d.handle(c, std::move(in));
  }

  // Stops reading; the request being handled (if any) still gets its answer.
  void stop() {
    stopping_ = true;
    asio::error_code ignored;
    socket_.cancel(ignored);
  }

 private:
  asio::awaitable<bool> write(frame_out out) {
    auto framed = encode_frame(out.payload, std::numeric_limits<std::uint32_t>::max());
    if (!framed) co_return false;
    std::vector<int> fds;
    for (const auto& fd : out.fds) fds.push_back(fd.get());
    std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(framed->data()), framed->size());
    // Never block the I/O thread on a slow reader: send what the socket takes, then wait for
    // writability as a coroutine. The fds ride on the sendmsg that carries the first byte.
    bool fds_pending = !fds.empty();
    while (!bytes.empty()) {
      auto sent = send_some(socket_.native_handle(), bytes, fds_pending ? std::span<const int>(fds) : std::span<const int>{});
      if (!sent) co_return false;
      if (*sent == 0) {
        asio::error_code ec;
        co_await socket_.async_wait(stream::socket::wait_write, asio::redirect_error(asio::use_awaitable, ec));
        if (ec) co_return false;
        continue;
      }
      fds_pending = false;
      bytes = bytes.subspan(*sent);
    }
    co_return true;
  }

  stream::socket socket_;
  dispatcher& dispatch_;
  asio::thread_pool& workers_;
  frame_decoder decoder_;
  logger& log_;
  peer_credentials peer_;
  dispatcher::connection_ptr connection_;
  bool stopping_ = false;
};

struct server::impl {
  server_options options;
  dispatcher& dispatch;
  logger& log;
  asio::io_context io{1};
  stream::acceptor acceptor{io};
  asio::signal_set signals{io, SIGINT, SIGTERM};
  asio::thread_pool workers;
  std::list<std::weak_ptr<session>> sessions;
  std::size_t served = 0;
  bool stopping = false;

  impl(server_options o, dispatcher& d)
      : options(std::move(o)), dispatch(d), log(options.log != nullptr ? *options.log : null_logger()),
        workers(options.workers != 0 ? options.workers : std::max(2u, std::thread::hardware_concurrency())) {}

  asio::awaitable<void> accept_loop() {
    while (!stopping) {
      asio::error_code ec;
      stream::socket socket = co_await acceptor.async_accept(asio::redirect_error(asio::use_awaitable, ec));
      if (ec) {
        if (stopping || ec == asio::error::operation_aborted) break;
        tensorreg::log(log, log_level::debug, "cannot accept a connection: {}", ec.message());
        continue;
      }
      std::erase_if(sessions, [](const auto& w) { return w.expired(); });
      if (sessions.size() >= options.max_sessions) {
        // Over the limit: one RESOURCE_EXHAUSTED answer on request 0, then the connection
        // closes. The frame is small and the socket fresh, so this send does not wait.
        const error refused{errc::resource_exhausted, "cannot accept connection: the daemon serves its maximum of " +
                                                          std::to_string(options.max_sessions) + " sessions"};
        const auto peer = peer_of(socket.native_handle());
        tensorreg::log(log, log_level::warn, "refused a connection from pid {} uid {}: {}", peer ? peer->pid : 0,
                       peer ? peer->uid : 0, refused.message);
        auto out = dispatch.reject(refused);
        if (auto framed = encode_frame(out.payload, std::numeric_limits<std::uint32_t>::max())) {
          (void)send_some(socket.native_handle(),
                          std::span<const std::byte>(reinterpret_cast<const std::byte*>(framed->data()), framed->size()),
                          {});
        }
        asio::error_code ignored;
        socket.close(ignored);
        continue;
      }
      auto s = std::make_shared<session>(std::move(socket), dispatch, workers, options.max_frame_bytes, log);
      ++served;
      sessions.push_back(s);
      asio::co_spawn(io, s->run(), log_exception{&log, "a session"});
    }
  }

  void shutdown() {
    if (stopping) return;
    stopping = true;
    asio::error_code ignored;
    acceptor.close(ignored);
    signals.cancel(ignored);
    for (auto& w : sessions) {
      if (auto s = w.lock()) s->stop();
    }
    ::unlink(options.socket_path.c_str());
  }
};

server::server(std::unique_ptr<impl> i) noexcept : impl_(std::move(i)) {}
server::~server() {
  impl_->workers.join();
}

result<std::unique_ptr<server>> server::create(server_options options, dispatcher& dispatch) {
  namespace fs = std::filesystem;
  const fs::path path = options.socket_path;
  if (path.native().size() >= sizeof(sockaddr_un{}.sun_path)) {
    return fail(errc::invalid_argument, "cannot listen on '" + options.socket_path + "': the path is too long");
  }
  // The socket directory is private to the daemon's user (DECISIONS §4).
  const auto dir = path.parent_path();
  std::error_code fs_error;
  if (!dir.empty() && !fs::exists(dir)) {
    fs::create_directories(dir, fs_error);
    if (fs_error) {
      return fail(errc::unavailable, "cannot create socket directory '" + dir.string() + "': " + fs_error.message());
    }
    ::chmod(dir.c_str(), 0700);
  }
  // A live daemon answers connect(); a stale file from a crashed one does not.
  if (fs::exists(path)) {
    if (connect_unix(options.socket_path)) {
      return fail(errc::failed_precondition, "cannot listen on '" + options.socket_path +
                                                 "': another tensorregd is already serving it");
    }
    ::unlink(options.socket_path.c_str());
  }
  auto i = std::make_unique<impl>(std::move(options), dispatch);
  asio::error_code ec;
  i->acceptor.open(stream(), ec);
  if (!ec) i->acceptor.bind(stream::endpoint(i->options.socket_path), ec);
  if (!ec) ::chmod(i->options.socket_path.c_str(), 0660);
  if (!ec) i->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    const auto code = ec == asio::error::access_denied ? errc::permission_denied : errc::unavailable;
    return fail(code, "cannot listen on '" + i->options.socket_path + "': " + ec.message());
  }
  return std::unique_ptr<server>(new server(std::move(i)));
}

std::size_t server::run() {
  auto& i = *impl_;
  i.signals.async_wait([&i](const asio::error_code& ec, int) {
    if (!ec) i.shutdown();
  });
  asio::co_spawn(i.io, i.accept_loop(), log_exception{&i.log, "the accept loop"});
  i.io.run();
  i.workers.join();
  return i.served;
}

void server::stop() {
  asio::post(impl_->io, [i = impl_.get()] { i->shutdown(); });
}

const std::string& server::socket_path() const noexcept { return impl_->options.socket_path; }

}  // namespace tensorreg::daemon
