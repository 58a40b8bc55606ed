#include "memory/sigbus_guard.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <mutex>

namespace tensorreg::memory::detail {
namespace {

// The innermost guard of this thread. Written before the guarded read, so the handler (on the
// same thread) never reaches an unallocated thread-local block.
thread_local sigbus_guard* armed = nullptr;

struct sigaction previous {};
std::mutex installing;
std::uintptr_t page_bytes = 4096;  // set before the handler is installed

}  // namespace

struct sigbus_handler {
  static void on_signal(int sig, siginfo_t* info, void* context) noexcept {
    const auto address = reinterpret_cast<std::uintptr_t>(info->si_addr);
    for (sigbus_guard* g = armed; g != nullptr; g = g->outer_) {
      if (address < g->begin_ || address >= g->end_) continue;
      const std::uintptr_t page = page_bytes;
      const std::uintptr_t first = address & ~(page - 1);
      const std::uintptr_t last = (g->end_ + page - 1) & ~(page - 1);
      if (g->broken_ != nullptr) g->broken_->store(true);  // lock-free: safe in a handler
      // Zero pages over what vanished (and the rest of the range): the faulting load resumes.
      void* zeros = ::mmap(reinterpret_cast<void*>(first), last - first, PROT_READ,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
      if (zeros == MAP_FAILED) break;
      if (g->faulted_ == 0) g->fault_offset_ = address - g->begin_;
      g->faulted_ = 1;
      return;
    }
    forward(sig, info, context);
  }

  static void forward(int sig, siginfo_t* info, void* context) noexcept {
    if ((previous.sa_flags & SA_SIGINFO) != 0 && previous.sa_sigaction != nullptr) {
      previous.sa_sigaction(sig, info, context);
      return;
    }
    if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN && previous.sa_handler != nullptr) {
      previous.sa_handler(sig);
      return;
    }
    // Not ours: die of SIGBUS as we would have. A fault re-executes the load under the default
    // action (a core at the right place); a SIGBUS sent by kill() is raised again.
    ::signal(SIGBUS, SIG_DFL);
    if (info->si_code <= 0) ::raise(SIGBUS);
  }

  static void install() noexcept {
    std::lock_guard lock(installing);
    struct sigaction current {};
    if (::sigaction(SIGBUS, nullptr, &current) != 0) return;
    if ((current.sa_flags & SA_SIGINFO) != 0 && current.sa_sigaction == &on_signal) return;
    page_bytes = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
    struct sigaction action {};
    action.sa_sigaction = &on_signal;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    (void)::sigaction(SIGBUS, &action, &previous);
  }
};

void ensure_sigbus_handler() noexcept { sigbus_handler::install(); }

static_assert(std::atomic<bool>::is_always_lock_free);

sigbus_guard::sigbus_guard(std::span<const std::byte> bytes, std::atomic<bool>* broken) noexcept
    : begin_(reinterpret_cast<std::uintptr_t>(bytes.data())),
      end_(reinterpret_cast<std::uintptr_t>(bytes.data()) + bytes.size()),
      outer_(armed),
      broken_(broken) {
  armed = this;
  std::atomic_signal_fence(std::memory_order_seq_cst);
}

sigbus_guard::~sigbus_guard() {
  std::atomic_signal_fence(std::memory_order_seq_cst);
  armed = outer_;
}

}  // namespace tensorreg::memory::detail
