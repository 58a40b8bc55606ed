// View registration end to end (registration.md §7): the real tensorregd, driven by hand-made
// protobuf frames over its socket (client/raw_connection).
#include "client/raw_connection.hpp"

#include <catch2/catch.hpp>

#include <unistd.h>

#include <algorithm>
#include <random>

#include "support/daemon_process.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/identity/content_id.hpp"
#include "tensorreg/index/canonical_index.hpp"

namespace {

namespace wire = tensorreg::wire::v1;
namespace v2 = tensorcast::daemon::v2;
using tensorreg::errc;
using client = tensorreg::client::raw::connection;
using tensorreg::testing::daemon_process;

// b: bfloat16 [40] at 0; w: float32 [32, 40] at 80 (names in byte order). Total 5200 bytes.
constexpr std::int64_t rows = 32;
constexpr std::int64_t cols = 40;

struct model {
  std::string index_json;
  std::string canonical;
  std::string mi2;  // of the whole artifact, computed offline
};

model make_model() {
  std::vector<tensorreg::index::tensor_desc> tensors{
      {"w", "torch.float32", {rows, cols}, {cols, 1}, "w", rows * cols * 4, 0},
      {"b", "torch.bfloat16", {cols}, {1}, "b", cols * 2, 0}};
  auto idx = tensorreg::index::canonical_index::build(tensors).value();
  model m;
  m.index_json = idx.json();
  std::mt19937 rng(5);
  for (std::uint64_t i = 0; i < idx.total_size(); ++i) m.canonical.push_back(static_cast<char>(rng() & 0xFF));
  tensorreg::thread_pool pool(1);
  const tensorreg::memory::host_bytes_view bytes(std::as_bytes(std::span(m.canonical.data(), m.canonical.size())));
  m.mi2 = tensorreg::identity::content_id(m.index_json, bytes, &pool).value().to_string();
  return m;
}

constexpr std::int64_t w_at = cols * 2;

std::string b_bytes(const model& m) { return m.canonical.substr(0, cols * 2); }

// b, then w^T.
std::string transposed(const model& m) {
  std::string out = b_bytes(m);
  for (std::int64_t j = 0; j < cols; ++j) {
    for (std::int64_t i = 0; i < rows; ++i)
      out += m.canonical.substr(static_cast<std::size_t>(w_at + (i * cols + j) * 4), 4);
  }
  return out;
}

// b, then w[:, c0:c0+n].
std::string columns(const model& m, std::int64_t c0, std::int64_t n) {
  std::string out = b_bytes(m);
  for (std::int64_t i = 0; i < rows; ++i)
    out += m.canonical.substr(static_cast<std::size_t>(w_at + (i * cols + c0) * 4), static_cast<std::size_t>(n * 4));
  return out;
}

wire::Request begin(const model& m, std::uint64_t total_size, const std::string& cgid) {
  wire::Request r;
  auto* b = r.mutable_begin_register_artifact();
  b->set_owner_pid(::getpid());
  b->set_total_size(total_size);
  b->mutable_tensor_index_data()->set_data(m.index_json);
  b->mutable_tensor_index_data()->set_schema_version("v3");
  b->mutable_tensor_index_data()->set_encoding("json");
  b->mutable_coalesced();
  if (!cgid.empty()) b->set_client_artifact_id(cgid);
  b->mutable_view()->add_tensor_names("b");
  b->mutable_view()->set_placement(v2::TRANSFORM_PLACEMENT_SERVER);
  return r;
}

wire::Request transpose_begin(const model& m) {
  auto r = begin(m, m.canonical.size(), "");
  auto* v = r.mutable_begin_register_artifact()->mutable_view();
  auto* t = (*v->mutable_spec()->mutable_tensors())["w"].add_ops()->mutable_transpose();
  t->set_dim0(0);
  t->set_dim1(1);
  v->set_registration_kind(v2::VIEW_REGISTRATION_KIND_CANONICAL);
  return r;
}

wire::Request piece_begin(const model& m, std::int64_t c0, std::int64_t n, const std::string& cgid) {
  auto r = begin(m, static_cast<std::uint64_t>(cols * 2 + rows * n * 4), cgid);
  auto* v = r.mutable_begin_register_artifact()->mutable_view();
  auto* narrow = (*v->mutable_spec()->mutable_tensors())["w"].add_ops()->mutable_narrow();
  narrow->set_dim(1);
  narrow->set_start(c0);
  narrow->set_length(static_cast<std::uint64_t>(n));
  v->set_registration_kind(v2::VIEW_REGISTRATION_KIND_PIECE);
  v->set_canonical_size_bytes(m.canonical.size());
  return r;
}

// Begin, the view bytes in chunks of `chunk` (one Feed stream), Commit.
tensorreg::result<v2::CommitRegisteredArtifactResponse> register_view(client& c, wire::Request b,
                                                                      const std::string& bytes, std::size_t chunk,
                                                                      std::string* id = nullptr) {
  TENSORREG_TRY_ASSIGN(auto begun, c.call(std::move(b)));
  const auto reg_id = begun.response.begin_register_artifact().registration_id();
  if (id != nullptr) *id = reg_id;
  std::vector<v2::FeedRegisterArtifactStreamRequest> frames;
  for (std::size_t at = 0; at < bytes.size(); at += chunk) {
    v2::FeedRegisterArtifactStreamRequest f;
    f.set_registration_id(reg_id);
    f.mutable_view_chunk()->set_view_offset(at);
    f.mutable_view_chunk()->set_data(bytes.substr(at, chunk));
    frames.push_back(std::move(f));
  }
  TENSORREG_TRY(c.feed(std::move(frames)));
  wire::Request commit;
  commit.mutable_commit_registered_artifact()->set_registration_id(reg_id);
  TENSORREG_TRY_ASSIGN(auto done, c.call(std::move(commit)));
  return done.response.commit_registered_artifact();
}

std::unique_ptr<client> connect(const daemon_process& d) {
  auto c = client::connect(d.socket_path());
  REQUIRE(c);
  return std::move(*c);
}

}  // namespace

