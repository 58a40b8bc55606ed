// Faulting a buffer in ahead of scattered writes: every page resident, no byte changed.
#include "memory/page_populator.hpp"

#include <catch2/catch.hpp>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

#include "tensorreg/memory/shared_memory.hpp"

namespace {

using tensorreg::memory::page_populator;
using tensorreg::memory::shared_memory;

// How many of the mapping's pages are in memory (mincore: a memfd page is there once faulted
// or written).
std::size_t resident_pages(std::span<const std::byte> mapping) {
  const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> flags((mapping.size() + page - 1) / page);
  REQUIRE(::mincore(const_cast<std::byte*>(mapping.data()), mapping.size(), flags.data()) == 0);
  return static_cast<std::size_t>(std::count_if(flags.begin(), flags.end(), [](unsigned char f) { return f & 1; }));
}

}  // namespace

TEST_CASE("page populator: threads fault a fresh buffer in together and change no byte", "[memory]") {
  // Not a multiple of the slice, so the last slice is short.
  const std::uint64_t size = 5 * page_populator::slice_bytes + 12345;
  auto memory = shared_memory::create(size, "populator-test").value();
  const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  const std::size_t pages = (size + page - 1) / page;
  CHECK(resident_pages(memory.bytes()) == 0);

  // Bytes written before (and while) it runs stay as written.
  std::memset(memory.mutable_bytes().data() + page_populator::slice_bytes + 7, 0x5a, 100);
  std::memset(memory.mutable_bytes().data() + size - 10, 0xa5, 10);
  if (!tensorreg::memory::populate_for_write(memory.mutable_bytes().data(), 0)) FAIL("a zero-length populate fails");
  page_populator populator(memory.mutable_bytes());
  CHECK_FALSE(populator.claimed_all());
  const bool supported = tensorreg::memory::populate_for_write(memory.mutable_bytes().data(), page);
  // A run populates about its allowance, at least one slice: not the whole buffer.
  populator.run(1);
  CHECK_FALSE(populator.claimed_all());
  if (supported) CHECK(resident_pages(memory.bytes()) <= page_populator::slice_bytes / page + 3);
  std::vector<std::thread> helpers;
  for (int t = 0; t < 3; ++t) helpers.emplace_back([&] { populator.run(size); });
  for (auto& h : helpers) h.join();
  CHECK(populator.claimed_all());
  populator.run(size);  // nothing left: returns at once

  // The kernel may lack MADV_POPULATE_WRITE (before 5.14): then nothing is faulted in, and the
  // writes fault their pages themselves.
  if (supported) {
    CHECK(resident_pages(memory.bytes()) == pages);
  } else {
    WARN("MADV_POPULATE_WRITE is not supported here: nothing to check but the bytes");
  }
  const auto bytes = memory.bytes();
  for (std::uint64_t i = 0; i < size; ++i) {
    const bool first = i >= page_populator::slice_bytes + 7 && i < page_populator::slice_bytes + 107;
    const bool last = i >= size - 10;
    const auto want = first ? std::byte{0x5a} : last ? std::byte{0xa5} : std::byte{0};
    if (bytes[i] != want) FAIL("byte " << i << " changed");
  }
}
