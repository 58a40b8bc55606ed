// Implements tensorreg/memory/unlocked_release.hpp.
#include "tensorreg/memory/unlocked_release.hpp"

namespace tensorreg::memory {
namespace {

thread_local int open_scopes = 0;
thread_local std::vector<std::shared_ptr<const void>> released_in_scope;

}  // namespace

void release_unlocked(std::shared_ptr<const void> held) {
  if (open_scopes > 0) {
    released_in_scope.push_back(std::move(held));
  }
  // Otherwise `held` goes here, with no lock of ours held by this thread.
}

unlocked_release_scope::unlocked_release_scope() noexcept { ++open_scopes; }

unlocked_release_scope::~unlocked_release_scope() {
  if (--open_scopes > 0) return;
  // Destructors run here may release more (a mapping that held another): with no scope open
  // any more, those go at once.
  auto released = std::exchange(released_in_scope, {});
  released.clear();
}

}  // namespace tensorreg::memory
