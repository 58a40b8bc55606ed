#include "server.hpp"

#include <fcntl.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <asio.hpp>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <deque>
#include <exception>
#include <filesystem>
#include <list>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_set>

#include "framing.hpp"
#include "request_pool.hpp"
#include "src/common/log.hpp"
#include "tensorreg/common/priority_inheriting_mutex.hpp"
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

// Gives the calling thread, the I/O thread, its turn ahead of busy threads (server_options::
// io_rt_priority, io_nice). Both are per thread on Linux: the pools, made earlier, keep theirs.
void schedule_io_thread(const server_options& o, logger& log) {
  if (o.io_rt_priority > 0) {
    sched_param param{};
    param.sched_priority =
        std::clamp(o.io_rt_priority, ::sched_get_priority_min(SCHED_FIFO), ::sched_get_priority_max(SCHED_FIFO));
    // SCHED_RESET_ON_FORK: a thread this one starts later runs fair-share again, at nice 0.
    if (::sched_setscheduler(0, SCHED_FIFO | SCHED_RESET_ON_FORK, &param) == 0) {
      tensorreg::log(log, log_level::debug, "the I/O thread runs SCHED_FIFO at priority {}", param.sched_priority);
      return;
    }
    tensorreg::log(log, log_level::debug, "the I/O thread cannot run SCHED_FIFO at priority {}: {}; asking nice {}",
                   param.sched_priority, std::strerror(errno), o.io_nice);
  }
  if (o.io_nice != 0 && ::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), o.io_nice) != 0) {
    tensorreg::log(log, log_level::debug, "the I/O thread keeps its nice value (asked {}): {}", o.io_nice,
                   std::strerror(errno));
  }
}

// Work handed to a pool comes back to the I/O thread through here. A pool thread appends the
// finished job under a short lock, then writes an eventfd holding no lock. Completing into the
// io_context instead (what co_spawn onto a pool does) takes the io_context's mutex and wakes
// the I/O thread while holding it: a SCHED_FIFO I/O thread woken on that core preempts the
// holder at once, then blocks on the mutex until the holder runs again, behind whatever else
// the core has queued. Used from the I/O thread, except push(), which any thread may call.
class return_channel {
 public:
  // Takes `eventfd` (non-blocking).
  return_channel(asio::io_context& io, int eventfd) : efd_(eventfd), wait_(io, eventfd) {}

  // Runs `work()` (returning std::optional<frame_out>) on `pool`; the awaiting coroutine resumes on
  // the I/O thread with its result, or with the exception it threw.
  template <typename Work>
  asio::awaitable<std::optional<frame_out>> run_on(request_pool& pool, Work work) {
    return asio::async_initiate<const asio::use_awaitable_t<>, void(std::exception_ptr, std::optional<frame_out>)>(
        [this, &pool](auto handler, Work w) {
          ++outstanding_;
          arm();
          pool.post([this, handler = std::move(handler), w = std::move(w)]() mutable {
            std::exception_ptr failed;
            std::optional<frame_out> out;
            try {
              out = w();
            } catch (...) {
              failed = std::current_exception();
            }
            push([handler = std::move(handler), failed, out = std::move(out)]() mutable {
              std::move(handler)(failed, std::move(out));
            });
          });
        },
        asio::use_awaitable, std::move(work));
  }

 private:
  struct job {
    virtual ~job() = default;
    virtual void run() = 0;
  };
  template <typename F>
  struct job_of final : job {
    explicit job_of(F fn) : f(std::move(fn)) {}
    void run() override { f(); }
    F f;
  };

  // On a pool thread.
  template <typename F>
  void push(F f) {
    auto j = std::make_unique<job_of<F>>(std::move(f));
    bool wake = false;
    {
      std::lock_guard lock(mutex_);
      pending_.push_back(std::move(j));
      wake = !signalled_;
      signalled_ = true;
    }
    if (wake) {
      const std::uint64_t one = 1;
      (void)!::write(efd_, &one, sizeof one);
    }
  }

  // Waits for the eventfd while jobs are out, so that io_context::run() ends when nothing is.
  void arm() {
    if (armed_) return;
    armed_ = true;
    wait_.async_wait(asio::posix::stream_descriptor::wait_read, [this](const asio::error_code& ec) {
      armed_ = false;
      if (!ec) drain();
    });
  }

