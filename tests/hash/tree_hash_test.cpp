#include "tensorreg/hash/tree_hash.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "hash/sha256_x2.hpp"
#include "support/temp_dir.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/memory/mapped_file.hpp"

namespace {

using tensorreg::errc;
using tensorreg::status;
using tensorreg::thread_pool;
using tensorreg::hash::digest;
using tensorreg::hash::encode_multihash;
using tensorreg::hash::leaf_bytes;
using tensorreg::hash::sha256;
using tensorreg::hash::tree_hash;
using tensorreg::memory::host_bytes_view;

constexpr std::uint64_t mib = std::uint64_t{1} << 20;

// byte i = (i*131 + (i >> 12)) & 0xff; the golden values below were computed from the same
// pattern with Python's hashlib (see tests/hash/tree_hash_reference.py for the rules).
std::vector<std::byte> pattern(std::uint64_t n) {
  std::vector<std::byte> out(static_cast<std::size_t>(n));
  for (std::uint64_t i = 0; i < n; ++i) out[i] = static_cast<std::byte>((i * 131 + (i >> 12)) & 0xFFU);
  return out;
}

// A source that hands out its memory in small, unevenly sized pieces (as a staged or
// segmented source would), so per-leaf hashing must stream pieces into one context.
class choppy_view final : public tensorreg::memory::byte_source {
 public:
  explicit choppy_view(std::span<const std::byte> bytes) : bytes_(bytes) {}
  [[nodiscard]] std::uint64_t size() const noexcept override { return bytes_.size(); }
  [[nodiscard]] status visit(std::uint64_t offset, std::uint64_t length,
                             tensorreg::memory::piece_sink sink) const override {
    TENSORREG_TRY(check_range(offset, length));
    std::uint64_t step = 1;
    while (length > 0) {
      const auto n = std::min(length, step);
      TENSORREG_TRY(sink(bytes_.subspan(offset, n)));
      offset += n;
      length -= n;
      step = step * 7 % 100003 + 1;
    }
    return {};
  }

 private:
  std::span<const std::byte> bytes_;
};

// A source whose bytes from `bad_from` on cannot be read.
class failing_source final : public tensorreg::memory::byte_source {
 public:
  failing_source(std::uint64_t size, std::uint64_t bad_from) : size_(size), bad_from_(bad_from) {}
  [[nodiscard]] std::uint64_t size() const noexcept override { return size_; }
  [[nodiscard]] status visit(std::uint64_t offset, std::uint64_t length,
                             tensorreg::memory::piece_sink sink) const override {
    TENSORREG_TRY(check_range(offset, length));
    if (offset + length > bad_from_) {
      return tensorreg::fail(errc::data_loss, "cannot read offset " + std::to_string(offset) + ": bad sector");
    }
    return tensorreg::memory::zero_source(size_).visit(offset, length, sink);
  }

 private:
  std::uint64_t size_;
  std::uint64_t bad_from_;
};

digest pair(const digest& l, const digest& r) {
  std::vector<std::byte> joined(l.begin(), l.end());
  joined.insert(joined.end(), r.begin(), r.end());
  return sha256(joined);
}

std::string root_of(const std::vector<std::byte>& data, thread_pool* pool = nullptr) {
  const host_bytes_view source(data);
  const auto root = tree_hash(source, pool);
  REQUIRE(root.has_value());
  return encode_multihash(*root);
}

}  // namespace

TEST_CASE("tree_hash: leaf_count rounds up to 4 MiB leaves", "[hash][tree_hash]") {
  STATIC_REQUIRE(leaf_bytes == 4 * mib);
  STATIC_REQUIRE(tensorreg::hash::leaf_count(0) == 0);
  STATIC_REQUIRE(tensorreg::hash::leaf_count(1) == 1);
  STATIC_REQUIRE(tensorreg::hash::leaf_count(4 * mib) == 1);
  STATIC_REQUIRE(tensorreg::hash::leaf_count(4 * mib + 1) == 2);
  STATIC_REQUIRE(tensorreg::hash::leaf_count(12 * mib + 5) == 4);
}

