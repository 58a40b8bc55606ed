#include "registration/background_hash.hpp"

namespace tensorreg::registration::detail {

bool background_hash::start_reading() {
  std::lock_guard lock(mutex_);
  started_ = true;
  if (cancel_.load()) return false;
  reading_ = true;
  return true;
}

void background_hash::finish_reading() {
  std::lock_guard lock(mutex_);
  reading_ = false;
  changed_.notify_all();
}

hash_state background_hash::settle(hash_status outcome) {
  std::lock_guard lock(mutex_);
  if (status_.state != hash_state::pending) return status_.state;  // failed by a cancel already
  if (cancel_.load()) {
    status_ = hash_status{hash_state::failed, {}, {}, cancel_reason_};
  } else {
    status_ = std::move(outcome);
  }
  changed_.notify_all();
  return status_.state;
}

void background_hash::request_cancel(const std::string& reason) {
  std::lock_guard lock(mutex_);
  if (status_.state != hash_state::pending || cancel_.load()) return;
  cancel_reason_ = reason;
  cancel_.store(true);
  if (!started_) {
    // The job has not started: it will read nothing, so the waiters need not wait for it.
    status_ = hash_status{hash_state::failed, {}, {}, reason};
    changed_.notify_all();
  }
}

void background_hash::wait_stopped() {
  std::unique_lock lock(mutex_);
  changed_.wait(lock, [&] { return !reading_; });
}

hash_status background_hash::status() const {
  std::lock_guard lock(mutex_);
  return status_;
}

hash_status background_hash::wait(std::chrono::milliseconds timeout) const {
  std::unique_lock lock(mutex_);
  const auto ended = [&] { return status_.state != hash_state::pending; };
  if (timeout.count() <= 0) {
    changed_.wait(lock, ended);
  } else {
    changed_.wait_for(lock, timeout, ended);
  }
  return status_;
}

}  // namespace tensorreg::registration::detail
