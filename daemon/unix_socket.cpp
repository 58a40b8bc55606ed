#include "unix_socket.hpp"

#include <grp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>

namespace tensorreg::daemon {
namespace {

std::string os_reason(int e) { return std::strerror(e); }

std::string octal(mode_t mode) {
  char text[8];
  std::snprintf(text, sizeof text, "%04o", static_cast<unsigned>(mode & 07777));
  return text;
}

// The socket's directory: ours, 0700, a real directory (DECISIONS §4); or 0750 with the group
// of socket_access, which may then connect too.
status prepare_directory(const std::filesystem::path& dir, const socket_access& access) {
  const std::string name = dir.string();
  if (::mkdir(name.c_str(), 0700) != 0 && errno != EEXIST) {
    if (errno != ENOENT) {
      const auto code = errno == EACCES ? errc::permission_denied : errc::unavailable;
      return fail(code, "cannot create socket directory '" + name + "': " + os_reason(errno));
    }
    // Parents missing: make them as usual, then the directory itself 0700.
    std::error_code ec;
    std::filesystem::create_directories(dir.parent_path(), ec);
    if (ec) return fail(errc::unavailable, "cannot create socket directory '" + name + "': " + ec.message());
    if (::mkdir(name.c_str(), 0700) != 0 && errno != EEXIST) {
      return fail(errc::unavailable, "cannot create socket directory '" + name + "': " + os_reason(errno));
    }
  }
  struct stat st {};
  if (::lstat(name.c_str(), &st) != 0) {
    return fail(errc::unavailable, "cannot inspect socket directory '" + name + "': " + os_reason(errno));
  }
  const std::string allowed =
      access.group ? " with mode 0700, or 0750 with group " + std::to_string(*access.group) : " with mode 0700";
  const auto refuse = [&](const std::string& why) {
    return fail(errc::failed_precondition, "cannot use socket directory '" + name + "': " + why +
                                               "; it must be a directory owned by uid " + std::to_string(::geteuid()) +
                                               allowed);
  };
  if (S_ISLNK(st.st_mode)) return refuse("it is a symbolic link");
  if (!S_ISDIR(st.st_mode)) return refuse("it is not a directory");
  if (st.st_uid != ::geteuid()) return refuse("it is owned by uid " + std::to_string(st.st_uid));
  if (access.group && (st.st_mode & 077) == 050) {
    if (st.st_gid == *access.group) return {};
    return refuse("its group is " + std::to_string(st.st_gid));
  }
  if ((st.st_mode & 077) != 0) return refuse("its mode is " + octal(st.st_mode));
  if (access.group) {
    // Ours and private: open it to the group (read and search, never write). chown first, so
    // that the directory is never open to the wrong group.
    if (::chown(name.c_str(), static_cast<uid_t>(-1), *access.group) != 0 || ::chmod(name.c_str(), 0750) != 0) {
      const auto code = errno == EPERM ? errc::permission_denied : errc::unavailable;
      return fail(code, "cannot open socket directory '" + name + "' to group " + std::to_string(*access.group) + ": " +
                            os_reason(errno));
    }
  }
  return {};
}

// Whatever is at `path` already: nothing, a stale socket (removed) or a refusal.
status clear_path(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return {};
    return fail(errc::unavailable, "cannot listen on '" + path + "': " + os_reason(errno));
  }
  if (!S_ISSOCK(st.st_mode)) {
    return fail(errc::failed_precondition, "cannot listen on '" + path +
                                               "': it exists and is not a socket; "
                                               "refusing to remove it");
  }
  // A live daemon answers connect(); a stale file from a crashed one does not.
  if (connect_unix(path)) {
    return fail(errc::failed_precondition, "cannot listen on '" + path + "': another tensorregd is already serving it");
  }
  ::unlink(path.c_str());
  return {};
}

}  // namespace

result<peer_credentials> peer_of(int socket_fd) {
  ucred cred{};
  socklen_t len = sizeof cred;
  if (::getsockopt(socket_fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    return fail(errc::internal, "cannot read peer credentials: " + os_reason(errno));
  }
  return peer_credentials{cred.pid, cred.uid, cred.gid};
}

result<received> receive_some(int socket_fd, std::span<std::byte> buffer) {
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * max_fds_per_frame)];
  iovec iov{buffer.data(), buffer.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ssize_t n = 0;
  do {
    n = ::recvmsg(socket_fd, &msg, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  received out;
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      out.would_block = true;
      return out;
    }
    return fail(errc::unavailable, "cannot receive: " + os_reason(errno));
  }
  out.bytes = static_cast<std::size_t>(n);
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < count; ++i) {
      int fd = -1;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
      out.fds.emplace_back(fd);
    }
  }
  if (msg.msg_flags & MSG_CTRUNC) {
    return fail(errc::data_loss, "cannot receive: more than " + std::to_string(max_fds_per_frame) +
                                     " file descriptors arrived with one frame");
  }
  return out;
}

