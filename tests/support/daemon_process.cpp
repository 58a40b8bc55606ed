#include "support/daemon_process.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#ifndef TENSORREG_DAEMON_PATH
#error "TENSORREG_DAEMON_PATH must name the tensorregd binary"
#endif

namespace tensorreg::testing {

daemon_process::daemon_process(std::vector<std::string> extra_args)
    : socket_((dir_.path() / "run" / "tensorregd.sock").string()) {
  start(std::move(extra_args), true);
}

daemon_process::daemon_process(std::string socket_path, std::vector<std::string> extra_args, bool expect_ready)
    : socket_(std::move(socket_path)) {
  start(std::move(extra_args), expect_ready);
}

daemon_process::daemon_process(std::vector<std::string> extra_args, stderr_to where)
    : socket_((dir_.path() / "run" / "tensorregd.sock").string()) {
  if (where == stderr_to::own_file) err_log_ = dir_.path() / "daemon.err";
  start(std::move(extra_args), true);
}

daemon_process::daemon_process(std::string socket_path, std::vector<std::string> extra_args, listen_fds passed)
    : socket_(std::move(socket_path)) {
  start(std::move(extra_args), true, &passed);
}

void daemon_process::start(std::vector<std::string> extra_args, bool expect_ready, const listen_fds* passed) {
  log_ = dir_.path() / "daemon.log";
  if (err_log_.empty()) err_log_ = log_;
  // $TENSORREGD overrides the built path (binaries carried to another machine).
  const char* override_path = std::getenv("TENSORREGD");
  std::vector<std::string> args{
      override_path != nullptr && *override_path != '\0' ? override_path : TENSORREG_DAEMON_PATH, "--socket", socket_};
#ifndef TENSORREG_TEST_DAEMON_WARM_START
  // The CPU suites use no GPU: on a GPU machine the daemon would ready its GPUs before its ready
  // line (about half a second a start) and log it. The GPU suite defines the macro.
  args.emplace_back("--no-warm-start");
#endif
  for (auto& a : extra_args) args.push_back(std::move(a));
  pid_ = ::fork();
  if (pid_ < 0) throw std::runtime_error("cannot fork the daemon");
  if (pid_ == 0) {
#if defined(__SANITIZE_THREAD__)
    // UCX (linked for --cluster) patches madvise and munmap in libc; a thread exiting under
    // TSan then enters UCX's hook after TSan has let go of that thread and the daemon
    // segfaults. The daemons these suites start use no UCX, so its hooks stay out.
    ::setenv("UCX_MEM_MMAP_HOOK_MODE", "none", 0);
#endif
    const int fd = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ::dup2(fd, 1);
    ::dup2(err_log_ == log_ ? fd : ::open(err_log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600), 2);
    if (passed != nullptr) {
      // Out of the way first (a passed fd may sit where another is going), then to 3, 4, ….
      std::vector<int> high;
      for (int f : passed->fds) high.push_back(::fcntl(f, F_DUPFD_CLOEXEC, 1000));
      std::string names;
      for (std::size_t i = 0; i < high.size(); ++i) {
        ::dup2(high[i], 3 + static_cast<int>(i));  // dup2 clears close-on-exec
        names += (i == 0 ? "" : ":") + passed->names[i];
      }
      ::setenv("LISTEN_FDS", std::to_string(high.size()).c_str(), 1);
      ::setenv("LISTEN_FDNAMES", names.c_str(), 1);
      ::setenv("LISTEN_PID", std::to_string(::getpid()).c_str(), 1);
    }
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  if (!expect_ready) return;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < give_up) {
    // The daemon's own line, not any word that contains "ready" ("already …" in an error).
    if (output().find("tensorregd: ready on ") != std::string::npos) return;
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      throw std::runtime_error("tensorregd exited before it was ready: " + output() +
                               (err_log_ == log_ ? std::string() : error_output()));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  throw std::runtime_error("tensorregd did not report ready within 10 s: " + output() +
                           (err_log_ == log_ ? std::string() : error_output()));
}

namespace {

std::string read_all(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

std::string daemon_process::output() const { return read_all(log_); }

std::string daemon_process::error_output() const { return read_all(err_log_); }

std::optional<int> daemon_process::wait_exit() {
  if (pid_ < 0) return std::nullopt;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < give_up) {
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return std::nullopt;
}

int daemon_process::stop(int signal) {
  if (pid_ < 0) return -1;
  ::kill(pid_, signal);
  auto code = wait_exit();
  if (!code) {
    ::kill(pid_, SIGKILL);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
    return 137;
  }
  return *code;
}

daemon_process::~daemon_process() {
  if (pid_ > 0) stop(SIGTERM);
}

}  // namespace tensorreg::testing