  void drain() {
    std::uint64_t count = 0;
    (void)!::read(efd_, &count, sizeof count);  // reset before taking the jobs: a later push writes again
    std::vector<std::unique_ptr<job>> ready;
    {
      std::lock_guard lock(mutex_);
      ready.swap(pending_);
      signalled_ = false;
    }
    for (auto& j : ready) {
      --outstanding_;
      j->run();  // resumes a session's coroutine, which may hand out more work
    }
    if (outstanding_ > 0) arm();
  }

  int efd_;
  asio::posix::stream_descriptor wait_;  // owns efd_
  bool armed_ = false;
  std::size_t outstanding_ = 0;  // jobs handed out and not yet finished here
  // The FIFO I/O thread takes it to drain: a pool thread preempted while holding it runs
  // again at once, boosted, instead of after what else its core has queued.
  priority_inheriting_mutex mutex_;
  std::vector<std::unique_ptr<job>> pending_;  // guarded by mutex_
  bool signalled_ = false;                     // guarded by mutex_: the eventfd was written since the last drain
};

}  // namespace

// One client connection: reads frames and hands each to the dispatcher as it arrives, without
// waiting for the answers of earlier ones (docs/wire-format.md §5). Immediate requests run on
// the I/O thread, control requests on the control pool, Feed stream frames one at a time in
// arrival order, the rest on the worker pool. Answers are written on the I/O thread as they
// finish, one frame at a time. At most max_in_flight requests are in flight: beyond that the
// session stops reading (backpressure).
class session : public std::enable_shared_from_this<session> {
 public:
  session(stream::socket socket, const peer_credentials& peer, dispatcher& dispatch, request_pool& workers,
          request_pool& control, return_channel& back, const server_options& options, logger& log)
      : socket_(std::move(socket)),
        watchdog_(socket_.get_executor()),
        slot_freed_(socket_.get_executor()),
        dispatch_(dispatch),
        workers_(workers),
        control_(control),
        back_(back),
        decoder_(options.max_frame_bytes),
        idle_timeout_(options.idle_timeout),
        frame_timeout_(options.frame_timeout),
        max_in_flight_(std::max<std::size_t>(1, options.max_in_flight_per_connection)),
        log_(log),
        peer_(peer) {}

  [[nodiscard]] uid_t uid() const noexcept { return peer_.uid; }

