#include "registration/owner_watch.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "tensorreg/common/unique_fd.hpp"

namespace tensorreg::registration::detail {

struct owner_watch::impl {
  std::function<void(std::int32_t)> on_exit;
  unique_fd wake;  // eventfd: tells the poller that the set changed or that it must stop
  mutable std::mutex mutex;
  std::unordered_map<std::int32_t, unique_fd> pidfds;
  bool stopping = false;
  std::thread thread;

  void poke() const {
    const std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake.get(), &one, sizeof one);
  }

  void run() {
    std::vector<pollfd> fds;
    std::vector<std::int32_t> pids;
    for (;;) {
      fds.clear();
      pids.clear();
      fds.push_back({wake.get(), POLLIN, 0});
      {
        std::lock_guard lock(mutex);
        if (stopping) return;
        for (const auto& [pid, fd] : pidfds) {
          fds.push_back({fd.get(), POLLIN, 0});
          pids.push_back(pid);
        }
      }
      if (::poll(fds.data(), fds.size(), -1) < 0) continue;  // EINTR
      if (fds[0].revents & POLLIN) {
        std::uint64_t drained = 0;
        [[maybe_unused]] auto n = ::read(wake.get(), &drained, sizeof drained);
      }
      std::vector<std::int32_t> exited;
      {
        std::lock_guard lock(mutex);
        if (stopping) return;
        for (std::size_t i = 1; i < fds.size(); ++i) {
          if (fds[i].revents & (POLLIN | POLLHUP | POLLERR)) {
            pidfds.erase(pids[i - 1]);
            exited.push_back(pids[i - 1]);
          }
        }
      }
      for (auto pid : exited) on_exit(pid);
    }
  }
};

owner_watch::owner_watch(std::unique_ptr<impl> i) noexcept : impl_(std::move(i)) {}

result<std::unique_ptr<owner_watch>> owner_watch::create(std::function<void(std::int32_t)> on_exit) {
  auto i = std::make_unique<impl>();
  i->on_exit = std::move(on_exit);
  i->wake = unique_fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!i->wake)
    return fail(errc::internal, std::string("cannot watch owner processes: eventfd: ") + std::strerror(errno));
  auto* raw = i.get();
  i->thread = std::thread([raw] { raw->run(); });
  return std::unique_ptr<owner_watch>(new owner_watch(std::move(i)));
}

owner_watch::~owner_watch() {
  {
    std::lock_guard lock(impl_->mutex);
    impl_->stopping = true;
  }
  impl_->poke();
  impl_->thread.join();
}

status owner_watch::watch(std::int32_t pid) {
  {
    std::lock_guard lock(impl_->mutex);
    if (impl_->pidfds.contains(pid)) return {};
  }
  unique_fd fd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!fd) {
    const int e = errno;
    if (e == ESRCH) {
      return fail(errc::invalid_argument, "cannot watch owner process " + std::to_string(pid) + ": no such process");
    }
    return fail(errc_of_errno(e, errc::internal),
                "cannot watch owner process " + std::to_string(pid) + ": pidfd_open: " + std::strerror(e));
  }
  {
    std::lock_guard lock(impl_->mutex);
    impl_->pidfds.try_emplace(pid, std::move(fd));
  }
  impl_->poke();
  return {};
}

std::size_t owner_watch::watched() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->pidfds.size();
}

}  // namespace tensorreg::registration::detail