TEST_CASE("tensorregd views: SERVER transpose commits the whole artifact's id and serves the view",
          "[views][view_daemon][e2e]") {
  daemon_process d;
  auto c = connect(d);
  const auto m = make_model();
  const auto view = transposed(m);
  auto done = register_view(*c, transpose_begin(m), view, 777);
  REQUIRE(done);
  CHECK(done->artifact_descriptor().artifact_id() == m.mi2);
  CHECK(done->registration_kind() == v2::VIEW_REGISTRATION_KIND_CANONICAL);
  CHECK(done->view_index_json() ==
        R"({"b":[0,80,[40],[1],"torch.bfloat16",0],"w":[80,5120,[40,32],[32,1],"torch.float32",0]})");
  CHECK(done->view_data_hash() == tensorreg::hash::encode_multihash(tensorreg::hash::sha256(std::string_view(view))));
  REQUIRE(done->canonical_ranges_size() == 1);
  CHECK(done->canonical_ranges(0).length() == m.canonical.size());
  CHECK(done->local_stable_tier().status() == v2::LOCAL_STABLE_TIER_STATUS_SKIPPED);
  CHECK_FALSE(done->view_id().empty());

  // GetArtifactIndexById answers the view by id; ListArtifacts lists it.
  wire::Request get;
  get.mutable_get_artifact_index_by_id()->set_artifact_id(m.mi2);
  get.mutable_get_artifact_index_by_id()->set_view_id(done->view_id());
  auto got = c->call(get);
  REQUIRE(got);
  const auto& v = got->response.get_artifact_index_by_id().view();
  CHECK(v.view_id() == done->view_id());
  CHECK(v.view_data_hash() == done->view_data_hash());
  CHECK(v.spec().tensors().at("w").ops(0).has_transpose());
  CHECK(v.view_size() == view.size());
  get.mutable_get_artifact_index_by_id()->set_view_id("bciqnone");
  auto missing = c->call(get);
  REQUIRE_FALSE(missing);
  CHECK(missing.error().code == errc::not_found);
  wire::Request list;
  list.mutable_list_artifacts();
  auto listed = c->call(list);
  REQUIRE(listed);
  REQUIRE(listed->response.list_artifacts().artifacts_size() == 1);
  CHECK(listed->response.list_artifacts().artifacts(0).views_size() == 1);
}

TEST_CASE("tensorregd views: a SERVER narrow is a piece, and 4 pieces in random order seal the whole id",
          "[views][view_daemon][e2e]") {
  daemon_process d;
  auto c = connect(d);
  const auto m = make_model();
  const std::string cgid = "cgid:e2e-model.tp4";
  std::vector<int> order{0, 1, 2, 3};
  std::mt19937 rng(17);
  std::shuffle(order.begin(), order.end(), rng);
  for (std::size_t n = 0; n < order.size(); ++n) {
    const auto k = order[n];
    auto done = register_view(*c, piece_begin(m, k * 10, 10, cgid), columns(m, k * 10, 10), 1000);
    REQUIRE(done);
    CHECK(done->registration_kind() == v2::VIEW_REGISTRATION_KIND_PIECE);
    CHECK(done->assembly().cgid() == cgid);
    CHECK(done->assembly().pieces() == n + 1);
    if (n == 0) {
      // b whole, and 10 of 40 columns of each row of w (the first row's touches b when k is 0).
      CHECK(done->canonical_ranges_size() == rows + (k == 0 ? 0 : 1));
      CHECK(done->artifact_descriptor().artifact_id() == cgid);
    }
    CHECK(done->assembly().sealed() == (n + 1 == order.size()));
    if (n + 1 == order.size()) {
      CHECK(done->artifact_descriptor().artifact_id() == m.mi2);
      CHECK(done->assembly().artifact_id() == m.mi2);
    }
  }
  // Sealed: another piece is FAILED_PRECONDITION at Begin.
  auto late = c->call(piece_begin(m, 0, 10, cgid));
  REQUIRE_FALSE(late);
  CHECK(late.error().code == errc::failed_precondition);
  CHECK(late.error().message ==
        "cannot begin registration: assembly " + cgid + " is already sealed as artifact " + m.mi2);
}

