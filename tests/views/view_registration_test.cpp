// The engine's view plan (registration.md §7): SERVER and CLIENT placement, CANONICAL views and
// PIECE assembly, through engine::begin / feed / commit with a fake clock.
#include "tensorreg/registration/engine.hpp"

#include <catch2/catch.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <deque>
#include <random>
#include <thread>

#include "support/engine_helpers.hpp"
#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/identity/view_id.hpp"

namespace {

namespace t = tensorreg::testing;
using namespace tensorreg::registration;
using tensorreg::errc;
using tensorreg::identity::narrow_op;
using tensorreg::identity::transpose_op;
using tensorreg::testing::fake_clock;
namespace views = tensorreg::views;

const std::int32_t me = static_cast<std::int32_t>(::getpid());

// b: float16 [48] at 0; w: float32 [64, 48] at 96 (names in byte order). Total 12384 bytes.
constexpr std::int64_t rows = 64;
constexpr std::int64_t cols = 48;

struct fixture {
  tensorreg::index::canonical_index index;
  std::string canonical;  // random bytes
};

fixture make_fixture() {
  std::vector<tensorreg::index::tensor_desc> tensors{
      {"w", "torch.float32", {rows, cols}, {cols, 1}, "w", rows * cols * 4, 0},
      {"b", "torch.float16", {cols}, {1}, "b", cols * 2, 0}};
  auto idx = tensorreg::index::canonical_index::build(tensors);
  REQUIRE(idx);
  return fixture{*idx, t::pattern(idx->total_size(), 7)};
}

// w^T (float32 [48, 64]) then b, as the client linearizes them; b sorts first: "b" < "w".
constexpr std::int64_t w_at = cols * 2;

std::string transposed_view(const fixture& f) {
  std::string out = f.canonical.substr(0, cols * 2);
  for (std::int64_t j = 0; j < cols; ++j) {
    for (std::int64_t i = 0; i < rows; ++i) {
      out += f.canonical.substr(static_cast<std::size_t>(w_at + (i * cols + j) * 4), 4);
    }
  }
  return out;
}

// b whole, then w[:, c0:c0+n] (float32 [64, n]).
std::string column_piece(const fixture& f, std::int64_t c0, std::int64_t n) {
  std::string out = f.canonical.substr(0, cols * 2);
  for (std::int64_t i = 0; i < rows; ++i) {
    out += f.canonical.substr(static_cast<std::size_t>(w_at + (i * cols + c0) * 4), static_cast<std::size_t>(n * 4));
  }
  return out;
}

begin_request view_begin(const fixture& f, views::view_request v, std::uint64_t total_size, std::string cgid = "") {
  begin_request r;
  r.device_id = 0;
  r.total_size = total_size;
  r.owner_pid = me;
  r.tensor_index_data = index_data{f.index.json(), "v3", "json"};
  r.plan = coalesced_options{};
  r.client_artifact_id = std::move(cgid);
  r.view = std::move(v);
  r.has_view = true;
  return r;
}

views::view_request transpose_request() {
  views::view_request v;
  v.spec["w"] = {transpose_op{0, 1}};
  v.tensor_names = {"b"};
  v.place = views::placement::server;
  v.kind = views::registration_kind::canonical;
  return v;
}

views::view_request piece_request(std::int64_t c0, std::int64_t n) {
  views::view_request v;
  v.spec["w"] = {narrow_op{1, c0, static_cast<std::uint64_t>(n)}};
  v.tensor_names = {"b"};
  v.place = views::placement::server;
  v.kind = views::registration_kind::piece;
  v.canonical_size_bytes = rows * cols * 4 + cols * 2;
  return v;
}

tensorreg::status feed_view(engine& e, const std::string& id, const std::string& bytes, std::uint64_t at,
                            std::uint64_t n) {
  feed_request f;
  f.registration_id = id;
  f.payload = view_chunk{0, at, bytes.substr(at, n)};
  return e.feed(std::move(f));
}

// Whether a piece's commit was answered "commit again": bytes of it lie in the claim of a piece
// that has not committed yet.
bool waits_for_other_piece(const tensorreg::result<commit_response>& r) {
  return !r && r.error().code == errc::failed_precondition &&
         r.error().message.find("which has not committed yet: commit again once it has") != std::string::npos;
}

// Commit, again while another piece holds bytes of this one (as the clients do), for up to 10 s.
tensorreg::result<commit_response> commit_piece(engine& e, const std::string& id) {
  for (int attempt = 0;; ++attempt) {
    auto done = e.commit(id);
    if (!waits_for_other_piece(done) || attempt == 10000) return done;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

// Begin + chunks of `chunk` bytes (in order) + commit.
tensorreg::result<commit_response> register_view(engine& e, const begin_request& r, const std::string& bytes,
                                                 std::size_t chunk, std::string* id_out = nullptr) {
  auto begun = e.begin(r);
  if (!begun) return tl::unexpected(begun.error());
  if (id_out != nullptr) *id_out = begun->registration_id;
  for (std::uint64_t at = 0; at < bytes.size(); at += chunk) {
    TENSORREG_TRY(feed_view(e, begun->registration_id, bytes, at, std::min<std::uint64_t>(chunk, bytes.size() - at)));
  }
  return commit_piece(e, begun->registration_id);
}

// A SERVER upload whose view bytes go through the staging memfd (staging_memfd, stable_dram).
begin_request staged_begin(const fixture& f, views::view_request v, std::uint64_t total_size, std::string cgid = "") {
  v.staging_memfd = true;
  auto r = view_begin(f, std::move(v), total_size, std::move(cgid));
  r.plan = stable_dram_options{};
  return r;
}

// The client's fd of the staging memfd a staged Begin handed out.
tensorreg::unique_fd staging_fd(const begin_response& begun) {
  const auto* hs = std::get_if<stable_dram_handshake>(&begun.handshake);
  REQUIRE(hs != nullptr);
  REQUIRE(hs->publish);
  auto fd = hs->publish->memory->duplicate_fd();
  REQUIRE(fd);
  return std::move(*fd);
}

// Writes view bytes [at, at + n) into the staging memfd and reports them.
tensorreg::status stage_view(engine& e, const std::string& id, int fd, const std::string& bytes, std::uint64_t at,
                             std::uint64_t n) {
  REQUIRE(::pwrite(fd, bytes.data() + at, n, static_cast<off_t>(at)) == static_cast<ssize_t>(n));
  feed_request f;
  f.registration_id = id;
  f.payload = stable_write_progress{{{at, n}}, false};
  return e.feed(std::move(f));
}

std::string multihash_of(const std::string& bytes) {
  return tensorreg::hash::encode_multihash(tensorreg::hash::sha256(std::string_view(bytes)));
}

}  // namespace

TEST_CASE("view registration: SERVER transpose on the CPU gives the whole artifact's id and the view record",
          "[views][view_registration]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto f = make_fixture();
  const auto view = transposed_view(f);
  auto begun = e->begin(view_begin(f, transpose_request(), f.index.total_size()));
  REQUIRE_OK(begun);
  CHECK(std::holds_alternative<coalesced_handshake>(begun->handshake));
  // Chunks in random order, cut mid-element, one sent twice (overlapping chunks are fine).
  std::vector<std::pair<std::uint64_t, std::uint64_t>> chunks{{0, 1001}, {1001, 5003}, {6004, 6000}, {2000, 3}};
  chunks.emplace_back(12004, view.size() - 12004);
  std::mt19937 rng(3);
  std::shuffle(chunks.begin(), chunks.end(), rng);
  for (const auto& [at, n] : chunks) REQUIRE_OK(feed_view(*e, begun->registration_id, view, at, n));
  auto done = e->commit(begun->registration_id);
  REQUIRE_OK(done);
  CHECK(done->descriptor.artifact_id == t::expected_mi2(f.index.json(), f.canonical));
  CHECK_FALSE(done->existed);
  REQUIRE(done->view);
  CHECK(done->view->view_id ==
        *tensorreg::identity::compute_view_id(done->view->spec, t::index_multihash_of(f.index.json())));
  CHECK(done->view->kind == views::registration_kind::canonical);
  CHECK(done->view->view_size == view.size());
  CHECK(done->view->data_hash == multihash_of(view));  // one leaf: the view is < 256 MiB
  CHECK(done->view->index_json ==
        R"({"b":[0,96,[48],[1],"torch.float16",0],"w":[96,12288,[48,64],[64,1],"torch.float32",0]})");
  CHECK(done->view->canonical_ranges == std::vector<views::byte_range>{{0, f.index.total_size()}});
  REQUIRE(done->local_stable_tier);
  CHECK(done->local_stable_tier->status == local_stable_status::skipped);
  CHECK(done->local_stable_tier->message == "view registrations do not satisfy the local stable tier");

  // The artifact lists the view, and reads it back.
  auto summary = e->get(done->descriptor.artifact_id);
  REQUIRE_OK(summary);
  CHECK(summary->stable_replica);
  REQUIRE(summary->views.size() == 1);
  CHECK(summary->views[0].view_id == done->view->view_id);
  auto record = e->view_of(done->descriptor.artifact_id, done->view->view_id);
  REQUIRE_OK(record);
  CHECK(record->data_hash == done->view->data_hash);
  auto source = e->open_view(done->descriptor.artifact_id, done->view->view_id);
  REQUIRE_OK(source);
  std::string back(view.size(), '\0');
  REQUIRE_OK((*source)->read(0, std::as_writable_bytes(std::span(back.data(), back.size()))));
  CHECK(back == view);
  CHECK_ERROR(e->view_of(done->descriptor.artifact_id, "bciqnope"), errc::not_found,
              "cannot find view bciqnope of " + done->descriptor.artifact_id + ": no such view");
}

TEST_CASE("view registration: a commit before every view byte came is retryable", "[views][view_registration]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto f = make_fixture();
  const auto view = transposed_view(f);
  auto begun = e->begin(view_begin(f, transpose_request(), f.index.total_size()));
  REQUIRE_OK(begun);
  const auto& id = begun->registration_id;
  REQUIRE_OK(feed_view(*e, id, view, 0, 5000));
  CHECK_ERROR(
      e->commit(id), errc::failed_precondition,
      "cannot commit view registration '" + id + "': view bytes incomplete: view bytes [5000, 12384) were not written");
  // Past the view: OUT_OF_RANGE, nothing recorded.
  feed_request past;
  past.registration_id = id;
  past.payload = view_chunk{0, view.size() - 4, std::string(8, 'x')};
  CHECK_ERROR(e->feed(std::move(past)), errc::out_of_range,
              "cannot feed registration '" + id + "': view bytes [12380, +8) run past the view size 12384");
  feed_request huge;
  huge.registration_id = id;
  huge.payload = view_chunk{0, ~std::uint64_t{0}, std::string(8, 'x')};
  CHECK_CODE(e->feed(std::move(huge)), errc::out_of_range);
  feed_request progress;
  progress.registration_id = id;
  progress.payload = stable_write_progress{{{0, 8}}, false};
  CHECK_ERROR(e->feed(std::move(progress)), errc::failed_precondition,
              "cannot feed registration '" + id +
                  "': stable_dram_write_progress needs a view registration with staging_memfd; this one takes "
                  "view_chunk messages");
  REQUIRE_OK(feed_view(*e, id, view, 5000, view.size() - 5000));
  auto done = e->commit(id);
  REQUIRE_OK(done);
  CHECK(done->descriptor.artifact_id == t::expected_mi2(f.index.json(), f.canonical));
}

TEST_CASE("view registration: Begin refuses what §7 refuses, with its code", "[views][view_registration]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto f = make_fixture();
  SECTION("an empty ViewRegistrationOptions has no registration_kind") {
    auto r = view_begin(f, {}, f.index.total_size());
    r.view.reset();
    CHECK_ERROR(e->begin(r), errc::invalid_argument,
                "cannot register view: registration_kind is required (CANONICAL or PIECE), got 0");
  }
  SECTION("a narrow that does not cover is not CANONICAL") {
    auto v = piece_request(0, 12);
    v.kind = views::registration_kind::canonical;
    v.canonical_size_bytes = 0;
    CHECK_CODE(e->begin(view_begin(f, v, f.index.total_size())), errc::invalid_argument);
  }
  SECTION("a PIECE needs a cgid") {
    CHECK_ERROR(e->begin(view_begin(f, piece_request(0, 12), 96 + 64 * 12 * 4)), errc::invalid_argument,
                "cannot register view: a PIECE needs a client_artifact_id (the cgid of its assembly)");
  }
  SECTION("a PIECE with placement CLIENT is not implemented") {
    auto v = piece_request(0, 12);
    v.place = views::placement::client;
    CHECK_ERROR(e->begin(view_begin(f, v, 96 + 64 * 12 * 4, "cgid:model-a")), errc::unimplemented,
                "cannot register view: a PIECE with placement CLIENT is not implemented; send its view bytes with "
                "placement SERVER");
  }
  SECTION("view_id checked") {
    auto v = transpose_request();
    v.view_id = "bciqnotit";
    auto out = e->begin(view_begin(f, v, f.index.total_size()));
    REQUIRE_FALSE(out);
    CHECK(out.error().code == errc::invalid_argument);
    CHECK_THAT(out.error().message, Catch::StartsWith("cannot register view: view_id does not match view spec"));
  }
  CHECK(e->stats().pending_registrations == 0);
}

TEST_CASE("view registration: CLIENT placement records the view over the uploaded canonical tensors",
          "[views][view_registration]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto f = make_fixture();
  auto v = transpose_request();
  v.place = views::placement::client;
  auto r = view_begin(f, v, f.index.total_size());
  r.plan = stable_dram_options{};
  auto begun = e->begin(r);
  REQUIRE_OK(begun);
  const auto& id = begun->registration_id;
  auto* hs = std::get_if<stable_dram_handshake>(&begun->handshake);
  REQUIRE(hs != nullptr);
  REQUIRE(hs->publish);
  // view_chunk is for SERVER placement only.
  CHECK_ERROR(feed_view(*e, id, f.canonical, 0, 8), errc::failed_precondition,
              "cannot feed registration '" + id +
                  "': view_chunk needs a view registration with placement SERVER; this one has placement CLIENT "
                  "(upload the canonical tensors)");
  std::memcpy(hs->publish->memory->mutable_bytes().data(), f.canonical.data(), f.canonical.size());
  feed_request progress;
  progress.registration_id = id;
  progress.payload = stable_write_progress{{{0, f.canonical.size()}}, true};
  REQUIRE_OK(e->feed(std::move(progress)));
  auto done = e->commit(id);
  REQUIRE_OK(done);
  CHECK(done->descriptor.artifact_id == t::expected_mi2(f.index.json(), f.canonical));
  REQUIRE(done->view);
  CHECK(done->view->data_hash == multihash_of(transposed_view(f)));
  CHECK(done->view->place == views::placement::client);
  auto summary = e->get(done->descriptor.artifact_id);
  REQUIRE_OK(summary);
  CHECK(summary->views.size() == 1);
}

TEST_CASE("view registration: 4 pieces in random order assemble the id of the whole artifact",
          "[views][view_registration]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto f = make_fixture();
  const std::string cgid = "cgid:model-a.tp4";
  std::vector<int> order{0, 1, 2, 3};
  std::mt19937 rng(11);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<std::string> ids(4);
  std::vector<begin_response> begun;
  for (int k = 0; k < 4; ++k) {
    const auto bytes = column_piece(f, k * 12, 12);
    auto b = e->begin(view_begin(f, piece_request(k * 12, 12), bytes.size(), cgid));
    REQUIRE_OK(b);
    ids[static_cast<std::size_t>(k)] = b->registration_id;
    for (std::uint64_t at = 0; at < bytes.size(); at += 1000) {
      REQUIRE_OK(feed_view(*e, b->registration_id, bytes, at, 1000));
    }
  }
  // A fifth piece, begun before the seal, duplicating piece 0.
  const auto extra_bytes = column_piece(f, 0, 12);
  auto extra = e->begin(view_begin(f, piece_request(0, 12), extra_bytes.size(), cgid));
  REQUIRE_OK(extra);
  REQUIRE_OK(feed_view(*e, extra->registration_id, extra_bytes, 0, extra_bytes.size()));

  // Piece 0 began first and claimed b, which every piece holds: a piece that commits before it
  // is told to commit again once piece 0 has, and stays open meanwhile.
  std::deque<int> queue(order.begin(), order.end());
  int waited = 0;
  for (std::size_t n = 0; n < order.size();) {
    const int k = queue.front();
    queue.pop_front();
    auto done = e->commit(ids[static_cast<std::size_t>(k)]);
    if (k != 0 && waits_for_other_piece(done)) {
      CHECK_THAT(done.error().message, Catch::Contains("being written by piece '" + ids[0] + "'"));
      queue.push_back(k);
      ++waited;
      continue;
    }
    REQUIRE_OK(done);
    REQUIRE(done->assembly);
    REQUIRE(done->view);
    CHECK(done->view->kind == views::registration_kind::piece);
    CHECK(done->assembly->pieces == n + 1);
    if (n + 1 < order.size()) {
      CHECK_FALSE(done->assembly->sealed);
      CHECK(done->descriptor.artifact_id == cgid);
      CHECK(done->descriptor.id_kind == tensorreg::identity::id_kind::cgid);
      CHECK_CODE(e->get(cgid), errc::not_found);
    } else {
      CHECK(done->assembly->sealed);
      CHECK(done->assembly->covered_bytes == f.index.total_size());
      CHECK(done->descriptor.artifact_id == t::expected_mi2(f.index.json(), f.canonical));
      CHECK(done->assembly->artifact_id == done->descriptor.artifact_id);
      auto summary = e->get(done->descriptor.artifact_id);
      REQUIRE_OK(summary);
      CHECK(summary->stable_replica);
    }
    ++n;
  }
  CHECK(waited == std::find(order.begin(), order.end(), 0) - order.begin());
  auto status = e->assembly_of(cgid);
  REQUIRE_OK(status);
  CHECK(status->sealed);
  // Sealed: a new piece is refused at Begin, one begun before at Commit.
  const auto mi2 = t::expected_mi2(f.index.json(), f.canonical);
  CHECK_ERROR(e->begin(view_begin(f, piece_request(0, 12), extra_bytes.size(), cgid)), errc::failed_precondition,
              "cannot begin registration: assembly " + cgid + " is already sealed as artifact " + mi2);
  CHECK_ERROR(e->commit(extra->registration_id), errc::failed_precondition,
              "cannot add piece '" + extra->registration_id + "' to assembly " + cgid +
                  ": assembly is already sealed as artifact " + mi2);
}

TEST_CASE("view registration: a piece that ends without a commit gives its claim back", "[views][view_registration]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto f = make_fixture();
  const std::string cgid = "cgid:model-f.tp2";
  const auto first_bytes = column_piece(f, 0, 24);
  auto first = e->begin(view_begin(f, piece_request(0, 24), first_bytes.size(), cgid));
  REQUIRE_OK(first);
  // Other bytes than the model's, half of them, then the abort: none of it may stay.
  const std::string garbage(first_bytes.size(), '\x3c');
  REQUIRE_OK(feed_view(*e, first->registration_id, garbage, 0, garbage.size() / 2));
  const auto second_bytes = column_piece(f, 24, 24);
  auto second = e->begin(view_begin(f, piece_request(24, 24), second_bytes.size(), cgid));
  REQUIRE_OK(second);
  REQUIRE_OK(feed_view(*e, second->registration_id, second_bytes, 0, second_bytes.size()));
  // b is in the first piece's claim.
  auto early = e->commit(second->registration_id);
  CHECK(waits_for_other_piece(early));
  REQUIRE_OK(e->abort(first->registration_id));
  auto added = e->commit(second->registration_id);  // the same registration: it stayed open
  REQUIRE_OK(added);
  CHECK_FALSE(added->assembly->sealed);
  auto last = register_view(*e, view_begin(f, piece_request(0, 24), first_bytes.size(), cgid), first_bytes, 1000);
  REQUIRE_OK(last);
  CHECK(last->assembly->sealed);
  CHECK(last->descriptor.artifact_id == t::expected_mi2(f.index.json(), f.canonical));
}

TEST_CASE("view registration: a piece that streams all its bytes hashes its view from the assembly",
          "[views][view_registration]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto f = make_fixture();
  const std::string cgid = "cgid:model-g.tp2";
  // The first piece claims every byte it has (nothing else is there): it keeps no staging copy.
  // Its chunks overlap (the view hash then starts again from the bytes in the assembly).
  const auto first_bytes = column_piece(f, 0, 24);
  auto first = e->begin(view_begin(f, piece_request(0, 24), first_bytes.size(), cgid));
  REQUIRE_OK(first);
  REQUIRE_OK(feed_view(*e, first->registration_id, first_bytes, 0, 3000));
  REQUIRE_OK(feed_view(*e, first->registration_id, first_bytes, 2000, first_bytes.size() - 2000));
  auto one = e->commit(first->registration_id);
  REQUIRE_OK(one);
  CHECK(one->view->data_hash == multihash_of(first_bytes));
  CHECK_FALSE(one->assembly->sealed);
  const auto second_bytes = column_piece(f, 24, 24);
  auto two = register_view(*e, view_begin(f, piece_request(24, 24), second_bytes.size(), cgid), second_bytes, 1000);
  REQUIRE_OK(two);
  CHECK(two->view->data_hash == multihash_of(second_bytes));
  CHECK(two->assembly->sealed);
  CHECK(two->descriptor.artifact_id == t::expected_mi2(f.index.json(), f.canonical));
  // In order, without overlaps: the same view hash, carried as the chunks land.
  auto again = register_view(*e, view_begin(f, piece_request(0, 24), first_bytes.size(), "cgid:model-g.again"),
                             first_bytes, 1000);
  REQUIRE_OK(again);
  CHECK(again->view->data_hash == multihash_of(first_bytes));
}

TEST_CASE("view registration: a piece whose shared bytes differ is ABORTED naming both pieces",
          "[views][view_registration]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto f = make_fixture();
  const std::string cgid = "cgid:model-b";
  std::string first_id;
  std::string second_id;
  auto first = register_view(*e, view_begin(f, piece_request(0, 24), 96 + 64 * 24 * 4, cgid), column_piece(f, 0, 24),
                             4096, &first_id);
  REQUIRE_OK(first);
  auto bad = column_piece(f, 24, 24);
  bad[10] = static_cast<char>(bad[10] ^ 0x11);  // b, shared with the first piece
  auto second = register_view(*e, view_begin(f, piece_request(24, 24), bad.size(), cgid), bad, 4096, &second_id);
  CHECK_ERROR(second, errc::aborted,
              "cannot add piece '" + second_id + "' to assembly " + cgid +
                  ": its byte at canonical offset 10 (view offset 10) differs from piece '" + first_id +
                  "', which wrote it first");
  // The conflicting piece changed nothing: the right one completes the assembly.
  auto third = register_view(*e, view_begin(f, piece_request(24, 24), bad.size(), cgid), column_piece(f, 24, 24), 4096);
  REQUIRE_OK(third);
  CHECK(third->descriptor.artifact_id == t::expected_mi2(f.index.json(), f.canonical));
}

TEST_CASE("view registration: an assembly whose pieces stop arriving expires with their TTL",
          "[views][view_registration]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto f = make_fixture();
  const std::string cgid = "cgid:model-c";
  auto r = view_begin(f, piece_request(0, 24), 96 + 64 * 24 * 4, cgid);
  r.ttl_ms = 1000;
  auto first = register_view(*e, r, column_piece(f, 0, 24), 4096);
  REQUIRE_OK(first);
  REQUIRE(first->assembly);
  CHECK(first->assembly->expires_in == std::chrono::milliseconds(1000));
  REQUIRE_OK(e->assembly_of(cgid));
  clock.advance(std::chrono::milliseconds(999));
  e->sweep();
  // Listed while open (it has no artifact yet), with what is left of its TTL.
  const auto listed = e->assemblies();
  REQUIRE(listed.size() == 1);
  CHECK(listed[0].cgid == cgid);
  CHECK(listed[0].pieces == 1);
  CHECK_FALSE(listed[0].sealed);
  CHECK(listed[0].artifact_id.empty());
  CHECK(listed[0].covered_bytes == 96 + 64 * 24 * 4);  // b whole, half of w
  CHECK(listed[0].canonical_size == f.index.total_size());
  CHECK(listed[0].expires_in == std::chrono::milliseconds(1));
  clock.advance(std::chrono::milliseconds(2));
  e->sweep();
  CHECK_ERROR(e->assembly_of(cgid), errc::not_found, "cannot find assembly " + cgid + ": no piece of it is held here");
  CHECK(e->assemblies().empty());
  // A new assembly starts from nothing: one piece does not seal it.
  auto again =
      register_view(*e, view_begin(f, piece_request(24, 24), 96 + 64 * 24 * 4, cgid), column_piece(f, 24, 24), 4096);
  REQUIRE_OK(again);
  REQUIRE(again->assembly);
  CHECK_FALSE(again->assembly->sealed);
  CHECK(again->assembly->pieces == 1);
}

TEST_CASE("view registration: 8 pieces committed from 8 threads seal once, with the whole id",
          "[views][view_registration][concurrency]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto f = make_fixture();
  const std::string cgid = "cgid:model-d.tp8";
  std::vector<tensorreg::result<commit_response>> results(8,
                                                          tl::unexpected(tensorreg::error{errc::internal, "not run"}));
  std::vector<std::thread> threads;
  for (int k = 0; k < 8; ++k) {
    threads.emplace_back([&, k] {
      const auto bytes = column_piece(f, k * 6, 6);
      results[static_cast<std::size_t>(k)] =
          register_view(*e, view_begin(f, piece_request(k * 6, 6), bytes.size(), cgid), bytes, 777);
    });
  }
  for (auto& th : threads) th.join();
  // Exactly one commit completed the buffer and answers the mi2 id; the others answer the cgid.
  // Each answers the assembly as its own piece left it: the counts are 1..8, the 8th sealed.
  int sealed = 0;
  std::vector<std::uint32_t> counts;
  for (const auto& r : results) {
    REQUIRE_OK(r);
    REQUIRE(r->assembly);
    counts.push_back(r->assembly->pieces);
    CHECK(r->assembly->sealed == (r->assembly->pieces == 8));
    if (r->descriptor.id_kind == tensorreg::identity::id_kind::mi2) {
      ++sealed;
      CHECK(r->descriptor.artifact_id == t::expected_mi2(f.index.json(), f.canonical));
    } else {
      CHECK(r->descriptor.artifact_id == cgid);
    }
  }
  CHECK(sealed == 1);
  std::sort(counts.begin(), counts.end());
  CHECK(counts == std::vector<std::uint32_t>{1, 2, 3, 4, 5, 6, 7, 8});
  auto status = e->assembly_of(cgid);
  REQUIRE_OK(status);
  CHECK(status->sealed);
  CHECK(status->pieces == 8);
}

TEST_CASE("view registration: a piece's PAD reads as zero in its view hash, whatever the client sent",
          "[views][view_registration]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto f = make_fixture();
  // b[0:47] (94 bytes), 2 bytes of PAD, then w[:, 0:12] at view offset 96.
  views::view_request v = piece_request(0, 12);
  v.tensor_names.clear();
  v.spec["b"] = {narrow_op{0, 0, 47}};
  std::string zeroed = f.canonical.substr(0, 94) + std::string(2, '\0') + column_piece(f, 0, 12).substr(cols * 2);
  std::string sent = zeroed;
  sent[94] = '\xFF';
  sent[95] = '\x7F';
  // In two chunks, the PAD at the end of the first, the second first.
  auto begun = e->begin(view_begin(f, v, sent.size(), "cgid:model-pad.tp"));
  REQUIRE_OK(begun);
  REQUIRE_OK(feed_view(*e, begun->registration_id, sent, 96, sent.size() - 96));
  REQUIRE_OK(feed_view(*e, begun->registration_id, sent, 0, 96));
  auto done = e->commit(begun->registration_id);
  REQUIRE_OK(done);
  REQUIRE(done->view);
  CHECK(done->view->data_hash == multihash_of(zeroed));
}

TEST_CASE("view registration: view bytes through a staging memfd give what chunks give", "[views][view_registration]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto f = make_fixture();
  const auto view = transposed_view(f);
  auto chunks_engine = t::make_engine(clock);
  auto chunked = register_view(*chunks_engine, view_begin(f, transpose_request(), f.index.total_size()), view, 1000);
  REQUIRE_OK(chunked);

  auto begun = e->begin(staged_begin(f, transpose_request(), f.index.total_size()));
  REQUIRE_OK(begun);
  const auto& id = begun->registration_id;
  auto fd = staging_fd(*begun);
  struct stat st {};
  REQUIRE(::fstat(fd.get(), &st) == 0);
  CHECK(static_cast<std::uint64_t>(st.st_size) == view.size());
  // Ranges in any order, cut mid-element, bytes reported twice.
  for (const auto& [at, n] : std::vector<std::pair<std::uint64_t, std::uint64_t>>{
           {100, 50}, {8192, view.size() - 8192}, {0, 4096}, {4096, 4096}}) {
    REQUIRE_OK(stage_view(*e, id, fd.get(), view, at, n));
  }
  // Copied out as reported: the client's pages wholly inside the ranges are given back; the
  // view's last page, partly past its end, stays.
  REQUIRE(::fstat(fd.get(), &st) == 0);
  CHECK(st.st_blocks * 512 <= 4096);
  auto done = e->commit(id);
  REQUIRE_OK(done);
  CHECK(done->descriptor.artifact_id == chunked->descriptor.artifact_id);
  CHECK(done->descriptor.artifact_id == t::expected_mi2(f.index.json(), f.canonical));
  REQUIRE(done->view);
  CHECK(done->view->view_id == chunked->view->view_id);
  CHECK(done->view->data_hash == multihash_of(view));
  // Past the memfd's end nothing can be written; the registration is gone anyway.
  CHECK(::pwrite(fd.get(), "x", 1, static_cast<off_t>(view.size())) == -1);
}

TEST_CASE("view registration: pieces through staging memfds assemble the whole id, whatever the client writes later",
          "[views][view_registration]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto f = make_fixture();
  const std::string cgid = "cgid:model-staged.tp4";
  std::vector<std::string> ids;
  std::vector<tensorreg::unique_fd> fds;
  for (int k = 0; k < 4; ++k) {
    const auto bytes = column_piece(f, k * 12, 12);
    auto b = e->begin(staged_begin(f, piece_request(k * 12, 12), bytes.size(), cgid));
    REQUIRE_OK(b);
    ids.push_back(b->registration_id);
    fds.push_back(staging_fd(*b));
    REQUIRE_OK(stage_view(*e, ids.back(), fds.back().get(), bytes, 0, bytes.size() / 2));
    REQUIRE_OK(stage_view(*e, ids.back(), fds.back().get(), bytes, bytes.size() / 2, bytes.size() - bytes.size() / 2));
    // The daemon copied what was reported: what the client writes there now counts for nothing.
    const std::string junk(bytes.size(), 'j');
    REQUIRE(::pwrite(fds.back().get(), junk.data(), junk.size(), 0) == static_cast<ssize_t>(junk.size()));
  }
  tensorreg::result<commit_response> last = tl::unexpected(tensorreg::error{errc::internal, "no commit"});
  for (const auto& id : ids) {
    last = commit_piece(*e, id);
    REQUIRE_OK(last);
  }
  REQUIRE(last->assembly);
  CHECK(last->assembly->sealed);
  CHECK(last->descriptor.artifact_id == t::expected_mi2(f.index.json(), f.canonical));
}

TEST_CASE("view registration: a staging memfd is for SERVER uploads of the stable_dram plan",
          "[views][view_registration]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto f = make_fixture();
  SECTION("CLIENT placement") {
    auto v = transpose_request();
    v.place = views::placement::client;
    CHECK_ERROR(e->begin(staged_begin(f, v, f.index.total_size())), errc::invalid_argument,
                "cannot register view: staging_memfd needs placement SERVER (with CLIENT placement the plan's own "
                "buffer takes the canonical tensors)");
  }
  SECTION("another plan") {
    auto r = staged_begin(f, transpose_request(), f.index.total_size());
    r.plan = coalesced_options{};
    CHECK_ERROR(e->begin(r), errc::invalid_argument,
                "cannot register view: staging_memfd needs the stable_dram plan, whose handshake carries the memfd");
  }
  SECTION("ranges past the view") {
    auto begun = e->begin(staged_begin(f, transpose_request(), f.index.total_size()));
    REQUIRE_OK(begun);
    const auto& id = begun->registration_id;
    const std::uint64_t size = f.index.total_size();
    for (const auto& [at, n] : std::vector<std::pair<std::uint64_t, std::uint64_t>>{
             {size - 4, 8}, {~std::uint64_t{0}, 8}, {8, ~std::uint64_t{0}}}) {
      feed_request progress;
      progress.registration_id = id;
      progress.payload = stable_write_progress{{{0, 8}, {at, n}}, false};
      CHECK_ERROR(e->feed(std::move(progress)), errc::out_of_range,
                  "cannot feed registration '" + id + "': view bytes [" + std::to_string(at) + ", +" +
                      std::to_string(n) + ") run past the view size " + std::to_string(size));
    }
    REQUIRE_OK(e->abort(id));
  }
  CHECK(e->stats().pending_registrations == 0);
}