  asio::awaitable<void> run() {
    auto self = shared_from_this();
    tensorreg::log(log_, log_level::debug, "connection accepted from pid {} uid {}", peer_.pid, peer_.uid);
    connection_ = dispatch_.open_connection(peer_);
    socket_.native_non_blocking(true);
    last_activity_ = std::chrono::steady_clock::now();
    if (idle_timeout_.count() > 0 || frame_timeout_.count() > 0) {
      asio::co_spawn(socket_.get_executor(), watch(), log_exception{&log_, "a session's watchdog"});
    }
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
          const error bad{errc::invalid_argument, "cannot read frame: more than " + std::to_string(max_fds_per_frame) +
                                                      " file descriptors arrived with one message (at most " +
                                                      std::to_string(max_fds_per_frame) + " per frame)"};
          tensorreg::log(log_, log_level::warn, "bad frame from pid {} uid {}, closing its connection: {}: {}",
                         peer_.pid, peer_.uid, errc_name(bad.code), bad.message);
          rejecting_ = true;  // the watchdog must not write into this answer
          co_await send(dispatch_.reject(bad));
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
        rejecting_ = true;  // the watchdog must not write into this answer
        co_await send(dispatch_.reject(bad));
        break;
      }
      last_activity_ = std::chrono::steady_clock::now();
      while (!stopping_) {
        if (in_flight_ >= max_in_flight_) {
          // Backpressure, not an error: read no further until a request of ours is answered.
          co_await wait_for_slot();
          continue;
        }
        auto frame = decoder_.next();
        if (!frame) break;
        start(frame_in{std::move(frame->payload), std::move(frame->fds)});
      }
      const auto now = std::chrono::steady_clock::now();
      last_activity_ = now;
      note_partial_frame(now);
    }
    // Every request already read still gets its answer (or the connection closes first, when a
    // write fails); then the connection state goes.
    while (in_flight_ > 0) co_await wait_for_slot();
    closed_ = true;
    watchdog_.cancel();
    dispatch_.close_connection(*connection_);
    asio::error_code ignored;
    socket_.shutdown(stream::socket::shutdown_both, ignored);
    socket_.close(ignored);
    tensorreg::log(log_, log_level::debug, "connection from pid {} uid {} closed", peer_.pid, peer_.uid);
  }

  // Hands one frame to its lane; its answer is written when it is ready.
  void start(frame_in in) {
    const auto [lane, id] = dispatcher::lane_of(in);
    if (lane != request_lane::stream && id != 0 && !ids_in_flight_.insert(id).second) {
      // Checked here, in arrival order, so that the answer does not depend on which request a
      // worker happens to start first (docs/wire-format.md §4).
      rejecting_ = true;
      ++in_flight_;
      asio::co_spawn(socket_.get_executor(),
                     answer_ready(shared_from_this(), dispatch_.reject(dispatcher::id_in_use(id))),
                     log_exception{&log_, "a session's request"});
      stop();
      return;
    }
    ++in_flight_;
    if (lane == request_lane::immediate) {
      // A few table reads: answered here, on the I/O thread, without the two thread hops of a
      // pool (each a scheduling delay when the cores are busy).
      auto out = dispatch_.handle(*connection_, std::move(in));
      ids_in_flight_.erase(id);
      asio::co_spawn(socket_.get_executor(), answer_ready(shared_from_this(), std::move(out)),
                     log_exception{&log_, "a session's request"});
      return;
    }
    if (lane == request_lane::stream) {
      // A Feed stream's messages apply in the order sent (§6): one at a time, in arrival order.
      stream_queue_.push_back(std::move(in));
      if (!stream_running_) {
        stream_running_ = true;
        asio::co_spawn(socket_.get_executor(), run_streams(shared_from_this()),
                       log_exception{&log_, "a session's feed streams"});
      }
      return;
    }
    request_pool& pool = lane == request_lane::control ? control_ : workers_;
    asio::co_spawn(socket_.get_executor(), answer_one(shared_from_this(), pool, std::move(in), id),
                   log_exception{&log_, "a session's request"});
  }

  asio::awaitable<void> answer_ready([[maybe_unused]] std::shared_ptr<session> alive, std::optional<frame_out> out) {
    if (out) co_await send(std::move(*out));
    finished_one();
  }

  // `alive` holds the session until the answer is written (coroutine parameters live in its frame).
  asio::awaitable<void> answer_one([[maybe_unused]] std::shared_ptr<session> alive, request_pool& pool, frame_in in,
                                   std::uint64_t id) {
    auto out = co_await handle_on(pool, std::move(in));
    ids_in_flight_.erase(id);
    if (out) co_await send(std::move(*out));
    finished_one();
  }

  asio::awaitable<void> run_streams([[maybe_unused]] std::shared_ptr<session> alive) {
    while (!stream_queue_.empty()) {
      frame_in in = std::move(stream_queue_.front());
      stream_queue_.pop_front();
      auto out = co_await handle_on(workers_, std::move(in));
      if (out) co_await send(std::move(*out));
      finished_one();
    }
    stream_running_ = false;
  }

  // Handles `in` on a thread of `pool`; the answer comes back through the return channel.
  asio::awaitable<std::optional<frame_out>> handle_on(request_pool& pool, frame_in in) {
    return back_.run_on(pool, [d = &dispatch_, c = connection_.get(), in = std::move(in)]() mutable {
      return d->handle(*c, std::move(in));
    });
  }

  // Closes connections that are idle (no request in flight, nothing received for
  // idle_timeout) or stalled inside a frame (frame_timeout after its first byte), so that
  // neither held sessions nor half-sent frames' buffers pile up.
  asio::awaitable<void> watch() {
    auto self = shared_from_this();
    using clock = std::chrono::steady_clock;
    while (!closed_ && !stopping_) {
      const auto now = clock::now();
      std::optional<clock::time_point> due;
      bool stalled = false;
      if (in_flight_ == 0 && !rejecting_) {
        if (frame_started_ && frame_timeout_.count() > 0) {
          due = *frame_started_ + frame_timeout_;
          stalled = true;
        } else if (!frame_started_ && idle_timeout_.count() > 0) {
          due = last_activity_ + idle_timeout_;
        }
      }
      if (due && now >= *due) {
        const auto ms = [](auto d) { return std::chrono::duration_cast<std::chrono::milliseconds>(d).count(); };
        const error why =
            stalled
                ? error{errc::deadline_exceeded, "cannot read frame: the frame at stream offset " +
                                                     std::to_string(frame_offset_) + " did not arrive whole within " +
                                                     std::to_string(ms(frame_timeout_)) + " ms of its first byte"}
                : error{errc::deadline_exceeded, "closing the connection: no request for " +
                                                     std::to_string(ms(idle_timeout_)) + " ms (idle timeout)"};
        tensorreg::log(log_, log_level::info, "closing the connection of pid {} uid {}: {}", peer_.pid, peer_.uid,
                       why.message);
        // Best effort, one non-blocking send: a peer that does not read must not hold us.
        auto out = dispatch_.reject(why);
        if (auto framed = encode_frame(out.payload, std::numeric_limits<std::uint32_t>::max())) {
          (void)send_some(
              socket_.native_handle(),
              std::span<const std::byte>(reinterpret_cast<const std::byte*>(framed->data()), framed->size()), {});
        }
        stop();
        co_return;
      }
      // While busy, look again later; otherwise at the deadline (activity may move it on).
      const auto period = idle_timeout_.count() > 0 ? idle_timeout_ : frame_timeout_;
      watchdog_.expires_at(due ? *due : now + period);
      asio::error_code ec;
      co_await watchdog_.async_wait(asio::redirect_error(asio::use_awaitable, ec));
    }
  }

  // Stops reading; the requests being handled still get their answers.
  void stop() {
    stopping_ = true;
    asio::error_code ignored;
    socket_.cancel(ignored);
    watchdog_.cancel();
    slot_freed_.cancel();
  }

 private:
  // Waits until a request of this session is answered (or the session stops).
  asio::awaitable<void> wait_for_slot() {
    slot_freed_.expires_at(std::chrono::steady_clock::time_point::max());
    asio::error_code ec;
    co_await slot_freed_.async_wait(asio::redirect_error(asio::use_awaitable, ec));
  }

  void finished_one() {
    --in_flight_;
    slot_freed_.cancel();
    if (in_flight_ == 0) {
      const auto now = std::chrono::steady_clock::now();
      last_activity_ = now;
      // A frame that began while requests were in flight may have waited on our backpressure:
      // its clock starts now that nothing is.
      if (frame_started_) frame_started_ = now;
      watchdog_.cancel();  // idle and stall deadlines moved: let it look again
    }
  }

  // Answers leave one whole frame at a time, in the order they are ready. After a write fails or
  // a connection-level answer (request_id 0) is sent, nothing more is written and reading stops.
  asio::awaitable<void> send(frame_out out) {
    if (write_closed_) co_return;
    outbox_.push_back(std::move(out));
    if (writing_) co_return;  // the session's writer sends it in turn
    writing_ = true;
    while (!outbox_.empty() && !write_closed_) {
      frame_out next = std::move(outbox_.front());
      outbox_.pop_front();
      const bool close_after = next.close_after;
      if (!co_await write(std::move(next)) || close_after) {
        write_closed_ = true;
        outbox_.clear();
        stop();
      }
    }
    writing_ = false;
  }

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
      auto sent =
          send_some(socket_.native_handle(), bytes, fds_pending ? std::span<const int>(fds) : std::span<const int>{});
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

  // A frame's clock starts once its first bytes are read and the frames before it answered
  // (until then its rest may wait in the socket on us), and runs until it is whole: bytes that
  // trickle in do not restart it.
  void note_partial_frame(std::chrono::steady_clock::time_point now) {
    if (decoder_.partial_bytes() == 0) {
      frame_started_.reset();
      return;
    }
    if (frame_started_ && frame_offset_ == decoder_.partial_stream_offset()) return;
    frame_started_ = now;
    frame_offset_ = decoder_.partial_stream_offset();
    watchdog_.cancel();  // its deadline moved: let it look again
  }

  stream::socket socket_;
  asio::steady_timer watchdog_;
  asio::steady_timer slot_freed_;  // cancelled whenever a request is answered
  dispatcher& dispatch_;
  request_pool& workers_;
  request_pool& control_;
  return_channel& back_;
  frame_decoder decoder_;
  const std::chrono::milliseconds idle_timeout_;
  const std::chrono::milliseconds frame_timeout_;
  const std::size_t max_in_flight_;
  logger& log_;
  peer_credentials peer_;
  dispatcher::connection_ptr connection_;
  // All on the I/O thread.
  bool stopping_ = false;
  bool closed_ = false;                              // run() has ended
  std::size_t in_flight_ = 0;                        // frames read and not yet answered (or dropped)
  std::unordered_set<std::uint64_t> ids_in_flight_;  // request_ids of the unary requests in flight
  std::deque<frame_in> stream_queue_;                // Feed stream frames waiting for their turn
  bool stream_running_ = false;                      // run_streams() is working through stream_queue_
  std::deque<frame_out> outbox_;                     // answers waiting for the writer
  bool writing_ = false;                             // a send() is writing the outbox
  bool write_closed_ = false;                        // a write failed or an id-0 answer went out
  // The watchdog's view: a reject being written, last activity, the partial frame.
  bool rejecting_ = false;
  std::chrono::steady_clock::time_point last_activity_;
  std::optional<std::chrono::steady_clock::time_point> frame_started_;
  std::uint64_t frame_offset_ = 0;
};