TEST_CASE("tree_hash: registration.md data vector (32 bytes, one leaf)", "[hash][tree_hash]") {
  std::vector<std::byte> data(32);
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::byte>(i);
  CHECK(root_of(data) == "bciqggdonfftmim3gsejfisf3wjnu75asusohglnszcv4docydplrbxi");
}

TEST_CASE("tree_hash: size 0 gives the documented 32-zero-byte root", "[hash][tree_hash]") {
  const std::vector<std::byte> empty;
  const auto leaves = tensorreg::hash::leaf_digests(host_bytes_view(empty));
  REQUIRE(leaves.has_value());
  CHECK(leaves->empty());
  CHECK(root_of(empty) == "bciqaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa");
  CHECK(tensorreg::hash::tree_root({}) == digest{});
  // Not SHA-256 of empty input (DECISIONS §7).
  CHECK(tensorreg::hash::tree_root({}) != sha256(std::span<const std::byte>{}));
}

TEST_CASE("tree_hash: golden roots around the leaf boundary", "[hash][tree_hash]") {
  const auto data = pattern(12 * mib + 5);
  const auto first = [&](std::uint64_t n) {
    return std::vector<std::byte>(data.begin(), data.begin() + static_cast<std::ptrdiff_t>(n));
  };
  CHECK(root_of(first(1)) == "bciqg4naltt73g6uytssujzv3pafcy6eqdu73gnzyo2crdiygc6x2ahi");
  CHECK(root_of(first(4 * mib - 1)) == "bciqkqhk63hng3id626uirkpr6nd72tiiiaribexoc6yybritxcgxxnq");
  CHECK(root_of(first(4 * mib)) == "bciqnmgfesrae7b7ntfwh7nel5c67fazf2egmpdd7jtyovikb3uxvkbi");
  CHECK(root_of(first(4 * mib + 1)) == "bciqivqbc43ftl56hythdpmyiqaui2h7cifmsnn7kqa5vu7dfyt6nqli");
  CHECK(root_of(data) == "bciqjjtpxw7nemn7zkeevw4ljtdrzn7ozr5uamx4xjrwznl6h55jbk3q");
  CHECK(root_of(pattern(5 * leaf_bytes + 7)) == "bciqbp7lacfmpa5sudxwrc2egib2xkv7hnyln36pujhc6zwfsl5nvpfy");
}

TEST_CASE("tree_hash: tree shape is binary with the odd node promoted", "[hash][tree_hash]") {
  const auto data = pattern(2 * leaf_bytes + 100);  // three leaves, the last short
  const std::span<const std::byte> all(data);
  const digest l0 = sha256(all.subspan(0, leaf_bytes));
  const digest l1 = sha256(all.subspan(leaf_bytes, leaf_bytes));
  const digest l2 = sha256(all.subspan(2 * leaf_bytes));

  const host_bytes_view source(data);
  const auto leaves = tensorreg::hash::leaf_digests(source);
  REQUIRE(leaves.has_value());
  CHECK(*leaves == std::vector<digest>{l0, l1, l2});
  const auto root = tree_hash(source);
  REQUIRE(root.has_value());
  CHECK(*root == pair(pair(l0, l1), l2));

  // Five leaves: ((01)(23))4 — the promoted node climbs two levels unchanged.
  std::vector<digest> five;
  for (int i = 0; i < 5; ++i) five.push_back(sha256(std::string_view(std::to_string(i))));
  CHECK(tensorreg::hash::tree_root(five) == pair(pair(pair(five[0], five[1]), pair(five[2], five[3])), five[4]));
  // One leaf is its own root.
  CHECK(tensorreg::hash::tree_root(std::span<const digest>(five).first(1)) == five[0]);
}

TEST_CASE("tree_hash: hash_leaf hashes one leaf and rejects indices past the end", "[hash][tree_hash]") {
  const auto data = pattern(leaf_bytes + 10);
  const host_bytes_view source(data);
  const auto leaf1 = tensorreg::hash::hash_leaf(source, 1);
  REQUIRE(leaf1.has_value());
  CHECK(*leaf1 == sha256(std::span<const std::byte>(data).subspan(leaf_bytes)));
  const auto past = tensorreg::hash::hash_leaf(source, 2);
  REQUIRE_FALSE(past.has_value());
  CHECK(past.error().code == errc::out_of_range);
  CHECK(past.error().message == "cannot hash leaf 2: a source of 4194314 bytes has 2 leaves");
}

