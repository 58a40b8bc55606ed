// views::assembly (registration.md §7, PIECE kind): leaves hashed as pieces complete them, so that
// the seal hashes only what is left, and the same data hash as the whole buffer's.
#include "views/assembly.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <random>
#include <thread>

#include "support/engine_helpers.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/memory/byte_source.hpp"
#include "tensorreg/views/scatter.hpp"

namespace {

namespace t = tensorreg::testing;
namespace views = tensorreg::views;
using tensorreg::identity::narrow_op;

constexpr int pieces = 4;

// a: float32 [1000, 1100] (4.2 MiB), b: bfloat16 [6000] , c: float32 [2400, 1000] (9.2 MiB): four
// leaves of the data hash, with tensors across leaf boundaries. 1000, 6000 and 2400 divide by 4.
struct model {
  std::shared_ptr<const tensorreg::index::canonical_index> index;
  std::string canonical;
};

model make_model() {
  std::vector<tensorreg::index::tensor_desc> tensors{
      {"a", "torch.float32", {1000, 1100}, {1100, 1}, "a", 1000 * 1100 * 4, 0},
      {"b", "torch.bfloat16", {6000}, {1}, "b", 6000 * 2, 0},
      {"c", "torch.float32", {2400, 1000}, {1000, 1}, "c", 2400 * 1000 * 4, 0}};
  auto idx = tensorreg::index::canonical_index::build(tensors);
  REQUIRE(idx);
  auto shared = std::make_shared<const tensorreg::index::canonical_index>(std::move(*idx));
  return model{shared, t::pattern(shared->total_size(), 3)};
}

// Rank `rank`'s piece: every tensor narrowed along dim 0 to its rank-th quarter.
views::view_plan piece_plan(const model& m, int rank) {
  views::view_request v;
  std::uint64_t size = 0;
  for (const auto& e : m.index->entries()) {
    const auto part = static_cast<std::uint64_t>(e.shape[0] / pieces);
    v.spec[e.name] = {narrow_op{0, static_cast<std::int64_t>(part) * rank, part}};
    size += e.size / pieces;
  }
  v.place = views::placement::server;
  v.kind = views::registration_kind::piece;
  v.canonical_size_bytes = m.index->total_size();
  auto plan = views::view_plan::create(v, *m.index, {size, true});
  REQUIRE(plan);
  return std::move(*plan);
}

std::string view_bytes(const model& m, const views::view_plan& plan) {
  std::string out(plan.view_size(), '\0');
  const auto canonical = std::as_bytes(std::span(m.canonical.data(), m.canonical.size()));
  REQUIRE(views::gather(plan, canonical, 0, std::as_writable_bytes(std::span(out.data(), out.size()))));
  return out;
}

std::span<const std::byte> as_bytes(const std::string& s) { return std::as_bytes(std::span(s.data(), s.size())); }

tensorreg::hash::digest whole_hash(const model& m) {
  const tensorreg::memory::host_bytes_view bytes(as_bytes(m.canonical));
  auto d = tensorreg::hash::tree_hash(bytes);
  REQUIRE(d);
  return *d;
}

std::shared_ptr<views::assembly> make_assembly(const model& m) {
  const auto plan = piece_plan(m, 0);
  auto a = views::assembly::create("cgid:assembly-test", m.index, plan.required_ranges());
  REQUIRE(a);
  return *a;
}

}  // namespace

TEST_CASE(
    "assembly: pieces hash the leaves they complete; the seal hashes the rest, once; faulting pages in "
    "ahead changes no byte",
    "[views][assembly]") {
  const auto m = make_model();
  REQUIRE(tensorreg::hash::leaf_count(m.index->total_size()) == 4);
  tensorreg::thread_pool pool(2);
  std::vector<int> order{0, 1, 2, 3};
  std::mt19937 rng(GENERATE(1u, 2u, 3u));
  std::shuffle(order.begin(), order.end(), rng);

  auto whole = make_assembly(m);
  std::uint64_t hashed = 0;
  for (std::size_t k = 0; k < order.size(); ++k) {
    const auto plan = piece_plan(m, order[k]);
    const auto bytes = view_bytes(m, plan);
    auto after = whole->add_piece("piece-" + std::to_string(order[k]), plan, as_bytes(bytes), *m.index, &pool);
    REQUIRE_OK(after);
    CHECK(after->complete == (k + 1 == order.size()));
    if (k + 1 < order.size()) {
      auto now = whole->hash_complete_leaves(&pool, nullptr);
      REQUIRE_OK(now);
      hashed += *now;
      whole->prefault_uncovered(pool);  // in the background, beside the next piece's scatter
    } else {
      auto none = whole->hash_complete_leaves(&pool, nullptr);
      REQUIRE_OK(none);
      CHECK(*none == 0);  // complete: the sealing commit hashes what is left
    }
  }
  auto leaves = whole->leaf_digests(&pool, nullptr);
  REQUIRE_OK(leaves);
  // The last leaf lies in rank 3's quarter of c alone: it is hashed before the seal unless rank
  // 3 comes last. Every leaf is hashed exactly once, and the root is the whole buffer's.
  if (order.back() != 3) CHECK(hashed > 0);
  CHECK(hashed + leaves->bytes_hashed == m.index->total_size());
  CHECK(tensorreg::hash::tree_root(leaves->digests) == whole_hash(m));
  auto buffer = whole->seal_buffer();
  REQUIRE_OK(buffer);
  CHECK((*buffer)->bytes().size() == m.index->total_size());
  CHECK(std::equal((*buffer)->bytes().begin(), (*buffer)->bytes().end(), as_bytes(m.canonical).begin()));
}

