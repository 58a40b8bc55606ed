#include "tensorreg/views/scatter.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/index/dtype.hpp"

namespace {

using tensorreg::errc;
using tensorreg::identity::narrow_op;
using tensorreg::identity::transpose_op;
using tensorreg::identity::view_op;
using tensorreg::index::canonical_index;
using tensorreg::index::entry;
using namespace tensorreg::views;

// An independent reference of a view: for each view byte, the canonical byte it reads (or -1
// for PAD), computed element by element from the ops as torch applies them.
std::vector<std::int64_t> reference_map(const canonical_index& idx, const tensorreg::identity::view_spec& spec) {
  std::vector<std::int64_t> map;
  for (const auto& [name, ops] : spec) {
    const auto* e = idx.find(name);
    const auto es = static_cast<std::int64_t>(*tensorreg::index::element_size(e->dtype));
    auto shape = e->shape;
    auto stride = e->stride;
    std::int64_t base = e->storage_offset;
    for (const auto& op : ops) {
      if (const auto* n = std::get_if<narrow_op>(&op)) {
        const auto start = n->start < 0 ? n->start + shape[n->dim] : n->start;
        base += start * stride[n->dim];
        shape[n->dim] = static_cast<std::int64_t>(n->length);
      } else {
        const auto& t = std::get<transpose_op>(op);
        std::swap(shape[t.dim0], shape[t.dim1]);
        std::swap(stride[t.dim0], stride[t.dim1]);
      }
    }
    while (map.size() % 8 != 0) map.push_back(-1);
    const auto numel = std::accumulate(shape.begin(), shape.end(), std::int64_t{1}, std::multiplies<>());
    std::vector<std::int64_t> i(shape.size(), 0);
    for (std::int64_t k = 0; k < numel; ++k) {
      std::int64_t off = base;
      for (std::size_t d = 0; d < shape.size(); ++d) off += i[d] * stride[d];
      for (std::int64_t b = 0; b < es; ++b) map.push_back(static_cast<std::int64_t>(e->offset) + off * es + b);
      for (std::size_t d = shape.size(); d-- > 0;) {
        if (++i[d] < shape[d]) break;
        i[d] = 0;
      }
    }
  }
  return map;
}

struct random_case {
  canonical_index index;
  view_request request;
};

// Random tensors (rank 0–4, element sizes 1–8, row-major or with permuted strides) and a random
// spec over some of them: narrow (negative starts too) or 1–3 transposes.
random_case make_case(std::mt19937_64& rng) {
  static const std::vector<std::string> dtypes = {"torch.uint8",   "torch.float16",  "torch.float32",
                                                  "torch.float64", "torch.bfloat16", "torch.int32"};
  auto pick = [&](std::int64_t lo, std::int64_t hi) {
    return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng);
  };
  std::vector<tensorreg::index::tensor_desc> tensors;
  const auto count = pick(1, 4);
  for (std::int64_t n = 0; n < count; ++n) {
    tensorreg::index::tensor_desc t;
    t.name = "t" + std::to_string(n);
    t.dtype = dtypes[static_cast<std::size_t>(pick(0, static_cast<std::int64_t>(dtypes.size()) - 1))];
    const auto rank = static_cast<std::size_t>(pick(0, 4));
    for (std::size_t d = 0; d < rank; ++d) t.shape.push_back(pick(1, rank <= 2 ? 70 : 9));
    // Strides of a permuted contiguous layout: storage order `perm`.
    std::vector<std::size_t> perm(rank);
    std::iota(perm.begin(), perm.end(), 0);
    if (pick(0, 2) == 0) std::shuffle(perm.begin(), perm.end(), rng);
    t.stride.assign(rank, 0);
    std::int64_t s = 1;
    for (std::size_t k = rank; k-- > 0;) {
      t.stride[perm[k]] = s;
      s *= t.shape[perm[k]];
    }
    t.storage_offset = pick(0, 3);
    t.storage_key = t.name;
    t.storage_nbytes = static_cast<std::uint64_t>((s + t.storage_offset) * *tensorreg::index::element_size(t.dtype));
    tensors.push_back(t);
  }
  auto idx = canonical_index::build(tensors);
  REQUIRE(idx);
  random_case c{*idx, {}};
  for (const auto& t : tensors) {
    if (pick(0, 3) == 0 && !c.request.spec.empty()) continue;
    auto& ops = c.request.spec[t.name];
    const auto rank = t.shape.size();
    if (rank == 0 || pick(0, 4) == 0) continue;
    if (pick(0, 1) == 0) {
      const auto dim = static_cast<std::uint32_t>(pick(0, static_cast<std::int64_t>(rank) - 1));
      const auto size = t.shape[dim];
      const auto start = pick(0, size - 1);
      const auto length = static_cast<std::uint64_t>(pick(1, size - start));
      ops.push_back(narrow_op{dim, pick(0, 1) == 0 ? start : start - size, length});
    } else if (rank >= 2) {
      const auto times = pick(1, 3);
      for (std::int64_t k = 0; k < times; ++k) {
        const auto d0 = static_cast<std::uint32_t>(pick(0, static_cast<std::int64_t>(rank) - 1));
        auto d1 = static_cast<std::uint32_t>(pick(0, static_cast<std::int64_t>(rank) - 2));
        if (d1 >= d0) ++d1;
        ops.push_back(transpose_op{d0, d1});
      }
    }
  }
  c.request.place = placement::server;
  c.request.kind = registration_kind::piece;
  c.request.canonical_size_bytes = c.index.total_size();
  return c;
}