TEST_CASE("tree_hash: the result does not depend on the thread count", "[hash][tree_hash]") {
  const auto data = pattern(9 * leaf_bytes + 333);
  const std::string expected = root_of(data);
  for (const unsigned threads : {1U, 2U, 4U, 8U}) {
    thread_pool pool(threads);
    CHECK(root_of(data, &pool) == expected);
  }
  thread_pool empty_pool(0);
  CHECK(root_of(data, &empty_pool) == expected);
}

TEST_CASE("tree_hash: sources that hand out many pieces hash the same", "[hash][tree_hash]") {
  const auto data = pattern(2 * leaf_bytes + 4099);
  thread_pool pool(3);
  const auto root = tree_hash(choppy_view(data), &pool);
  REQUIRE(root.has_value());
  CHECK(encode_multihash(*root) == root_of(data));
}

TEST_CASE("tree_hash: leaves are split into pairs for SHA-NI only while every thread keeps two", "[hash][tree_hash]") {
  using tensorreg::hash::plan_leaf_jobs;
  const bool ni = tensorreg::hash::sha_ni_available();
  const auto odd = plan_leaf_jobs(9 * leaf_bytes + 333, 1);  // 9 whole leaves and a short one
  CHECK(odd.pairs == (ni ? 4U : 0U));
  CHECK(odd.count == (ni ? 6U : 10U));
  CHECK(odd.first_leaf(0) == 0);
  CHECK(odd.first_leaf(odd.count - 1) == 9);
  if (ni) CHECK(odd.first_leaf(4) == 8);
  const auto even = plan_leaf_jobs(8 * leaf_bytes, 2);
  CHECK(even.pairs == (ni ? 4U : 0U));
  CHECK(even.count == (ni ? 4U : 8U));
  // Seven whole leaves on two threads: pairs would leave a thread with one job.
  CHECK(plan_leaf_jobs(7 * leaf_bytes, 2).pairs == 0);
  CHECK(plan_leaf_jobs(0, 1).count == 0);
}

TEST_CASE("tree_hash: leaves hashed two at a time equal leaves hashed one by one", "[hash][tree_hash]") {
  // hash_leaf() hashes one leaf alone; leaf_digests() pairs whole leaves where SHA-NI allows,
  // visiting the second leaf inside the first's visit (a file reads both through buffers).
  const auto data = pattern(9 * leaf_bytes + 333);
  const tensorreg::testing::temp_dir dir;
  const auto path = dir.path() / "leaves.bin";
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  const auto file = tensorreg::memory::mapped_file::open(path.string()).value();
  const host_bytes_view view(data);
  const choppy_view choppy(data);
  for (const tensorreg::memory::byte_source* source : {static_cast<const tensorreg::memory::byte_source*>(&view),
                                                       static_cast<const tensorreg::memory::byte_source*>(&file),
                                                       static_cast<const tensorreg::memory::byte_source*>(&choppy)}) {
    const auto leaves = tensorreg::hash::leaf_digests(*source);
    REQUIRE(leaves.has_value());
    REQUIRE(leaves->size() == 10);
    for (std::size_t i = 0; i < leaves->size(); ++i) {
      INFO("leaf " << i);
      CHECK((*leaves)[i] == tensorreg::hash::hash_leaf(*source, i).value());
    }
  }
  const auto a = std::span(data).first(leaf_bytes);
  const auto b = std::span(data).subspan(leaf_bytes, leaf_bytes);
  const auto two = tensorreg::hash::sha256_two(a, b);
  CHECK(two[0] == sha256(a));
  CHECK(two[1] == sha256(b));
}

