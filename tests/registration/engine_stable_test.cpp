// stable_dram uploads (registration.md §4.3.10, §4.5; DECISIONS §5.1, §5.13) and the same
// tensors end to end through every host plan: LIP over a memfd region, streamed chunks and
// memfd publish must all give one mi2 id.
#include "tensorreg/registration/engine.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

#include "support/engine_helpers.hpp"
#include "support/temp_dir.hpp"
#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/index/byte_range_map.hpp"
#include "tensorreg/memory/shared_memory.hpp"

namespace {

using namespace tensorreg;
using namespace tensorreg::registration;
using tensorreg::testing::fake_clock;
namespace t = tensorreg::testing;

const std::int32_t me = static_cast<std::int32_t>(::getpid());

begin_response begin_stable(engine& e, const t::model& m) {
  auto begun = e.begin(t::stable_begin(m, me));
  REQUIRE_OK(begun);
  return std::move(*begun);
}

feed_request chunk(const std::string& id, std::uint64_t at, std::string data) {
  feed_request f;
  f.registration_id = id;
  f.payload = view_chunk{at, 0, std::move(data)};
  return f;
}

feed_request progress(const std::string& id, std::vector<written_range> ranges, bool complete = false) {
  feed_request f;
  f.registration_id = id;
  f.payload = stable_write_progress{std::move(ranges), complete};
  return f;
}

// What a client does with the publish handle: map its own duplicate of the memfd, writable.
memory::shared_memory client_mapping(const begin_response& begun) {
  const auto& hs = std::get<stable_dram_handshake>(begun.handshake);
  REQUIRE(hs.publish);
  auto fd = hs.publish->memory->duplicate_fd();
  REQUIRE_OK(fd);
  auto mapped = memory::shared_memory::adopt(std::move(*fd), hs.publish->size_bytes, true);
  REQUIRE_OK(mapped);
  return std::move(*mapped);
}

// A model of a few MiB: several leaves, and PAD between storages.
t::model big_model() {
  t::model m;
  m.storages = {
      {"a", t::pattern((3u << 20) + 4, 11)}, {"b", t::pattern((2u << 20) + 2, 12)}, {"c", t::pattern(4u << 20, 13)}};
  m.tensors = {{"a", "a", {(3 << 20) + 4}, {1}, "torch.uint8", 0, (3u << 20) + 4},
               {"b", "b", {(1 << 20) + 1}, {1}, "torch.float16", 0, (2u << 20) + 2},
               {"c", "c", {1 << 20}, {1}, "torch.int32", 0, 4u << 20}};
  return m;
}

std::string read_all(const memory::byte_source& src) {
  std::string out(src.size(), '\0');
  auto done = src.read(0, std::as_writable_bytes(std::span<char>(out)));
  REQUIRE_OK(done);
  return out;
}

// The bytes of the replica the engine keeps for `artifact_id`.
std::string kept_bytes(engine& e, const std::string& artifact_id) {
  auto kept = e.open_bytes(artifact_id);
  REQUIRE_OK(kept);
  return read_all(**kept);
}

}  // namespace

TEST_CASE("engine stable feed: a chunk or range outside the buffer is OUT_OF_RANGE", "[registration][engine_stable]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  const auto id = begin_stable(*e, m).registration_id;
  CHECK_ERROR(e->feed(chunk(id, 36, "12345678")), errc::out_of_range,
              "cannot accept stable bytes [36, +8): past total_size 40");
  CHECK_ERROR(e->feed(chunk(id, 41, "")), errc::out_of_range,
              "cannot accept stable bytes [41, +0): past total_size 40");
  const auto other = begin_stable(*e, m).registration_id;
  CHECK_ERROR(e->feed(progress(other, {{0, 41}})), errc::out_of_range,
              "cannot accept stable bytes [0, +41): past total_size 40");
  CHECK_ERROR(e->feed(progress(other, {{8, ~std::uint64_t{0}}})), errc::out_of_range,
              "cannot accept stable bytes [8, +18446744073709551615): past total_size 40");
}