// The plan of a random case: a PIECE unless it covers everything, then CANONICAL.
view_plan plan_of(const random_case& c, std::uint64_t view_size) {
  auto r = c.request;
  auto piece = view_plan::create(r, c.index, registration_facts{view_size, true});
  if (piece) return *piece;
  REQUIRE_THAT(piece.error().message, Catch::Contains("must not cover the whole canonical buffer"));
  r.kind = registration_kind::canonical;
  r.canonical_size_bytes = 0;
  auto whole = view_plan::create(r, c.index, registration_facts{c.index.total_size(), false});
  REQUIRE(whole);
  return *whole;
}

std::vector<std::byte> random_bytes(std::mt19937_64& rng, std::size_t n) {
  std::vector<std::byte> out(n);
  for (auto& b : out) b = static_cast<std::byte>(rng() & 0xFFU);
  return out;
}

}  // namespace

TEST_CASE("scatter: random views gather as the element-by-element reference and round trip", "[views][scatter]") {
  std::mt19937_64 rng(20261201);
  for (int round = 0; round < 300; ++round) {
    auto c = make_case(rng);
    const auto map = reference_map(c.index, c.request.spec);
    if (map.empty()) continue;
    const auto plan = plan_of(c, map.size());
    INFO("round " << round << ", view index " << plan.index_json());
    REQUIRE(plan.view_size() == map.size());

    // gather equals the reference.
    const auto canonical = random_bytes(rng, c.index.total_size());
    std::vector<std::byte> view(plan.view_size());
    REQUIRE(gather(plan, canonical, 0, view));
    bool same = true;
    for (std::size_t i = 0; i < map.size(); ++i) {
      const auto want = map[i] < 0 ? std::byte{0} : canonical[static_cast<std::size_t>(map[i])];
      same = same && view[i] == want;
    }
    CHECK(same);

    // scatter in random chunks (mid-element edges included) writes what the reference writes.
    const auto x = random_bytes(rng, plan.view_size());
    std::vector<std::byte> scattered(c.index.total_size(), std::byte{0});
    std::vector<std::byte> expected(c.index.total_size(), std::byte{0});
    for (std::size_t i = 0; i < map.size(); ++i) {
      if (map[i] >= 0) expected[static_cast<std::size_t>(map[i])] = x[i];
    }
    std::uint64_t at = 0;
    while (at < x.size()) {
      const auto n = std::min<std::uint64_t>(x.size() - at, 1 + rng() % 97);
      REQUIRE(scatter(plan, at, std::span(x).subspan(at, n), scattered));
      at += n;
    }
    CHECK(scattered == expected);

    // gather(scatter(x)) == x outside PAD, in random pieces too.
    std::vector<std::byte> back(plan.view_size());
    at = 0;
    while (at < back.size()) {
      const auto n = std::min<std::uint64_t>(back.size() - at, 1 + rng() % 131);
      REQUIRE(gather(plan, scattered, at, std::span(back).subspan(at, n)));
      at += n;
    }
    bool round_trip = true;
    for (std::size_t i = 0; i < map.size(); ++i)
      round_trip = round_trip && back[i] == (map[i] < 0 ? std::byte{0} : x[i]);
    CHECK(round_trip);

    // The coverage is exactly the canonical bytes the reference touches.
    std::vector<byte_range> touched;
    for (auto m : map) {
      if (m >= 0) touched.push_back({static_cast<std::uint64_t>(m), 1});
    }
    CHECK(merge_ranges(touched) == plan.canonical_ranges());

    // compare finds no difference against what was scattered, and the first one after a flip.
    auto none = compare(plan, 0, x, scattered, plan.canonical_ranges());
    REQUIRE(none);
    CHECK(*none == std::nullopt);
    for (std::size_t i = 0; i < map.size(); ++i) {
      if (map[i] < 0) continue;
      auto y = x;
      y[i] ^= std::byte{0x5A};
      auto found = compare(plan, 0, y, scattered, plan.canonical_ranges());
      REQUIRE(found);
      REQUIRE(found->has_value());
      CHECK((*found)->view_offset == i);
      CHECK((*found)->canonical_offset == static_cast<std::uint64_t>(map[i]));
      break;
    }
  }
}

