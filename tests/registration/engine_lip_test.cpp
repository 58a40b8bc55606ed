// Lease-in-place: Feed rules (registration.md §4.3, §5.1; DECISIONS §5.4, §5.5), Commit rules
// in §4.5 order (§2.3, §5.1; DECISIONS §5.2, §5.13, §5.14), CUDA-handle storages through a fake
// device, and the local stable tier at commit (§6.2).
#include "tensorreg/registration/engine.hpp"

#include <catch2/catch.hpp>

#include <unistd.h>

#include <cstring>

#include "support/engine_helpers.hpp"
#include "support/fake_device_memory.hpp"
#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/sha256.hpp"

namespace {

using namespace tensorreg;
using namespace tensorreg::registration;
using tensorreg::testing::fake_clock;
using tensorreg::testing::fake_device_memory;
namespace t = tensorreg::testing;

const std::int32_t me = static_cast<std::int32_t>(::getpid());

std::string begin_lip(engine& e, std::uint64_t total_size = 40, std::uint32_t ttl_ms = 0) {
  auto begun = e.begin(t::lip_begin(total_size, me, ttl_ms));
  REQUIRE_OK(begun);
  return begun->registration_id;
}

storage_entry host_entry(const std::string& id, const std::string& bytes, std::int32_t device = 0) {
  storage_entry s;
  s.storage_id = id;
  s.device_id = device;
  s.storage_length = bytes.size();
  s.source = host_storage_source{std::make_shared<t::owned_bytes>(bytes)};
  return s;
}

feed_request feed_of(const std::string& id) {
  feed_request f;
  f.registration_id = id;
  return f;
}

regions::register_request host_region(std::uint64_t size, std::int32_t owner = me) {
  regions::register_request r;
  r.kind = regions::memory_kind::host_shared;
  r.owner_pid = owner;
  r.size_bytes = size;
  r.host_shared = regions::host_shared_spec{"", true, regions::host_shared_class::scratch};
  return r;
}

regions::register_request vram_region(std::int32_t device, std::string handle, std::uint64_t size = 4096) {
  regions::register_request r;
  r.kind = regions::memory_kind::vram;
  r.owner_pid = me;
  r.size_bytes = size;
  r.device_id = device;
  r.cuda_ipc_handle = std::move(handle);
  return r;
}

storage_entry region_entry(const std::string& id, const regions::region_info& region, std::uint64_t length,
                           std::uint64_t base_offset = 0) {
  storage_entry s;
  s.storage_id = id;
  s.device_id = region.device_id;
  s.storage_length = length;
  s.source = region_ref_source{region.id, region.kind, region.device_id, region.size_bytes};
  s.mapping_base_offset = base_offset;
  return s;
}

// The number of references held on a region, read from unregister's refusal (0 = it was free
// and is now unregistered).
std::uint32_t region_refs(engine& e, const std::string& region_id) {
  auto r = e.unregister_region(region_id, me, false);
  if (r) return 0;
  const auto& m = r.error().message;
  const auto at = m.find("': ");
  REQUIRE(at != std::string::npos);
  return static_cast<std::uint32_t>(std::stoul(m.substr(at + 3)));
}

policy::store_policy profile(policy::profile p) {
  policy::store_policy out;
  out.profile = p;
  return out;
}

}  // namespace

// ---- Feed ----------------------------------------------------------------------------------

TEST_CASE("engine lip feed: a segment with an empty storage_id is INVALID_ARGUMENT", "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto id = begin_lip(*e);
  auto f = feed_of(id);
  f.payload = lease_segments{{{"s0", 0, 0, 16}, {"", 0, 16, 16}}};
  CHECK_ERROR(e->feed(f), errc::invalid_argument, "cannot add lease segment 1: storage_id is empty");
}

TEST_CASE("engine lip feed: a storage entry needs exactly one source and a storage_id", "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto id = begin_lip(*e);
  auto f = feed_of(id);
  auto entry = host_entry("s0", std::string(16, 'x'));
  entry.source = std::monostate{};
  f.storage_entries.push_back(entry);
  CHECK_ERROR(e->feed(f), errc::invalid_argument,
              "cannot add storage 's0': storage entry must specify exactly one source");
  auto g = feed_of(id);
  g.storage_entries.push_back(host_entry("", std::string(16, 'x')));
  CHECK_ERROR(e->feed(g), errc::invalid_argument, "cannot add storage: storage_id is empty");
}

TEST_CASE("engine lip feed: a duplicate storage_id is INVALID_ARGUMENT, within and across messages",
          "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto id = begin_lip(*e);
  auto f = feed_of(id);
  f.storage_entries = {host_entry("s0", std::string(16, 'x')), host_entry("s0", std::string(16, 'y'))};
  CHECK_ERROR(e->feed(f), errc::invalid_argument, "cannot add storage 's0': duplicate storage_id");
  auto g = feed_of(id);
  g.storage_entries = {host_entry("s0", std::string(16, 'x'))};
  REQUIRE_OK(e->feed(g));
  CHECK_ERROR(e->feed(g), errc::invalid_argument, "cannot add storage 's0': duplicate storage_id");
}