TEST_CASE("engine stable feed: overlapping chunks are FAILED_PRECONDITION", "[registration][engine_stable]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto id = begin_stable(*e, t::small_model()).registration_id;
  REQUIRE_OK(e->feed(chunk(id, 8, "abcdefgh")));
  CHECK_ERROR(e->feed(chunk(id, 4, "abcdefgh")), errc::failed_precondition,
              "cannot accept stable bytes [4, +8): overlaps bytes [8, +8) already written");
  CHECK_ERROR(e->feed(chunk(id, 15, "ab")), errc::failed_precondition,
              "cannot accept stable bytes [15, +2): overlaps bytes [8, +8) already written");
  REQUIRE_OK(e->feed(chunk(id, 16, "ab")));  // adjacent is fine
  REQUIRE_OK(e->feed(chunk(id, 0, "abcdefgh")));
}

TEST_CASE("engine stable feed: overlapping memfd ranges are FAILED_PRECONDITION", "[registration][engine_stable]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto id = begin_stable(*e, t::small_model()).registration_id;
  REQUIRE_OK(e->feed(progress(id, {{0, 20}})));
  CHECK_ERROR(e->feed(progress(id, {{19, 4}})), errc::failed_precondition,
              "cannot accept stable bytes [19, +4): overlaps bytes [0, +20) already written");
}

TEST_CASE("engine stable feed: chunks and memfd ranges do not mix", "[registration][engine_stable]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  const auto a = begin_stable(*e, m).registration_id;
  REQUIRE_OK(e->feed(chunk(a, 0, "abcd")));
  CHECK_ERROR(e->feed(progress(a, {{8, 4}})), errc::failed_precondition,
              "cannot accept stable bytes [8, +4): the upload already uses streamed chunks, which cannot be mixed "
              "with memfd written ranges");
  const auto b = begin_stable(*e, m).registration_id;
  REQUIRE_OK(e->feed(progress(b, {{0, 4}})));
  CHECK_ERROR(e->feed(chunk(b, 8, "abcd")), errc::failed_precondition,
              "cannot accept stable bytes [8, +4): the upload already uses memfd written ranges, which cannot be "
              "mixed with streamed chunks");
}

TEST_CASE("engine stable feed: nothing is accepted after the client reported the upload complete",
          "[registration][engine_stable]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto id = begin_stable(*e, t::small_model()).registration_id;
  REQUIRE_OK(e->feed(progress(id, {{0, 20}}, true)));
  CHECK_ERROR(e->feed(progress(id, {{24, 16}})), errc::failed_precondition,
              "cannot accept stable bytes [24, +16): the client already reported the upload complete");
}

TEST_CASE("engine stable feed: lease tables on a stable registration are FAILED_PRECONDITION",
          "[registration][engine_stable]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  const auto id = begin_stable(*e, m).registration_id;
  const std::string message =
      "cannot feed registration '" + id +
      "': storage tables and lease segments need a lease-in-place registration, not stable_dram";
  auto lip = t::lip_feed(id, m);
  CHECK_ERROR(e->feed(lip), errc::failed_precondition, message);
  feed_request only_aliases;
  only_aliases.registration_id = id;
  only_aliases.tensor_aliases = lip.tensor_aliases;
  CHECK_ERROR(e->feed(only_aliases), errc::failed_precondition, message);
  feed_request only_segments;
  only_segments.registration_id = id;
  only_segments.payload = lip.payload;
  CHECK_ERROR(e->feed(only_segments), errc::failed_precondition, message);
}

TEST_CASE("engine stable commit: an incomplete upload is FAILED_PRECONDITION and the registration stays open",
          "[registration][engine_stable]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  const auto id = begin_stable(*e, m).registration_id;
  const auto bytes = m.canonical();
  REQUIRE_OK(e->feed(chunk(id, 0, bytes.substr(0, 20))));
  REQUIRE_OK(e->feed(chunk(id, 24, bytes.substr(24, 8))));
  CHECK_ERROR(e->commit(id), errc::failed_precondition,
              "cannot commit stable upload: canonical bytes [32, 40) were not written");
  REQUIRE_OK(e->feed(chunk(id, 32, bytes.substr(32, 8))));  // PAD [20, 24) need not be written
  auto committed = e->commit(id);
  REQUIRE_OK(committed);
  CHECK(committed->descriptor.artifact_id == t::expected_mi2(t::small_model_json, bytes));
}