TEST_CASE("scatter: a 2-D transpose larger than a tile lands element by element", "[views][scatter]") {
  // 300 × 170 (not multiples of any tile: whole tiles, then ragged edges), transposed, for every
  // element size: the whole tiles go through the block transpose of that size.
  const std::int64_t rows = 300, cols = 170;
  for (const std::string dtype : {"torch.uint8", "torch.bfloat16", "torch.float32", "torch.int64"}) {
    CAPTURE(dtype);
    const auto es = static_cast<std::size_t>(*tensorreg::index::element_size(dtype));
    const auto nbytes = static_cast<std::uint64_t>(rows * cols) * es;
    std::vector<tensorreg::index::tensor_desc> tensors{{"w", dtype, {rows, cols}, {cols, 1}, "w", nbytes, 0}};
    auto idx = canonical_index::build(tensors);
    REQUIRE(idx);
    view_request r;
    r.spec["w"] = {transpose_op{0, 1}};
    r.place = placement::server;
    r.kind = registration_kind::canonical;
    auto plan = view_plan::create(r, *idx, registration_facts{idx->total_size(), false});
    REQUIRE(plan);
    std::mt19937_64 rng(es);
    const auto view = random_bytes(rng, nbytes);
    std::vector<std::byte> canonical(idx->total_size());
    REQUIRE(scatter(*plan, 0, view, canonical));
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < static_cast<std::size_t>(rows); ++i) {
      for (std::size_t j = 0; j < static_cast<std::size_t>(cols); ++j) {
        const auto c = (i * static_cast<std::size_t>(cols) + j) * es;
        const auto v = (j * static_cast<std::size_t>(rows) + i) * es;
        wrong += std::memcmp(canonical.data() + c, view.data() + v, es) != 0 ? 1 : 0;
      }
    }
    CHECK(wrong == 0);
  }
}

TEST_CASE("scatter: ranges outside the view or a short canonical buffer are OUT_OF_RANGE", "[views][scatter]") {
  auto idx = canonical_index::parse(R"({"a":[0,16,[2,2],[2,1],"torch.float32",0]})", std::nullopt);
  REQUIRE(idx);
  view_request r;
  r.spec["a"] = {transpose_op{0, 1}};
  r.place = placement::server;
  r.kind = registration_kind::canonical;
  auto plan = view_plan::create(r, *idx, registration_facts{16, false});
  REQUIRE(plan);
  std::vector<std::byte> canonical(16);
  std::vector<std::byte> bytes(8);
  auto past = scatter(*plan, 12, bytes, canonical);
  REQUIRE_FALSE(past);
  CHECK(past.error().code == errc::out_of_range);
  CHECK(past.error().message == "cannot move view bytes [12, +8): past the view size 16");
  auto huge = scatter(*plan, ~std::uint64_t{0} - 2, bytes, canonical);
  REQUIRE_FALSE(huge);
  CHECK(huge.error().code == errc::out_of_range);
  std::vector<std::byte> small(8);
  auto short_buffer = gather(*plan, small, 0, bytes);
  REQUIRE_FALSE(short_buffer);
  CHECK(short_buffer.error().code == errc::out_of_range);
  CHECK(short_buffer.error().message == "cannot move view bytes: the canonical buffer has 8 bytes, not 16");
}

