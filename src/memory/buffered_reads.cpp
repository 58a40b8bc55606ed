#include "memory/buffered_reads.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <optional>

#include "memory/page_aligned_buffer.hpp"
#include "memory/system_calls.hpp"

namespace tensorreg::memory {

status visit_through_buffer(std::uint64_t offset, std::uint64_t length,
                            function_ref<status(std::uint64_t, std::span<std::byte>)> fill, piece_sink sink) {
  if (length == 0) return {};
  // One buffer per thread, reused by every visit on it (pool threads hash leaves in parallel).
  thread_local std::optional<page_aligned_buffer> reused;
  thread_local bool reused_busy = false;
  std::optional<page_aligned_buffer> own;
  std::byte* buffer = nullptr;
  if (!reused_busy) {
    if (!reused) reused.emplace(buffered_piece_bytes);
    buffer = reused->data();
    reused_busy = true;
  } else {
    own.emplace(buffered_piece_bytes);
    buffer = own->data();
  }
  struct release_reused {
    bool owned;
    ~release_reused() {
      if (owned) reused_busy = false;
    }
  } release{!own};
  while (length > 0) {
    const auto want = static_cast<std::size_t>(std::min<std::uint64_t>(length, buffered_piece_bytes));
    TENSORREG_TRY(fill(offset, {buffer, want}));
    TENSORREG_TRY(sink(std::span<const std::byte>(buffer, want)));
    offset += want;
    length -= want;
  }
  return {};
}

status memfd_reads::visit(std::uint64_t offset, std::uint64_t length, piece_sink sink) const {
  TENSORREG_TRY(check_range(offset, length));
  const auto fill = [this](std::uint64_t at, std::span<std::byte> out) -> status {
    std::size_t got = 0;
    while (got < out.size()) {
      const ssize_t n = sys::pread(fd_, out.data() + got, out.size() - got, at + got);
      if (n > 0) {
        got += static_cast<std::size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      const std::string reason = n == 0 ? "it ends there now (it shrank)" : std::strerror(errno);
      return fail(errc::data_loss, "cannot read " + what_ + " at offset " + std::to_string(at + got) + ": " + reason);
    }
    return {};
  };
  return visit_through_buffer(offset, length, fill, sink);
}

}  // namespace tensorreg::memory
