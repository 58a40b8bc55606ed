// The takeover handoff (daemon/takeover.hpp, docs/architecture.md §14.2).
#include "takeover.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "src/common/log.hpp"

namespace tensorreg::daemon {
namespace {

constexpr std::uint32_t kMagic = 0x4f485254;  // "TRHO" read as little-endian bytes
constexpr std::uint64_t kMaxPayload = std::uint64_t{1} << 30;
constexpr std::string_view kListenerName = "listener";
constexpr std::string_view kControlName = "control";

enum class kind : std::uint32_t { hello = 1, refused = 2, fds = 3, state = 4, adopted = 5 };

struct header {
  std::uint32_t magic = kMagic;
  std::uint32_t kind = 0;
  std::uint64_t length = 0;
};
static_assert(sizeof(header) == 16);

struct message {
  kind type = kind::hello;
  std::string payload;
  std::vector<unique_fd> fds;
};

using clock_type = std::chrono::steady_clock;

// Reads exactly out.size() bytes, collecting the fds that arrive with them.
status read_exact(int fd, std::span<std::byte> out, clock_type::time_point deadline, std::vector<unique_fd>& fds) {
  while (!out.empty()) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock_type::now()).count();
    if (left <= 0) return fail(errc::unavailable, "cannot hand over: the other daemon sent nothing in time");
    pollfd p{fd, POLLIN, 0};
    const int ready = ::poll(&p, 1, static_cast<int>(left));
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) continue;
    TENSORREG_TRY_ASSIGN(auto got, receive_some(fd, out));
    for (auto& f : got.fds) fds.push_back(std::move(f));
    if (got.would_block) continue;
    if (got.bytes == 0) return fail(errc::unavailable, "cannot hand over: the other daemon closed the connection");
    out = out.subspan(got.bytes);
  }
  return {};
}

result<message> read_message(int fd, clock_type::time_point deadline) {
  message m;
  header h;
  TENSORREG_TRY(read_exact(fd, std::as_writable_bytes(std::span(&h, 1)), deadline, m.fds));
  if (h.magic != kMagic) return fail(errc::invalid_argument, "cannot hand over: a message has a bad magic number");
  if (h.kind < 1 || h.kind > 5) {
    return fail(errc::invalid_argument, "cannot hand over: unknown message kind " + std::to_string(h.kind));
  }
  if (h.length > kMaxPayload) {
    return fail(errc::invalid_argument, "cannot hand over: a message of " + std::to_string(h.length) + " bytes");
  }
  m.type = static_cast<kind>(h.kind);
  m.payload.resize(static_cast<std::size_t>(h.length));
  TENSORREG_TRY(read_exact(fd, std::as_writable_bytes(std::span(m.payload.data(), m.payload.size())), deadline, m.fds));
  return m;
}

status send_message(int fd, kind type, std::string_view payload, std::span<const int> fds = {}) {
  header h;
  h.kind = static_cast<std::uint32_t>(type);
  h.length = payload.size();
  std::string bytes(reinterpret_cast<const char*>(&h), sizeof h);
  bytes.append(payload);
  return send_all(fd, std::as_bytes(std::span(bytes.data(), bytes.size())), fds);
}

std::string os_reason() { return std::strerror(errno); }

}  // namespace

std::string takeover_path(const std::string& socket_path) { return socket_path + ".takeover"; }

status check_takeover_peer(const peer_credentials& peer, uid_t daemon_uid) {
  if (peer.uid == daemon_uid || peer.uid == 0) return {};
  return fail(errc::permission_denied, "cannot take over tensorregd: pid " + std::to_string(peer.pid) +
                                           " runs as uid " + std::to_string(peer.uid) + "; only uid " +
                                           std::to_string(daemon_uid) + " (the daemon's) or root may take it over");
}

// ---- the successor -----------------------------------------------------------------------------

result<received_handoff> request_handoff(const std::string& socket_path, std::chrono::milliseconds timeout) {
  const auto path = takeover_path(socket_path);
  TENSORREG_TRY_ASSIGN(auto conn, connect_unix(path));
  TENSORREG_TRY_ASSIGN(const auto peer, peer_of(conn.get()));
  // Our socket and memory come from it: it must be ours too.
  if (peer.uid != ::geteuid() && peer.uid != 0) {
    return fail(errc::permission_denied, "cannot take over the daemon at '" + path + "': it runs as uid " +
                                             std::to_string(peer.uid) + ", not as uid " + std::to_string(::geteuid()));
  }
  // A daemon that refuses us answers and closes at once, maybe before our hello arrives: its
  // answer is still there to read, so a failed send is reported only if nothing is.
  const auto hello = send_message(conn.get(), kind::hello, "v1");
  const auto deadline = clock_type::now() + timeout;
  received_handoff out;
  out.predecessor = peer.pid;
  for (;;) {
    auto next = read_message(conn.get(), deadline);
    if (!next && !hello) return tl::unexpected(hello.error());
    TENSORREG_TRY_ASSIGN(auto m, std::move(next));
    if (m.type == kind::refused) return fail(errc::permission_denied, m.payload);
    if (m.type == kind::state) {
      if (!out.listener || !out.control_listener) {
        return fail(errc::invalid_argument, "cannot take over: the old daemon sent no listening socket");
      }
      out.state = std::move(m.payload);
      out.connection = std::move(conn);
      return out;
    }
    if (m.type != kind::fds) {
      return fail(errc::invalid_argument,
                  "cannot take over: unexpected message kind " + std::to_string(static_cast<std::uint32_t>(m.type)));
    }
    // One name per line, one fd per name, in order.
    std::vector<std::string> names;
    std::size_t at = 0;
    while (at < m.payload.size()) {
      const auto end = m.payload.find('\n', at);
      names.push_back(m.payload.substr(at, end == std::string::npos ? std::string::npos : end - at));
      at = end == std::string::npos ? m.payload.size() : end + 1;
    }
    if (names.size() != m.fds.size()) {
      return fail(errc::invalid_argument, "cannot take over: a batch names " + std::to_string(names.size()) +
                                              " fds and carries " + std::to_string(m.fds.size()));
    }
    for (std::size_t i = 0; i < names.size(); ++i) {
      if (names[i] == kListenerName) {
        out.listener = std::move(m.fds[i]);
      } else if (names[i] == kControlName) {
        out.control_listener = std::move(m.fds[i]);
      } else {
        out.fds.push_back(persistence::named_fd{std::move(names[i]), std::move(m.fds[i])});
      }
    }
  }
}

