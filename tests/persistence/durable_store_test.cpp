#include "tensorreg/persistence/durable_store.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cerrno>
#include <filesystem>
#include <fstream>

#include "support/engine_helpers.hpp"
#include "support/temp_dir.hpp"
#include "tensorreg/common/fault_injection.hpp"
#include "tensorreg/hash/fingerprint.hpp"
#include "tensorreg/hash/tree_hash.hpp"

namespace {

namespace fs = std::filesystem;
using tensorreg::errc;
using tensorreg::fault_site;
using tensorreg::scoped_fault;
using tensorreg::persistence::artifact_record;
using tensorreg::persistence::durable_store;
using tensorreg::testing::owned_bytes;
using tensorreg::testing::temp_dir;

// One tensor of `n` bytes (n a multiple of 4), its canonical index, bytes and record.
struct artifact {
  tensorreg::index::canonical_index index;
  std::string bytes;
  artifact_record record;
};

artifact make_artifact(std::size_t n, std::uint32_t seed) {
  const std::string json =
      "{\"w\":[0," + std::to_string(n) + ",[" + std::to_string(n / 4) + "],[1],\"torch.float32\",0]}";
  auto idx = tensorreg::index::canonical_index::parse(json, n);
  REQUIRE(idx);
  artifact a{std::move(*idx), tensorreg::testing::pattern(n, seed), {}};
  a.record.artifact_id = tensorreg::testing::expected_mi2(a.index.json(), a.bytes);
  a.record.id_kind = "MI2";
  a.record.index_multihash = tensorreg::testing::index_multihash_of(a.index.json());
  a.record.data_multihash = a.record.artifact_id.substr(a.record.artifact_id.rfind(':') + 1);
  a.record.total_size = n;
  return a;
}

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

std::vector<std::string> names_in(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

constexpr std::size_t kNine = std::size_t{9} << 20;  // three leaves, the last short

}  // namespace

TEST_CASE("durable_store: a written artifact survives reopening and loads byte for byte",
          "[persistence][durable_store]") {
  temp_dir dir;
  const auto root = (dir.path() / "persist").string();
  auto a = make_artifact(kNine + 4, 7);
  {
    auto store = durable_store::open(root);
    REQUIRE(store);
    CHECK(fs::status(root).permissions() == fs::perms::owner_all);
    REQUIRE((*store)->write(a.record, a.index, owned_bytes(a.bytes)));
    CHECK((*store)->contains(a.record.artifact_id));
  }
  const auto name = durable_store::directory_name(a.record.artifact_id);
  CHECK(names_in(root) == std::vector<std::string>{name, "quarantine"});
  CHECK(names_in(fs::path(root) / name) == std::vector<std::string>{"MANIFEST", "data.bin", "index.json"});
  CHECK(read_all(fs::path(root) / name / "data.bin") == a.bytes);

  auto store = durable_store::open(root);
  REQUIRE(store);
  auto listed = (*store)->list();
  REQUIRE(listed.size() == 1);
  CHECK(listed[0].record.artifact_id == a.record.artifact_id);
  CHECK(listed[0].leaves.size() == 3);
  CHECK(listed[0].index->json() == a.index.json());
  std::string back(a.bytes.size(), '\0');
  REQUIRE((*store)->load(a.record.artifact_id, std::as_writable_bytes(std::span(back.data(), back.size()))));
  CHECK(back == a.bytes);
  CHECK((*store)->verify(a.record.artifact_id));
  // Writing it again is a no-op.
  CHECK((*store)->write(a.record, a.index, owned_bytes(a.bytes)));
  // Chunks smaller than a leaf read and check the same.
  tensorreg::persistence::store_options small;
  small.chunk_bytes = std::uint64_t{1} << 20;
  auto chunked = durable_store::open(root, small);
  REQUIRE(chunked);
  CHECK((*chunked)->verify(a.record.artifact_id));
  std::string again(a.bytes.size(), '\0');
  REQUIRE((*chunked)->load(a.record.artifact_id, std::as_writable_bytes(std::span(again.data(), again.size()))));
  CHECK(again == a.bytes);
}

TEST_CASE("durable_store: a load reads its chunks in parallel rounds, and a failed read ends it",
          "[persistence][durable_store][concurrency]") {
  temp_dir dir;
  const auto root = dir.path().string();
  auto a = make_artifact(kNine + 4, 11);  // ten 1 MiB chunks, the last 4 bytes
  {
    auto store = durable_store::open(root);
    REQUIRE(store);
    REQUIRE((*store)->write(a.record, a.index, owned_bytes(a.bytes)));
  }
  for (const unsigned readers : {1u, 3u, 4u, 16u}) {
    DYNAMIC_SECTION(readers << " readers") {
      tensorreg::persistence::store_options o;
      o.chunk_bytes = std::uint64_t{1} << 20;
      o.load_readers = readers;
      auto store = durable_store::open(root, o);
      REQUIRE(store);
      std::string back(a.bytes.size(), '\0');
      REQUIRE((*store)->load(a.record.artifact_id, std::as_writable_bytes(std::span(back.data(), back.size()))));
      CHECK(back == a.bytes);
      // One read failing, in any round, fails the load with its reason and keeps the copy.
      scoped_fault f(fault_site::read, EIO, 5, 1);
      auto failed = (*store)->load(a.record.artifact_id, std::as_writable_bytes(std::span(back.data(), back.size())));
      REQUIRE_FALSE(failed);
      CHECK(f.fired() == 1);
      CHECK_THAT(failed.error().message, Catch::Contains("data.bin': Input/output error"));
      CHECK((*store)->contains(a.record.artifact_id));
    }
  }
}

TEST_CASE("durable_store: bytes that do not hash to the id are refused and leave nothing",
          "[persistence][durable_store]") {
  temp_dir dir;
  auto store = durable_store::open(dir.path().string());
  REQUIRE(store);
  auto a = make_artifact(4096, 1);
  auto other = tensorreg::testing::pattern(4096, 2);
  auto wrote = (*store)->write(a.record, a.index, owned_bytes(other));
  REQUIRE_FALSE(wrote);
  CHECK(wrote.error().code == errc::data_loss);
  CHECK(wrote.error().message ==
        "cannot persist " + a.record.artifact_id + ": the bytes written do not hash to its data multihash");
  CHECK(names_in(dir.path()) == std::vector<std::string>{"quarantine"});
}

TEST_CASE("durable_store: a failing system call ends the write with its reason and leaves nothing visible",
          "[persistence][durable_store]") {
  temp_dir dir;
  auto store = durable_store::open(dir.path().string());
  REQUIRE(store);
  auto a = make_artifact(kNine, 3);
  struct fault_case {
    fault_site site;
    int error;
    std::uint64_t skip;
    errc code;
    std::string text;
  };
  // skip counts earlier calls of the same site: write 0 is index.json, write 1 the data.
  const std::vector<fault_case> cases{
      {fault_site::open, EACCES, 1, errc::unavailable, "cannot open '"},
      {fault_site::write, ENOSPC, 1, errc::resource_exhausted, "data.bin': No space left on device"},
      {fault_site::write, ENOSPC, 2, errc::resource_exhausted, "MANIFEST': No space left on device"},
      {fault_site::fsync, EIO, 1, errc::unavailable, "cannot fsync '"},
      {fault_site::rename, EIO, 0, errc::unavailable, "cannot rename '"},
  };
  for (const auto& c : cases) {
    DYNAMIC_SECTION("fault at " << tensorreg::to_string(c.site) << " after " << c.skip) {
      scoped_fault f(c.site, c.error, c.skip, 1);
      auto wrote = (*store)->write(a.record, a.index, owned_bytes(a.bytes));
      REQUIRE_FALSE(wrote);
      CHECK(f.fired() == 1);
      CHECK(wrote.error().code == c.code);
      CHECK_THAT(wrote.error().message,
                 Catch::StartsWith("cannot persist " + a.record.artifact_id + ": ") && Catch::Contains(c.text));
      CHECK_FALSE((*store)->contains(a.record.artifact_id));
      CHECK(names_in(dir.path()) == std::vector<std::string>{"quarantine"});
    }
  }
  // And once the disk behaves again, the same write succeeds.
  REQUIRE((*store)->write(a.record, a.index, owned_bytes(a.bytes)));
  CHECK((*store)->contains(a.record.artifact_id));
}

TEST_CASE("durable_store: a flipped byte is DATA_LOSS naming the leaf, and the copy is quarantined",
          "[persistence][durable_store]") {
  temp_dir dir;
  auto a = make_artifact(kNine, 5);
  const auto name = durable_store::directory_name(a.record.artifact_id);
  tensorreg::persistence::store_options options;
  std::string check = "XXH3-128";
  SECTION("load, checking XXH3-128") {}
  SECTION("load, checking SHA-256") {
    options.load_check = tensorreg::persistence::leaf_check_kind::sha256;
    check = "SHA-256";
  }
  auto store = durable_store::open(dir.path().string(), options);
  REQUIRE(store);
  REQUIRE((*store)->write(a.record, a.index, owned_bytes(a.bytes)));
  {
    std::fstream f(dir.path() / name / "data.bin", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp((std::int64_t{4} << 20) + 17);  // in leaf 1
    f.put(static_cast<char>(a.bytes[(std::size_t{4} << 20) + 17] ^ 0x01));
  }
  std::string back(a.bytes.size(), '\0');
  auto loaded = (*store)->load(a.record.artifact_id, std::as_writable_bytes(std::span(back.data(), back.size())));
  REQUIRE_FALSE(loaded);
  CHECK(loaded.error().code == errc::data_loss);
  CHECK_THAT(loaded.error().message,
             Catch::StartsWith("cannot load " + a.record.artifact_id + " from the persist directory: bad data '") &&
                 Catch::EndsWith("data.bin': leaf 1 (bytes 4194304..) does not match its " + check));
  CHECK_FALSE((*store)->contains(a.record.artifact_id));
  CHECK_FALSE(fs::exists(dir.path() / name));
  REQUIRE(names_in(dir.path() / "quarantine").size() == 1);
  CHECK(names_in(dir.path() / "quarantine")[0].starts_with(name + "."));
  // Never served again, also not after reopening.
  CHECK(
      (*store)->load(a.record.artifact_id, std::as_writable_bytes(std::span(back.data(), back.size()))).error().code ==
      errc::not_found);
  auto reopened = durable_store::open(dir.path().string());
  REQUIRE(reopened);
  CHECK((*reopened)->list().empty());
}

TEST_CASE("durable_store: verify checks every leaf's SHA-256", "[persistence][durable_store]") {
  temp_dir dir;
  auto a = make_artifact(kNine, 6);
  const auto name = durable_store::directory_name(a.record.artifact_id);
  auto store = durable_store::open(dir.path().string());
  REQUIRE(store);
  REQUIRE((*store)->write(a.record, a.index, owned_bytes(a.bytes)));
  {
    std::fstream f(dir.path() / name / "data.bin", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp((std::int64_t{8} << 20) + 1);  // in leaf 2, the short one
    f.put(static_cast<char>(a.bytes[(std::size_t{8} << 20) + 1] ^ 0x40));
  }
  auto checked = (*store)->verify(a.record.artifact_id);
  REQUIRE_FALSE(checked);
  CHECK(checked.error().code == errc::data_loss);
  CHECK_THAT(checked.error().message,
             Catch::StartsWith("cannot verify " + a.record.artifact_id + " in the persist directory: bad data '") &&
                 Catch::EndsWith("data.bin': leaf 2 (bytes 8388608..) does not match its SHA-256"));
  CHECK_FALSE((*store)->contains(a.record.artifact_id));
  CHECK(names_in(dir.path() / "quarantine").size() == 1);
}

TEST_CASE("durable_store: open quarantines truncated data, missing and garbled manifests, removes leftovers",
          "[persistence][durable_store]") {
  temp_dir dir;
  auto t = make_artifact(kNine, 11);
  auto m = make_artifact(8192, 12);
  auto g = make_artifact(4096, 13);
  auto fine = make_artifact(4096, 14);
  {
    auto store = durable_store::open(dir.path().string());
    REQUIRE(store);
    for (auto* a : {&t, &m, &g, &fine}) REQUIRE((*store)->write(a->record, a->index, owned_bytes(a->bytes)));
  }
  fs::resize_file(dir.path() / durable_store::directory_name(t.record.artifact_id) / "data.bin", kNine - 1);
  fs::remove(dir.path() / durable_store::directory_name(m.record.artifact_id) / "MANIFEST");
  {
    std::ofstream out(dir.path() / durable_store::directory_name(g.record.artifact_id) / "MANIFEST",
                      std::ios::binary | std::ios::trunc);
    out << "{\"format\":";
  }
  fs::create_directory(dir.path() / ".tmp-interrupted");
  std::ofstream(dir.path() / ".tmp-interrupted" / "data.bin") << "partial";

  auto store = durable_store::open(dir.path().string());
  REQUIRE(store);
  auto listed = (*store)->list();
  REQUIRE(listed.size() == 1);
  CHECK(listed[0].record.artifact_id == fine.record.artifact_id);
  CHECK_FALSE(fs::exists(dir.path() / ".tmp-interrupted"));
  auto q = (*store)->quarantined();
  REQUIRE(q.size() == 3);
  std::map<std::string, std::string> why;
  for (const auto& e : q) why[e.name] = e.reason;
  CHECK_THAT(why[durable_store::directory_name(t.record.artifact_id)],
             Catch::EndsWith("data.bin': 9437183 bytes, the manifest says 9437184"));
  CHECK_THAT(why[durable_store::directory_name(m.record.artifact_id)],
             Catch::StartsWith("cannot read manifest '") && Catch::EndsWith("MANIFEST': it is missing"));
  CHECK_THAT(why[durable_store::directory_name(g.record.artifact_id)],
             Catch::StartsWith("bad manifest '") && Catch::EndsWith("': it is not a JSON object"));
  CHECK(names_in(dir.path() / "quarantine").size() == 3);
}

TEST_CASE("durable_store: a root that is a symbolic link or open to others is refused",
          "[persistence][durable_store]") {
  temp_dir dir;
  fs::create_directory(dir.path() / "real");
  fs::create_directory_symlink(dir.path() / "real", dir.path() / "link");
  auto linked = durable_store::open((dir.path() / "link").string());
  REQUIRE_FALSE(linked);
  CHECK(linked.error().code == errc::failed_precondition);
  CHECK(linked.error().message == "cannot use persist directory '" + (dir.path() / "link").string() +
                                      "': it is a symbolic link; it must be a directory owned by uid " +
                                      std::to_string(::geteuid()) + " with mode 0700");
  ::chmod((dir.path() / "real").c_str(), 0755);
  auto open_to_others = durable_store::open((dir.path() / "real").string());
  REQUIRE_FALSE(open_to_others);
  CHECK(open_to_others.error().code == errc::failed_precondition);
  CHECK_THAT(open_to_others.error().message, Catch::Contains("': its mode is 0755; it must be a directory"));
}

TEST_CASE("durable_store: directory names keep ids readable and safe", "[persistence][durable_store]") {
  CHECK(durable_store::directory_name("mi2:bciq:bciq") == "mi2%3Abciq%3Abciq");
  CHECK(durable_store::directory_name("cgid:a/../b") == "cgid%3Aa%2F..%2Fb");
}

TEST_CASE("durable_store: open_data hands a read-only fd of the data file and the manifest's leaf checks",
          "[persistence][durable_store]") {
  temp_dir dir;
  auto a = make_artifact(kNine + 4, 21);
  {
    auto store = durable_store::open(dir.path().string());
    REQUIRE(store);
    REQUIRE((*store)->write(a.record, a.index, owned_bytes(a.bytes)));
  }
  auto store = durable_store::open(dir.path().string());
  REQUIRE(store);
  auto opened = (*store)->open_data(a.record.artifact_id);
  REQUIRE(opened);
  CHECK((::fcntl(opened->data.get(), F_GETFL) & O_ACCMODE) == O_RDONLY);
  CHECK((::fcntl(opened->data.get(), F_GETFD) & FD_CLOEXEC) != 0);
  std::string back(a.bytes.size(), '\0');
  CHECK(::pread(opened->data.get(), back.data(), back.size(), 0) == static_cast<ssize_t>(back.size()));
  CHECK(back == a.bytes);
  CHECK(::write(opened->data.get(), "x", 1) == -1);
  CHECK(errno == EBADF);
  // The checks are the ones open() read from the MANIFEST: what a load compares with.
  REQUIRE(opened->artifact->leaves.size() == 3);
  for (std::size_t i = 0; i < 3; ++i) {
    const auto from = i * tensorreg::hash::leaf_bytes;
    const auto n = std::min<std::size_t>(tensorreg::hash::leaf_bytes, a.bytes.size() - from);
    CHECK(opened->artifact->leaves[i].xxh3 ==
          tensorreg::hash::xxh3_128(std::as_bytes(std::span(a.bytes.data() + from, n))));
  }
  CHECK(opened->artifact->index->json() == a.index.json());
  CHECK(opened->artifact->record.total_size == a.bytes.size());
  // The data file is the owner's alone: others can reopen neither it nor its directory.
  const auto data = dir.path() / durable_store::directory_name(a.record.artifact_id) / "data.bin";
  CHECK(fs::status(data).permissions() == (fs::perms::owner_read | fs::perms::owner_write));
  CHECK(fs::status(data.parent_path()).permissions() == fs::perms::owner_all);

  auto unknown = (*store)->open_data("mi2:unknown");
  REQUIRE_FALSE(unknown);
  CHECK(unknown.error().code == errc::not_found);
  CHECK(unknown.error().message == "cannot open mi2:unknown in the persist directory: it is not there");

  scoped_fault refused(fault_site::open, EACCES);
  auto failed = (*store)->open_data(a.record.artifact_id);
  REQUIRE_FALSE(failed);
  CHECK(failed.error().code == errc::unavailable);
  CHECK(failed.error().message == "cannot open " + a.record.artifact_id + " in the persist directory: cannot open '" +
                                      data.string() + "': Permission denied");
  CHECK((*store)->contains(a.record.artifact_id));  // an I/O error is no damage
}

TEST_CASE("durable_store: open_data of a cut-short data file is DATA_LOSS, then quarantined",
          "[persistence][durable_store]") {
  temp_dir dir;
  auto a = make_artifact(kNine, 22);
  auto store = durable_store::open(dir.path().string());
  REQUIRE(store);
  REQUIRE((*store)->write(a.record, a.index, owned_bytes(a.bytes)));
  const auto name = durable_store::directory_name(a.record.artifact_id);
  const auto data = (dir.path() / name / "data.bin").string();
  fs::resize_file(data, 4096);
  const std::string reason = "bad data '" + data + "': 4096 bytes, the manifest says " + std::to_string(kNine);
  auto cut = (*store)->open_data(a.record.artifact_id);
  REQUIRE_FALSE(cut);
  CHECK(cut.error().code == errc::data_loss);
  CHECK(cut.error().message == "cannot open " + a.record.artifact_id + " in the persist directory: " + reason);
  CHECK_FALSE((*store)->contains(a.record.artifact_id));
  CHECK_FALSE(fs::exists(dir.path() / name));
  // Asked again: still DATA_LOSS (not NOT_FOUND), with the reason it was moved aside.
  auto again = (*store)->open_data(a.record.artifact_id);
  REQUIRE_FALSE(again);
  CHECK(again.error().code == errc::data_loss);
  CHECK(again.error().message ==
        "cannot open " + a.record.artifact_id + " in the persist directory: it was quarantined: " + reason);
}

namespace {

tensorreg::persistence::store_options shared_as(const std::string& tag) {
  tensorreg::persistence::store_options o;
  o.shared = true;
  o.writer_tag = tag;
  return o;
}

std::string load_all(durable_store& store, const artifact& a) {
  std::string back(a.bytes.size(), '\0');
  auto loaded = store.load(a.record.artifact_id, std::as_writable_bytes(std::span(back.data(), back.size())));
  REQUIRE(loaded);
  return back;
}

}  // namespace

TEST_CASE("durable_store: daemons sharing a root find each other's copies and keep each other's writes",
          "[persistence][durable_store][shared]") {
  temp_dir dir;
  const auto root = dir.path().string();
  auto a = make_artifact(kNine, 21);
  auto b = make_artifact(4096, 22);
  auto host_a = durable_store::open(root, shared_as("host-a"));
  auto host_b = durable_store::open(root, shared_as("host-b"));
  REQUIRE(host_a);
  REQUIRE(host_b);

  // A copy published after B opened the root: B does not list it until it looks.
  REQUIRE((*host_a)->write(a.record, a.index, owned_bytes(a.bytes)));
  CHECK_FALSE((*host_b)->contains(a.record.artifact_id));
  auto found = (*host_b)->discover(a.record.artifact_id);
  REQUIRE(found);
  CHECK(*found);
  CHECK((*host_b)->contains(a.record.artifact_id));
  CHECK(load_all(**host_b, a) == a.bytes);
  // A rescan lists what was published and forgets what was removed since.
  auto host_c = durable_store::open(root, shared_as("host-c"));
  REQUIRE(host_c);
  REQUIRE((*host_a)->write(b.record, b.index, owned_bytes(b.bytes)));
  CHECK((*host_c)->list().size() == 1);
  REQUIRE((*host_c)->rescan());
  CHECK((*host_c)->list().size() == 2);
  REQUIRE((*host_a)->remove(b.record.artifact_id));
  REQUIRE((*host_c)->rescan());
  REQUIRE((*host_c)->list().size() == 1);
  CHECK((*host_c)->list()[0].record.artifact_id == a.record.artifact_id);
  auto absent = (*host_b)->discover(b.record.artifact_id);
  REQUIRE(absent);
  CHECK_FALSE(*absent);
  // Writing what another daemon published writes nothing.
  const auto before = fs::last_write_time(fs::path(root) / durable_store::directory_name(a.record.artifact_id));
  REQUIRE((*host_b)->write(a.record, a.index, owned_bytes(a.bytes)));
  CHECK(fs::last_write_time(fs::path(root) / durable_store::directory_name(a.record.artifact_id)) == before);

  // Each daemon's temporary directories carry its tag; opening the root removes only its own
  // leftovers and those nobody touched for a day.
  fs::create_directory(fs::path(root) / ".tmp-host-a_0123");
  fs::create_directory(fs::path(root) / ".tmp-host-b_4567");
  fs::create_directory(fs::path(root) / ".tmp-host-c_89ab");
  fs::last_write_time(fs::path(root) / ".tmp-host-c_89ab", fs::file_time_type::clock::now() - std::chrono::hours(25));
  auto reopened_b = durable_store::open(root, shared_as("host-b"));
  REQUIRE(reopened_b);
  CHECK(fs::exists(fs::path(root) / ".tmp-host-a_0123"));
  CHECK_FALSE(fs::exists(fs::path(root) / ".tmp-host-b_4567"));
  CHECK_FALSE(fs::exists(fs::path(root) / ".tmp-host-c_89ab"));
  // A tag that is another's prefix names none of its directories.
  auto host_h = durable_store::open(root, shared_as("host"));
  REQUIRE(host_h);
  CHECK(fs::exists(fs::path(root) / ".tmp-host-a_0123"));
  // A private root removes every leftover, as before.
  auto private_root = durable_store::open(root);
  REQUIRE(private_root);
  CHECK_FALSE(fs::exists(fs::path(root) / ".tmp-host-a_0123"));

  // A copy one daemon removes is gone for the other, not damaged: NOT_FOUND, nothing quarantined.
  REQUIRE((*host_a)->remove(a.record.artifact_id));
  std::string back(a.bytes.size(), '\0');
  auto gone = (*host_b)->load(a.record.artifact_id, std::as_writable_bytes(std::span(back.data(), back.size())));
  REQUIRE_FALSE(gone);
  CHECK(gone.error().code == errc::not_found);
  CHECK_THAT(gone.error().message, Catch::EndsWith("another daemon sharing the persist directory removed it"));
  CHECK_FALSE((*host_b)->contains(a.record.artifact_id));
  CHECK((*host_b)->quarantined().empty());
  CHECK(names_in(fs::path(root) / "quarantine").empty());
  // Removing what another daemon removed first succeeds: it is gone either way. Once it is not
  // listed, NOT_FOUND.
  REQUIRE((*host_a)->write(a.record, a.index, owned_bytes(a.bytes)));
  REQUIRE((*host_b)->discover(a.record.artifact_id).value());
  REQUIRE((*host_a)->remove(a.record.artifact_id));
  CHECK((*host_b)->remove(a.record.artifact_id));
  CHECK_FALSE((*host_b)->contains(a.record.artifact_id));
  auto again = (*host_b)->remove(a.record.artifact_id);
  REQUIRE_FALSE(again);
  CHECK(again.error().code == errc::not_found);
}

TEST_CASE("durable_store: a damaged copy another daemon published is DATA_LOSS when found",
          "[persistence][durable_store][shared]") {
  temp_dir dir;
  const auto root = dir.path().string();
  auto a = make_artifact(kNine, 23);
  auto host_a = durable_store::open(root, shared_as("host-a"));
  auto host_b = durable_store::open(root, shared_as("host-b"));
  REQUIRE(host_a);
  REQUIRE(host_b);
  REQUIRE((*host_a)->write(a.record, a.index, owned_bytes(a.bytes)));
  fs::resize_file(fs::path(root) / durable_store::directory_name(a.record.artifact_id) / "data.bin", kNine - 1);
  auto found = (*host_b)->discover(a.record.artifact_id);
  REQUIRE_FALSE(found);
  CHECK(found.error().code == errc::data_loss);
  CHECK_THAT(found.error().message, Catch::EndsWith("9437183 bytes, the manifest says 9437184"));
  CHECK_FALSE((*host_b)->contains(a.record.artifact_id));
  CHECK(names_in(fs::path(root) / "quarantine").size() == 1);
  // A private store never looks beyond what it listed at open().
  auto b = make_artifact(4096, 24);
  auto private_root = durable_store::open(root);
  REQUIRE(private_root);
  REQUIRE((*host_a)->write(b.record, b.index, owned_bytes(b.bytes)));
  auto unseen = (*private_root)->discover(b.record.artifact_id);
  REQUIRE(unseen);
  CHECK_FALSE(*unseen);
}