TEST_CASE("engine lip feed: a message with nothing in it is 'missing feed payload'", "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto id = begin_lip(*e);
  CHECK_ERROR(e->feed(feed_of(id)), errc::invalid_argument,
              "cannot feed registration '" + id + "': missing feed payload");
}

TEST_CASE("engine lip feed: stable payloads are refused on a lease registration", "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto id = begin_lip(*e);
  auto f = feed_of(id);
  f.payload = view_chunk{0, 0, "abcd"};
  CHECK_ERROR(e->feed(f), errc::failed_precondition,
              "cannot feed registration '" + id +
                  "': view_chunk and stable_dram_write_progress need a stable_dram "
                  "registration with stage_on_gpu=false, not lease-in-place");
  f.payload = stable_write_progress{{{0, 4}}, true};
  CHECK_CODE(e->feed(f), errc::failed_precondition);
}

TEST_CASE("engine lip feed: a region-backed entry naming an unknown region is NOT_FOUND",
          "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto id = begin_lip(*e);
  auto f = feed_of(id);
  regions::region_info ghost;
  ghost.id = "region:00000000000000000000000000000000";
  ghost.kind = regions::memory_kind::host_shared;
  f.storage_entries.push_back(region_entry("s0", ghost, 16));
  CHECK_ERROR(e->feed(f), errc::not_found,
              "cannot add storage 's0': cannot find region 'region:00000000000000000000000000000000': no such region");
  auto g = feed_of(id);
  storage_entry v;
  v.storage_id = "s1";
  v.storage_length = 16;
  v.source = vram_region_source{ghost.id};
  g.storage_entries.push_back(v);
  CHECK_CODE(e->feed(g), errc::not_found);
}

TEST_CASE("engine lip feed: a VRAM region on another device is FAILED_PRECONDITION", "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto region = e->register_region(vram_region(0, std::string(64, '\x07')));
  REQUIRE_OK(region);
  const auto id = begin_lip(*e);
  auto f = feed_of(id);
  auto entry = region_entry("s0", *region, 16);
  entry.device_id = 1;
  f.storage_entries.push_back(entry);
  CHECK_ERROR(e->feed(f), errc::failed_precondition,
              "cannot add storage 's0': cannot use region '" + region->id +
                  "' for storage 's0': region is on device 0, storage on device 1");
  CHECK(region_refs(*e, region->id) == 0);
}

TEST_CASE("engine lip feed: a region_ref of the wrong kind is FAILED_PRECONDITION", "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto vram = e->register_region(vram_region(0, std::string(64, '\x07')));
  auto host = e->register_region(host_region(4096));
  REQUIRE_OK(vram);
  REQUIRE_OK(host);
  const auto id = begin_lip(*e);
  auto f = feed_of(id);
  auto entry = region_entry("s0", *vram, 16);
  std::get<region_ref_source>(entry.source).kind = regions::memory_kind::host_shared;
  f.storage_entries.push_back(entry);
  CHECK_ERROR(e->feed(f), errc::failed_precondition,
              "cannot add storage 's0': cannot use region '" + vram->id +
                  "' for storage 's0': region is VRAM, not HOST_SHARED");
  // vram_region_id naming a HOST_SHARED region.
  auto g = feed_of(id);
  storage_entry v;
  v.storage_id = "s1";
  v.storage_length = 16;
  v.source = vram_region_source{host->id};
  g.storage_entries.push_back(v);
  CHECK_ERROR(e->feed(g), errc::failed_precondition,
              "cannot add storage 's1': cannot use region '" + host->id +
                  "' for storage 's1': region is HOST_SHARED, not VRAM");
}

TEST_CASE("engine lip feed: a region-backed entry must lie inside its region", "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto region = e->register_region(host_region(4096));
  REQUIRE_OK(region);
  const auto id = begin_lip(*e);
  const std::string what = "cannot add storage 's0': cannot use region '" + region->id + "' for storage 's0': ";
  {
    auto f = feed_of(id);
    f.storage_entries.push_back(region_entry("s0", *region, 4097));
    CHECK_ERROR(e->feed(f), errc::failed_precondition, what + "bytes [0, +4097) exceed the region's 4096 bytes");
  }
  {
    auto f = feed_of(id);
    f.storage_entries.push_back(region_entry("s0", *region, 16, 4081));
    CHECK_ERROR(e->feed(f), errc::failed_precondition, what + "bytes [4081, +16) exceed the region's 4096 bytes");
  }
  {
    auto f = feed_of(id);
    f.storage_entries.push_back(region_entry("s0", *region, 16, 4080));  // exactly the last 16 bytes
    REQUIRE_OK(e->feed(f));
  }
  CHECK(region_refs(*e, region->id) == 1);
}

