#include "tensorreg/memory/byte_source.hpp"

#include <catch2/catch.hpp>

#include <sys/mman.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "support/temp_dir.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/memory/mapped_file.hpp"
#include "tensorreg/memory/segmented_view.hpp"
#include "tensorreg/memory/shared_memory.hpp"

#include <algorithm>
#include <mutex>

// The contract suite: every byte_source implementation must pass the same cases, given the
// bytes it is expected to hold.

namespace {

using tensorreg::errc;
using namespace tensorreg::memory;

std::vector<std::byte> random_bytes(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<std::byte> out(n);
  for (auto& b : out) b = static_cast<std::byte>(rng() & 0xff);
  return out;
}

// A fixture: a source under test plus the bytes it must read as. Keeps its backing alive.
struct subject {
  std::string name;
  std::shared_ptr<void> backing;
  std::shared_ptr<const byte_source> source;
  std::vector<std::byte> expected;
};

std::vector<subject> all_sources(const tensorreg::testing::temp_dir& dir) {
  std::vector<subject> out;
  {
    auto bytes = std::make_shared<std::vector<std::byte>>(random_bytes(3 << 20, 1));
    auto src = std::make_shared<host_bytes_view>(std::span<const std::byte>(*bytes));
    out.push_back({"host_bytes_view", bytes, src, *bytes});
  }
  {
    auto src = std::make_shared<zero_source>((2 << 20) + 3);
    out.push_back({"zero_source", nullptr, src, std::vector<std::byte>((2 << 20) + 3)});
  }
  {
    const auto bytes = random_bytes((1 << 20) + 17, 2);
    const auto path = dir.path() / "contract.bin";
    std::ofstream(path, std::ios::binary)
        .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    auto file = std::make_shared<mapped_file>(mapped_file::open(path.string()).value());
    out.push_back({"mapped_file", nullptr, file, bytes});
  }
  {
    const auto bytes = random_bytes((1 << 20) + 9, 4);
    auto mem = std::make_shared<shared_memory>(shared_memory::create(bytes.size(), "tensorreg-contract").value());
    std::copy(bytes.begin(), bytes.end(), mem->mutable_bytes().begin());
    out.push_back({"shared_memory", nullptr, mem, bytes});
  }
  {
    // Two data segments from one host buffer, with a leading gap, a middle gap and a tail.
    auto bytes = std::make_shared<std::vector<std::byte>>(random_bytes(1 << 20, 3));
    auto host = std::make_shared<host_bytes_view>(std::span<const std::byte>(*bytes));
    const std::uint64_t total = (3 << 20) + 5;
    std::vector<segment> segs{{(2 << 20) + 1, 1000, host.get(), 5000}, {8, 4096, host.get(), 0}};
    auto view = std::make_shared<segmented_view>(segmented_view::create(total, segs).value());
    std::vector<std::byte> expected(total);
    std::copy_n(bytes->begin(), 4096, expected.begin() + 8);
    std::copy_n(bytes->begin() + 5000, 1000, expected.begin() + (2 << 20) + 1);
    auto keep = std::make_shared<std::pair<decltype(bytes), decltype(host)>>(bytes, host);
    out.push_back({"segmented_view", keep, view, expected});
  }
  return out;
}

}  // namespace

TEST_CASE("byte_source: every implementation reads back its bytes, whole and in parts", "[memory][byte_source]") {
  tensorreg::testing::temp_dir dir;
  for (const auto& s : all_sources(dir)) {
    INFO(s.name);
    REQUIRE(s.source->size() == s.expected.size());
    std::vector<std::byte> whole(s.expected.size());
    REQUIRE(s.source->read(0, whole));
    CHECK(whole == s.expected);

    // Ranges that start and end at odd places, cross segment and block borders.
    std::mt19937_64 rng(7);
    for (int i = 0; i < 50; ++i) {
      const std::uint64_t off = rng() % s.expected.size();
      const std::uint64_t len = rng() % (s.expected.size() - off + 1);
      std::vector<std::byte> part(len);
      REQUIRE(s.source->read(off, part));
      CHECK(std::equal(part.begin(), part.end(), s.expected.begin() + static_cast<std::ptrdiff_t>(off)));
    }
  }
}

