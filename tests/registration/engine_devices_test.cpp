// Device identity, CUDA VMM regions and the device layout of an artifact, through the engine and
// a fake device (docs/wire-format.md §12–13). The real CUDA side is tested on a GPU in
// tests/cuda/; here are the engine's rules, which hold on any machine.
#include "tensorreg/registration/engine.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <set>

#include "support/engine_helpers.hpp"
#include "support/fake_device_memory.hpp"
#include "tensorreg/memory/shared_memory.hpp"

namespace {

using namespace tensorreg;
using namespace tensorreg::registration;
using tensorreg::testing::fake_clock;
using tensorreg::testing::fake_device_memory;
namespace t = tensorreg::testing;

const std::int32_t me = static_cast<std::int32_t>(::getpid());

struct rig {
  fake_clock clock;
  std::shared_ptr<fake_device_memory> devices = std::make_shared<fake_device_memory>(2);
  std::unique_ptr<engine> e;
  explicit rig(std::uint64_t stable_bytes = 1 << 20) {
    auto options = t::deterministic_options(clock);
    options.devices = devices;
    options.stable_bytes = stable_bytes;
    e = t::make_engine(options);
  }
};

// A "VMM allocation" of the fake: a memfd holding `bytes`.
unique_fd vmm_chunk(const std::string& bytes) {
  auto memory = memory::shared_memory::create(bytes.size(), "test-vmm");
  REQUIRE(memory);
  std::memcpy(memory->mutable_bytes().data(), bytes.data(), bytes.size());
  unique_fd fd(::fcntl(memory->fd(), F_DUPFD_CLOEXEC, 0));
  REQUIRE(fd);
  return fd;
}

regions::register_request vmm_region(std::int32_t device, const std::vector<std::string>& chunks) {
  regions::register_request r;
  r.kind = regions::memory_kind::vram;
  r.owner_pid = me;
  r.device_id = device;
  auto vmm = std::make_shared<regions::vmm_chunks>();
  for (const auto& c : chunks) {
    vmm->fds.push_back(vmm_chunk(c));
    vmm->chunk_bytes.push_back(c.size());
    r.size_bytes += c.size();
  }
  r.vmm = std::move(vmm);
  return r;
}

storage_entry region_entry(const std::string& id, const regions::region_info& region, std::uint64_t length,
                           std::uint64_t base_offset) {
  storage_entry s;
  s.storage_id = id;
  s.device_id = region.device_id;
  s.storage_length = length;
  s.source = region_ref_source{region.id, region.kind, region.device_id, region.size_bytes};
  s.mapping_base_offset = base_offset;
  return s;
}

storage_entry handle_entry(const std::string& id, const std::string& handle, std::uint64_t length, std::uint64_t base,
                           std::int32_t device = 0) {
  storage_entry s;
  s.storage_id = id;
  s.device_id = device;
  s.storage_length = length;
  s.source = cuda_ipc_source{handle};
  s.mapping_base_offset = base;
  return s;
}

std::string begin_lip(engine& e, std::uint64_t total_size) {
  auto begun = e.begin(t::lip_begin(total_size, me));
  REQUIRE_OK(begun);
  return begun->registration_id;
}

// The canonical bytes a reader of `layout` would see, read through `memory` (allocation i's
// bytes), PAD as zero.
std::string read_layout(const device_layout& layout, const std::vector<std::string>& memory) {
  std::string out(layout.descriptor.total_size, '\0');
  for (const auto& s : layout.segments) {
    REQUIRE(s.allocation < memory.size());
    REQUIRE(s.allocation_offset + s.length <= memory[s.allocation].size());
    std::memcpy(out.data() + s.artifact_offset, memory[s.allocation].data() + s.allocation_offset, s.length);
  }
  return out;
}

// Two storages in one region of two VMM chunks, one of them straddling the chunk boundary.
t::model two_storage_model() {
  t::model m;
  m.storages = {{"s0", t::pattern(24, 11)}, {"s1", t::pattern(40, 12)}};
  m.tensors = {{"a", "s0", {6}, {1}, "torch.float32", 0, 24}, {"b", "s1", {10}, {1}, "torch.float32", 0, 40}};
  return m;
}

}  // namespace

// ---- Device identity -------------------------------------------------------------------------