TEST_CASE("engine lip feed: a region of another owner is PERMISSION_DENIED", "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto region = e->register_region(host_region(4096, me + 1));
  REQUIRE_OK(region);
  const auto id = begin_lip(*e);
  auto f = feed_of(id);
  f.storage_entries.push_back(region_entry("s0", *region, 16));
  CHECK_ERROR(e->feed(f), errc::permission_denied,
              "cannot add storage 's0': cannot acquire region '" + region->id + "': owned by pid " +
                  std::to_string(me + 1) + ", not " + std::to_string(me));
}

TEST_CASE("engine lip feed: a retiring region is FAILED_PRECONDITION", "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto region = e->register_region(host_region(4096));
  REQUIRE_OK(region);
  const auto first = begin_lip(*e);
  auto f = feed_of(first);
  f.storage_entries.push_back(region_entry("s0", *region, 16));
  REQUIRE_OK(e->feed(f));
  auto retired = e->unregister_region(region->id, me, true);  // referenced: it retires
  REQUIRE_OK(retired);
  CHECK_FALSE(*retired);

  const auto second = begin_lip(*e);
  f.registration_id = second;
  CHECK_ERROR(e->feed(f), errc::failed_precondition,
              "cannot add storage 's0': cannot acquire region '" + region->id + "': region is retiring");
  // The retiring region goes away with its last reference.
  REQUIRE_OK(e->abort(first));
  CHECK(e->stats().regions == 0);
}

TEST_CASE("engine lip feed: a bad entry in a message leaves no region reference taken", "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto region = e->register_region(host_region(4096));
  REQUIRE_OK(region);
  const auto id = begin_lip(*e);
  auto f = feed_of(id);
  f.storage_entries.push_back(region_entry("s0", *region, 16));
  f.storage_entries.push_back(region_entry("s1", *region, 8192));  // too big
  CHECK_CODE(e->feed(f), errc::failed_precondition);
  CHECK(region_refs(*e, region->id) == 0);
}

TEST_CASE("engine lip feed: a message rejected for a bad segment records none of its storages",
          "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto region = e->register_region(host_region(4096));
  REQUIRE_OK(region);
  const auto id = begin_lip(*e);
  auto f = feed_of(id);
  f.storage_entries.push_back(region_entry("s0", *region, 16));
  f.payload = lease_segments{{{"", 0, 0, 16}}};
  CHECK_ERROR(e->feed(f), errc::invalid_argument, "cannot add lease segment 0: storage_id is empty");
  CHECK(region_refs(*e, region->id) == 0);
  region = e->register_region(host_region(4096));
  REQUIRE_OK(region);
  // The client's corrected retry is not a duplicate.
  f.storage_entries = {region_entry("s0", *region, 16)};
  f.payload = lease_segments{{{"s0", 0, 0, 16}}};
  REQUIRE_OK(e->feed(f));
  CHECK(region_refs(*e, region->id) == 1);
}

// ---- Commit: payload presence (step 3), the registration stays open -------------------------

TEST_CASE(
    "engine lip commit: missing segments, storages or aliases are FAILED_PRECONDITION and the registration stays open",
    "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  const auto id = begin_lip(*e, m.total_size());
  const auto all = t::lip_feed(id, m);

  CHECK_ERROR(e->commit(id), errc::failed_precondition, "cannot commit lease: no lease segments fed");
  auto segs = feed_of(id);
  segs.payload = all.payload;
  REQUIRE_OK(e->feed(segs));
  CHECK_ERROR(e->commit(id), errc::failed_precondition, "cannot commit lease: no storage entries fed");
  auto storages = feed_of(id);
  storages.storage_entries = all.storage_entries;
  REQUIRE_OK(e->feed(storages));
  CHECK_ERROR(e->commit(id), errc::failed_precondition,
              "cannot commit lease: registration missing tensor_aliases payload");
  auto aliases = feed_of(id);
  aliases.tensor_aliases = all.tensor_aliases;
  REQUIRE_OK(e->feed(aliases));
  auto committed = e->commit(id);
  REQUIRE_OK(committed);
  CHECK(committed->descriptor.artifact_id == t::expected_mi2(t::small_model_json, m.canonical()));
}

// ---- Commit: the index rebuild (step 4, §2.3) -----------------------------------------------

TEST_CASE("engine lip commit: a duplicate alias name is INVALID_ARGUMENT and ends the registration",
          "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  const auto id = begin_lip(*e, m.total_size());
  auto f = t::lip_feed(id, m);
  f.tensor_aliases.push_back(t::alias_of(m.tensors[0]));
  REQUIRE_OK(e->feed(f));
  CHECK_ERROR(e->commit(id), errc::invalid_argument, "cannot rebuild index: alias 'w' is duplicated");
  CHECK_CODE(e->commit(id), errc::not_found);
  CHECK(e->stats().pending_registrations == 0);
}

TEST_CASE("engine lip commit: an alias of an unknown storage is INVALID_ARGUMENT", "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  const auto id = begin_lip(*e, m.total_size());
  auto f = t::lip_feed(id, m);
  f.tensor_aliases[1].storage_id = "zz";
  REQUIRE_OK(e->feed(f));
  CHECK_ERROR(e->commit(id), errc::invalid_argument, "cannot rebuild index: alias 'v' refers to unknown storage_id=zz");
}

