// tensorreg::client's views (registration.md §7) against a real tensorregd: CANONICAL views of
// an artifact with SERVER and CLIENT placement read back as the transposes they are, pieces
// seal the whole artifact's id, and the daemon's refusals come back with code and message.
#include "tensorreg/client/connection.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstring>
#include <random>

#include "support/daemon_process.hpp"
#include "support/safetensors_writer.hpp"
#include "support/temp_dir.hpp"
#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/sha256.hpp"

namespace {

using namespace tensorreg;
using client::connection;
using identity::narrow_op;
using identity::transpose_op;
using testing::daemon_process;

// b: bfloat16 [cols] at 0; w: float32 [rows, cols] after it (names in byte order).
struct model {
  std::unique_ptr<index::safetensors_bundle> bundle;
  std::string canonical;  // the canonical bytes, as the daemon's replica holds them
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  [[nodiscard]] std::uint64_t w_at() const { return static_cast<std::uint64_t>((cols * 2 + 7) / 8 * 8); }
};

model make_model(const testing::temp_dir& dir, std::int64_t rows, std::int64_t cols, std::uint32_t seed) {
  const auto path = dir.path() / ("model-" + std::to_string(seed) + ".safetensors");
  testing::write_safetensors(
      path, {{"w", "F32", {rows, cols}, testing::pattern_bytes(static_cast<std::size_t>(rows * cols * 4), seed)},
             {"b", "BF16", {cols}, testing::pattern_bytes(static_cast<std::size_t>(cols * 2), seed + 1)}});
  model m;
  m.bundle = index::safetensors_bundle::open({path.string()}).value();
  m.rows = rows;
  m.cols = cols;
  m.canonical.resize(m.bundle->index().total_size());
  REQUIRE(m.bundle->canonical().visit(0, m.canonical.size(), [&, at = std::size_t{0}](auto piece) mutable -> status {
    std::memcpy(m.canonical.data() + at, piece.data(), piece.size());
    at += piece.size();
    return {};
  }));
  return m;
}

std::string b_bytes(const model& m) { return m.canonical.substr(0, static_cast<std::size_t>(m.cols * 2)); }

// b, PAD, then w^T.
std::string transposed(const model& m) {
  std::string out = b_bytes(m);
  out.resize(m.w_at());
  for (std::int64_t j = 0; j < m.cols; ++j) {
    for (std::int64_t i = 0; i < m.rows; ++i) {
      out += m.canonical.substr(static_cast<std::size_t>(m.w_at() + static_cast<std::uint64_t>(i * m.cols + j) * 4), 4);
    }
  }
  return out;
}

// b, PAD, then w[:, c0:c0+n].
std::string columns(const model& m, std::int64_t c0, std::int64_t n) {
  std::string out = b_bytes(m);
  out.resize(m.w_at());
  for (std::int64_t i = 0; i < m.rows; ++i) {
    out += m.canonical.substr(static_cast<std::size_t>(m.w_at() + static_cast<std::uint64_t>(i * m.cols + c0) * 4),
                              static_cast<std::size_t>(n * 4));
  }
  return out;
}

std::span<const std::byte> as_bytes(const std::string& s) { return std::as_bytes(std::span(s.data(), s.size())); }

std::string as_string(const std::vector<std::byte>& b) { return {reinterpret_cast<const char*>(b.data()), b.size()}; }

std::string multihash_of(const std::string& bytes) {
  return hash::encode_multihash(hash::sha256(std::string_view(bytes)));
}

connection connect(const daemon_process& d) {
  auto c = connection::connect(d.socket_path());
  REQUIRE(c);
  return std::move(*c);
}

client::piece_options piece(const model& m, std::string cgid, std::int64_t c0, std::int64_t n) {
  client::piece_options o;
  o.cgid = std::move(cgid);
  o.canonical_index_json = m.bundle->index().json();
  o.spec["w"] = {narrow_op{1, c0, static_cast<std::uint64_t>(n)}};
  o.tensor_names = {"b"};
  return o;
}

}  // namespace

