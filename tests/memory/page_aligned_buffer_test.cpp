// Read buffers start on a page boundary, whatever their size.
#include "memory/page_aligned_buffer.hpp"

#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>

TEST_CASE("page aligned buffer: starts on a page boundary and holds its size", "[memory]") {
  for (std::size_t size : {std::size_t{1}, std::size_t{4095}, std::size_t{256} << 10, (std::size_t{256} << 10) + 3}) {
    tensorreg::memory::page_aligned_buffer buffer(size);
    CHECK(reinterpret_cast<std::uintptr_t>(buffer.data()) % tensorreg::memory::page_aligned_buffer::alignment == 0);
    CHECK(buffer.size() == size);
    std::memset(buffer.data(), 0x7f, size);  // all of it is ours (ASan checks)
    CHECK(buffer.first(size).back() == std::byte{0x7f});
  }
}