TEST_CASE("engine lip commit: an aliased storage without a segment is INVALID_ARGUMENT", "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  const auto id = begin_lip(*e, m.total_size());
  auto f = t::lip_feed(id, m);
  auto& segs = std::get<lease_segments>(f.payload).segments;
  std::erase_if(segs, [](const auto& s) { return s.storage_id == "s1"; });
  REQUIRE_OK(e->feed(f));
  CHECK_ERROR(e->commit(id), errc::invalid_argument,
              "cannot rebuild index: alias 'b': missing segment entry for storage_id=s1");
}

TEST_CASE("engine lip commit: alias bounds are checked in bytes (storage_offset in elements)",
          "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto with_v = [&](std::uint64_t storage_offset, std::uint64_t logical_length) {
    const auto id = begin_lip(*e, m.total_size());
    auto f = t::lip_feed(id, m);
    for (auto& a : f.tensor_aliases) {
      if (a.name == "v") {
        a.storage_offset = storage_offset;
        a.logical_length = logical_length;
      }
    }
    REQUIRE_OK(e->feed(f));
    return e->commit(id);
  };
  // 2 elements × 4 bytes + 8 = 16 = storage_length: fits exactly.
  REQUIRE_OK(with_v(2, 8));
  CHECK_ERROR(with_v(2, 9), errc::out_of_range,
              "cannot rebuild index: alias 'v' ends at byte 17, past storage_length 16 of storage 's0'");
  // Upstream's element-plus-bytes check would accept 3 + 8 <= 16; in bytes it is 20.
  CHECK_ERROR(with_v(3, 8), errc::out_of_range,
              "cannot rebuild index: alias 'v' ends at byte 20, past storage_length 16 of storage 's0'");
}

TEST_CASE("engine lip commit: two segments of one storage at different artifact_offsets are INVALID_ARGUMENT",
          "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  const auto id = begin_lip(*e, 64);
  auto f = t::lip_feed(id, m);
  std::get<lease_segments>(f.payload).segments.push_back({"s0", 0, 40, 16});
  REQUIRE_OK(e->feed(f));
  CHECK_ERROR(e->commit(id), errc::invalid_argument,
              "cannot rebuild index: storage_id=s0 has segments at artifact_offset 24 and 40");
}

TEST_CASE("engine lip commit: overlapping segments of different storages are INVALID_ARGUMENT",
          "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  SECTION("both aliased: the index itself overlaps") {
    const auto id = begin_lip(*e, m.total_size());
    auto f = t::lip_feed(id, m);
    for (auto& s : std::get<lease_segments>(f.payload).segments) {
      if (s.storage_id == "s0") s.artifact_offset = 16;  // s1 is [0, 20)
    }
    REQUIRE_OK(e->feed(f));
    CHECK_ERROR(
        e->commit(id), errc::invalid_argument,
        "cannot build byte range map: tensor 'b' [0, 20) and tensor 'v' [16, 32) overlap without being aliases");
  }
  SECTION("an unaliased storage's segment over an aliased one (DECISIONS §5.14)") {
    const auto id = begin_lip(*e, m.total_size());
    auto f = t::lip_feed(id, m);
    f.storage_entries.push_back(host_entry("s2", std::string(8, 'z')));
    std::get<lease_segments>(f.payload).segments.push_back({"s2", 0, 16, 8});
    REQUIRE_OK(e->feed(f));
    CHECK_ERROR(e->commit(id), errc::invalid_argument,
                "cannot commit lease: cannot build byte range map: segment 1 of storage 's1' [0, 20) (source 1 at 0) "
                "and segment 2 of storage 's2' [16, 24) (source 2 at 0) overlap but map to different source bytes");
  }
}

TEST_CASE("engine lip commit: a segment ending past total_size is INVALID_ARGUMENT", "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  SECTION("an aliased storage") {
    const auto id = begin_lip(*e, 36);
    REQUIRE_OK(e->feed(t::lip_feed(id, m)));
    CHECK_ERROR(e->commit(id), errc::invalid_argument,
                "cannot build byte range map: tensor 'v' ends at 40, past total_size 36");
  }
  SECTION("an unaliased storage") {
    const auto id = begin_lip(*e, m.total_size());
    auto f = t::lip_feed(id, m);
    f.storage_entries.push_back(host_entry("s2", std::string(8, 'z')));
    std::get<lease_segments>(f.payload).segments.push_back({"s2", 0, 40, 8});
    REQUIRE_OK(e->feed(f));
    CHECK_ERROR(
        e->commit(id), errc::invalid_argument,
        "cannot commit lease: cannot build byte range map: segment 2 of storage 's2' ends at 48, past total_size 40");
  }
}

// ---- Commit: per-segment rules (step 7) ------------------------------------------------------