result<std::size_t> send_some(int socket_fd, std::span<const std::byte> bytes, std::span<const int> fds) {
  if (fds.size() > max_fds_per_frame) {
    return fail(errc::invalid_argument, "cannot send " + std::to_string(fds.size()) + " file descriptors: at most " +
                                            std::to_string(max_fds_per_frame) + " per frame");
  }
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * max_fds_per_frame)];
  iovec iov{const_cast<std::byte*>(bytes.data()), bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (!fds.empty()) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  for (;;) {
    const ssize_t n = ::sendmsg(socket_fd, &msg, MSG_NOSIGNAL);
    if (n >= 0) return static_cast<std::size_t>(n);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return std::size_t{0};
    return fail(errc::unavailable, "cannot send: " + os_reason(errno));
  }
}

status send_all(int socket_fd, std::span<const std::byte> bytes, std::span<const int> fds) {
  bool fds_pending = !fds.empty();
  while (!bytes.empty() || fds_pending) {
    TENSORREG_TRY_ASSIGN(const std::size_t n, send_some(socket_fd, bytes, fds_pending ? fds : std::span<const int>{}));
    if (n == 0 && !bytes.empty()) {
      pollfd p{socket_fd, POLLOUT, 0};
      (void)::poll(&p, 1, -1);
      continue;
    }
    fds_pending = false;
    bytes = bytes.subspan(n);
  }
  return {};
}

std::string default_socket_path() {
  if (const char* runtime = std::getenv("XDG_RUNTIME_DIR"); runtime != nullptr && runtime[0] != '\0') {
    return std::string(runtime) + "/tensorreg/tensorregd.sock";
  }
  return "/tmp/tensorreg-" + std::to_string(::getuid()) + "/tensorregd.sock";
}

result<gid_t> find_group(std::string_view name) {
  gid_t number = 0;
  const auto* end = name.data() + name.size();
  if (auto [ptr, ec] = std::from_chars(name.data(), end, number); ec == std::errc{} && ptr == end && !name.empty()) {
    return number;
  }
  const std::string text(name);
  std::vector<char> buffer(16384);
  struct group entry {};
  struct group* found = nullptr;
  const int e = ::getgrnam_r(text.c_str(), &entry, buffer.data(), buffer.size(), &found);
  if (e != 0 || found == nullptr) {
    return fail(errc::not_found, "cannot find group '" + text + "'" + (e != 0 ? ": " + os_reason(e) : std::string()));
  }
  return found->gr_gid;
}

result<listening_socket> listen_unix(const std::string& path, int backlog, const socket_access& access) {
  sockaddr_un addr{};
  if (path.size() >= sizeof addr.sun_path) {
    return fail(errc::invalid_argument, "cannot listen on '" + path + "': the path is too long");
  }
  const auto dir = std::filesystem::path(path).parent_path();
  TENSORREG_TRY(prepare_directory(dir.empty() ? std::filesystem::path(".") : dir, access));
  TENSORREG_TRY(clear_path(path));
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  listening_socket out;
  out.fd = unique_fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!out.fd) return fail(errc::unavailable, "cannot listen on '" + path + "': " + os_reason(errno));
  // bind() creates the file with 0777 & ~umask: 0660 from the first instant.
  const mode_t old_mask = ::umask(0117);
  const int bound = ::bind(out.fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
  const int bind_errno = errno;
  ::umask(old_mask);
  if (bound != 0) {
    const auto code = bind_errno == EACCES ? errc::permission_denied : errc::unavailable;
    return fail(code, "cannot listen on '" + path + "': " + os_reason(bind_errno));
  }
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0 || ::listen(out.fd.get(), backlog) != 0) {
    const int e = errno;
    ::unlink(path.c_str());
    return fail(errc::unavailable, "cannot listen on '" + path + "': " + os_reason(e));
  }
  if (access.group && st.st_gid != *access.group &&
      ::lchown(path.c_str(), static_cast<uid_t>(-1), *access.group) != 0) {
    const int e = errno;
    ::unlink(path.c_str());
    return fail(e == EPERM ? errc::permission_denied : errc::unavailable,
                "cannot give socket '" + path + "' to group " + std::to_string(*access.group) + ": " + os_reason(e));
  }
  out.device = st.st_dev;
  out.inode = st.st_ino;
  return out;
}

void unlink_if_ours(const std::string& path, const listening_socket& bound) noexcept {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return;
  if (st.st_dev == bound.device && st.st_ino == bound.inode) ::unlink(path.c_str());
}

result<unique_fd> connect_unix(const std::string& path) {
  sockaddr_un addr{};
  if (path.size() >= sizeof addr.sun_path) {
    return fail(errc::invalid_argument, "cannot connect to '" + path + "': the path is longer than " +
                                            std::to_string(sizeof addr.sun_path - 1) + " bytes");
  }
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  unique_fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return fail(errc::unavailable, "cannot create a socket: " + os_reason(errno));
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
    return fail(errc::unavailable, "cannot connect to tensorregd at '" + path + "': " + os_reason(errno));
  }
  return fd;
}

}  // namespace tensorreg::daemon
