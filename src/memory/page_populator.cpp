#include "memory/page_populator.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>

namespace tensorreg::memory {

bool populate_for_write(std::byte* p, std::uint64_t length) noexcept {
  constexpr int populate_write = 23;  // MADV_POPULATE_WRITE, missing from older headers
  static std::atomic<bool> unsupported{false};
  if (length == 0) return true;
  if (unsupported.load(std::memory_order_relaxed)) return false;
  if (::madvise(p, length, populate_write) == 0) return true;
  if (errno == EINVAL) unsupported.store(true, std::memory_order_relaxed);
  return false;
}

void page_populator::run(std::uint64_t allowance) noexcept {
  const std::uint64_t size = mapping_.size();
  for (std::uint64_t done = 0; done == 0 || done < allowance; done += slice_bytes) {
    const auto at = next_.fetch_add(slice_bytes, std::memory_order_relaxed);
    if (at >= size) return;
    if (!populate_for_write(mapping_.data() + at, std::min(slice_bytes, size - at))) {
      next_.store(size, std::memory_order_relaxed);  // the writes fault the rest themselves
      return;
    }
  }
}

}  // namespace tensorreg::memory