TEST_CASE("engine lip commit: a segment must cover its whole storage", "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  SECTION("length differs from storage_length") {
    const auto id = begin_lip(*e, 64);
    auto f = t::lip_feed(id, m);
    f.storage_entries.push_back(host_entry("s2", std::string(8, 'z')));
    std::get<lease_segments>(f.payload).segments.push_back({"s2", 0, 48, 4});
    REQUIRE_OK(e->feed(f));
    CHECK_ERROR(e->commit(id), errc::invalid_argument,
                "cannot commit lease: segment 2 of storage 's2' has length 4, not the storage_length 8");
  }
  SECTION("storage_offset is not 0") {
    const auto id = begin_lip(*e, 64);
    auto f = t::lip_feed(id, m);
    f.storage_entries.push_back(host_entry("s2", std::string(8, 'z')));
    std::get<lease_segments>(f.payload).segments.push_back({"s2", 4, 48, 8});
    REQUIRE_OK(e->feed(f));
    CHECK_ERROR(
        e->commit(id), errc::invalid_argument,
        "cannot commit lease: segment 2 of storage 's2' has storage_offset 4: a segment must cover its whole storage");
  }
  SECTION("the storage was never fed") {
    const auto id = begin_lip(*e, 64);
    auto f = t::lip_feed(id, m);
    std::get<lease_segments>(f.payload).segments.push_back({"zz", 0, 48, 8});
    REQUIRE_OK(e->feed(f));
    CHECK_ERROR(e->commit(id), errc::invalid_argument,
                "cannot commit lease: segment 2 of storage 'zz' refers to a storage that was not fed");
  }
}

TEST_CASE("engine lip commit: a storage no alias references is not checked, and its segment hashes as zero",
          "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  const auto expected = t::expected_mi2(t::small_model_json, m.canonical());
  SECTION("a storage entry with no segment and no alias") {
    const auto id = begin_lip(*e, m.total_size());
    auto f = t::lip_feed(id, m);
    f.storage_entries.push_back(host_entry("extra", std::string(4096, 'q')));
    REQUIRE_OK(e->feed(f));
    auto committed = e->commit(id);
    REQUIRE_OK(committed);
    CHECK(committed->descriptor.artifact_id == expected);
  }
  SECTION("an unaliased storage with a segment in the PAD gap (DECISIONS §5.1)") {
    const auto id = begin_lip(*e, m.total_size());
    auto f = t::lip_feed(id, m);
    f.storage_entries.push_back(host_entry("extra", std::string(4, 'q')));
    std::get<lease_segments>(f.payload).segments.push_back({"extra", 0, 20, 4});
    REQUIRE_OK(e->feed(f));
    auto committed = e->commit(id);
    REQUIRE_OK(committed);
    CHECK(committed->descriptor.artifact_id == expected);
    auto bytes = e->open_bytes(expected);
    REQUIRE_OK(bytes);
    std::string seen(40, '\0');
    REQUIRE_OK((*bytes)->read(0, std::as_writable_bytes(std::span<char>(seen))));
    CHECK(seen == m.canonical());
  }
}

TEST_CASE("engine lip commit: a CUDA-handle storage without a GPU is FAILED_PRECONDITION",
          "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  const auto id = begin_lip(*e, m.total_size());
  auto f = t::lip_feed(id, m);
  for (auto& s : f.storage_entries) s.source = cuda_ipc_source{std::string(64, '\x01')};
  REQUIRE_OK(e->feed(f));
  CHECK_ERROR(e->commit(id), errc::failed_precondition,
              "cannot open storage 's0' on device 0: CUDA memory needs a GPU and this engine has none");
  // Feeding more cannot fix that: the registration is gone.
  CHECK(e->stats().pending_registrations == 0);
  CHECK_CODE(e->commit(id), errc::not_found);
}

TEST_CASE("engine lip commit: a VRAM region storage without a GPU is FAILED_PRECONDITION",
          "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto region = e->register_region(vram_region(0, std::string(64, '\x02')));
  REQUIRE_OK(region);
  const auto id = begin_lip(*e, m.total_size());
  std::map<std::string, storage_entry> entries{{"s0", region_entry("s0", *region, 16, 0)},
                                               {"s1", region_entry("s1", *region, 20, 64)}};
  REQUIRE_OK(e->feed(t::lip_feed(id, m, entries)));
  CHECK(region_refs(*e, region->id) == 1);  // one per registration and region
  CHECK_ERROR(e->commit(id), errc::failed_precondition,
              "cannot open storage 's0' on device 0: CUDA memory needs a GPU and this engine has none");
  CHECK(e->stats().pending_registrations == 0);
  CHECK(region_refs(*e, region->id) == 0);  // released with the registration
}

// ---- Commit: hashing, identity ---------------------------------------------------------------