TEST_CASE("engine devices: a device UUID resolves to the engine's ordinal, in either form and any case",
          "[registration][devices]") {
  rig r;
  CHECK(r.e->resolve_device(5, "").value() == 5);  // no UUID: the ordinal as given
  const auto uuid = fake_device_memory::uuid_for(1);
  CHECK(r.e->resolve_device(0, uuid).value() == 1);  // the client's ordinal 0 is our device 1
  CHECK(r.e->resolve_device(0, uuid.substr(4)).value() == 1);
  std::string upper = uuid;
  for (auto& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  CHECK(r.e->resolve_device(0, upper).value() == 1);
  CHECK(r.e->device_uuid(1) == uuid);
  CHECK_CODE(r.e->resolve_device(0, "GPU-00000000-0000-0000-0000-000000000009"), errc::failed_precondition);
}

TEST_CASE("engine devices: without a GPU a device UUID is FAILED_PRECONDITION naming it", "[registration][devices]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto resolved = e->resolve_device(0, "GPU-00000000-0000-0000-0000-000000000000");
  REQUIRE_FALSE(resolved);
  CHECK(resolved.error().code == errc::failed_precondition);
  CHECK(resolved.error().message.find("GPU-00000000-0000-0000-0000-000000000000") != std::string::npos);
  CHECK(e->device_uuid(0).empty());
}

// ---- VMM regions -----------------------------------------------------------------------------

TEST_CASE("engine devices: a VMM region maps its chunks back to back and leases storages across them",
          "[registration][devices]") {
  rig r;
  const auto m = two_storage_model();
  // Region bytes: chunk 0 = [s0 (24) | 8 spare], chunk 1 = [s1 (40) | 24 spare]; s1 starts at
  // 32, so a storage at offset 16 of 48 bytes would straddle; s1 lies wholly in chunk 1 and a
  // third storage below straddles the boundary.
  std::string chunk0 = m.storage("s0").bytes + std::string(8, '\x7f');
  std::string chunk1 = m.storage("s1").bytes + std::string(24, '\x7e');
  t::model straddling = m;
  straddling.storages.push_back({"s2", (chunk0 + chunk1).substr(16, 48)});
  straddling.tensors.push_back({"c", "s2", {12}, {1}, "torch.float32", 0, 48});
  const auto id = begin_lip(*r.e, straddling.total_size());
  std::string region_id;
  {
    // The region_info handed back shares the mapping: let it go once the entries are made.
    auto region = r.e->register_region(vmm_region(1, {chunk0, chunk1}));
    REQUIRE_OK(region);
    CHECK(region->device_id == 1);
    CHECK(region->size_bytes == 96);
    CHECK(r.devices->vmm_reserved_bytes() == 96);
    CHECK(r.e->stats().vmm_reserved_bytes == 96);
    region_id = region->id;
    std::map<std::string, storage_entry> entries{{"s0", region_entry("s0", *region, 24, 0)},
                                                 {"s1", region_entry("s1", *region, 40, 32)},
                                                 {"s2", region_entry("s2", *region, 48, 16)}};
    REQUIRE_OK(r.e->feed(t::lip_feed(id, straddling, entries)));
  }
  auto committed = r.e->commit(id);
  REQUIRE_OK(committed);
  CHECK(committed->descriptor.artifact_id == t::expected_mi2(straddling.index().json(), straddling.canonical()));

  // A reader elsewhere gets the region once, with its chunks, and finds every tensor in it.
  {
    auto layout = r.e->device_layout_of(committed->descriptor.artifact_id);
    REQUIRE_OK(layout);
    REQUIRE(layout->allocations.size() == 1);
    const auto& a = layout->allocations[0];
    CHECK(a.device_id == 1);
    CHECK(a.size_bytes == 96);
    CHECK(a.cuda_ipc_handle.empty());
    REQUIRE(a.vmm);
    CHECK(a.vmm->fds.size() == 2);
    CHECK(a.vmm->chunk_bytes == std::vector<std::uint64_t>{32, 64});
    CHECK(read_layout(*layout, {chunk0 + chunk1}) == straddling.canonical());
  }

  // The mapping lives while the lease or the region does.
  r.e->revoke(id, "test");
  CHECK(r.devices->vmm_reserved_bytes() == 96);
  REQUIRE_OK(r.e->unregister_region(region_id, me, false));
  CHECK(r.devices->vmm_reserved_bytes() == 0);
  CHECK(r.e->stats().vmm_reserved_bytes == 0);
}

TEST_CASE("engine devices: a VMM region's chunks must match their fds and size_bytes", "[registration][devices]") {
  rig r;
  {
    auto req = vmm_region(0, {std::string(32, 'a'), std::string(32, 'b')});
    auto chunks = std::make_shared<regions::vmm_chunks>();
    chunks->chunk_bytes = req.vmm->chunk_bytes;
    chunks->fds.push_back(vmm_chunk(std::string(32, 'a')));  // one fd for two chunks
    req.vmm = chunks;
    CHECK_ERROR(r.e->register_region(std::move(req)), errc::invalid_argument,
                "cannot register region: 1 fds for 2 chunk sizes");
  }
  {
    auto req = vmm_region(0, {std::string(32, 'a')});
    req.size_bytes = 64;
    CHECK_ERROR(r.e->register_region(std::move(req)), errc::invalid_argument,
                "cannot register region: its CUDA VMM chunks hold 32 bytes, not size_bytes 64");
  }
  {
    auto req = vmm_region(0, {std::string(32, 'a')});
    req.cuda_ipc_handle = std::string(64, '\x01');
    CHECK_CODE(r.e->register_region(std::move(req)), errc::invalid_argument);  // both sources
  }
  {
    auto req = vmm_region(7, {std::string(32, 'a')});  // no device 7
    CHECK_CODE(r.e->register_region(std::move(req)), errc::failed_precondition);
  }
  {
    auto req = vmm_region(0, {std::string(32, 'a')});
    req.kind = regions::memory_kind::host_shared;
    req.host_shared = regions::host_shared_spec{"", true, regions::host_shared_class::scratch};
    req.device_mapping = std::make_shared<t::owned_bytes>(std::string(32, 'a'));
    CHECK_ERROR(r.e->register_region(std::move(req)), errc::invalid_argument,
                "cannot register region: HOST_SHARED takes no CUDA VMM allocations");
  }
  CHECK(r.devices->vmm_reserved_bytes() == 0);  // nothing imported by a refused request stays
}

TEST_CASE("engine devices: a VMM region without a GPU is FAILED_PRECONDITION", "[registration][devices]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  CHECK_ERROR(e->register_region(vmm_region(0, {std::string(32, 'a')})), errc::failed_precondition,
              "cannot register region: CUDA VMM memory on device 0 needs a GPU and this engine has none");
}