TEST_CASE("byte_source: pieces cover the range exactly and in order", "[memory][byte_source]") {
  tensorreg::testing::temp_dir dir;
  for (const auto& s : all_sources(dir)) {
    INFO(s.name);
    const std::uint64_t off = 3, len = s.expected.size() - 10;
    std::uint64_t seen = 0;
    bool match = true;
    REQUIRE(s.source->visit(off, len, [&](std::span<const std::byte> piece) -> tensorreg::status {
      REQUIRE_FALSE(piece.empty());
      match =
          match && std::equal(piece.begin(), piece.end(), s.expected.begin() + static_cast<std::ptrdiff_t>(off + seen));
      seen += piece.size();
      return {};
    }));
    CHECK(seen == len);
    CHECK(match);
    int calls = 0;
    REQUIRE(s.source->visit(5, 0, [&](std::span<const std::byte>) -> tensorreg::status {
      ++calls;
      return {};
    }));
    CHECK(calls == 0);
  }
}

TEST_CASE("byte_source: ranges outside the source are OUT_OF_RANGE", "[memory][byte_source]") {
  tensorreg::testing::temp_dir dir;
  for (const auto& s : all_sources(dir)) {
    INFO(s.name);
    const auto n = s.source->size();
    std::vector<std::byte> one(1);
    auto r = s.source->read(n, one);
    REQUIRE_FALSE(r);
    CHECK(r.error().code == errc::out_of_range);
    CHECK(r.error().message ==
          "cannot read 1 bytes at offset " + std::to_string(n) + ": source holds " + std::to_string(n) + " bytes");
    // offset + length overflows uint64: still a clean OUT_OF_RANGE.
    auto overflow = s.source->visit(1, UINT64_MAX, [](std::span<const std::byte>) -> tensorreg::status { return {}; });
    REQUIRE_FALSE(overflow);
    CHECK(overflow.error().code == errc::out_of_range);
  }
}

TEST_CASE("byte_source: a sink error stops the visit and is returned unchanged", "[memory][byte_source]") {
  tensorreg::testing::temp_dir dir;
  for (const auto& s : all_sources(dir)) {
    INFO(s.name);
    int calls = 0;
    auto r = s.source->visit(0, s.source->size(), [&](std::span<const std::byte>) -> tensorreg::status {
      ++calls;
      return tensorreg::fail(errc::data_loss, "cannot accept piece: injected");
    });
    REQUIRE_FALSE(r);
    CHECK(calls == 1);
    CHECK(r.error() == tensorreg::error{errc::data_loss, "cannot accept piece: injected"});
  }
}