TEST_CASE("tree_hash: a read error is returned unchanged", "[hash][tree_hash]") {
  const failing_source source(6 * leaf_bytes, 5 * leaf_bytes + 1);
  thread_pool pool(2);
  for (thread_pool* p : {static_cast<thread_pool*>(nullptr), &pool}) {
    const auto root = tree_hash(source, p);
    REQUIRE_FALSE(root.has_value());
    CHECK(root.error().code == errc::data_loss);
    CHECK(root.error().message == "cannot read offset 20971520: bad sector");
  }
}

TEST_CASE("tree_hash: incremental leaves in shuffled order give the tree_hash root", "[hash][tree_hash]") {
  const auto data = pattern(7 * leaf_bytes + 1);
  const host_bytes_view source(data);
  const auto leaves = tensorreg::hash::leaf_digests(source);
  REQUIRE(leaves.has_value());
  REQUIRE(leaves->size() == 8);

  auto inc = tensorreg::hash::incremental_tree_hash::create(data.size());
  REQUIRE(inc.has_value());
  CHECK(inc->total_size() == data.size());
  CHECK(inc->leaf_count() == 8);
  std::vector<std::uint64_t> order(8);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937(42));
  for (const auto i : order) {
    CHECK_FALSE(inc->complete());
    REQUIRE(inc->add_leaf(i, (*leaves)[i]).has_value());
  }
  CHECK(inc->complete());
  CHECK(inc->leaves_added() == 8);
  const auto root = inc->finish();
  REQUIRE(root.has_value());
  CHECK(*root == *tree_hash(source));
  CHECK(*inc->finish() == *root);  // finish() can be repeated
}

TEST_CASE("tree_hash: incremental leaves from many threads", "[hash][tree_hash]") {
  const std::uint64_t total = 64 * leaf_bytes;
  std::vector<digest> leaves(64);
  for (std::size_t i = 0; i < leaves.size(); ++i) leaves[i] = sha256(std::string_view(std::to_string(i)));
  auto inc = tensorreg::hash::incremental_tree_hash::create(total);
  REQUIRE(inc.has_value());
  std::atomic<int> failures{0};
  {
    std::vector<std::jthread> threads;
    for (std::size_t t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        for (std::size_t i = t; i < leaves.size(); i += 4) {
          if (!inc->add_leaf(i, leaves[i])) ++failures;
        }
      });
    }
  }
  CHECK(failures == 0);
  REQUIRE(inc->complete());
  CHECK(*inc->finish() == tensorreg::hash::tree_root(leaves));
}

TEST_CASE("tree_hash: incremental rejects size 0, bad and duplicate indices, early finish", "[hash][tree_hash]") {
  const auto zero = tensorreg::hash::incremental_tree_hash::create(0);
  REQUIRE_FALSE(zero.has_value());
  CHECK(zero.error().code == errc::invalid_argument);
  CHECK(zero.error().message == "cannot start a tree hash: total_size is 0");

  auto inc = tensorreg::hash::incremental_tree_hash::create(3 * leaf_bytes);
  REQUIRE(inc.has_value());
  const digest a = sha256(std::string_view("a"));
  const digest b = sha256(std::string_view("b"));

  const auto out_of_range = inc->add_leaf(3, a);
  REQUIRE_FALSE(out_of_range.has_value());
  CHECK(out_of_range.error().code == errc::out_of_range);
  CHECK(out_of_range.error().message == "cannot add leaf 3: a buffer of 12582912 bytes has 3 leaves");

  REQUIRE(inc->add_leaf(0, a).has_value());
  const auto duplicate = inc->add_leaf(0, b);
  REQUIRE_FALSE(duplicate.has_value());
  CHECK(duplicate.error().code == errc::failed_precondition);
  CHECK(duplicate.error().message == "cannot add leaf 0: it was already added");

  REQUIRE(inc->add_leaf(2, b).has_value());
  const auto early = inc->finish();
  REQUIRE_FALSE(early.has_value());
  CHECK(early.error().code == errc::failed_precondition);
  CHECK(early.error().message == "cannot finish tree hash: leaf 1 is missing (1 of 3 leaves missing)");

  REQUIRE(inc->add_leaf(1, b).has_value());
  REQUIRE(inc->finish().has_value());
  CHECK(*inc->finish() == pair(pair(a, b), b));  // the first digest of leaf 0 was kept
}