TEST_CASE("engine lip commit: the rebuilt index equals canonical_index::build and the id is computed independently",
          "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  REQUIRE(m.index().json() == t::small_model_json);
  auto committed = t::register_lip(*e, m, me);
  REQUIRE_OK(committed);
  const auto& d = committed->descriptor;
  CHECK(d.artifact_id == t::expected_mi2(t::small_model_json, m.canonical()));
  CHECK(d.index_multihash == t::index_multihash_of(t::small_model_json));
  CHECK(d.id_kind == identity::id_kind::mi2);
  CHECK(d.total_size == 40);
  CHECK(d.schema_version == "v3");
  CHECK(d.encoding == "json");
  CHECK_FALSE(committed->existed);
  auto idx = e->index_of(d.artifact_id);
  REQUIRE_OK(idx);
  CHECK((*idx)->json() == m.index().json());
}

TEST_CASE("engine lip commit: gaps between segments and the tail hash as zero", "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  t::model m;
  m.storages = {{"a", t::pattern(24, 7)}, {"b", t::pattern((5u << 20) + 8, 8)}};
  m.tensors = {{"x", "a", {6}, {1}, "torch.float32", 0, 24},
               {"y", "b", {(5 << 18) + 2}, {1}, "torch.float32", 0, (5u << 20) + 8}};
  const std::uint64_t total = m.total_size() + 4096 + 1000;  // tail PAD past the last storage
  const auto id = begin_lip(*e, total);
  auto f = t::lip_feed(id, m);
  auto& segs = std::get<lease_segments>(f.payload).segments;
  segs[1].artifact_offset += 4096;  // a gap of 4096 + the alignment PAD
  REQUIRE_OK(e->feed(f));
  auto committed = e->commit(id);
  REQUIRE_OK(committed);

  std::string canonical(total, '\0');
  std::copy(m.storages[0].bytes.begin(), m.storages[0].bytes.end(), canonical.begin());
  std::copy(m.storages[1].bytes.begin(), m.storages[1].bytes.end(),
            canonical.begin() + static_cast<std::ptrdiff_t>(segs[1].artifact_offset));
  const std::string json = R"({"x":[0,24,[6],[1],"torch.float32",0],"y":[)" + std::to_string(segs[1].artifact_offset) +
                           "," + std::to_string((5u << 20) + 8) + "," + "[" + std::to_string((5 << 18) + 2) +
                           R"(],[1],"torch.float32",0]})";
  CHECK(committed->descriptor.artifact_id == t::expected_mi2(json, canonical));
}

TEST_CASE("engine lip commit: a name with é gives the JSON-escaped index of registration.md §3.4",
          "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto id = begin_lip(*e, 16);
  auto f = feed_of(id);
  f.storage_entries.push_back(host_entry("s", t::pattern(16, 3)));
  f.payload = lease_segments{{{"s", 0, 0, 16}}};
  f.tensor_aliases.push_back({"\xc3\xa9", "s", 0, 16, {2, 2}, {2, 1}, "torch.float32"});
  REQUIRE_OK(e->feed(f));
  auto committed = e->commit(id);
  REQUIRE_OK(committed);
  CHECK(committed->descriptor.index_multihash == "bciqehocq7w5cliuf24tdgag26cwzyswfkhaflh42wcy3lpnwlyzbk4y");
  auto idx = e->index_of(committed->descriptor.artifact_id);
  REQUIRE_OK(idx);
  CHECK((*idx)->json() == R"({"\u00e9":[0,16,[2,2],[2,1],"torch.float32",0]})");
}

TEST_CASE("engine lip commit: a tensor name that is not valid UTF-8 is INVALID_ARGUMENT",
          "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto id = begin_lip(*e, 16);
  auto f = feed_of(id);
  f.storage_entries.push_back(host_entry("s", t::pattern(16, 3)));
  f.payload = lease_segments{{{"s", 0, 0, 16}}};
  f.tensor_aliases.push_back({"bad\xff", "s", 0, 16, {4}, {1}, "torch.float32"});
  REQUIRE_OK(e->feed(f));
  CHECK_ERROR(e->commit(id), errc::invalid_argument,
              "cannot build canonical index: tensor name 'bad\\xff' is not valid utf-8");
}

TEST_CASE("engine lip commit: a cgid registration is identified by its cgid, with no data hash",
          "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto r = t::lip_begin(m.total_size(), me);
  r.client_artifact_id = "cgid:model-7.v1";
  auto begun = e->begin(r);
  REQUIRE_OK(begun);
  REQUIRE_OK(e->feed(t::lip_feed(begun->registration_id, m)));
  auto committed = e->commit(begun->registration_id);
  REQUIRE_OK(committed);
  CHECK(committed->descriptor.artifact_id == "cgid:model-7.v1");
  CHECK(committed->descriptor.data_multihash.empty());
  CHECK(committed->descriptor.id_kind == identity::id_kind::cgid);
  CHECK(committed->descriptor.index_multihash == t::index_multihash_of(t::small_model_json));
  auto got = e->get("cgid:model-7.v1");
  REQUIRE_OK(got);
  CHECK(got->leases == 1);
}