TEST_CASE("tensorregd views: a piece whose shared bytes differ is ABORTED", "[views][view_daemon][e2e]") {
  daemon_process d;
  auto c = connect(d);
  const auto m = make_model();
  const std::string cgid = "cgid:e2e-conflict";
  std::string first;
  REQUIRE(register_view(*c, piece_begin(m, 0, 20, cgid), columns(m, 0, 20), 4096, &first));
  auto bad = columns(m, 20, 20);
  bad[3] = static_cast<char>(bad[3] ^ 1);
  std::string second;
  auto refused = register_view(*c, piece_begin(m, 20, 20, cgid), bad, 4096, &second);
  REQUIRE_FALSE(refused);
  CHECK(refused.error().code == errc::aborted);
  CHECK(refused.error().message == "cannot add piece '" + second + "' to assembly " + cgid +
                                       ": its byte at canonical offset 3 (view offset 3) differs from piece '" + first +
                                       "', which wrote it first");
}

TEST_CASE("tensorregd views: CLIENT placement uploads canonical bytes and refuses a view_chunk",
          "[views][view_daemon][e2e]") {
  daemon_process d;
  auto c = connect(d);
  const auto m = make_model();
  auto b = transpose_begin(m);
  b.mutable_begin_register_artifact()->mutable_stable_dram();
  b.mutable_begin_register_artifact()->mutable_view()->set_placement(v2::TRANSFORM_PLACEMENT_CLIENT);
  auto begun = c->call(b);
  REQUIRE(begun);
  REQUIRE(begun->fds.size() == 1);
  const auto reg_id = begun->response.begin_register_artifact().registration_id();
  v2::FeedRegisterArtifactStreamRequest chunk;
  chunk.set_registration_id(reg_id);
  chunk.mutable_view_chunk()->set_data("12345678");
  auto refused = c->feed({chunk});
  REQUIRE_FALSE(refused);
  CHECK(refused.error().code == errc::failed_precondition);
  CHECK_THAT(refused.error().message, Catch::Contains("view_chunk needs a view registration with placement SERVER"));
  REQUIRE(::pwrite(begun->fds[0].get(), m.canonical.data(), m.canonical.size(), 0) ==
          static_cast<ssize_t>(m.canonical.size()));
  v2::FeedRegisterArtifactStreamRequest progress;
  progress.set_registration_id(reg_id);
  auto* range = progress.mutable_stable_dram_write_progress()->add_ranges();
  range->set_canonical_offset(0);
  range->set_length(m.canonical.size());
  progress.mutable_stable_dram_write_progress()->set_upload_complete(true);
  REQUIRE(c->feed({progress}));
  wire::Request commit;
  commit.mutable_commit_registered_artifact()->set_registration_id(reg_id);
  auto done = c->call(commit);
  REQUIRE(done);
  const auto& r = done->response.commit_registered_artifact();
  CHECK(r.artifact_descriptor().artifact_id() == m.mi2);
  CHECK(r.view_data_hash() ==
        tensorreg::hash::encode_multihash(tensorreg::hash::sha256(std::string_view(transposed(m)))));
  CHECK(r.registration_kind() == v2::VIEW_REGISTRATION_KIND_CANONICAL);
}

TEST_CASE("tensorregd views: an Op with neither narrow nor transpose is INVALID_ARGUMENT",
          "[views][view_daemon][e2e]") {
  daemon_process d;
  auto c = connect(d);
  const auto m = make_model();
  auto b = transpose_begin(m);
  (*b.mutable_begin_register_artifact()->mutable_view()->mutable_spec()->mutable_tensors())["w"].add_ops();
  auto out = c->call(b);
  REQUIRE_FALSE(out);
  CHECK(out.error().code == errc::invalid_argument);
  CHECK(out.error().message == "cannot register view: tensor 'w': op 1 sets neither narrow nor transpose");
}