TEST_CASE("view_data_hash: the tree hash of the gathered view bytes, with its own leaf size", "[views][scatter]") {
  auto idx = canonical_index::parse(
      R"({"a":[0,16,[2,2],[2,1],"torch.float32",0],"b":[16,16,[2,2],[2,1],"torch.float32",0]})", std::nullopt);
  REQUIRE(idx);
  view_request r;
  r.spec["a"] = {transpose_op{0, 1}};
  r.spec["b"] = {narrow_op{1, 0, 1}};
  r.place = placement::server;
  r.kind = registration_kind::piece;
  r.canonical_size_bytes = 32;
  auto plan = std::make_shared<view_plan>(*view_plan::create(r, *idx, registration_facts{24, true}));
  std::vector<std::byte> canonical(32);
  for (std::size_t i = 0; i < 32; ++i) canonical[i] = static_cast<std::byte>(i);
  std::vector<std::byte> view(24);
  REQUIRE(gather(*plan, canonical, 0, view));
  // a^T = bytes 0-3, 8-11, 4-7, 12-15; b[:, 0:1] = 16-19, 24-27.
  std::vector<std::byte> want;
  for (int i : {0, 8, 4, 12, 16, 24}) {
    for (int k = 0; k < 4; ++k) want.push_back(static_cast<std::byte>(i + k));
  }
  CHECK(view == want);
  // One leaf: SHA-256 of the view bytes. 8-byte leaves: a 3-leaf tree.
  auto one = view_data_hash(*plan, canonical);
  REQUIRE(one);
  CHECK(*one == tensorreg::hash::sha256(std::span<const std::byte>(want)));
  auto three = view_data_hash(*plan, canonical, 8);
  REQUIRE(three);
  const std::vector<tensorreg::hash::digest> leaves{tensorreg::hash::sha256(std::span(want).first(8)),
                                                    tensorreg::hash::sha256(std::span(want).subspan(8, 8)),
                                                    tensorreg::hash::sha256(std::span(want).subspan(16, 8))};
  CHECK(*three == tensorreg::hash::tree_root(leaves));
  // gathered_view reads the same bytes.
  gathered_view source(plan, canonical, nullptr);
  std::vector<std::byte> read(24);
  REQUIRE(source.read(0, read));
  CHECK(read == want);
}

TEST_CASE("scatter_within: random views write the reference's bytes inside `only`, none outside, and say which",
          "[views][scatter]") {
  std::mt19937_64 rng(20261204);
  for (int round = 0; round < 200; ++round) {
    auto c = make_case(rng);
    const auto map = reference_map(c.index, c.request.spec);
    if (map.empty()) continue;
    const auto plan = plan_of(c, map.size());
    INFO("round " << round << ", view index " << plan.index_json());
    // `only`: random ranges of the canonical buffer, merged.
    std::vector<byte_range> only;
    const auto total = c.index.total_size();
    for (int k = 0; k < 4; ++k) {
      const auto offset = rng() % total;
      only.push_back({offset, 1 + rng() % (total - offset)});
    }
    only = merge_ranges(std::move(only));
    const auto inside = [&](std::uint64_t b) {
      return std::any_of(only.begin(), only.end(), [b](const byte_range& r) { return r.offset <= b && b < r.end(); });
    };

    const auto x = random_bytes(rng, plan.view_size());
    const std::byte untouched{0xA5};
    std::vector<std::byte> scattered(total, untouched);
    std::vector<std::byte> expected(total, untouched);
    std::vector<char> expected_written(total, 0);
    for (std::size_t i = 0; i < map.size(); ++i) {
      const auto b = map[i];
      if (b < 0 || !inside(static_cast<std::uint64_t>(b))) continue;
      expected[static_cast<std::size_t>(b)] = x[i];
      expected_written[static_cast<std::size_t>(b)] = 1;
    }
    std::vector<char> written(total, 0);
    bool each_once = true;
    std::uint64_t at = 0;
    while (at < x.size()) {
      const auto n = std::min<std::uint64_t>(x.size() - at, 1 + rng() % 97);
      REQUIRE(scatter_within(plan, at, std::span(x).subspan(at, n), scattered, only,
                             [&](std::uint64_t offset, std::uint64_t length) {
                               for (auto b = offset; b < offset + length; ++b) {
                                 each_once = each_once && written[b] == 0;
                                 written[b] = 1;
                               }
                             }));
      at += n;
    }
    CHECK(scattered == expected);
    CHECK(written == expected_written);
    CHECK(each_once);
  }
  // Nothing to write: no call, no byte.
  std::mt19937_64 one(7);
  auto c = make_case(one);
  const auto map = reference_map(c.index, c.request.spec);
  const auto plan = plan_of(c, map.size());
  std::vector<std::byte> canonical(c.index.total_size(), std::byte{1});
  const auto x = random_bytes(one, plan.view_size());
  int calls = 0;
  REQUIRE(scatter_within(plan, 0, x, canonical, {}, [&](std::uint64_t, std::uint64_t) { ++calls; }));
  CHECK(calls == 0);
  CHECK(std::all_of(canonical.begin(), canonical.end(), [](std::byte b) { return b == std::byte{1}; }));
  CHECK(
      scatter_within(plan, plan.view_size(), std::span(x).first(1), canonical, {}, [](std::uint64_t, std::uint64_t) {})
          .error()
          .code == errc::out_of_range);
}