TEST_CASE("engine lip commit: a second lease of the same artifact on the same device is ALREADY_EXISTS",
          "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto first = t::register_lip(*e, m, me);
  REQUIRE_OK(first);
  const auto& id = first->descriptor.artifact_id;
  std::string second_id;
  CHECK_ERROR(t::register_lip(*e, m, me, &second_id), errc::already_exists,
              "cannot commit lease of " + id + ": lease already exists for artifact on device 0");
  CHECK(e->stats().pending_registrations == 0);
  // Another device is fine.
  auto r = t::lip_begin(m.total_size(), me);
  r.device_id = 1;
  auto begun = e->begin(r);
  REQUIRE_OK(begun);
  REQUIRE_OK(e->feed(t::lip_feed(begun->registration_id, m)));
  auto other = e->commit(begun->registration_id);
  REQUIRE_OK(other);
  CHECK(other->descriptor.artifact_id == id);
  CHECK(e->get(id)->leases == 2);
}

TEST_CASE("engine lip commit: an expired registration is DEADLINE_EXCEEDED", "[registration][engine_lip]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  const auto id = begin_lip(*e, m.total_size(), 100);
  REQUIRE_OK(e->feed(t::lip_feed(id, m)));
  clock.advance(std::chrono::milliseconds(101));
  CHECK_ERROR(e->commit(id), errc::deadline_exceeded, "cannot commit registration '" + id + "': its TTL expired");
  CHECK_ERROR(e->commit(id), errc::not_found, "cannot commit registration '" + id + "': no such registration");
}

// ---- CUDA handles through the fake device ---------------------------------------------------

TEST_CASE("engine lip commit: each distinct CUDA handle is opened once", "[registration][engine_lip]") {
  fake_clock clock;
  auto devices = std::make_shared<fake_device_memory>(2);
  auto options = t::deterministic_options(clock);
  options.devices = devices;
  auto e = t::make_engine(options);

  // Three storages: s0 and s1 in one allocation (different offsets), s2 in another; plus a
  // VRAM region whose two storages share its handle.
  t::model m;
  m.storages = {{"s0", t::pattern(16, 1)},
                {"s1", t::pattern(20, 2)},
                {"s2", t::pattern(8, 3)},
                {"r0", t::pattern(12, 4)},
                {"r1", t::pattern(12, 5)}};
  m.tensors = {{"a", "s0", {4}, {1}, "torch.float32", 0, 16},
               {"b", "s1", {5}, {1}, "torch.float32", 0, 20},
               {"c", "s2", {2}, {1}, "torch.float32", 0, 8},
               {"d", "r0", {3}, {1}, "torch.float32", 0, 12},
               {"e", "r1", {3}, {1}, "torch.float32", 0, 12}};
  const auto shared = devices->export_allocation(0, 256);
  const auto single = devices->export_allocation(0, 8);
  const auto region_handle = devices->export_allocation(1, 1024);
  auto write = [&](const std::string& handle, std::size_t at, const std::string& bytes) {
    auto mem = devices->memory_of(handle);
    REQUIRE(mem.size() >= at + bytes.size());
    std::memcpy(mem.data() + at, bytes.data(), bytes.size());
  };
  write(shared, 0, m.storage("s0").bytes);
  write(shared, 100, m.storage("s1").bytes);
  write(single, 0, m.storage("s2").bytes);
  write(region_handle, 0, m.storage("r0").bytes);
  write(region_handle, 500, m.storage("r1").bytes);
  auto region = e->register_region(vram_region(1, region_handle, 1024));
  REQUIRE_OK(region);

  auto handle_entry = [](const std::string& id, const std::string& handle, std::uint64_t length, std::uint64_t base) {
    storage_entry s;
    s.storage_id = id;
    s.device_id = 0;
    s.storage_length = length;
    s.source = cuda_ipc_source{handle};
    s.mapping_base_offset = base;
    return s;
  };
  std::map<std::string, storage_entry> entries{
      {"s0", handle_entry("s0", shared, 16, 0)},    {"s1", handle_entry("s1", shared, 20, 100)},
      {"s2", handle_entry("s2", single, 8, 0)},     {"r0", region_entry("r0", *region, 12, 0)},
      {"r1", region_entry("r1", *region, 12, 500)},
  };
  const auto id = begin_lip(*e, m.total_size());
  REQUIRE_OK(e->feed(t::lip_feed(id, m, entries)));
  auto committed = e->commit(id);
  REQUIRE_OK(committed);
  CHECK(committed->descriptor.artifact_id == t::expected_mi2(m.index().json(), m.canonical()));
  CHECK(devices->opens_of(shared) == 1);
  CHECK(devices->opens_of(single) == 1);
  CHECK(devices->opens_of(region_handle) == 1);
  CHECK(devices->total_opens() == 3);
  CHECK(e->stats().open_mappings == 3);     // the lease keeps them
  CHECK(region_refs(*e, region->id) == 1);  // one per registration and region, however many storages
  e->revoke(id, "test");
  // The handles' mappings closed with the lease; the region keeps its own until it goes
  // (registration.md §5.2).
  CHECK(e->stats().open_mappings == 1);
  CHECK(region_refs(*e, region->id) == 0);  // and unregisters it
  CHECK(e->stats().open_mappings == 0);
}