TEST_CASE("segmented_view: for_each_leaf resolves nested views into their leaves, skipping gaps",
          "[memory][segmented_view]") {
  std::vector<std::byte> a_bytes(100), b_bytes(100);
  host_bytes_view a(a_bytes), b(b_bytes);
  // inner: [0, 10) gap, [10, 30) = a[50, 70), [30, 40) = b[0, 10); outer: [5, 25) = inner[15, 35), [40, 60) = a[0, 20).
  auto inner = segmented_view::create(40, {{10, 20, &a, 50}, {30, 10, &b, 0}}).value();
  auto outer = segmented_view::create(80, {{5, 20, &inner, 15}, {40, 20, &a, 0}}).value();
  struct piece {
    const tensorreg::memory::byte_source* source;
    std::uint64_t offset, length, at;
    bool operator==(const piece&) const = default;
  };
  std::vector<piece> seen;
  const auto record = [&](const tensorreg::memory::byte_source& s, std::uint64_t offset, std::uint64_t length,
                          std::uint64_t at) {
    seen.push_back({&s, offset, length, at});
    return true;
  };
  CHECK(for_each_leaf(outer, 0, outer.size(), 100, record));
  CHECK(seen == std::vector<piece>{{&a, 55, 15, 105}, {&b, 0, 5, 120}, {&a, 0, 20, 140}});

  // A part of the view, and a visitor that stops at the first leaf.
  seen.clear();
  CHECK(for_each_leaf(outer, 10, 40, 0, record));
  CHECK(seen == std::vector<piece>{{&a, 60, 10, 0}, {&b, 0, 5, 10}, {&a, 0, 10, 30}});
  std::size_t calls = 0;
  CHECK_FALSE(for_each_leaf(outer, 0, outer.size(), 0, [&](const auto&, std::uint64_t, std::uint64_t, std::uint64_t) {
    ++calls;
    return false;
  }));
  CHECK(calls == 1);
  // A source that is not a view is its own leaf.
  seen.clear();
  CHECK(for_each_leaf(a, 3, 4, 9, record));
  CHECK(seen == std::vector<piece>{{&a, 3, 4, 9}});
}

TEST_CASE("segmented_view: rejects overlapping, out-of-bounds and sourceless segments", "[memory][segmented_view]") {
  std::vector<std::byte> bytes(100);
  host_bytes_view host(bytes);
  auto overlap = segmented_view::create(200, {{0, 50, &host, 0}, {40, 20, &host, 0}});
  REQUIRE_FALSE(overlap);
  CHECK(overlap.error().code == errc::invalid_argument);
  CHECK(overlap.error().message ==
        "cannot assemble segment [40, +20): it overlaps the previous segment, which ends at 50");

  auto past_end = segmented_view::create(100, {{90, 20, &host, 0}});
  REQUIRE_FALSE(past_end);
  CHECK(past_end.error().code == errc::invalid_argument);
  CHECK(past_end.error().message == "cannot assemble segment [90, +20): it ends past total_size 100");

  auto past_source = segmented_view::create(200, {{0, 50, &host, 60}});
  REQUIRE_FALSE(past_source);
  CHECK(past_source.error().code == errc::out_of_range);
  CHECK(past_source.error().message == "cannot assemble segment [0, +50): it reads [60, +50) of a source of 100 bytes");

  auto no_source = segmented_view::create(200, {{0, 50, nullptr, 0}});
  REQUIRE_FALSE(no_source);
  CHECK(no_source.error().message == "cannot assemble segment [0, +50): it has no source");
}

TEST_CASE("mapped_file: missing files and directories are clear errors", "[memory][mapped_file]") {
  tensorreg::testing::temp_dir dir;
  auto missing = mapped_file::open((dir.path() / "nope").string());
  REQUIRE_FALSE(missing);
  CHECK(missing.error().code == errc::not_found);
  CHECK_THAT(missing.error().message, Catch::Matchers::StartsWith("cannot open '") &&
                                          Catch::Matchers::EndsWith("nope': No such file or directory"));
  auto directory = mapped_file::open(dir.path().string());
  REQUIRE_FALSE(directory);
  CHECK(directory.error().code == errc::invalid_argument);
  CHECK_THAT(directory.error().message, Catch::Matchers::EndsWith("': not a regular file"));

  std::ofstream(dir.path() / "empty");
  auto empty = mapped_file::open((dir.path() / "empty").string());
  REQUIRE(empty);
  CHECK(empty->size() == 0);
}

