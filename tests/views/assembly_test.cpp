// views::assembly (registration.md §7, PIECE kind): leaves hashed as pieces complete them, so that
// the seal hashes only what is left, and the same data hash as the whole buffer's.
#include "views/assembly.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <future>
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

// Adds rank `rank`'s piece (staged, no stream) as "piece-<rank>"; the leaves it completed hashed.
void add_staged(views::assembly& whole, const model& m, int rank) {
  const auto plan = piece_plan(m, rank);
  const auto bytes = view_bytes(m, plan);
  REQUIRE_OK(whole.add_piece("piece-" + std::to_string(rank), plan, as_bytes(bytes), *m.index));
  REQUIRE_OK(whole.hash_complete_leaves(nullptr, nullptr));
}

// The leaf digests of a complete assembly give the data hash of the whole buffer.
void check_whole_hash(views::assembly& whole, const model& m) {
  auto leaves = whole.leaf_digests(nullptr, nullptr);
  REQUIRE_OK(leaves);
  CHECK(tensorreg::hash::tree_root(leaves->digests) == whole_hash(m));
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
  check_whole_hash(*whole, m);
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

// ---- pieces that stream their bytes in at Feed (views::assembly_stream) ----

namespace {

// Writes the piece's view bytes through `stream` in 256 KiB chunks, in a shuffled order; with
// `of` > 1, only every of-th chunk from the `part`-th on (another writer takes the others).
// Whether every write succeeded (no Catch assertion here: writers run on threads of their own).
bool stream_chunks(views::assembly_stream& stream, const std::string& bytes, std::uint32_t seed, std::size_t part = 0,
                   std::size_t of = 1) {
  constexpr std::uint64_t chunk = 256 << 10;
  std::vector<std::uint64_t> offsets;
  for (std::uint64_t at = 0; at < bytes.size(); at += chunk) {
    if ((at / chunk) % of == part) offsets.push_back(at);
  }
  std::mt19937 rng(seed);
  std::shuffle(offsets.begin(), offsets.end(), rng);
  for (const auto at : offsets) {
    const auto n = std::min<std::uint64_t>(chunk, bytes.size() - at);
    if (!stream.write(at, as_bytes(bytes).subspan(at, n))) return false;
  }
  return true;
}

std::shared_ptr<const views::view_plan> shared_plan(const model& m, int rank) {
  return std::make_shared<const views::view_plan>(piece_plan(m, rank));
}

}  // namespace

TEST_CASE("assembly: pieces that stream their bytes in leave the seal nothing to hash", "[views][assembly]") {
  const auto m = make_model();
  tensorreg::thread_pool pool(2);
  std::vector<int> order{0, 1, 2, 3};
  std::mt19937 rng(GENERATE(4u, 5u, 6u));
  std::shuffle(order.begin(), order.end(), rng);

  auto whole = make_assembly(m);
  for (std::size_t k = 0; k < order.size(); ++k) {
    const auto plan = shared_plan(m, order[k]);
    const auto bytes = view_bytes(m, *plan);
    const auto id = "piece-" + std::to_string(order[k]);
    auto stream = whole->claim(id, plan, *m.index, &pool);  // its completed leaves hashed there
    CHECK(stream->claimed() == plan->canonical_ranges());   // nothing else covers or claims its bytes
    // Two writers at once, as Feed's workers write.
    bool other_ok = false;
    std::thread other([&] { other_ok = stream_chunks(*stream, bytes, 7, 0, 2); });
    CHECK(stream_chunks(*stream, bytes, 8, 1, 2));
    other.join();
    CHECK(other_ok);
    auto after = whole->add_piece(id, *plan, as_bytes(bytes), *m.index, &pool, stream.get());
    REQUIRE_OK(after);
    CHECK(after->complete == (k + 1 == order.size()));
    if (!after->complete) REQUIRE_OK(whole->hash_complete_leaves(&pool, nullptr));
  }
  auto leaves = whole->leaf_digests(&pool, nullptr);
  REQUIRE_OK(leaves);
  // Each leaf was hashed by the writes that completed it: every other piece had been added.
  CHECK(leaves->bytes_hashed == 0);
  CHECK(tensorreg::hash::tree_root(leaves->digests) == whole_hash(m));
  auto buffer = whole->seal_buffer();
  REQUIRE_OK(buffer);
  CHECK(std::equal((*buffer)->bytes().begin(), (*buffer)->bytes().end(), as_bytes(m.canonical).begin()));
}

TEST_CASE("assembly: a stream whose leaves outrun the hashing threads hashes them itself", "[views][assembly]") {
  const auto m = make_model();
  auto whole = make_assembly(m);
  for (int rank : {0, 1, 2}) add_staged(*whole, m, rank);
  // Rank 3's bytes complete all four leaves; the pool's one thread is held busy meanwhile.
  tensorreg::thread_pool pool(1);
  std::promise<void> go;
  pool.submit([held = go.get_future().share()] { held.wait(); });
  const auto plan = shared_plan(m, 3);
  const auto bytes = view_bytes(m, *plan);
  auto stream = whole->claim("piece-3", plan, *m.index, &pool);
  REQUIRE(stream->claims_all());
  REQUIRE_OK(stream->write(0, as_bytes(bytes)));
  // The writer hashed the backlog down to twice the pool's threads.
  CHECK(stream->leaves_queued() == 2);
  // The commit's wait hashes the rest itself: the pool is still held.
  stream->wait_for_hashes();
  CHECK(stream->leaves_queued() == 0);
  go.set_value();
  REQUIRE_OK(whole->add_piece("piece-3", *plan, as_bytes(bytes), *m.index, &pool, stream.get()));
  auto leaves = whole->leaf_digests(&pool, nullptr);
  REQUIRE_OK(leaves);
  CHECK(leaves->bytes_hashed == 0);
  CHECK(tensorreg::hash::tree_root(leaves->digests) == whole_hash(m));
}

TEST_CASE("assembly: bytes in another piece's open claim wait for it; then they are compared", "[views][assembly]") {
  const auto m = make_model();
  auto whole = make_assembly(m);
  const auto plan = shared_plan(m, 1);
  const auto bytes = view_bytes(m, *plan);
  auto first = whole->claim("first", plan, *m.index);
  REQUIRE(first->claimed() == plan->canonical_ranges());
  auto second = whole->claim("second", plan, *m.index);
  CHECK(second->claimed().empty());                                  // all of it is the first one's
  whole->touch(tensorreg::clock::time_point{});                      // long past
  CHECK_FALSE(whole->expired(tensorreg::clock::time_point::max()));  // an open claim keeps it

  bool retry = false;
  auto early = whole->add_piece("second", *plan, as_bytes(bytes), *m.index, nullptr, second.get(), &retry);
  CHECK_CODE(early, tensorreg::errc::failed_precondition);
  CHECK_THAT(early.error().message, Catch::Contains("being written by piece 'first', which has not committed yet"));
  CHECK(retry);
  CHECK(whole->snapshot().pieces == 0);  // nothing changed

  REQUIRE(stream_chunks(*first, bytes, 1));
  REQUIRE_OK(whole->add_piece("first", *plan, as_bytes(bytes), *m.index, nullptr, first.get()));
  retry = false;
  REQUIRE_OK(whole->add_piece("second", *plan, as_bytes(bytes), *m.index, nullptr, second.get(), &retry));
  CHECK_FALSE(retry);

  auto differing = bytes;
  differing[100] = static_cast<char>(differing[100] ^ 1);
  auto third = whole->claim("third", plan, *m.index);
  CHECK(third->claimed().empty());  // covered
  auto refused = whole->add_piece("third", *plan, as_bytes(differing), *m.index, nullptr, third.get());
  CHECK_CODE(refused, tensorreg::errc::aborted);
  CHECK_THAT(refused.error().message, Catch::Contains("differs from piece 'first'"));
  CHECK(whole->expired(tensorreg::clock::time_point::max()));  // no claim is open any more
}

TEST_CASE("assembly: a claim given back unadded leaves its bytes to the next piece", "[views][assembly]") {
  const auto m = make_model();
  auto whole = make_assembly(m);
  for (int rank : {0, 2, 3}) add_staged(*whole, m, rank);
  const auto plan = shared_plan(m, 1);
  const auto bytes = view_bytes(m, *plan);
  {
    // A piece that writes other bytes and ends without a commit (aborted, expired, its owner
    // gone): what it wrote is nobody's.
    auto garbage = std::string(bytes.size(), '\x5a');
    auto gone = whole->claim("gone", plan, *m.index);
    REQUIRE_FALSE(gone->claimed().empty());
    REQUIRE(stream_chunks(*gone, garbage, 2));
  }
  SECTION("the next piece claims them again") {
    auto next = whole->claim("next", plan, *m.index);
    CHECK(next->claimed() == plan->canonical_ranges());
    REQUIRE(stream_chunks(*next, bytes, 3));
    auto after = whole->add_piece("next", *plan, as_bytes(bytes), *m.index, nullptr, next.get());
    REQUIRE_OK(after);
    CHECK(after->complete);
  }
  SECTION("or a piece without a stream writes them at its commit") {
    auto after = whole->add_piece("next", *plan, as_bytes(bytes), *m.index);
    REQUIRE_OK(after);
    CHECK(after->complete);
  }
  check_whole_hash(*whole, m);
}

TEST_CASE("assembly: a stream that wrote some bytes twice leaves its leaves to the seal", "[views][assembly]") {
  const auto m = make_model();
  auto whole = make_assembly(m);
  for (int rank : {0, 1, 2}) add_staged(*whole, m, rank);
  const auto plan = shared_plan(m, 3);
  const auto bytes = view_bytes(m, *plan);
  auto stream = whole->claim("piece-3", plan, *m.index);
  // Other bytes first, then the right ones: leaves hashed over the first may be wrong.
  REQUIRE(stream_chunks(*stream, std::string(bytes.size(), '\x11'), 4));
  stream->spoil();
  REQUIRE(stream_chunks(*stream, bytes, 5));
  auto after = whole->add_piece("piece-3", *plan, as_bytes(bytes), *m.index, nullptr, stream.get());
  REQUIRE_OK(after);
  REQUIRE(after->complete);
  auto leaves = whole->leaf_digests(nullptr, nullptr);
  REQUIRE_OK(leaves);
  CHECK(leaves->bytes_hashed > 0);
  CHECK(tensorreg::hash::tree_root(leaves->digests) == whole_hash(m));
}

TEST_CASE("assembly: streaming pieces of many threads, committing again while others write, seal once",
          "[views][assembly][concurrency]") {
  const auto m = make_model();
  tensorreg::thread_pool pool(2);
  const auto expected = whole_hash(m);
  for (int round = 0; round < 3; ++round) {
    auto whole = make_assembly(m);
    // Ranks 0-3 and a second rank 1 (overlapping it entirely): one of the two writes, the other
    // waits for it and is compared. Plans and bytes made here: Catch asserts on this thread only.
    std::vector<std::shared_ptr<const views::view_plan>> plans;
    std::vector<std::string> bytes_of;
    for (int k = 0; k < pieces + 1; ++k) {
      plans.push_back(shared_plan(m, k == pieces ? 1 : k));
      bytes_of.push_back(view_bytes(m, *plans.back()));
    }
    std::atomic<int> sealed{0};
    std::vector<std::thread> ranks;
    for (int k = 0; k < pieces + 1; ++k) {
      ranks.emplace_back([&, k] {
        const auto& plan = plans[static_cast<std::size_t>(k)];
        const auto& bytes = bytes_of[static_cast<std::size_t>(k)];
        const auto id = "piece-" + std::to_string(k);
        auto stream = whole->claim(id, plan, *m.index, &pool);
        if (!stream_chunks(*stream, bytes, static_cast<std::uint32_t>(k))) return;
        for (;;) {
          bool retry = false;
          auto after = whole->add_piece(id, *plan, as_bytes(bytes), *m.index, &pool, stream.get(), &retry);
          if (!after && retry) {
            std::this_thread::yield();
            continue;
          }
          if (!after) return;  // sealed before this one came: fine
          if (!after->complete) {
            static_cast<void>(whole->hash_complete_leaves(&pool, nullptr));
            return;
          }
          auto leaves = whole->leaf_digests(&pool, nullptr);
          auto buffer = whole->seal_buffer();
          if (leaves && buffer && tensorreg::hash::tree_root(leaves->digests) == expected) ++sealed;
          return;
        }
      });
    }
    for (auto& th : ranks) th.join();
    CHECK(sealed == 1);
  }
}