TEST_CASE("client views: a transposed view with SERVER and CLIENT placement answers its record and reads back",
          "[client][connection_views]") {
  daemon_process d;
  testing::temp_dir dir;
  // 4.5 MB of w: the SERVER upload takes two view_chunk frames.
  const auto m = make_model(dir, 1024, 1100, 3);
  auto c = connect(d);
  auto put = c.put(*m.bundle);
  REQUIRE(put);
  const auto& id = put->descriptor.artifact_id;
  const auto want = transposed(m);

  client::view_options options;
  options.spec["w"] = {transpose_op{0, 1}};
  std::string view_id;
  for (const auto place : {views::placement::server, views::placement::client}) {
    INFO("placement " << views::placement_name(place));
    options.place = place;
    auto v = c.register_view(id, options);
    REQUIRE(v);
    CHECK(v->descriptor.artifact_id == id);
    CHECK(v->existed);
    CHECK(v->kind == views::registration_kind::canonical);
    CHECK_FALSE(v->assembly);
    REQUIRE(v->canonical_ranges.size() == 1);
    CHECK(v->canonical_ranges[0] == views::byte_range{0, m.canonical.size()});
    CHECK(v->view_index_json ==
          R"({"b":[0,2200,[1100],[1],"torch.bfloat16",0],"w":[2200,4505600,[1100,1024],[1024,1],"torch.float32",0]})");
    CHECK(v->view_data_hash == multihash_of(want));
    CHECK_FALSE(v->registration_id.empty());
    if (view_id.empty()) view_id = v->view_id;
    CHECK(v->view_id == view_id);  // one spec, one id, whoever uploads

    auto got = c.get_view(id, v->view_id);
    REQUIRE(got);
    CHECK(got->view.view_id == v->view_id);
    CHECK(got->view.view_size == want.size());
    CHECK(got->view.spec.at("w") == std::vector<identity::view_op>{transpose_op{0, 1}});
    CHECK(got->view.spec.at("b").empty());
    CHECK(as_string(got->bytes) == want);
  }
  auto listed = c.list();
  REQUIRE(listed);
  REQUIRE(listed->size() == 1);
  REQUIRE(listed->front().views.size() == 1);
  CHECK(listed->front().views.front().view_id == view_id);
  CHECK(listed->front().views.front().kind == views::registration_kind::canonical);
}

TEST_CASE("client views: the daemon's refusals come back with their code and message", "[client][connection_views]") {
  daemon_process d;
  testing::temp_dir dir;
  const auto m = make_model(dir, 32, 40, 5);
  auto c = connect(d);
  auto put = c.put(*m.bundle);
  REQUIRE(put);
  const auto& id = put->descriptor.artifact_id;

  client::view_options options;
  options.spec["w"] = {narrow_op{0, 0, 32}, narrow_op{1, 0, 40}};
  auto twice = c.register_view(id, options);
  REQUIRE_FALSE(twice);
  CHECK(twice.error().code == errc::invalid_argument);
  CHECK(twice.error().message == "cannot register view: tensor 'w' has 2 narrow ops; at most one is allowed");

  options.spec["w"] = {narrow_op{0, 0, 16}};
  auto partial = c.register_view(id, options);
  REQUIRE_FALSE(partial);
  CHECK(partial.error().code == errc::invalid_argument);
  CHECK(partial.error().message ==
        "cannot register view: a CANONICAL view must cover every byte of every canonical tensor; bytes [2640, 5200) "
        "are not covered (register a PIECE instead)");

  auto unknown = c.register_view("mi2:nope", options);
  REQUIRE_FALSE(unknown);
  CHECK(unknown.error().code == errc::not_found);

  auto no_view = c.get_view(id, "bciqnone");
  REQUIRE_FALSE(no_view);
  CHECK(no_view.error().code == errc::not_found);
  CHECK(no_view.error().message == "cannot find view bciqnone of " + id + ": no such view");

  // A piece whose bytes are not its view's size.
  const auto bytes = columns(m, 0, 10);
  auto short_piece = c.register_piece(piece(m, "cgid:client-short", 0, 10), as_bytes(bytes).first(100));
  REQUIRE_FALSE(short_piece);
  CHECK(short_piece.error().code == errc::invalid_argument);
  CHECK(short_piece.error().message ==
        "cannot register view: total_size 100 of a PIECE must equal its view size " + std::to_string(bytes.size()));

  // Nothing was left pending by the refusals.
  auto stats = c.stats();
  REQUIRE(stats);
  CHECK(stats->pending_registrations == 0);
}