TEST_CASE("mapped_file: a file truncated after it was opened reads as DATA_LOSS, not SIGBUS", "[memory][mapped_file]") {
  tensorreg::testing::temp_dir dir;
  const auto path = dir.path() / "shrinks.bin";
  const auto bytes = random_bytes((1 << 20) + 5, 7);
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  auto file = mapped_file::open(path.string());
  REQUIRE(file);
  std::filesystem::resize_file(path, 1000);
  std::uint64_t seen = 0;
  auto read = file->visit(0, file->size(), [&](std::span<const std::byte> piece) -> tensorreg::status {
    seen += piece.size();
    return {};
  });
  REQUIRE_FALSE(read);
  CHECK(read.error().code == errc::data_loss);
  CHECK(read.error().message == "cannot read '" + path.string() +
                                    "' at offset 1000: the file ends there now (it was truncated after it was opened)");
  CHECK(seen == 0);  // the short piece was never handed out
}

TEST_CASE("mapped_file: read_into reads in place, and a range, a shrunk file or memory it cannot write fails",
          "[memory][mapped_file]") {
  tensorreg::testing::temp_dir dir;
  const auto path = dir.path() / "direct.bin";
  const auto bytes = random_bytes(3 * mapped_file::piece_bytes + 7, 11);
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  auto file = mapped_file::open(path.string());
  REQUIRE(file);
  std::vector<std::byte> out(bytes.size() - 10);
  REQUIRE(file->read_into(10, out));
  CHECK(std::equal(out.begin(), out.end(), bytes.begin() + 10));

  auto past = file->read_into(20, out);
  REQUIRE_FALSE(past);
  CHECK(past.error().code == errc::out_of_range);

  // Memory the kernel cannot write (here read-only; a shared mapping whose file shrank alike):
  // the read fails instead of raising a signal.
  void* ro = ::mmap(nullptr, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  REQUIRE(ro != MAP_FAILED);
  auto faulted = file->read_into(0, {static_cast<std::byte*>(ro), 4096});
  ::munmap(ro, 4096);
  REQUIRE_FALSE(faulted);
  CHECK(faulted.error().code == errc::data_loss);
  CHECK(faulted.error().message ==
        "cannot read '" + path.string() + "' at offset 0: the memory to read into cannot be written (Bad address)");

  std::filesystem::resize_file(path, 1000);
  auto shrunk = file->read_into(0, out);
  REQUIRE_FALSE(shrunk);
  CHECK(shrunk.error().code == errc::data_loss);
  CHECK(shrunk.error().message ==
        "cannot read '" + path.string() +
            "' at offset 1000: the file ends there now (it was truncated after it was opened)");
}

TEST_CASE("mapped_file: pieces are at most piece_bytes, and a nested visit on the same thread reads right",
          "[memory][mapped_file]") {
  tensorreg::testing::temp_dir dir;
  const auto a_bytes = random_bytes(3 * mapped_file::piece_bytes + 3, 8);
  const auto b_bytes = random_bytes(mapped_file::piece_bytes + 1, 9);
  std::ofstream(dir.path() / "a.bin", std::ios::binary)
      .write(reinterpret_cast<const char*>(a_bytes.data()), static_cast<std::streamsize>(a_bytes.size()));
  std::ofstream(dir.path() / "b.bin", std::ios::binary)
      .write(reinterpret_cast<const char*>(b_bytes.data()), static_cast<std::streamsize>(b_bytes.size()));
  auto a = mapped_file::open((dir.path() / "a.bin").string());
  auto b = mapped_file::open((dir.path() / "b.bin").string());
  REQUIRE(a);
  REQUIRE(b);
  std::vector<std::byte> a_read, b_read;
  std::size_t largest = 0;
  REQUIRE(a->visit(0, a->size(), [&](std::span<const std::byte> piece) -> tensorreg::status {
    largest = std::max(largest, piece.size());
    // Read b inside a's sink: a's piece must survive it unchanged.
    const std::vector<std::byte> before(piece.begin(), piece.end());
    b_read.clear();
    TENSORREG_TRY(b->visit(0, b->size(), [&](std::span<const std::byte> inner) -> tensorreg::status {
      b_read.insert(b_read.end(), inner.begin(), inner.end());
      return {};
    }));
    if (!std::equal(before.begin(), before.end(), piece.begin())) {
      return tensorreg::fail(errc::internal, "a nested visit overwrote the outer piece");
    }
    a_read.insert(a_read.end(), piece.begin(), piece.end());
    return {};
  }));
  CHECK(largest == mapped_file::piece_bytes);
  CHECK(a_read == a_bytes);
  CHECK(b_read == b_bytes);
}

TEST_CASE("shared_memory: an adopted descriptor sees the creator's bytes", "[memory][shared_memory]") {
  auto owner = shared_memory::create(4096, "tensorreg-test").value();
  owner.mutable_bytes()[100] = std::byte{42};
  auto peer = shared_memory::adopt(owner.duplicate_fd().value(), 4096, /*writable=*/false).value();
  CHECK_FALSE(peer.writable());
  CHECK(peer.bytes()[100] == std::byte{42});
  owner.mutable_bytes()[101] = std::byte{7};
  CHECK(peer.bytes()[101] == std::byte{7});
}

TEST_CASE("shared_memory: handing its fd out marks it exported, and moves keep the mark", "[memory][shared_memory]") {
  auto kept = shared_memory::create(4096, "tensorreg-test").value();
  CHECK_FALSE(kept.exported());
  auto shared = shared_memory::create(4096, "tensorreg-test").value();
  auto fd = shared.duplicate_fd();
  REQUIRE(fd);
  CHECK(shared.exported());
  const shared_memory moved(std::move(shared));
  CHECK(moved.exported());
  // Reopened by its owner (the engine's read-only reopen for GetArtifactMemfd): marked by hand.
  kept.mark_exported();
  kept.mark_exported();
  CHECK(kept.exported());
  auto assigned = shared_memory::create(4096, "tensorreg-test").value();
  assigned = std::move(kept);
  CHECK(assigned.exported());
}

TEST_CASE("shared_memory: bad sizes and short files are INVALID_ARGUMENT", "[memory][shared_memory]") {
  auto zero = shared_memory::create(0, "z");
  REQUIRE_FALSE(zero);
  CHECK(zero.error() == tensorreg::error{errc::invalid_argument, "cannot create shared memory 'z': size is 0"});

  auto owner = shared_memory::create(4096, "short").value();
  auto too_long = shared_memory::adopt(owner.duplicate_fd().value(), 8192, false);
  REQUIRE_FALSE(too_long);
  CHECK(too_long.error() == tensorreg::error{errc::invalid_argument,
                                             "cannot map shared memory: the file holds 4096 bytes, fewer than 8192"});

  auto no_fd = shared_memory::adopt(tensorreg::unique_fd{}, 10, false);
  REQUIRE_FALSE(no_fd);
  CHECK(no_fd.error().message == "cannot map shared memory: no file descriptor");
}

TEST_CASE("copy_in_chunks: every implementation copies whole, each chunk reported once",
          "[memory][byte_source][concurrency]") {
  tensorreg::testing::temp_dir dir;
  tensorreg::thread_pool pool(3);
  for (const auto& s : all_sources(dir)) {
    INFO(s.name);
    const std::uint64_t chunk = (1 << 20) + 1;
    std::vector<std::byte> copy(s.expected.size());
    std::mutex m;
    std::vector<std::pair<std::uint64_t, std::uint64_t>> seen;
    REQUIRE(copy_in_chunks(*s.source, copy, chunk, pool, [&](std::size_t i, std::uint64_t off, std::uint64_t len) {
      std::lock_guard lock(m);
      if (off == i * chunk) seen.emplace_back(off, len);
    }));
    CHECK(copy == s.expected);
    std::sort(seen.begin(), seen.end());
    std::uint64_t covered = 0;
    for (const auto& [off, len] : seen) {
      CHECK(off == covered);
      covered += len;
    }
    CHECK(covered == s.expected.size());
  }
}