struct server::impl {
  server_options options;
  dispatcher& dispatch;
  logger& log;
  asio::io_context io{1};
  stream::acceptor acceptor{io};
  listening_socket bound;  // the socket file's identity: shutdown removes only our own
  asio::signal_set signals{io, SIGINT, SIGTERM};
  request_pool workers;
  request_pool control;  // control requests (dispatcher::lane_of): never behind the workers
  return_channel back;   // the pools' answers, back to the I/O thread
  std::list<std::weak_ptr<session>> sessions;
  std::size_t served = 0;
  bool stopping = false;
  // Out of fds: how long accepting pauses, and whether it is paused (to log once per episode).
  static constexpr std::chrono::milliseconds accept_pause{100};
  bool accept_paused = false;

  impl(server_options o, dispatcher& d, unique_fd eventfd)
      : options(std::move(o)),
        dispatch(d),
        log(options.log != nullptr ? *options.log : null_logger()),
        // Requests mostly wait for the engine's hashing pool (fair between clients), so there are
        // more of them than cores: a small commit must not queue behind big ones for a thread.
        workers(options.workers != 0 ? options.workers : std::max(16u, 4 * std::thread::hardware_concurrency())),
        control(std::max(1u, options.control_workers)),
        back(io, eventfd.release()) {}