TEST_CASE("engine lip commit: a handle on the wrong device or too small is refused by the device",
          "[registration][engine_lip]") {
  fake_clock clock;
  auto devices = std::make_shared<fake_device_memory>(1);
  auto options = t::deterministic_options(clock);
  options.devices = devices;
  auto e = t::make_engine(options);
  const auto m = t::small_model();
  const auto small = devices->export_allocation(0, 8);
  const auto id = begin_lip(*e, m.total_size());
  auto f = t::lip_feed(id, m);
  for (auto& s : f.storage_entries) s.source = cuda_ipc_source{small};
  REQUIRE_OK(e->feed(f));
  CHECK_ERROR(e->commit(id), errc::out_of_range,
              "cannot open storage 's0': cannot open CUDA IPC memory: the allocation has 8 bytes, 16 needed");
  CHECK(e->stats().pending_registrations == 0);
}

// ---- The local stable tier at commit (§6.2, §8) -----------------------------------------------

TEST_CASE("engine lip commit: policy WARM with a tiny stable budget is DEGRADED",
          "[registration][engine_lip][policy]") {
  fake_clock clock;
  auto options = t::deterministic_options(clock);
  options.stable_bytes = 1;
  auto e = t::make_engine(options);
  auto committed = t::register_lip(*e, t::small_model(), me, nullptr, profile(policy::profile::warm));
  REQUIRE_OK(committed);
  REQUIRE(committed->local_stable_tier);
  CHECK(committed->local_stable_tier->status == local_stable_status::degraded);
  CHECK_THAT(committed->local_stable_tier->message,
             Catch::StartsWith("cannot keep a local stable copy of " + committed->descriptor.artifact_id + ": "));
  auto got = e->get(committed->descriptor.artifact_id);
  REQUIRE_OK(got);
  CHECK(got->leases == 1);
  CHECK_FALSE(got->stable_replica);
}

TEST_CASE("engine lip commit: policy PINNED with a tiny stable budget fails RESOURCE_EXHAUSTED and drops the lease",
          "[registration][engine_lip][policy]") {
  fake_clock clock;
  auto options = t::deterministic_options(clock);
  options.stable_bytes = 1;
  auto e = t::make_engine(options);
  auto region = e->register_region(host_region(4096));
  REQUIRE_OK(region);
  const auto m = t::small_model();
  auto r = t::lip_begin(m.total_size(), me);
  r.policy = profile(policy::profile::pinned);
  auto begun = e->begin(r);
  REQUIRE_OK(begun);
  std::map<std::string, storage_entry> entries{{"s0", region_entry("s0", *region, 16, 0)},
                                               {"s1", region_entry("s1", *region, 20, 64)}};
  REQUIRE_OK(e->feed(t::lip_feed(begun->registration_id, m, entries)));
  auto got = e->commit(begun->registration_id);
  REQUIRE_FALSE(got);
  CHECK(got.error().code == errc::resource_exhausted);
  CHECK_THAT(got.error().message, Catch::StartsWith("cannot keep a local stable copy of mi2:"));
  CHECK(e->stats().leases == 0);
  CHECK(e->stats().artifacts == 0);
  CHECK(e->stats().pending_registrations == 0);
  CHECK(e->list().empty());
  CHECK(region_refs(*e, region->id) == 0);
}

TEST_CASE("engine lip commit: policy PINNED with room is READY and keeps a stable replica",
          "[registration][engine_lip][policy]") {
  fake_clock clock;
  auto options = t::deterministic_options(clock);
  options.stable_bytes = 1 << 20;
  auto e = t::make_engine(options);
  auto committed = t::register_lip(*e, t::small_model(), me, nullptr, profile(policy::profile::pinned));
  REQUIRE_OK(committed);
  REQUIRE(committed->local_stable_tier);
  CHECK(committed->local_stable_tier->status == local_stable_status::ready);
  auto got = e->get(committed->descriptor.artifact_id);
  REQUIRE_OK(got);
  CHECK(got->stable_replica);
  CHECK(e->stats().stable_bytes == 40);
}

TEST_CASE("engine lip commit: policy CACHE leaves the local stable tier SKIPPED",
          "[registration][engine_lip][policy]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  for (auto p : {std::optional<policy::store_policy>{}, std::optional(profile(policy::profile::cache))}) {
    auto committed = t::register_lip(*e, t::small_model(), me, nullptr, p);
    REQUIRE_OK(committed);
    REQUIRE(committed->local_stable_tier);
    CHECK(committed->local_stable_tier->status == local_stable_status::skipped);
    CHECK_FALSE(e->get(committed->descriptor.artifact_id)->stable_replica);
    REQUIRE_OK(e->deregister({committed->descriptor.artifact_id, true, 0, me}));
  }
}