status acknowledge(int connection, const status& outcome) {
  if (outcome) return send_message(connection, kind::adopted, "");
  return send_message(connection, kind::refused, outcome.error().message);
}

// ---- the old daemon ----------------------------------------------------------------------------

status hand_over(int successor, handoff_payload payload, std::chrono::milliseconds ack_timeout) {
  std::vector<std::string> names{std::string(kListenerName), std::string(kControlName)};
  std::vector<int> fds{payload.listener.get(), payload.control_listener.get()};
  for (const auto& f : payload.resident.fds) {
    names.push_back(f.name);
    fds.push_back(f.fd.get());
  }
  for (std::size_t at = 0; at < fds.size(); at += max_fds_per_frame) {
    const auto n = std::min(max_fds_per_frame, fds.size() - at);
    std::string list;
    for (std::size_t i = at; i < at + n; ++i) list += (i == at ? "" : "\n") + names[i];
    TENSORREG_TRY(send_message(successor, kind::fds, list, std::span<const int>(fds.data() + at, n)));
  }
  TENSORREG_TRY(send_message(successor, kind::state, payload.resident.state));
  TENSORREG_TRY_ASSIGN(auto answer, read_message(successor, clock_type::now() + ack_timeout));
  if (answer.type == kind::adopted) return {};
  return fail(errc::aborted, "the successor gave up: " + answer.payload);
}

takeover_listener::takeover_listener(std::string path, listening_socket bound, uid_t uid,
                                     std::function<void()> on_request, logger& log)
    : path_(std::move(path)), bound_(std::move(bound)), uid_(uid), on_request_(std::move(on_request)), log_(log) {}

result<std::unique_ptr<takeover_listener>> takeover_listener::create(const std::string& path, uid_t daemon_uid,
                                                                     std::function<void()> on_request, logger& log,
                                                                     const socket_access& access) {
  TENSORREG_TRY_ASSIGN(auto bound, listen_unix(path, 4, access));
  return adopt(path, std::move(bound.fd), daemon_uid, std::move(on_request), log);
}

result<std::unique_ptr<takeover_listener>> takeover_listener::adopt(const std::string& path, unique_fd listening,
                                                                    uid_t daemon_uid, std::function<void()> on_request,
                                                                    logger& log) {
  listening_socket bound;
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    bound.device = st.st_dev;
    bound.inode = st.st_ino;
  }
  bound.fd = std::move(listening);
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC | O_NONBLOCK) != 0) {
    return fail(errc::unavailable, "cannot listen for a takeover: pipe: " + os_reason());
  }
  std::unique_ptr<takeover_listener> out(
      new takeover_listener(path, std::move(bound), daemon_uid, std::move(on_request), log));
  out->wake_read_ = unique_fd(pipe_fds[0]);
  out->wake_write_ = unique_fd(pipe_fds[1]);
  out->thread_ = std::thread([l = out.get()] { l->run(); });
  return out;
}

takeover_listener::~takeover_listener() {
  stop_thread();
  std::lock_guard lock(mutex_);
  if (!released_) unlink_if_ours(path_, bound_);
}

void takeover_listener::stop_thread() {
  if (!thread_.joinable()) return;
  const char byte = 1;
  (void)!::write(wake_write_.get(), &byte, 1);
  thread_.join();
}

unique_fd takeover_listener::take_successor() {
  std::lock_guard lock(mutex_);
  return std::move(successor_);
}

unique_fd takeover_listener::release_listener() {
  stop_thread();
  std::lock_guard lock(mutex_);
  released_ = true;
  return std::move(bound_.fd);
}

void takeover_listener::run() {
  for (;;) {
    pollfd p[2] = {{bound_.fd.get(), POLLIN, 0}, {wake_read_.get(), POLLIN, 0}};
    if (::poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (p[1].revents != 0) return;
    unique_fd conn(::accept4(bound_.fd.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!conn) continue;
    auto peer = peer_of(conn.get());
    if (!peer) continue;
    if (auto allowed = check_takeover_peer(*peer, uid_); !allowed) {
      tensorreg::log(log_, log_level::warn, "refused a takeover: {}", allowed.error().message);
      (void)send_message(conn.get(), kind::refused, allowed.error().message);
      continue;
    }
    auto hello = read_message(conn.get(), clock_type::now() + std::chrono::seconds(5));
    if (!hello || hello->type != kind::hello || hello->payload != "v1") {
      const std::string why = hello ? "it did not ask in version v1" : hello.error().message;
      tensorreg::log(log_, log_level::warn, "ignored a takeover request from pid {}: {}", peer->pid, why);
      (void)send_message(conn.get(), kind::refused, "cannot take over tensorregd: " + why);
      continue;
    }
    tensorreg::log(log_, log_level::info, "pid {} (uid {}) takes over: stopping to hand over", peer->pid, peer->uid);
    {
      std::lock_guard lock(mutex_);
      successor_ = std::move(conn);
    }
    if (on_request_) on_request_();
    return;
  }
}

}  // namespace tensorreg::daemon
