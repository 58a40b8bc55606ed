// Memory let go under a lock is destroyed once the thread's outermost scope ends, after the
// locks taken inside it.
#include "tensorreg/memory/unlocked_release.hpp"

#include <catch2/catch.hpp>

#include <memory>
#include <mutex>
#include <vector>

namespace {

using tensorreg::memory::deferred_release;
using tensorreg::memory::release_unlocked;
using tensorreg::memory::unlocked_release_scope;

// An object whose destruction records whether `watched` was locked at that moment.
struct destruction_record {
  bool destroyed = false;
  bool under_lock = false;
};

std::shared_ptr<const void> watched_object(destruction_record& record, std::mutex& watched) {
  return std::shared_ptr<const void>(new int(0), [&record, &watched](const int* p) {
    record.destroyed = true;
    record.under_lock = !watched.try_lock();
    if (!record.under_lock) watched.unlock();
    delete p;
  });
}

}  // namespace

TEST_CASE("unlocked_release: without a scope a deferred_release destroys when it goes", "[memory][unlocked_release]") {
  std::mutex m;
  destruction_record record;
  {
    deferred_release gone;
    std::lock_guard lock(m);
    gone.push_back(watched_object(record, m));
    CHECK_FALSE(record.destroyed);
  }
  CHECK(record.destroyed);
  CHECK_FALSE(record.under_lock);  // declared before the lock, it ends after it
}

TEST_CASE("unlocked_release: inside a scope, what is let go waits for the scope's end, after its locks",
          "[memory][unlocked_release]") {
  std::mutex outer;
  std::mutex inner;
  destruction_record record;
  {
    unlocked_release_scope scope;
    std::lock_guard held(outer);
    {
      deferred_release gone;
      std::lock_guard lock(inner);
      gone.push_back(watched_object(record, outer));
    }
    CHECK_FALSE(record.destroyed);  // the component's lock went; the caller's `outer` has not
  }
  CHECK(record.destroyed);
  CHECK_FALSE(record.under_lock);
}

TEST_CASE("unlocked_release: nested scopes release at the outermost one's end", "[memory][unlocked_release]") {
  std::mutex m;
  destruction_record record;
  {
    unlocked_release_scope outer;
    {
      unlocked_release_scope inner;
      release_unlocked(watched_object(record, m));
    }
    CHECK_FALSE(record.destroyed);
  }
  CHECK(record.destroyed);
}

TEST_CASE("unlocked_release: what a released object lets go in its destructor goes at once",
          "[memory][unlocked_release]") {
  std::mutex m;
  destruction_record second;
  bool first_destroyed = false;
  {
    unlocked_release_scope scope;
    auto inner = watched_object(second, m);
    release_unlocked(std::shared_ptr<const void>(new int(0), [&first_destroyed, inner](const int* p) mutable {
      first_destroyed = true;
      release_unlocked(std::move(inner));  // no scope is open any more while this runs
      delete p;
    }));
    inner.reset();
  }
  CHECK(first_destroyed);
  CHECK(second.destroyed);
}
