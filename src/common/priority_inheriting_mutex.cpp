// Implements tensorreg/common/priority_inheriting_mutex.hpp.
#include "tensorreg/common/priority_inheriting_mutex.hpp"

#include <time.h>

#include <cerrno>
#include <system_error>

namespace tensorreg {

priority_inheriting_mutex::priority_inheriting_mutex() {
  pthread_mutexattr_t attributes;
  pthread_mutexattr_init(&attributes);
  // ENOTSUP on a libc without PI futexes: the mutex then stays an ordinary one, which is
  // correct and only loses the priority boost.
  static_cast<void>(pthread_mutexattr_setprotocol(&attributes, PTHREAD_PRIO_INHERIT));
  const int e = pthread_mutex_init(&mutex_, &attributes);
  pthread_mutexattr_destroy(&attributes);
  if (e != 0) throw std::system_error(e, std::generic_category(), "cannot create a priority-inheriting mutex");
}

priority_inheriting_mutex::~priority_inheriting_mutex() { pthread_mutex_destroy(&mutex_); }

void priority_inheriting_mutex::lock() {
  if (const int e = pthread_mutex_lock(&mutex_); e != 0) {
    throw std::system_error(e, std::generic_category(), "cannot lock a priority-inheriting mutex");
  }
}

bool priority_inheriting_mutex::try_lock() noexcept { return pthread_mutex_trylock(&mutex_) == 0; }

bool priority_inheriting_mutex::try_lock_for(std::chrono::nanoseconds patience) noexcept {
  if (pthread_mutex_trylock(&mutex_) == 0) return true;
  // CLOCK_REALTIME: what pthread_mutex_timedlock takes for every mutex protocol (the
  // monotonic pthread_mutex_clocklock is refused for PI mutexes where the kernel lacks
  // FUTEX_LOCK_PI2). A clock step during the wait only lengthens or shortens one wait.
  timespec deadline{};
  clock_gettime(CLOCK_REALTIME, &deadline);
  const auto total = std::chrono::nanoseconds(deadline.tv_nsec) + patience;
  deadline.tv_sec += static_cast<time_t>(std::chrono::duration_cast<std::chrono::seconds>(total).count());
  deadline.tv_nsec = static_cast<long>((total % std::chrono::seconds(1)).count());
  return pthread_mutex_timedlock(&mutex_, &deadline) == 0;
}

void priority_inheriting_mutex::unlock() noexcept { pthread_mutex_unlock(&mutex_); }

}  // namespace tensorreg
