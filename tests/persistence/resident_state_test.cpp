#include "tensorreg/persistence/resident_state.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstring>

#include "support/engine_helpers.hpp"
#include "tensorreg/memory/shared_memory.hpp"

namespace {

using tensorreg::errc;
using tensorreg::unique_fd;
using tensorreg::persistence::decode_resident_state;
using tensorreg::persistence::encode_resident_state;
using tensorreg::persistence::resident_entry;
using tensorreg::persistence::resident_state;

// One tensor of `n` bytes (n a multiple of 4): its entry and canonical bytes.
std::pair<resident_entry, std::string> make_entry(std::size_t n, std::uint32_t seed) {
  const std::string json =
      "{\"w\":[0," + std::to_string(n) + ",[" + std::to_string(n / 4) + "],[1],\"torch.float32\",0]}";
  auto idx = tensorreg::index::canonical_index::parse(json, n);
  REQUIRE(idx);
  resident_entry e;
  std::string bytes = tensorreg::testing::pattern(n, seed);
  e.record.artifact_id = tensorreg::testing::expected_mi2(idx->json(), bytes);
  e.record.id_kind = "MI2";
  e.record.index_multihash = tensorreg::testing::index_multihash_of(idx->json());
  e.record.data_multihash = e.record.artifact_id.substr(e.record.artifact_id.rfind(':') + 1);
  e.record.total_size = n;
  e.index = std::make_shared<const tensorreg::index::canonical_index>(std::move(*idx));
  e.fd_name = tensorreg::persistence::fd_name_of(e.record.artifact_id);
  return {std::move(e), std::move(bytes)};
}

// A memfd holding `bytes`, with `seals` added.
unique_fd memfd_of(const std::string& bytes, unsigned seals) {
  unique_fd fd(::memfd_create("resident-test", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  REQUIRE(fd);
  REQUIRE(::write(fd.get(), bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()));
  if (seals != 0) REQUIRE(::fcntl(fd.get(), F_ADD_SEALS, seals) == 0);
  return fd;
}

constexpr unsigned kAllSeals = F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK;

}  // namespace

TEST_CASE("resident state: an encoded state decodes to the same entries", "[persistence][resident_state]") {
  auto [a, a_bytes] = make_entry(4096, 1);
  auto [b, b_bytes] = make_entry(8192, 2);
  b.owner_uid = 1234;
  b.persisted = true;
  b.record.cache.retention = tensorreg::policy::retention::ttl;
  b.record.cache.ttl_ms = 5000;
  b.record.cache.overflow = tensorreg::policy::overflow::spill;
  b.record.cache.required = true;
  resident_state state{{a, b}, {}};
  auto decoded = decode_resident_state(encode_resident_state(state));
  REQUIRE(decoded);
  REQUIRE(decoded->entries.size() == 2);
  const auto& got = decoded->entries[1];
  CHECK(got.record.artifact_id == b.record.artifact_id);
  CHECK(got.record.total_size == 8192);
  CHECK(got.record.cache == b.record.cache);
  CHECK(got.owner_uid == std::optional<std::uint32_t>(1234));
  CHECK(got.persisted);
  CHECK(got.fd_name == b.fd_name);
  CHECK(got.index->json() == b.index->json());
  CHECK_FALSE(decoded->entries[0].owner_uid);
  CHECK_FALSE(decoded->entries[0].persisted);
}

TEST_CASE("resident state: a lease decodes with its segments and sources", "[persistence][resident_state]") {
  auto [a, bytes] = make_entry(8192, 8);
  tensorreg::persistence::resident_lease l;
  l.artifact = a;
  l.registration_id = "reg_1";
  l.owner_pid = 4321;
  l.device_id = -1;
  l.epoch = 7;
  l.ttl_left_ms = 1500;
  l.sources = {{tensorreg::persistence::lease_source_name("reg_1", 0), 16384}};
  l.segments = {{0, 4096, 0, 100}, {4096, 4096, 0, 8192}};
  resident_state state;
  state.leases.push_back(l);
  const auto encoded = encode_resident_state(state);
  auto decoded = decode_resident_state(encoded);
  REQUIRE(decoded);
  REQUIRE(decoded->leases.size() == 1);
  const auto& got = decoded->leases[0];
  CHECK(got.artifact.record.artifact_id == a.record.artifact_id);
  CHECK(got.registration_id == "reg_1");
  CHECK(got.owner_pid == 4321);
  CHECK(got.device_id == -1);
  CHECK(got.epoch == 7);
  CHECK(got.ttl_left_ms == std::optional<std::uint64_t>(1500));
  REQUIRE(got.sources.size() == 1);
  CHECK(got.sources[0].size == 16384);
  REQUIRE(got.segments.size() == 2);
  CHECK(got.segments[1].source_offset == 8192);
  // A segment naming a source that is not there is refused.
  state.leases[0].segments[1].source = 1;
  auto bad = decode_resident_state(encode_resident_state(state));
  REQUIRE_FALSE(bad);
  CHECK(bad.error().code == errc::invalid_argument);
  CHECK_THAT(bad.error().message, Catch::Contains("segment 1 names source 1 of 1"));
  for (std::size_t n = 0; n < encoded.size(); ++n) CHECK_FALSE(decode_resident_state(encoded.substr(0, n)));
}

TEST_CASE("resident state: every truncation and a wrong version are INVALID_ARGUMENT",
          "[persistence][resident_state]") {
  auto [a, bytes] = make_entry(4096, 3);
  const auto encoded = encode_resident_state(resident_state{{a}, {}});
  for (std::size_t n = 0; n < encoded.size(); ++n) {
    auto decoded = decode_resident_state(std::string_view(encoded).substr(0, n));
    REQUIRE_FALSE(decoded);
    CHECK(decoded.error().code == errc::invalid_argument);
    CHECK_THAT(decoded.error().message, Catch::StartsWith("cannot decode resident state"));
  }
  auto longer = encoded + "x";
  auto extra = decode_resident_state(longer);
  REQUIRE_FALSE(extra);
  CHECK_THAT(extra.error().message, Catch::Contains("1 bytes follow the last entry"));
  auto wrong = encoded;
  wrong[8] = 9;  // the version, after the 8-byte magic
  auto version = decode_resident_state(wrong);
  REQUIRE_FALSE(version);
  CHECK_THAT(version.error().message, Catch::Contains("version 9, this daemon reads version 1"));
}

TEST_CASE("resident state: an entry whose index does not hash to its id is refused", "[persistence][resident_state]") {
  auto [a, bytes] = make_entry(4096, 4);
  auto [b, b_bytes] = make_entry(4096 * 2, 5);
  a.index = b.index;  // canonical, but another artifact's
  a.record.total_size = b.record.total_size;
  auto decoded = decode_resident_state(encode_resident_state(resident_state{{a}, {}}));
  REQUIRE_FALSE(decoded);
  CHECK(decoded.error().code == errc::invalid_argument);
  CHECK_THAT(decoded.error().message, Catch::Contains("its index does not hash to its id"));
}

TEST_CASE("resident state: a handed memfd is mapped only when sealed and of the entry's size",
          "[persistence][resident_state]") {
  auto [e, bytes] = make_entry(4096, 6);
  SECTION("sealed and whole: mapped, the same bytes") {
    auto mapped = tensorreg::persistence::map_handed_memfd(e, memfd_of(bytes, kAllSeals));
    REQUIRE(mapped);
    CHECK(std::memcmp((*mapped)->bytes().data(), bytes.data(), bytes.size()) == 0);
    CHECK(tensorreg::persistence::verify_resident_bytes(e, **mapped));
  }
  SECTION("not sealed against writes") {
    auto mapped = tensorreg::persistence::map_handed_memfd(e, memfd_of(bytes, F_SEAL_GROW | F_SEAL_SHRINK));
    REQUIRE_FALSE(mapped);
    CHECK(mapped.error().code == errc::failed_precondition);
    CHECK_THAT(mapped.error().message, Catch::Contains("lacks the seal F_SEAL_WRITE"));
  }
  SECTION("not sealed at all") {
    auto mapped = tensorreg::persistence::map_handed_memfd(e, memfd_of(bytes, 0));
    REQUIRE_FALSE(mapped);
    CHECK_THAT(mapped.error().message, Catch::Contains("lacks the seal F_SEAL_SHRINK"));
  }
  SECTION("of another size") {
    auto mapped = tensorreg::persistence::map_handed_memfd(e, memfd_of(bytes + "more", kAllSeals));
    REQUIRE_FALSE(mapped);
    CHECK(mapped.error().code == errc::failed_precondition);
    CHECK_THAT(mapped.error().message, Catch::Contains("holds 4100 bytes, its entry says 4096"));
  }
  SECTION("missing") {
    auto mapped = tensorreg::persistence::map_handed_memfd(e, unique_fd());
    REQUIRE_FALSE(mapped);
    CHECK_THAT(mapped.error().message, Catch::Contains("no file descriptor arrived for it"));
  }
}

TEST_CASE("resident state: bytes that are not the id's are DATA_LOSS", "[persistence][resident_state]") {
  auto [e, bytes] = make_entry(4096, 7);
  bytes[100] = static_cast<char>(bytes[100] ^ 1);
  auto mapped = tensorreg::persistence::map_handed_memfd(e, memfd_of(bytes, kAllSeals));
  REQUIRE(mapped);
  auto checked = tensorreg::persistence::verify_resident_bytes(e, **mapped);
  REQUIRE_FALSE(checked);
  CHECK(checked.error().code == errc::data_loss);
  CHECK_THAT(checked.error().message, Catch::Contains("bytes do not hash to its id"));
}

TEST_CASE("resident state: the catalogue memfd is sealed and reads back whole", "[persistence][resident_state]") {
  auto fd = tensorreg::persistence::state_memfd("catalogue bytes");
  REQUIRE(fd);
  CHECK((::fcntl(fd->get(), F_GET_SEALS) & F_SEAL_WRITE) != 0);
  auto back = tensorreg::persistence::read_state_fd(fd->get());
  REQUIRE(back);
  CHECK(*back == "catalogue bytes");
  CHECK(tensorreg::persistence::fd_name_of("mi2:x").size() == 42);
  CHECK(tensorreg::persistence::fd_name_of("mi2:x").find(':') == std::string::npos);
}