TEST_CASE("engine stable commit: chunks in any order give the independently computed id",
          "[registration][engine_stable]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  const auto id = begin_stable(*e, m).registration_id;
  const auto bytes = m.canonical();
  for (std::uint64_t at : {32u, 0u, 24u, 8u, 16u}) REQUIRE_OK(e->feed(chunk(id, at, bytes.substr(at, 8))));
  auto committed = e->commit(id);
  REQUIRE_OK(committed);
  const auto& d = committed->descriptor;
  CHECK(d.artifact_id == t::expected_mi2(t::small_model_json, bytes));
  CHECK(d.index_multihash == t::index_multihash_of(t::small_model_json));
  CHECK(d.id_kind == identity::id_kind::mi2);
  CHECK(d.total_size == 40);
  CHECK_FALSE(committed->existed);
  REQUIRE(committed->local_stable_tier);
  CHECK(committed->local_stable_tier->status == local_stable_status::skipped);
  auto got = e->get(d.artifact_id);
  REQUIRE_OK(got);
  CHECK(got->stable_replica);
  CHECK(got->leases == 0);
  CHECK(e->stats().stable_bytes == 40);
  CHECK(e->stats().pending_registrations == 0);
}

TEST_CASE("engine stable commit: garbage in PAD bytes changes neither the id nor the kept bytes",
          "[registration][engine_stable]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto clean = e->begin(t::stable_begin(m, me));
  REQUIRE_OK(clean);
  REQUIRE_OK(t::feed_chunks(*e, clean->registration_id, m.canonical(), 40));
  auto a = e->commit(clean->registration_id);
  REQUIRE_OK(a);

  fake_clock clock2;
  auto e2 = t::make_engine(clock2);
  auto dirty = e2->begin(t::stable_begin(m, me));
  REQUIRE_OK(dirty);
  REQUIRE_OK(t::feed_chunks(*e2, dirty->registration_id, m.canonical_with_pad('\xee'), 40));
  auto b = e2->commit(dirty->registration_id);
  REQUIRE_OK(b);
  CHECK(a->descriptor.artifact_id == b->descriptor.artifact_id);
  CHECK(kept_bytes(*e2, b->descriptor.artifact_id) == m.canonical());
}

TEST_CASE("engine stable commit: a second put of the same tensors joins with existed=true",
          "[registration][engine_stable]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto first = t::register_stable(*e, m, me);
  REQUIRE_OK(first);
  std::string second_id;
  auto second = t::register_stable(*e, m, me, &second_id);
  REQUIRE_OK(second);
  CHECK(second->existed);
  CHECK(t::describe(second->descriptor) == t::describe(first->descriptor));
  auto got = e->get(first->descriptor.artifact_id);
  REQUIRE_OK(got);
  CHECK(got->joined_refs == 1);
  CHECK(e->stats().stable_bytes == 40);  // one copy
  CHECK(e->stats().artifacts == 1);
}

TEST_CASE("engine stable commit: a cgid put has no data hash", "[registration][engine_stable]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto r = t::stable_begin(m, me);
  r.client_artifact_id = "cgid:stable~one";
  auto begun = e->begin(r);
  REQUIRE_OK(begun);
  REQUIRE_OK(t::feed_chunks(*e, begun->registration_id, m.canonical(), 16));
  auto committed = e->commit(begun->registration_id);
  REQUIRE_OK(committed);
  CHECK(committed->descriptor.artifact_id == "cgid:stable~one");
  CHECK(committed->descriptor.id_kind == identity::id_kind::cgid);
  CHECK(committed->descriptor.data_multihash.empty());
  CHECK(committed->descriptor.index_multihash == t::index_multihash_of(t::small_model_json));
  CHECK(e->get("cgid:stable~one")->stable_replica);
}

