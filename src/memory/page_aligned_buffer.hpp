// src/memory/page_aligned_buffer.hpp — a heap buffer that starts on a page boundary, for
// pread() to copy page-cache pages into.
//
// The kernel's copy into a buffer 16 bytes past a page boundary (where malloc puts a block it
// maps on its own) ran 5× slower than into one on the boundary on the AMD development VM
// (benchmarks/RESULTS.md, put at disk speed): file reads into such buffers went at 2.5 GiB/s
// instead of 12.7.
//
// Thread-safety: none of its own; one owner. Move-only.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <span>

namespace tensorreg::memory {

class page_aligned_buffer {
 public:
  static constexpr std::size_t alignment = 4096;

  /// `size` bytes, uninitialised. Throws std::bad_alloc as new does.
  explicit page_aligned_buffer(std::size_t size)
      : bytes_(static_cast<std::byte*>(std::aligned_alloc(alignment, (size + alignment - 1) / alignment * alignment))),
        size_(size) {
    if (!bytes_) throw std::bad_alloc();
  }

  [[nodiscard]] std::byte* data() const noexcept { return bytes_.get(); }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] std::span<std::byte> first(std::size_t n) const noexcept { return {bytes_.get(), n}; }

 private:
  struct free_bytes {
    void operator()(std::byte* p) const noexcept { std::free(p); }
  };
  std::unique_ptr<std::byte, free_bytes> bytes_;
  std::size_t size_ = 0;
};

}  // namespace tensorreg::memory