// ---- Device layout (OpenArtifactDevice) --------------------------------------------------------

TEST_CASE("engine devices: the layout of an IPC lease names each allocation once", "[registration][devices]") {
  rig r;
  t::model m;
  m.storages = {{"s0", t::pattern(16, 1)}, {"s1", t::pattern(20, 2)}, {"s2", t::pattern(8, 3)}};
  m.tensors = {{"a", "s0", {4}, {1}, "torch.float32", 0, 16},
               {"b", "s1", {5}, {1}, "torch.float32", 0, 20},
               {"c", "s2", {2}, {1}, "torch.float32", 0, 8}};
  const auto shared = r.devices->export_allocation(0, 256);
  const auto single = r.devices->export_allocation(0, 8);
  auto write = [&](const std::string& handle, std::size_t at, const std::string& bytes) {
    std::memcpy(r.devices->memory_of(handle).data() + at, bytes.data(), bytes.size());
  };
  write(shared, 0, m.storage("s0").bytes);
  write(shared, 100, m.storage("s1").bytes);
  write(single, 0, m.storage("s2").bytes);
  const auto id = begin_lip(*r.e, m.total_size());
  std::map<std::string, storage_entry> entries{{"s0", handle_entry("s0", shared, 16, 0)},
                                               {"s1", handle_entry("s1", shared, 20, 100)},
                                               {"s2", handle_entry("s2", single, 8, 0)}};
  REQUIRE_OK(r.e->feed(t::lip_feed(id, m, entries)));
  auto committed = r.e->commit(id);
  REQUIRE_OK(committed);

  auto layout = r.e->device_layout_of(committed->descriptor.artifact_id);
  REQUIRE_OK(layout);
  REQUIRE(layout->allocations.size() == 2);
  std::vector<std::string> memory;
  for (const auto& a : layout->allocations) {
    CHECK(a.device_id == 0);
    CHECK_FALSE(a.vmm);
    auto bytes = r.devices->memory_of(a.cuda_ipc_handle);
    REQUIRE(bytes.size() == a.size_bytes);
    memory.emplace_back(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  }
  CHECK(layout->allocations[0].cuda_ipc_handle != layout->allocations[1].cuda_ipc_handle);
  CHECK(layout->segments.size() == 3);
  CHECK(read_layout(*layout, memory) == m.canonical());
  CHECK(layout->index->json() == m.index().json());
}

TEST_CASE("engine devices: the layout of a coalesced copy is the daemon's buffer, DATA ranges only",
          "[registration][devices]") {
  rig r;
  const auto m = t::small_model();
  auto req = t::stable_begin(m, me);
  req.plan = coalesced_options{};
  auto begun = r.e->begin(req);
  REQUIRE_OK(begun);
  const auto handle = std::get<coalesced_handshake>(begun->handshake).daemon_ipc_handle;
  const auto with_pad = m.canonical_with_pad('\x55');  // a client may leave garbage in PAD
  std::memcpy(r.devices->memory_of(handle).data(), with_pad.data(), with_pad.size());
  auto committed = r.e->commit(begun->registration_id);
  REQUIRE_OK(committed);

  auto layout = r.e->device_layout_of(committed->descriptor.artifact_id);
  REQUIRE_OK(layout);
  REQUIRE(layout->allocations.size() == 1);
  CHECK(layout->allocations[0].cuda_ipc_handle == handle);
  CHECK(read_layout(*layout, {with_pad}) == m.canonical());  // PAD reads as zero
}

TEST_CASE("engine devices: the layout of an unknown or host-only artifact is refused", "[registration][devices]") {
  rig r;
  CHECK_ERROR(r.e->device_layout_of("mi2:none"), errc::not_found,
              "cannot open the GPU memory of mi2:none: not held here");
  const auto m = t::small_model();
  const auto id = begin_lip(*r.e, m.total_size());
  REQUIRE_OK(r.e->feed(t::lip_feed(id, m)));  // host memory
  auto committed = r.e->commit(id);
  REQUIRE_OK(committed);
  CHECK_ERROR(r.e->device_layout_of(committed->descriptor.artifact_id), errc::failed_precondition,
              "cannot open the GPU memory of " + committed->descriptor.artifact_id +
                  ": it has no copy in GPU memory (read its stable DRAM replica with GetArtifactMemfd)");
}

TEST_CASE("engine devices: place_on_device copies a stable replica to a daemon buffer that the layout names",
          "[registration][devices]") {
  rig r;
  const auto m = t::small_model();
  auto committed = t::register_stable(*r.e, m, me);
  REQUIRE_OK(committed);
  const auto id = committed->descriptor.artifact_id;
  REQUIRE_FALSE(r.e->device_layout_of(id));  // host memory only
  const auto before = r.devices->allocations();

  auto placed = r.e->place_on_device(id, 1);
  REQUIRE_OK(placed);
  CHECK(*placed);
  CHECK(r.devices->allocations() == before + 1);
  auto layout = r.e->device_layout_of(id);
  REQUIRE_OK(layout);
  REQUIRE(layout->allocations.size() == 1);
  CHECK(layout->allocations[0].device_id == 1);
  const auto& handle = layout->allocations[0].cuda_ipc_handle;
  const auto on_device = r.devices->memory_of(handle);
  CHECK(std::string(reinterpret_cast<const char*>(on_device.data()), on_device.size()) == m.canonical());
  CHECK(read_layout(*layout, {m.canonical()}) == m.canonical());

  // Once there, no second copy; an unknown id and a GPU-less engine are refused.
  auto again = r.e->place_on_device(id, 1);
  REQUIRE_OK(again);
  CHECK_FALSE(*again);
  CHECK(r.devices->allocations() == before + 1);
  CHECK_ERROR(r.e->place_on_device("mi2:none", 0), errc::not_found,
              "cannot copy mi2:none to CUDA device 0: cannot open mi2:none: not held here");
  CHECK_ERROR(r.e->place_on_device(id, 7), errc::failed_precondition, "cannot allocate device memory: no device 7");
  fake_clock clock;
  auto plain = t::make_engine(clock);
  auto held = t::register_stable(*plain, m, me);
  REQUIRE_OK(held);
  CHECK_ERROR(plain->place_on_device(id, 0), errc::failed_precondition,
              "cannot copy " + id + " to CUDA device 0: no GPU is available to this engine");

  // The copy goes with the artifact, removed by any uid that may remove it: the copy is
  // nobody's put.
  deregister_request gone;
  gone.artifact_id = id;
  gone.owner_uid = 1234;
  REQUIRE_OK(r.e->deregister(gone));
  CHECK_FALSE(r.e->device_layout_of(id));
}

// ---- Several GPUs in one registration ----------------------------------------------------------

TEST_CASE(
    "engine devices: a lease whose storages span two devices commits, leases, opens and is materialized to host memory",
    "[registration][devices][multi_gpu]") {
  rig r;
  t::model m;
  m.storages = {{"s0", t::pattern(32, 21)}, {"s1", t::pattern(48, 22)}};
  m.tensors = {{"a", "s0", {8}, {1}, "torch.float32", 0, 32}, {"b", "s1", {12}, {1}, "torch.float32", 0, 48}};
  const auto on0 = r.devices->export_allocation(0, 64);
  const auto on1 = r.devices->export_allocation(1, 64);
  std::memcpy(r.devices->memory_of(on0).data(), m.storage("s0").bytes.data(), 32);
  std::memcpy(r.devices->memory_of(on1).data() + 16, m.storage("s1").bytes.data(), 48);

  auto begun = r.e->begin(t::lip_begin(m.total_size(), me));
  REQUIRE_OK(begun);
  std::map<std::string, storage_entry> entries{{"s0", handle_entry("s0", on0, 32, 0, 0)},
                                               {"s1", handle_entry("s1", on1, 48, 16, 1)}};
  auto feed = t::lip_feed(begun->registration_id, m, entries);
  REQUIRE_OK(r.e->feed(std::move(feed)));
  // PINNED asks for the local stable tier: the engine copies from both devices into one host replica
  // (upstream answers UNIMPLEMENTED for a multi-device source).
  auto committed = r.e->commit(begun->registration_id);
  REQUIRE_OK(committed);
  const auto& id = committed->descriptor.artifact_id;
  CHECK(id == t::expected_mi2(m.index().json(), m.canonical()));
  CHECK(r.devices->opens_of(on0) == 1);
  CHECK(r.devices->opens_of(on1) == 1);

  // A reader elsewhere gets one allocation per device, each with its own device.
  auto layout = r.e->device_layout_of(id);
  REQUIRE_OK(layout);
  REQUIRE(layout->allocations.size() == 2);
  std::vector<std::string> memory;
  std::set<std::int32_t> devices;
  for (const auto& a : layout->allocations) {
    devices.insert(a.device_id);
    auto bytes = r.devices->memory_of(a.cuda_ipc_handle);
    memory.emplace_back(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  }
  CHECK(devices == std::set<std::int32_t>{0, 1});
  CHECK(read_layout(*layout, memory) == m.canonical());

  // The bytes read back through the engine span both devices.
  auto bytes = r.e->open_bytes(id);
  REQUIRE_OK(bytes);
  std::string read((*bytes)->size(), '\0');
  REQUIRE_OK((*bytes)->read(0, std::as_writable_bytes(std::span<char>(read))));
  CHECK(read == m.canonical());
}

TEST_CASE("engine devices: the local stable tier materializes a two-device lease into host memory",
          "[registration][devices][multi_gpu]") {
  rig r;
  t::model m;
  m.storages = {{"s0", t::pattern(24, 31)}, {"s1", t::pattern(40, 32)}};
  m.tensors = {{"a", "s0", {6}, {1}, "torch.float32", 0, 24}, {"b", "s1", {10}, {1}, "torch.float32", 0, 40}};
  const auto on0 = r.devices->export_allocation(0, 24);
  const auto on1 = r.devices->export_allocation(1, 40);
  std::memcpy(r.devices->memory_of(on0).data(), m.storage("s0").bytes.data(), 24);
  std::memcpy(r.devices->memory_of(on1).data(), m.storage("s1").bytes.data(), 40);
  auto req = t::lip_begin(m.total_size(), me);
  policy::store_policy pinned;
  pinned.profile = policy::profile::pinned;
  req.policy = pinned;
  auto begun = r.e->begin(req);
  REQUIRE_OK(begun);
  std::map<std::string, storage_entry> entries{{"s0", handle_entry("s0", on0, 24, 0, 0)},
                                               {"s1", handle_entry("s1", on1, 40, 0, 1)}};
  REQUIRE_OK(r.e->feed(t::lip_feed(begun->registration_id, m, entries)));
  auto committed = r.e->commit(begun->registration_id);
  REQUIRE_OK(committed);
  REQUIRE(committed->local_stable_tier);
  CHECK(committed->local_stable_tier->status == local_stable_status::ready);
  auto got = r.e->get(committed->descriptor.artifact_id);
  REQUIRE_OK(got);
  CHECK(got->stable_replica);

  // The replica outlives the producer's memory: scribble on it, revoke the lease, read the replica.
  std::memset(r.devices->memory_of(on1).data(), 0x5a, 40);
  r.e->revoke(begun->registration_id, "test");
  auto replica = r.e->stable_replica_fd(committed->descriptor.artifact_id);
  REQUIRE_OK(replica);
  std::string read(m.total_size(), '\0');
  REQUIRE(::pread(replica->second.get(), read.data(), read.size(), 0) == static_cast<ssize_t>(read.size()));
  CHECK(read == m.canonical());
}
