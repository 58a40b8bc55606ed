// daemon/unix_socket.hpp — Unix domain stream sockets with file descriptors (SCM_RIGHTS).
//
// Plain POSIX helpers shared by the daemon's sessions (which wait for readiness with asio and
// then call these on the native handle) and by the blocking client: send bytes with fds
// attached to the first byte, receive bytes and whatever fds arrive with them, read the peer's
// credentials (SO_PEERCRED), and the default socket path of DECISIONS §4.
//
// Thread-safety: stateless functions; callers serialise use of one socket.
#pragma once

#include <sys/stat.h>
#include <sys/types.h>

#include <cstddef>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "framing.hpp"
#include "tensorreg/common/error.hpp"
#include "tensorreg/common/unique_fd.hpp"

namespace tensorreg::daemon {

struct peer_credentials {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
};

/// SO_PEERCRED of a connected socket. Errors: INTERNAL (getsockopt failed).
[[nodiscard]] result<peer_credentials> peer_of(int socket_fd);

/// What one recvmsg() returned. `bytes == 0` with `would_block == false` means end of stream.
struct received {
  std::size_t bytes = 0;
  bool would_block = false;
  std::vector<unique_fd> fds;
};

/// One recvmsg() into `buffer`, collecting SCM_RIGHTS fds (close-on-exec). Non-blocking sockets
/// report would_block instead of waiting. Errors: UNAVAILABLE (connection reset and other
/// socket errors), DATA_LOSS (fds were truncated by the kernel: more than max_fds_per_frame).
[[nodiscard]] result<received> receive_some(int socket_fd, std::span<std::byte> buffer);

/// One sendmsg() of as much of `bytes` as the socket takes, with `fds` attached when given.
/// Returns the bytes sent; 0 with nothing sent means a non-blocking socket is full (then the
/// fds were not sent either).
/// Errors: UNAVAILABLE (peer gone), INVALID_ARGUMENT (more than max_fds_per_frame fds).
[[nodiscard]] result<std::size_t> send_some(int socket_fd, std::span<const std::byte> bytes, std::span<const int> fds);

/// Sends all of `bytes`, with `fds` attached to the first sendmsg() (so they arrive with the
/// frame's first byte). Blocks (or, on a non-blocking socket, polls) until everything is sent.
/// Errors: UNAVAILABLE (peer gone), INVALID_ARGUMENT (more than max_fds_per_frame fds).
[[nodiscard]] status send_all(int socket_fd, std::span<const std::byte> bytes, std::span<const int> fds);

/// `$XDG_RUNTIME_DIR/tensorreg/tensorregd.sock`, else `/tmp/tensorreg-$UID/tensorregd.sock`.
[[nodiscard]] std::string default_socket_path();

/// A listening socket and the identity of the file it is bound to.
struct listening_socket {
  unique_fd fd;
  dev_t device = 0;
  ino_t inode = 0;
};

/// Who besides the daemon's own uid (and root) may connect.
struct socket_access {
  /// Unset: nobody else; the directory is 0700. Set: the members of this group too (a
  /// system-wide daemon under systemd, packaging/systemd/): the directory may be 0750 with this
  /// group (an existing 0700 one of ours is opened to it), and the socket is 0660 with it. The
  /// group gets no write bit on the directory, so it cannot replace the socket.
  std::optional<gid_t> group;
};

/// The gid of group `name` (a name from the group database, or a number).
/// Errors: NOT_FOUND naming the group.
[[nodiscard]] result<gid_t> find_group(std::string_view name);

/// Binds and listens at `path` safely (DECISIONS §4):
/// - The directory holding the socket is created 0700 when missing (its parents as needed).
///   It must be a directory (not a symlink), owned by our effective uid, with no permission
///   bits for group or others; anything else is refused, since whoever can write into it can
///   replace our socket.
/// - An existing socket with a live daemon behind it is refused; a stale socket is removed;
///   anything else at `path` (a regular file, a symlink, a directory) is refused, never removed.
/// - The socket is created 0660 under a umask, so it is never briefly wider (no chmod race).
/// Errors: INVALID_ARGUMENT (path too long), FAILED_PRECONDITION (unsafe directory, something
/// other than a socket at the path, another daemon live), UNAVAILABLE / PERMISSION_DENIED (the
/// directory cannot be made or the bind fails); each message names the path and the reason.
/// With `access.group` set, the directory may be 0750 with that group instead (see
/// socket_access), and the socket's group is that group.
[[nodiscard]] result<listening_socket> listen_unix(const std::string& path, int backlog,
                                                   const socket_access& access = {});

/// Removes `path` only if it is still the socket `bound` was bound to (same device and inode):
/// a newer daemon's socket on the same path is left alone.
void unlink_if_ours(const std::string& path, const listening_socket& bound) noexcept;

/// Connects to the daemon's socket (blocking, close-on-exec).
/// Errors: UNAVAILABLE naming the path and the OS reason (no daemon listening), INVALID_ARGUMENT
/// (path too long for a sockaddr_un).
[[nodiscard]] result<unique_fd> connect_unix(const std::string& path);

}  // namespace tensorreg::daemon