  asio::awaitable<void> accept_loop() {
    while (!stopping) {
      asio::error_code ec;
      stream::socket socket = co_await acceptor.async_accept(asio::redirect_error(asio::use_awaitable, ec));
      if (ec) {
        if (stopping || ec == asio::error::operation_aborted) break;
        if (ec == asio::error::no_descriptors || ec.value() == ENFILE || ec == asio::error::no_buffer_space ||
            ec == asio::error::no_memory) {
          // The connection stays in the backlog and would fail again at once: pause instead
          // of spinning, and let requests in progress give fds back.
          if (!accept_paused) {
            tensorreg::log(log, log_level::warn, "cannot accept a connection: {}; pausing accepts for {} ms",
                           ec.message(), accept_pause.count());
          }
          accept_paused = true;
          asio::steady_timer pause(io, accept_pause);
          co_await pause.async_wait(asio::redirect_error(asio::use_awaitable, ec));
          continue;
        }
        tensorreg::log(log, log_level::debug, "cannot accept a connection: {}", ec.message());
        continue;
      }
      accept_paused = false;
      std::erase_if(sessions, [](const auto& w) { return w.expired(); });
      const auto peer = peer_of(socket.native_handle());
      if (!peer) {
        tensorreg::log(log, log_level::warn, "closed a connection: {}", peer.error().message);
        continue;
      }
      std::optional<error> over;
      if (sessions.size() >= options.max_sessions) {
        over = error{errc::resource_exhausted, "cannot accept connection: the daemon serves its maximum of " +
                                                   std::to_string(options.max_sessions) + " sessions"};
      } else if (options.max_sessions_per_uid != 0) {
        const auto of_uid =
            static_cast<std::size_t>(std::count_if(sessions.begin(), sessions.end(), [&](const auto& w) {
              auto s = w.lock();
              return s && s->uid() == peer->uid;
            }));
        if (of_uid >= options.max_sessions_per_uid) {
          over = error{errc::resource_exhausted, "cannot accept connection: uid " + std::to_string(peer->uid) +
                                                     " already has its maximum of " +
                                                     std::to_string(options.max_sessions_per_uid) + " sessions"};
        }
      }
      if (over) {
        // Over a limit: one RESOURCE_EXHAUSTED answer on request 0, then the connection
        // closes. The frame is small and the socket fresh, so this send does not wait.
        const error& refused = *over;
        tensorreg::log(log, log_level::warn, "refused a connection from pid {} uid {}: {}", peer->pid, peer->uid,
                       refused.message);
        auto out = dispatch.reject(refused);
        if (auto framed = encode_frame(out.payload, std::numeric_limits<std::uint32_t>::max())) {
          (void)send_some(
              socket.native_handle(),
              std::span<const std::byte>(reinterpret_cast<const std::byte*>(framed->data()), framed->size()), {});
        }
        asio::error_code ignored;
        socket.close(ignored);
        continue;
      }
      auto s = std::make_shared<session>(std::move(socket), *peer, dispatch, workers, control, back, options, log);
      ++served;
      sessions.push_back(s);
      asio::co_spawn(io, s->run(), log_exception{&log, "a session"});
    }
  }