TEST_CASE("engine stable commit: memfd publish gives the same id as streamed chunks", "[registration][engine_stable]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto begun = begin_stable(*e, m);
  auto client = client_mapping(begun);
  const auto bytes = m.canonical_with_pad('\x77');
  std::memcpy(client.mutable_bytes().data(), bytes.data(), bytes.size());
  REQUIRE_OK(e->feed(progress(begun.registration_id, {{24, 16}})));
  REQUIRE_OK(e->feed(progress(begun.registration_id, {{0, 20}}, true)));
  auto committed = e->commit(begun.registration_id);
  REQUIRE_OK(committed);
  CHECK(committed->descriptor.artifact_id == t::expected_mi2(t::small_model_json, m.canonical()));
  // The engine kept its own copy: the client scribbling afterwards changes nothing.
  std::memset(client.mutable_bytes().data(), 0x11, 40);
  CHECK(kept_bytes(*e, committed->descriptor.artifact_id) == m.canonical());
}

// What the C++ and Python clients do with the publish handle: pwrite into their own duplicate
// of the memfd, never mapping it.
unique_fd client_fd_written(const begin_response& begun, const std::string& bytes) {
  const auto& hs = std::get<stable_dram_handshake>(begun.handshake);
  REQUIRE(hs.publish);
  auto fd = hs.publish->memory->duplicate_fd();
  REQUIRE_OK(fd);
  REQUIRE(::pwrite(fd->get(), bytes.data(), bytes.size(), 0) == static_cast<ssize_t>(bytes.size()));
  return std::move(*fd);
}

TEST_CASE("engine stable commit: a memfd no client maps writable is sealed and kept as the replica",
          "[registration][engine_stable]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = big_model();
  auto begun = begin_stable(*e, m);
  auto client = client_fd_written(begun, m.canonical());
  REQUIRE_OK(e->feed(progress(begun.registration_id, {{0, m.canonical().size()}}, true)));
  auto committed = e->commit(begun.registration_id);
  REQUIRE_OK(committed);
  CHECK(committed->descriptor.artifact_id == t::expected_mi2(m.index().json(), m.canonical()));
  // Kept, not copied: the client's own fd now names sealed memory it can no longer change.
  const int seals = ::fcntl(client.get(), F_GET_SEALS);
  CHECK((seals & F_SEAL_WRITE) != 0);
  CHECK((seals & F_SEAL_SHRINK) != 0);
  errno = 0;
  CHECK(::pwrite(client.get(), "evil", 4, 0) == -1);
  CHECK(errno == EPERM);
  CHECK(::ftruncate(client.get(), 0) == -1);
  CHECK(kept_bytes(*e, committed->descriptor.artifact_id) == m.canonical());
  CHECK(e->stats().stable_bytes == m.canonical().size());
}

