#include "producer_process.hpp"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <stdexcept>

#include "gpu_fill.hpp"

extern char** environ;

namespace tensorreg::cuda::testing {
namespace {

// The child's end of the socketpair lands here, away from 0-2 and from whatever the
// spawning process has open (dup2 onto the same number would keep its close-on-exec flag).
constexpr int child_socket_fd = 100;

[[noreturn]] void fail(const std::string& what) {
  throw std::runtime_error("producer_process: " + what + (errno != 0 ? std::string(": ") + std::strerror(errno) : ""));
}

std::string from_hex(const std::string& hex) {
  std::string out;
  for (std::size_t i = 0; i + 1 < hex.size(); i += 2) {
    out += static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16));
  }
  return out;
}

}  // namespace

std::string producer_process::producer_path() {
  if (const char* env = std::getenv("TENSORREG_GPU_PRODUCER"); env != nullptr && *env != '\0') return env;
  std::error_code ec;
  auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  return (ec ? std::string(".") : exe.parent_path().string()) + "/tensorreg_gpu_producer";
}

producer_process::producer_process(const std::vector<producer_allocation>& allocations, int device,
                                   const std::string& path) {
  if (rlimit lim{}; ::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
    lim.rlim_cur = lim.rlim_max;
    static_cast<void>(::setrlimit(RLIMIT_NOFILE, &lim));
  }
  int in[2];
  int out[2];
  int sock[2];
  errno = 0;
  if (::pipe2(in, O_CLOEXEC) != 0 || ::pipe2(out, O_CLOEXEC) != 0) fail("cannot make pipes");
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sock) != 0) fail("cannot make a socketpair");
  std::vector<std::string> argv{path, "--device", std::to_string(device), "--vmm-socket-fd",
                                std::to_string(child_socket_fd)};
  std::size_t vmm_count = 0;
  for (const auto& a : allocations) {
    argv.push_back((a.vmm ? "vmm:" : "") + std::to_string(a.size) + ":" + std::to_string(a.seed));
    vmm_count += a.vmm ? 1 : 0;
  }
  std::vector<char*> args;
  for (auto& a : argv) args.push_back(a.data());
  args.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, in[0], 0);
  posix_spawn_file_actions_adddup2(&actions, out[1], 1);
  posix_spawn_file_actions_adddup2(&actions, sock[1], child_socket_fd);
  const int rc = ::posix_spawn(&pid_, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  ::close(in[0]);
  ::close(out[1]);
  ::close(sock[1]);  // so a producer that dies shows as EOF on our end
  stdin_ = in[1];
  stdout_ = ::fdopen(out[0], "r");
  socket_ = sock[0];
  if (rc != 0) {
    pid_ = -1;
    errno = rc;
    release();
    fail("cannot start " + path);
  }
  try {
    std::size_t lines = 0;
    while (lines < allocations.size()) {
      const std::string line = read_line();
      if (line.rfind("granularity ", 0) == 0) {
        granularity_ = std::stoull(line.substr(12));
      } else if (line.rfind("handle ", 0) == 0) {
        const auto space = line.find(' ', 7);
        ipc_handles_.push_back(from_hex(line.substr(7, space - 7)));
        ++lines;
      } else if (line.rfind("vmm ", 0) == 0) {
        ++lines;
      } else {
        errno = 0;
        fail("unexpected line from the producer: '" + line + "'");
      }
    }
    // The fds come before "ready", in messages of up to 250: a 4-byte count + SCM_RIGHTS.
    while (vmm_fds_.size() < vmm_count) {
      std::uint32_t count = 0;
      iovec iov{&count, sizeof count};
      alignas(cmsghdr) char control[CMSG_SPACE(253 * sizeof(int))];
      msghdr msg{};
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      msg.msg_control = control;
      msg.msg_controllen = sizeof control;
      errno = 0;
      const ssize_t n = ::recvmsg(socket_, &msg, MSG_CMSG_CLOEXEC);
      if (n != static_cast<ssize_t>(sizeof count)) fail("cannot receive VMM fds (got " + std::to_string(n) + " bytes)");
      if ((msg.msg_flags & MSG_CTRUNC) != 0) fail("VMM fds were truncated (is RLIMIT_NOFILE too low?)");
      std::size_t got = 0;
      for (cmsghdr* cm = CMSG_FIRSTHDR(&msg); cm != nullptr; cm = CMSG_NXTHDR(&msg, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
        const std::size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (std::size_t i = 0; i < k; ++i) {
          int fd = -1;
          std::memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof fd);
          vmm_fds_.push_back(fd);
        }
        got += k;
      }
      if (got != count) {
        errno = 0;
        fail("a message announced " + std::to_string(count) + " fds and carried " + std::to_string(got));
      }
    }
    const std::string ready = read_line();
    if (ready != "ready") {
      errno = 0;
      fail("expected 'ready' from the producer, got '" + ready + "'");
    }
  } catch (...) {
    release();
    throw;
  }
}

std::string producer_process::read_line() {
  char buf[1024];
  errno = 0;
  if (std::fgets(buf, sizeof buf, stdout_) == nullptr) fail("the producer exited early (see its stderr)");
  std::string line = buf;
  if (!line.empty() && line.back() == '\n') line.pop_back();
  return line;
}

producer_process::~producer_process() { release(); }

int producer_process::end(bool kill) {
  if (kill) ::kill(pid_, SIGKILL);
  if (stdin_ >= 0) ::close(stdin_);
  stdin_ = -1;
  int status = 0;
  while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
  }
  pid_ = -1;
  return status;
}

void producer_process::release() noexcept {
  // Also called by a failing constructor; every step leaves its member reset.
  for (const int fd : vmm_fds_) ::close(fd);
  vmm_fds_.clear();
  if (socket_ >= 0) ::close(socket_);
  socket_ = -1;
  if (stdin_ >= 0) ::close(stdin_);
  stdin_ = -1;
  if (pid_ > 0) {
    int status = 0;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
  }
  pid_ = -1;
  if (stdout_ != nullptr) std::fclose(stdout_);
  stdout_ = nullptr;
}

std::string pattern(std::uint64_t seed, std::uint64_t offset, std::uint64_t length) {
  std::string all(offset + length, '\0');
  fill_random_host(reinterpret_cast<std::byte*>(all.data()), all.size(), seed);
  return all.substr(offset);
}

}  // namespace tensorreg::cuda::testing
