// memory::memfd_reads: a memfd read back through pread() in pieces of at most
// buffered_piece_bytes, the same bytes as its mapping; a memfd that shrank reads short with
// DATA_LOSS, not SIGBUS; nested visits on one thread each get a buffer of their own.
#include "memory/buffered_reads.hpp"

#include <catch2/catch.hpp>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <random>
#include <vector>

#include "tensorreg/common/unique_fd.hpp"
#include "tensorreg/memory/shared_memory.hpp"

using namespace tensorreg;
using memory::buffered_piece_bytes;
using memory::memfd_reads;

namespace {

memory::shared_memory filled(std::uint64_t size, unsigned seed) {
  auto mem = memory::shared_memory::create(size, "buffered-reads-test").value();
  std::mt19937 rng(seed);
  for (auto& b : mem.mutable_bytes()) b = static_cast<std::byte>(rng());
  return mem;
}

}  // namespace

TEST_CASE("memfd_reads: hands out the memfd's bytes in buffer-sized pieces", "[memory][buffered_reads]") {
  const std::uint64_t size = 3 * buffered_piece_bytes + 11;
  auto mem = filled(size, 1);
  const memfd_reads reads(mem.fd(), size, "the test memfd");
  CHECK(reads.size() == size);

  std::vector<std::byte> got;
  std::size_t pieces = 0, largest = 0;
  REQUIRE(reads.visit(5, size - 5, [&](std::span<const std::byte> piece) -> status {
    ++pieces;
    largest = std::max(largest, piece.size());
    CHECK(piece.data() != mem.bytes().data() + 5 + got.size());  // a copy, not the mapping
    got.insert(got.end(), piece.begin(), piece.end());
    return {};
  }));
  CHECK(pieces == 4);
  CHECK(largest == buffered_piece_bytes);
  REQUIRE(got.size() == size - 5);
  CHECK(std::equal(got.begin(), got.end(), mem.bytes().begin() + 5));

  auto past = reads.visit(size - 1, 2, [](std::span<const std::byte>) -> status { return {}; });
  REQUIRE_FALSE(past);
  CHECK(past.error().code == errc::out_of_range);
}

TEST_CASE("memfd_reads: a visit inside a visit on the same thread reads into a buffer of its own",
          "[memory][buffered_reads]") {
  const std::uint64_t size = buffered_piece_bytes + 100;
  auto a = filled(size, 2);
  auto b = filled(size, 3);
  const memfd_reads outer(a.fd(), size, "a");
  const memfd_reads inner(b.fd(), size, "b");
  std::vector<std::byte> outer_bytes, inner_bytes;
  REQUIRE(outer.visit(0, size, [&](std::span<const std::byte> piece) -> status {
    const std::vector<std::byte> before(piece.begin(), piece.end());
    TENSORREG_TRY(inner.visit(0, 100, [&](std::span<const std::byte> p) -> status {
      inner_bytes.insert(inner_bytes.end(), p.begin(), p.end());
      return {};
    }));
    CHECK(std::equal(before.begin(), before.end(), piece.begin()));  // the inner visit left it alone
    outer_bytes.insert(outer_bytes.end(), piece.begin(), piece.end());
    return {};
  }));
  CHECK(std::equal(outer_bytes.begin(), outer_bytes.end(), a.bytes().begin()));
  REQUIRE(inner_bytes.size() == 2 * 100);
  CHECK(std::equal(inner_bytes.begin(), inner_bytes.begin() + 100, b.bytes().begin()));
}

TEST_CASE("memfd_reads: a memfd that shrank reads short with DATA_LOSS naming it", "[memory][buffered_reads]") {
  const std::uint64_t size = 2 * buffered_piece_bytes;
  const unique_fd fd(::memfd_create("buffered-reads-test", MFD_CLOEXEC));
  REQUIRE(fd);
  REQUIRE(::ftruncate(fd.get(), static_cast<off_t>(size)) == 0);
  const memfd_reads reads(fd.get(), size, "the test memfd");
  REQUIRE(::ftruncate(fd.get(), 1000) == 0);
  std::uint64_t seen = 0;
  auto read = reads.visit(0, size, [&](std::span<const std::byte> piece) -> status {
    seen += piece.size();
    return {};
  });
  REQUIRE_FALSE(read);
  CHECK(read.error().code == errc::data_loss);
  CHECK(read.error().message == "cannot read the test memfd at offset 1000: it ends there now (it shrank)");
  CHECK(seen == 0);
}