TEST_CASE("assembly: a piece that overlaps an earlier one adds nothing to the leaves' counts", "[views][assembly]") {
  const auto m = make_model();
  auto whole = make_assembly(m);
  const auto first = piece_plan(m, 1);
  const auto first_bytes = view_bytes(m, first);
  REQUIRE_OK(whole->add_piece("first", first, as_bytes(first_bytes), *m.index));
  REQUIRE_OK(whole->add_piece("again", first, as_bytes(first_bytes), *m.index));
  for (int rank : {0, 2}) {
    const auto plan = piece_plan(m, rank);
    const auto bytes = view_bytes(m, plan);
    auto after = whole->add_piece("piece-" + std::to_string(rank), plan, as_bytes(bytes), *m.index);
    REQUIRE_OK(after);
    CHECK_FALSE(after->complete);  // counted twice, piece 1 would have completed leaves early
    REQUIRE_OK(whole->hash_complete_leaves(nullptr, nullptr));
  }
  const auto last = piece_plan(m, 3);
  const auto last_bytes = view_bytes(m, last);
  auto after = whole->add_piece("piece-3", last, as_bytes(last_bytes), *m.index);
  REQUIRE_OK(after);
  CHECK(after->complete);
  auto leaves = whole->leaf_digests(nullptr, nullptr);
  REQUIRE_OK(leaves);
  CHECK(tensorreg::hash::tree_root(leaves->digests) == whole_hash(m));
}

TEST_CASE("assembly: a cancelled hash leaves its leaves to the seal", "[views][assembly]") {
  const auto m = make_model();
  auto whole = make_assembly(m);
  const std::atomic<bool> cancelled{true};
  for (int rank : {0, 1, 2}) {
    const auto plan = piece_plan(m, rank);
    const auto bytes = view_bytes(m, plan);
    REQUIRE_OK(whole->add_piece("piece-" + std::to_string(rank), plan, as_bytes(bytes), *m.index));
    static_cast<void>(whole->hash_complete_leaves(nullptr, &cancelled));  // CANCELLED once a leaf is complete
  }
  const auto plan = piece_plan(m, 3);
  const auto bytes = view_bytes(m, plan);
  REQUIRE_OK(whole->add_piece("piece-3", plan, as_bytes(bytes), *m.index));
  CHECK_CODE(whole->leaf_digests(nullptr, &cancelled), tensorreg::errc::cancelled);
  auto leaves = whole->leaf_digests(nullptr, nullptr);
  REQUIRE_OK(leaves);
  CHECK(leaves->bytes_hashed == m.index->total_size());  // nothing was hashed under the flag
  CHECK(tensorreg::hash::tree_root(leaves->digests) == whole_hash(m));
}

TEST_CASE("assembly: pieces added and hashed on many threads seal with the whole buffer's hash",
          "[views][assembly][concurrency]") {
  const auto m = make_model();
  tensorreg::thread_pool pool(2);
  const auto expected = whole_hash(m);
  for (int round = 0; round < 3; ++round) {
    auto whole = make_assembly(m);
    std::vector<std::string> bytes;
    std::vector<views::view_plan> plans;
    for (int rank = 0; rank < pieces; ++rank) {
      plans.push_back(piece_plan(m, rank));
      bytes.push_back(view_bytes(m, plans.back()));
    }
    std::atomic<int> sealed{0};
    std::vector<std::thread> ranks;
    for (int rank = 0; rank < pieces; ++rank) {
      ranks.emplace_back([&, rank] {
        const auto r = static_cast<std::size_t>(rank);
        auto after = whole->add_piece("piece-" + std::to_string(rank), plans[r], as_bytes(bytes[r]), *m.index, &pool);
        if (!after) return;
        if (!after->complete) {
          static_cast<void>(whole->hash_complete_leaves(&pool, nullptr));
          whole->prefault_uncovered(pool);
          return;
        }
        // The completing piece seals while the others may still be hashing.
        auto leaves = whole->leaf_digests(&pool, nullptr);
        auto buffer = whole->seal_buffer();
        if (leaves && buffer && tensorreg::hash::tree_root(leaves->digests) == expected) ++sealed;
      });
    }
    for (auto& th : ranks) th.join();
    CHECK(sealed == 1);
  }
}