TEST_CASE("engine stable commit: a put given the populated reserve keeps it as its replica, with the same id",
          "[registration][engine_stable][populated_reserve]") {
  fake_clock clock;
  auto options = t::deterministic_options(clock);
  const auto m = big_model();
  options.populated_reserve_bytes = m.canonical().size() + (1u << 20);
  auto e = t::make_engine(std::move(options));
  for (int i = 0; i < 1000 && e->stats().populated_reserve_bytes == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  REQUIRE(e->stats().populated_reserve_bytes == m.canonical().size() + (1u << 20));
  auto begun = begin_stable(*e, m);
  CHECK(e->stats().populated_reserve_taken == 1);
  const auto& hs = std::get<stable_dram_handshake>(begun.handshake);
  REQUIRE(hs.publish);
  CHECK(hs.publish->memory->size() == m.canonical().size());
  auto client = client_fd_written(begun, m.canonical());
  REQUIRE_OK(e->feed(progress(begun.registration_id, {{0, m.canonical().size()}}, true)));
  auto committed = e->commit(begun.registration_id);
  REQUIRE_OK(committed);
  CHECK(committed->descriptor.artifact_id == t::expected_mi2(m.index().json(), m.canonical()));
  CHECK((::fcntl(client.get(), F_GET_SEALS) & F_SEAL_WRITE) != 0);  // kept, not copied
  CHECK(kept_bytes(*e, committed->descriptor.artifact_id) == m.canonical());
}

TEST_CASE("engine stable commit: a put from files takes the populated reserve for new content, not for held",
          "[registration][engine_stable][populated_reserve]") {
  fake_clock clock;
  auto options = t::deterministic_options(clock);
  const auto m = big_model();
  options.populated_reserve_bytes = m.canonical().size();
  auto e = t::make_engine(std::move(options));
  testing::temp_dir dir;
  const auto path = dir.path() / "model.bin";
  {
    unique_fd out(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    REQUIRE(out);
    REQUIRE(::pwrite(out.get(), m.canonical().data(), m.canonical().size(), 0) ==
            static_cast<ssize_t>(m.canonical().size()));
  }
  const auto file = std::make_shared<const unique_fd>(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  REQUIRE(*file);
  const auto put_from_file = [&] {
    auto r = t::stable_begin(m, me);
    stable_dram_options files;
    files.files = {file};
    const auto map = index::byte_range_map::from_index(m.index());
    for (const auto& range : map.ranges()) {
      if (range.kind == index::range_kind::data) {
        files.file_segments.push_back({0, range.offset, range.offset, range.length});
      }
    }
    r.plan = std::move(files);
    auto begun = e->begin(std::move(r));
    REQUIRE_OK(begun);
    auto committed = e->commit(begun->registration_id);
    REQUIRE_OK(committed);
    CHECK(committed->descriptor.artifact_id == t::expected_mi2(m.index().json(), m.canonical()));
    return committed->existed;
  };
  const auto wait_ready = [&] {
    for (int i = 0; i < 1000 && e->stats().populated_reserve_bytes == 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    REQUIRE(e->stats().populated_reserve_bytes == m.canonical().size());
  };

  wait_ready();
  CHECK_FALSE(put_from_file());
  CHECK(e->stats().populated_reserve_taken == 1);
  wait_ready();
  CHECK(put_from_file());  // its index is known: likely held, so it leaves the spare
  CHECK(e->stats().populated_reserve_taken == 1);
  CHECK(e->stats().populated_reserve_bytes == m.canonical().size());
}

TEST_CASE("engine stable commit: a put from files hashes its whole leaves in pairs, same id",
          "[registration][engine_stable]") {
  // One worker writes through pwrite(); more than memory::max_pwrite_fill_threads read into
  // the mapping. Either way a put of new content and a put of held content (hashed first).
  const unsigned workers = GENERATE(1U, memory::max_pwrite_fill_threads + 1);
  fake_clock clock;
  auto options = t::deterministic_options(clock);
  options.hash_threads = workers;
  auto e = t::make_engine(std::move(options));
  // Enough whole leaves for every thread to get two pairs (hash::plan_leaf_jobs), an odd one
  // and a short last leaf.
  const std::size_t size = 25 * hash::leaf_bytes + 12345;
  t::model m;
  m.storages = {{"w", t::pattern(size, 21)}};
  m.tensors = {{"w", "w", {static_cast<std::int64_t>(size)}, {1}, "torch.uint8", 0, size}};
  const std::string bytes = m.canonical();
  testing::temp_dir dir;
  const auto path = dir.path() / "model.bin";
  {
    unique_fd out(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    REQUIRE(out);
    REQUIRE(::pwrite(out.get(), bytes.data(), bytes.size(), 0) == static_cast<ssize_t>(bytes.size()));
  }
  // The root from each leaf hashed on its own, not through the code under test's pairs.
  const memory::host_bytes_view canonical(std::as_bytes(std::span(bytes)));
  std::vector<hash::digest> leaves;
  for (std::uint64_t i = 0; i < hash::leaf_count(size); ++i) leaves.push_back(hash::hash_leaf(canonical, i).value());
  const auto expected = hash::encode_multihash(hash::tree_root(leaves));
  for (const bool held : {false, true}) {
    INFO("workers " << workers << (held ? ", held content" : ", new content"));
    auto r = t::stable_begin(m, me);
    stable_dram_options files;
    files.files = {std::make_shared<const unique_fd>(::open(path.c_str(), O_RDONLY | O_CLOEXEC))};
    files.file_segments.push_back({0, 0, 0, size});
    r.plan = std::move(files);
    auto begun = e->begin(std::move(r));
    REQUIRE_OK(begun);
    auto committed = e->commit(begun->registration_id);
    REQUIRE_OK(committed);
    CHECK(committed->existed == held);
    CHECK(committed->descriptor.data_multihash == expected);
    CHECK(kept_bytes(*e, committed->descriptor.artifact_id) == bytes);
  }
}

TEST_CASE("engine stable commit: an unmapped memfd with garbage in PAD is copied with PAD zeroed",
          "[registration][engine_stable]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto begun = begin_stable(*e, m);
  auto client = client_fd_written(begun, m.canonical_with_pad('\x77'));
  REQUIRE_OK(e->feed(progress(begun.registration_id, {{0, 20}, {24, 16}}, true)));
  auto committed = e->commit(begun.registration_id);
  REQUIRE_OK(committed);
  CHECK(committed->descriptor.artifact_id == t::expected_mi2(t::small_model_json, m.canonical()));
  CHECK(kept_bytes(*e, committed->descriptor.artifact_id) == m.canonical());
}

TEST_CASE("engine stable commit: a memfd the client still maps writable is copied, not kept",
          "[registration][engine_stable]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto begun = begin_stable(*e, m);
  auto client = client_mapping(begun);
  const auto bytes = m.canonical();
  std::memcpy(client.mutable_bytes().data(), bytes.data(), bytes.size());
  REQUIRE_OK(e->feed(progress(begun.registration_id, {{0, 20}, {24, 16}}, true)));
  auto committed = e->commit(begun.registration_id);
  REQUIRE_OK(committed);
  CHECK(committed->descriptor.artifact_id == t::expected_mi2(t::small_model_json, m.canonical()));
  // Not sealed (the kernel refused while the mapping lives), so the daemon kept its own copy.
  CHECK((::fcntl(client.fd(), F_GET_SEALS) & F_SEAL_WRITE) == 0);
  std::memset(client.mutable_bytes().data(), 0x11, bytes.size());
  CHECK(kept_bytes(*e, committed->descriptor.artifact_id) == m.canonical());
}

TEST_CASE("engine stable commit: a read-only shared mapping of a writable fd also stops the memfd being kept",
          "[registration][engine_stable]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto begun = begin_stable(*e, m);
  auto client = client_fd_written(begun, m.canonical());
  // PROT_READ, but through an O_RDWR fd: mprotect could make it writable later, so the kernel
  // refuses the seal and the engine must copy.
  void* ro = ::mmap(nullptr, m.canonical().size(), PROT_READ, MAP_SHARED, client.get(), 0);
  REQUIRE(ro != MAP_FAILED);
  REQUIRE_OK(e->feed(progress(begun.registration_id, {{0, 20}, {24, 16}}, true)));
  auto committed = e->commit(begun.registration_id);
  REQUIRE_OK(committed);
  CHECK(committed->descriptor.artifact_id == t::expected_mi2(t::small_model_json, m.canonical()));
  CHECK((::fcntl(client.get(), F_GET_SEALS) & F_SEAL_WRITE) == 0);
  REQUIRE(::mprotect(ro, m.canonical().size(), PROT_READ | PROT_WRITE) == 0);
  std::memset(ro, 0x11, m.canonical().size());
  CHECK(kept_bytes(*e, committed->descriptor.artifact_id) == m.canonical());
  ::munmap(ro, m.canonical().size());
}

TEST_CASE("engine stable commit: concurrent chunks from several threads",
          "[registration][engine_stable][concurrency]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = big_model();
  const auto bytes = m.canonical_with_pad('\x42');
  const auto id = begin_stable(*e, m).registration_id;
  constexpr std::size_t chunk_bytes = 256 * 1024;
  const std::size_t chunks = (bytes.size() + chunk_bytes - 1) / chunk_bytes;
  std::atomic<std::size_t> next{0};
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 6; ++i) {
    threads.emplace_back([&] {
      for (std::size_t c = next++; c < chunks; c = next++) {
        const std::size_t at = (chunks - 1 - c) * chunk_bytes;  // back to front
        if (!e->feed(chunk(id, at, bytes.substr(at, chunk_bytes)))) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(failures == 0);
  auto committed = e->commit(id);
  REQUIRE_OK(committed);
  CHECK(committed->descriptor.artifact_id == t::expected_mi2(m.index().json(), m.canonical()));
}

TEST_CASE("engine end to end: LIP over a memfd region, stable chunks and memfd publish give one mi2 id",
          "[registration][engine_stable][end_to_end]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = big_model();
  const auto expected = t::expected_mi2(m.index().json(), m.canonical());

  // A daemon-managed HOST_SHARED region; the client writes its tensors through its own mapping.
  regions::register_request rr;
  rr.kind = regions::memory_kind::host_shared;
  rr.owner_pid = me;
  rr.size_bytes = 16u << 20;
  rr.host_shared = regions::host_shared_spec{"", true, regions::host_shared_class::allocator};
  auto region = e->register_region(std::move(rr));
  REQUIRE_OK(region);
  auto fd = region->memory->duplicate_fd();
  REQUIRE_OK(fd);
  auto client = memory::shared_memory::adopt(std::move(*fd), region->size_bytes, true);
  REQUIRE_OK(client);
  std::map<std::string, storage_entry> entries;
  std::uint64_t cursor = 4096;  // storages at arbitrary offsets of the region
  for (const auto& s : m.storages) {
    std::memcpy(client->mutable_bytes().data() + cursor, s.bytes.data(), s.bytes.size());
    storage_entry entry;
    entry.storage_id = s.id;
    entry.device_id = -1;
    entry.storage_length = s.bytes.size();
    entry.source = region_ref_source{region->id, regions::memory_kind::host_shared, -1, region->size_bytes};
    entry.mapping_base_offset = cursor;
    entries.emplace(s.id, entry);
    cursor += s.bytes.size() + 1000;
  }
  auto lip = e->begin(t::lip_begin(m.total_size(), me));
  REQUIRE_OK(lip);
  REQUIRE_OK(e->feed(t::lip_feed(lip->registration_id, m, entries)));
  auto leased = e->commit(lip->registration_id);
  REQUIRE_OK(leased);
  CHECK(leased->descriptor.artifact_id == expected);

  // The same tensors as streamed chunks, PAD as garbage.
  auto streamed = e->begin(t::stable_begin(m, me));
  REQUIRE_OK(streamed);
  REQUIRE_OK(t::feed_chunks(*e, streamed->registration_id, m.canonical_with_pad('\x99'), 1 << 20));
  auto put = e->commit(streamed->registration_id);
  REQUIRE_OK(put);
  CHECK(put->descriptor.artifact_id == expected);
  CHECK(t::describe(put->descriptor) == t::describe(leased->descriptor));
  CHECK_FALSE(put->existed);  // the lease held no host copy of the engine's own

  // And through the publish memfd: the stable copy exists, so this put joins.
  auto published = begin_stable(*e, m);
  auto mapped = client_mapping(published);
  const auto bytes = m.canonical_with_pad('\x5c');
  std::memcpy(mapped.mutable_bytes().data(), bytes.data(), bytes.size());
  std::vector<written_range> ranges;
  for (const auto& [sid, offset] : m.offsets()) ranges.push_back({offset, m.storage(sid).bytes.size()});
  REQUIRE_OK(e->feed(progress(published.registration_id, ranges, true)));
  auto joined = e->commit(published.registration_id);
  REQUIRE_OK(joined);
  CHECK(joined->descriptor.artifact_id == expected);
  CHECK(joined->existed);

  auto got = e->get(expected);
  REQUIRE_OK(got);
  CHECK(got->leases == 1);
  CHECK(got->stable_replica);
  CHECK(got->joined_refs == 1);
  CHECK(e->list().size() == 1);
}

TEST_CASE("engine stable: the replica fd cannot be reopened to change the bytes", "[registration][engine_stable]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto committed = t::register_stable(*e, m, me);
  REQUIRE_OK(committed);
  const auto& id = committed->descriptor.artifact_id;
  auto replica = e->stable_replica_fd(id);
  REQUIRE_OK(replica);
  const int fd = replica->second.get();
  CHECK((::fcntl(fd, F_GETFL) & O_ACCMODE) == O_RDONLY);

  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  unique_fd rw(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  REQUIRE(rw);  // the open works; every change through it is refused
  errno = 0;
  CHECK(::pwrite(rw.get(), "evil", 4, 0) == -1);
  CHECK(errno == EPERM);
  CHECK(::ftruncate(rw.get(), 0) == -1);
  CHECK(errno == EPERM);

  auto bytes = e->open_bytes(id);
  REQUIRE_OK(bytes);
  std::string read((*bytes)->size(), '\0');
  REQUIRE_OK((*bytes)->read(0, std::as_writable_bytes(std::span<char>(read))));
  CHECK(read == m.canonical());
}