TEST_CASE("client views: 4 pieces in random order seal the whole artifact's id, differing bytes are ABORTED",
          "[client][connection_views]") {
  daemon_process d;
  testing::temp_dir dir;
  const auto m = make_model(dir, 32, 40, 9);
  auto c = connect(d);
  const std::string cgid = "cgid:client-tp4";

  // A piece whose shared bytes (b) differ from the first piece's is refused, naming both.
  std::vector<int> order{0, 1, 2, 3};
  std::shuffle(order.begin(), order.end(), std::mt19937(23));
  const auto first_bytes = columns(m, order[0] * 10, 10);
  auto first = c.register_piece(piece(m, cgid, order[0] * 10, 10), as_bytes(first_bytes));
  REQUIRE(first);
  CHECK(first->kind == views::registration_kind::piece);
  CHECK(first->descriptor.artifact_id == cgid);
  REQUIRE(first->assembly);
  CHECK(first->assembly->pieces == 1);
  CHECK_FALSE(first->assembly->sealed);
  REQUIRE(first->assembly->expires_in);
  // Open, it has no artifact: the daemon lists it among its assemblies.
  auto open = c.assemblies();
  REQUIRE(open);
  REQUIRE(open->size() == 1);
  CHECK((*open)[0].cgid == cgid);
  CHECK((*open)[0].pieces == 1);
  CHECK_FALSE((*open)[0].sealed);
  CHECK((*open)[0].covered_bytes == first->assembly->covered_bytes);
  REQUIRE((*open)[0].expires_in);
  CHECK(*(*open)[0].expires_in <= *first->assembly->expires_in);
  CHECK(*(*open)[0].expires_in > std::chrono::milliseconds(0));
  auto bad = columns(m, order[1] * 10, 10);
  bad[5] = static_cast<char>(bad[5] ^ 1);
  auto refused = c.register_piece(piece(m, cgid, order[1] * 10, 10), as_bytes(bad));
  REQUIRE_FALSE(refused);
  CHECK(refused.error().code == errc::aborted);
  CHECK_THAT(refused.error().message,
             Catch::StartsWith("cannot add piece '") &&
                 Catch::EndsWith("' to assembly " + cgid +
                                 ": its byte at canonical offset 5 (view offset 5) differs from piece '" +
                                 first->registration_id + "', which wrote it first"));

  for (std::size_t n = 1; n < order.size(); ++n) {
    const auto bytes = columns(m, order[n] * 10, 10);
    auto done = c.register_piece(piece(m, cgid, order[n] * 10, 10), as_bytes(bytes));
    REQUIRE(done);
    REQUIRE(done->assembly);
    CHECK(done->assembly->pieces == n + 1);
    CHECK(done->assembly->sealed == (n + 1 == order.size()));
    CHECK(done->view_data_hash == multihash_of(bytes));
    if (n + 1 == order.size()) {
      auto whole = c.put(*m.bundle);
      REQUIRE(whole);
      CHECK(whole->existed);
      CHECK(done->descriptor.artifact_id == whole->descriptor.artifact_id);
      CHECK(done->assembly->artifact_id == whole->descriptor.artifact_id);
      CHECK(done->assembly->covered_bytes == m.canonical.size());
      auto listed = c.assemblies();
      REQUIRE(listed);
      REQUIRE(listed->size() == 1);
      CHECK((*listed)[0].sealed);
      CHECK((*listed)[0].artifact_id == whole->descriptor.artifact_id);
      // The sealing piece's view is recorded on the artifact and reads back as its columns.
      auto got = c.get_view(whole->descriptor.artifact_id, done->view_id);
      REQUIRE(got);
      CHECK(got->view.kind == views::registration_kind::piece);
      CHECK(as_string(got->bytes) == bytes);
    }
  }
  auto late = c.register_piece(piece(m, cgid, 0, 10), as_bytes(columns(m, 0, 10)));
  REQUIRE_FALSE(late);
  CHECK(late.error().code == errc::failed_precondition);
  CHECK_THAT(late.error().message,
             Catch::StartsWith("cannot begin registration: assembly " + cgid + " is already sealed as artifact mi2:"));
}
