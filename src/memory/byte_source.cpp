#include "tensorreg/memory/byte_source.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <string>

#include "tensorreg/common/thread_pool.hpp"

namespace tensorreg::memory {

status byte_source::check_range(std::uint64_t offset, std::uint64_t length) const {
  const std::uint64_t total = size();
  if (offset > total || length > total - offset) {
    return fail(errc::out_of_range, "cannot read " + std::to_string(length) + " bytes at offset " +
                                        std::to_string(offset) + ": source holds " + std::to_string(total) + " bytes");
  }
  return {};
}

status byte_source::read(std::uint64_t offset, std::span<std::byte> out) const {
  std::size_t written = 0;
  return visit(offset, out.size(), [&](std::span<const std::byte> piece) -> status {
    std::memcpy(out.data() + written, piece.data(), piece.size());
    written += piece.size();
    return {};
  });
}

status host_bytes_view::visit(std::uint64_t offset, std::uint64_t length, piece_sink sink) const {
  TENSORREG_TRY(check_range(offset, length));
  if (length == 0) return {};
  return sink(bytes_.subspan(offset, length));
}

status copy_in_chunks(const byte_source& source, std::span<std::byte> dst, std::uint64_t chunk_bytes, thread_pool& pool,
                      function_ref<void(std::size_t, std::uint64_t, std::uint64_t)> on_chunk) {
  const std::uint64_t total = source.size();
  TENSORREG_ASSERT(dst.size() >= total && chunk_bytes > 0);
  const std::uint64_t chunks = total / chunk_bytes + (total % chunk_bytes != 0 ? 1 : 0);
  return pool.parallel_for(chunks, [&](std::size_t chunk) -> status {
    const std::uint64_t begin = chunk * chunk_bytes;
    const std::uint64_t length = std::min(chunk_bytes, total - begin);
    std::uint64_t at = begin;
    TENSORREG_TRY(source.visit(begin, length, [&](std::span<const std::byte> piece) -> status {
      std::memcpy(dst.data() + at, piece.data(), piece.size());
      at += piece.size();
      return {};
    }));
    on_chunk(chunk, begin, length);
    return {};
  });
}

std::span<const std::byte> zero_block() noexcept {
  static constexpr std::size_t kZeroBlockBytes = 1 << 20;
  alignas(64) static const std::array<std::byte, kZeroBlockBytes> zeros{};
  return zeros;
}

status visit_zeros(std::uint64_t length, piece_sink sink) {
  const auto zeros = zero_block();
  while (length > 0) {
    const auto n = std::min<std::uint64_t>(length, zeros.size());
    TENSORREG_TRY(sink(zeros.first(n)));
    length -= n;
  }
  return {};
}

status zero_source::visit(std::uint64_t offset, std::uint64_t length, piece_sink sink) const {
  TENSORREG_TRY(check_range(offset, length));
  return visit_zeros(length, sink);
}

}  // namespace tensorreg::memory