  unique_fd handed_listener;  // hand_over(): the listening fd, kept open for the successor

  void shutdown(bool for_successor = false) {
    if (stopping) return;
    stopping = true;
    asio::error_code ignored;
    if (for_successor) handed_listener = unique_fd(::fcntl(acceptor.native_handle(), F_DUPFD_CLOEXEC, 0));
    acceptor.close(ignored);
    signals.cancel(ignored);
    for (auto& w : sessions) {
      if (auto s = w.lock()) s->stop();
    }
    if (!for_successor) unlink_if_ours(options.socket_path, bound);
  }
};

server::server(std::unique_ptr<impl> i) noexcept : impl_(std::move(i)) {}
server::~server() {
  impl_->workers.join();
  impl_->control.join();
}

result<std::unique_ptr<server>> server::create(server_options options, dispatcher& dispatch) {
  // The directory, the path and the bind are checked and done in unix_socket (DECISIONS §4).
  TENSORREG_TRY_ASSIGN(auto bound,
                       listen_unix(options.socket_path, asio::socket_base::max_listen_connections, options.access));
  return adopt(std::move(options), dispatch, std::move(bound));
}

result<std::unique_ptr<server>> server::adopt(server_options options, dispatcher& dispatch, listening_socket bound) {
  unique_fd eventfd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!eventfd)
    return fail(errc::resource_exhausted, std::string("cannot create the server's eventfd: ") + std::strerror(errno));
  auto i = std::make_unique<impl>(std::move(options), dispatch, std::move(eventfd));
  asio::error_code ec;
  const int fd = bound.fd.get();
  i->acceptor.assign(stream(), fd, ec);
  if (ec) {
    unlink_if_ours(i->options.socket_path, bound);
    return fail(errc::unavailable, "cannot listen on '" + i->options.socket_path + "': " + ec.message());
  }
  (void)bound.fd.release();  // the acceptor owns it now
  i->bound = std::move(bound);
  return std::unique_ptr<server>(new server(std::move(i)));
}

std::size_t server::run() {
  auto& i = *impl_;
  i.signals.async_wait([&i](const asio::error_code& ec, int) {
    if (!ec) i.shutdown();
  });
  asio::co_spawn(i.io, i.accept_loop(), log_exception{&i.log, "the accept loop"});
  schedule_io_thread(i.options, i.log);
  i.io.run();
  i.workers.join();
  i.control.join();
  return i.served;
}

void server::stop() {
  asio::post(impl_->io, [i = impl_.get()] { i->shutdown(); });
}

void server::hand_over() {
  asio::post(impl_->io, [i = impl_.get()] { i->shutdown(true); });
}

unique_fd server::take_listener() { return std::move(impl_->handed_listener); }

const std::string& server::socket_path() const noexcept { return impl_->options.socket_path; }

}  // namespace tensorreg::daemon
