#include "memory/buffered_reads.hpp"

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <optional>

#include "memory/page_aligned_buffer.hpp"
#include "memory/system_calls.hpp"

namespace tensorreg::memory {

std::optional<short_read> pread_fully(int fd, std::span<std::byte> out, std::uint64_t offset) noexcept {
  std::size_t got = 0;
  while (got < out.size()) {
    const ssize_t n = sys::pread(fd, out.data() + got, out.size() - got, offset + got);
    if (n > 0) {
      got += static_cast<std::size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    return short_read{got, n < 0 ? errno : 0};
  }
  return std::nullopt;
}

status visit_through_buffer(std::uint64_t offset, std::uint64_t length,
                            function_ref<status(std::uint64_t, std::span<std::byte>)> fill, piece_sink sink) {
  if (length == 0) return {};
  // Buffers per thread, reused by every visit on it (pool threads hash leaves in parallel):
  // two, since a visit may run inside another (two leaves hashed together, tree_hash.cpp).
  constexpr int reused_depth = 2;
  thread_local std::array<std::optional<page_aligned_buffer>, reused_depth> reused;
  thread_local int depth = 0;
  std::optional<page_aligned_buffer> own;
  std::byte* buffer = nullptr;
  if (depth < reused_depth) {
    auto& mine = reused[static_cast<std::size_t>(depth)];
    if (!mine) mine.emplace(buffered_piece_bytes);
    buffer = mine->data();
  } else {
    own.emplace(buffered_piece_bytes);
    buffer = own->data();
  }
  ++depth;
  struct leave_depth {
    ~leave_depth() { --depth; }
  } leave;
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
    const auto short_of = pread_fully(fd_, out, at);
    if (!short_of) return {};
    const std::string reason = short_of->error == 0 ? "it ends there now (it shrank)" : std::strerror(short_of->error);
    return fail(errc::data_loss,
                "cannot read " + what_ + " at offset " + std::to_string(at + short_of->got) + ": " + reason);
  };
  return visit_through_buffer(offset, length, fill, sink);
}

}  // namespace tensorreg::memory
