// Snapshot leases (LeaseOptions.in_place = false, registration.md §5.4) and VRAM regions that keep
// their mapping across leases (§5.2), through the engine with a fake device.
#include "tensorreg/registration/engine.hpp"

#include <catch2/catch.hpp>

#include <unistd.h>

#include <cstring>
#include <map>
#include <memory>
#include <string>

#include "support/engine_helpers.hpp"
#include "support/fake_device_memory.hpp"

namespace {

using namespace tensorreg;
using namespace tensorreg::registration;
using tensorreg::testing::fake_clock;
using tensorreg::testing::fake_device_memory;
namespace t = tensorreg::testing;

const std::int32_t me = static_cast<std::int32_t>(::getpid());

regions::register_request vram_region(std::int32_t device, std::string handle, std::uint64_t size) {
  regions::register_request r;
  r.kind = regions::memory_kind::vram;
  r.owner_pid = me;
  r.size_bytes = size;
  r.device_id = device;
  r.cuda_ipc_handle = std::move(handle);
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

// The fake device, plus a device-side snapshot: a copy kept in host memory that the engine must
// treat as a daemon-owned device buffer (its handle and device go to readers).
class snapshotting_device final : public device_memory {
 public:
  explicit snapshotting_device(std::shared_ptr<fake_device_memory> inner) : inner_(std::move(inner)) {}

  result<std::shared_ptr<const memory::byte_source>> open_ipc(std::int32_t pid, std::int32_t device,
                                                              std::string_view handle, std::uint64_t min) override {
    return inner_->open_ipc(pid, device, handle, min);
  }
  result<device_buffer> allocate(std::int32_t device, std::uint64_t bytes) override {
    return inner_->allocate(device, bytes);
  }
  [[nodiscard]] std::size_t open_mappings() const override { return inner_->open_mappings(); }
  std::optional<result<device_buffer>> snapshot_to_device(const memory::byte_source& source) override {
    if (out_of_memory) {
      return fail(errc::resource_exhausted, "cannot allocate a " + std::to_string(source.size()) +
                                                "-byte snapshot buffer on device 0: out of memory");
    }
    std::string copy(source.size(), '\0');
    auto read = source.read(0, std::as_writable_bytes(std::span<char>(copy)));
    if (!read) return tl::unexpected(std::move(read).error());
    ++snapshots;
    return device_buffer{std::make_shared<t::owned_bytes>(std::move(copy)), "snapshot-handle", 0};
  }

  int snapshots = 0;
  bool out_of_memory = false;

 private:
  std::shared_ptr<fake_device_memory> inner_;
};

struct fixture {
  fake_clock clock;
  std::shared_ptr<fake_device_memory> fake;
  std::unique_ptr<engine> e;
  t::model m = t::small_model();
  std::string handle;
  regions::region_info region;

  explicit fixture(std::shared_ptr<fake_device_memory> fake_device = std::make_shared<fake_device_memory>(1),
                   std::shared_ptr<device_memory> devices = nullptr)
      : fake(std::move(fake_device)) {
    auto options = t::deterministic_options(clock);
    options.devices = devices ? std::move(devices) : fake;
    e = t::make_engine(options);
    handle = fake->export_allocation(0, 1024);
    write(0, m.storage("s0").bytes);
    write(512, m.storage("s1").bytes);
    auto registered = e->register_region(vram_region(0, handle, 1024));
    REQUIRE_OK(registered);
    region = *registered;
  }

  void write(std::size_t at, const std::string& bytes) {
    auto mem = fake->memory_of(handle);
    REQUIRE(mem.size() >= at + bytes.size());
    std::memcpy(mem.data() + at, bytes.data(), bytes.size());
  }

  // Begin and feed (both storages from the region); returns the registration id.
  std::string begin_and_feed(bool in_place, bool publish_copy = false) {
    auto r = t::lip_begin(m.total_size(), me);
    r.plan = lease_options{.in_place = in_place, .publish_copy = publish_copy};
    auto begun = e->begin(r);
    REQUIRE_OK(begun);
    const auto id = begun->registration_id;
    std::map<std::string, storage_entry> entries{
        {"s0", region_entry("s0", region, m.storage("s0").bytes.size(), 0)},
        {"s1", region_entry("s1", region, m.storage("s1").bytes.size(), 512)},
    };
    REQUIRE_OK(e->feed(t::lip_feed(id, m, entries)));
    return id;
  }

  // begin_and_feed(), then commit; returns the registration id.
  std::string lease(bool in_place, result<commit_response>* out = nullptr, bool publish_copy = false) {
    const auto id = begin_and_feed(in_place, publish_copy);
    auto committed = e->commit(id);
    if (out != nullptr) *out = committed;
    REQUIRE_OK(committed);
    CHECK(committed->descriptor.artifact_id == t::expected_mi2(m.index().json(), m.canonical()));
    return id;
  }

  // Readers of `artifact` open one device allocation: the snapshotting device's copy of it all.
  device_layout check_served_from_snapshot(const std::string& artifact) {
    auto layout = e->device_layout_of(artifact);
    REQUIRE_OK(layout);
    REQUIRE(layout->allocations.size() == 1);
    CHECK(layout->allocations[0].cuda_ipc_handle == "snapshot-handle");
    CHECK(layout->allocations[0].device_id == 0);
    CHECK(layout->allocations[0].size_bytes == m.total_size());
    return std::move(*layout);
  }

  std::string read_artifact(const std::string& artifact_id) {
    auto bytes = e->open_bytes(artifact_id);
    REQUIRE_OK(bytes);
    std::string seen((*bytes)->size(), '\0');
    REQUIRE_OK((*bytes)->read(0, std::as_writable_bytes(std::span<char>(seen))));
    return seen;
  }
};

}  // namespace

TEST_CASE("engine snapshot lease: readers see the bytes of the commit after the client overwrites its memory",
          "[registration][engine_snapshot]") {
  fixture f;
  result<commit_response> committed = fail(errc::unknown, "not committed");
  f.lease(false, &committed);
  const auto artifact = committed->descriptor.artifact_id;
  // The client's memory is its own again: no region reference is held (unregister would
  // refuse otherwise), and the trainer scribbles over its tensors.
  f.write(0, std::string(f.m.storage("s0").bytes.size(), '\x7f'));
  f.write(512, std::string(f.m.storage("s1").bytes.size(), '\x7f'));
  CHECK(f.read_artifact(artifact) == f.m.canonical());
  const auto summary = f.e->get(artifact);
  REQUIRE_OK(summary);
  CHECK(summary->leases == 1);
  CHECK(summary->snapshot_leases == 1);
  CHECK(summary->vram_snapshots == 0);  // no device-side snapshot here: a memfd copy
  // Copied into a memfd on the host: no GPU memory to hand readers.
  CHECK_ERROR(f.e->device_layout_of(artifact), errc::failed_precondition,
              "cannot open the GPU memory of " + artifact +
                  ": it has no copy in GPU memory (read its stable DRAM replica with GetArtifactMemfd)");
  auto gone = f.e->unregister_region(f.region.id, me, false);
  REQUIRE_OK(gone);
  CHECK(*gone);
  CHECK(f.read_artifact(artifact) == f.m.canonical());
}

TEST_CASE("engine snapshot lease: device memory is snapshotted on the device and served from the copy",
          "[registration][engine_snapshot]") {
  auto fake = std::make_shared<fake_device_memory>(1);
  auto device = std::make_shared<snapshotting_device>(fake);
  fixture f(fake, device);

  result<commit_response> committed = fail(errc::unknown, "not committed");
  const auto id = f.lease(false, &committed);
  const auto artifact = committed->descriptor.artifact_id;
  CHECK(device->snapshots == 1);
  f.write(0, std::string(f.m.storage("s0").bytes.size(), '\x01'));
  CHECK(f.read_artifact(artifact) == f.m.canonical());
  const auto layout = f.check_served_from_snapshot(artifact);
  REQUIRE(layout.segments.size() == 1);  // the lease's one copy, PAD included
  CHECK(layout.segments[0].artifact_offset == 0);
  CHECK(layout.segments[0].length == f.m.total_size());
  const auto summary = f.e->get(artifact);
  REQUIRE_OK(summary);
  CHECK(summary->vram_snapshots == 1);
  // A lease like any other: revoke ends it, and the artifact with it.
  CHECK(f.e->stats().leases == 1);
  f.e->revoke(id, "test");
  CHECK(f.e->stats().leases == 0);
}

TEST_CASE("engine snapshot lease: publish_copy keeps the device copy as a GPU replica and no lease",
          "[registration][engine_snapshot]") {
  auto fake = std::make_shared<fake_device_memory>(1);
  auto device = std::make_shared<snapshotting_device>(fake);
  fixture f(fake, device);

  result<commit_response> committed = fail(errc::unknown, "not committed");
  const auto id = f.lease(false, &committed, /*publish_copy=*/true);
  const auto artifact = committed->descriptor.artifact_id;
  CHECK_FALSE(committed->existed);
  CHECK_FALSE(f.e->revoke(id, "test"));  // it names no lease
  CHECK(device->snapshots == 1);
  // No lease, no region reference: the client may unregister its memory and reuse it.
  CHECK(f.e->stats().leases == 0);
  auto gone = f.e->unregister_region(f.region.id, me, false);
  REQUIRE_OK(gone);
  CHECK(*gone);
  f.write(0, std::string(f.m.storage("s0").bytes.size(), '\x01'));
  CHECK(f.read_artifact(artifact) == f.m.canonical());
  // As a coalesced put's buffer is: its DATA ranges at their canonical offsets ("b" at 0, and
  // "w" with its view "v" at 24).
  CHECK(f.check_served_from_snapshot(artifact).segments.size() == 2);
  const auto summary = f.e->get(artifact);
  REQUIRE_OK(summary);
  CHECK(summary->leases == 0);
  CHECK(summary->vram_snapshots == 0);

  // The same bytes again (a region registered anew) join the replica there.
  auto registered = f.e->register_region(vram_region(0, f.handle, 1024));
  REQUIRE_OK(registered);
  f.region = *registered;
  f.write(0, f.m.storage("s0").bytes);
  result<commit_response> again = fail(errc::unknown, "not committed");
  f.lease(false, &again, /*publish_copy=*/true);
  CHECK(again->existed);
  CHECK(again->descriptor.artifact_id == artifact);
  CHECK(device->snapshots == 2);
}

TEST_CASE("engine snapshot lease: publish_copy needs a copy on the device and a snapshot lease",
          "[registration][engine_snapshot]") {
  fixture f;  // the plain fake device makes no device-side copies
  const auto id = f.begin_and_feed(false, /*publish_copy=*/true);
  CHECK_ERROR(f.e->commit(id), errc::failed_precondition,
              "cannot commit " + id +
                  " as a copy on its GPU: its bytes are not device memory of one GPU that this daemon reaches "
                  "(publish_copy copies device to device; put host tensors through the stable_dram plan)");
  // Nothing was kept: the region's reference went with the failed commit.
  CHECK(f.e->stats().leases == 0);
  auto gone = f.e->unregister_region(f.region.id, me, false);
  REQUIRE_OK(gone);
  CHECK(*gone);

  auto r = t::lip_begin(f.m.total_size(), me);
  r.plan = lease_options{.in_place = true, .publish_copy = true};
  CHECK_ERROR(f.e->begin(r), errc::invalid_argument,
              "cannot begin lease registration: publish_copy needs in_place = false (a lease in place makes no "
              "copy to publish)");
}

TEST_CASE("engine snapshot lease: host storages are copied too, with the id of a lease in place",
          "[registration][engine_snapshot]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto r = t::lip_begin(m.total_size(), me);
  r.plan = lease_options{.in_place = false};
  auto begun = e->begin(r);
  REQUIRE_OK(begun);
  REQUIRE_OK(e->feed(t::lip_feed(begun->registration_id, m)));
  auto committed = e->commit(begun->registration_id);
  REQUIRE_OK(committed);
  CHECK(committed->descriptor.artifact_id == t::expected_mi2(m.index().json(), m.canonical()));
  auto bytes = e->open_bytes(committed->descriptor.artifact_id);
  REQUIRE_OK(bytes);
  std::string seen(m.total_size(), '\0');
  REQUIRE_OK((*bytes)->read(0, std::as_writable_bytes(std::span<char>(seen))));
  CHECK(seen == m.canonical());
}

TEST_CASE("engine snapshot lease: a second snapshot of the same bytes on the same device is ALREADY_EXISTS",
          "[registration][engine_snapshot]") {
  fixture f;
  f.lease(false);
  auto r = t::lip_begin(f.m.total_size(), me);
  r.plan = lease_options{.in_place = false};
  auto begun = f.e->begin(r);
  REQUIRE_OK(begun);
  std::map<std::string, storage_entry> entries{
      {"s0", region_entry("s0", f.region, f.m.storage("s0").bytes.size(), 0)},
      {"s1", region_entry("s1", f.region, f.m.storage("s1").bytes.size(), 512)},
  };
  REQUIRE_OK(f.e->feed(t::lip_feed(begun->registration_id, f.m, entries)));
  const auto artifact = t::expected_mi2(f.m.index().json(), f.m.canonical());
  CHECK_ERROR(f.e->commit(begun->registration_id), errc::already_exists,
              "cannot commit lease of " + artifact + ": lease already exists for artifact on device 0");
  // The failed commit gave its region reference back too.
  auto gone = f.e->unregister_region(f.region.id, me, false);
  REQUIRE_OK(gone);
  CHECK(*gone);
}

TEST_CASE("engine lip commit: a VRAM region keeps its mapping across leases until it is unregistered",
          "[registration][engine_snapshot]") {
  fixture f;
  const auto first = f.lease(true);
  CHECK(f.fake->opens_of(f.handle) == 1);
  f.e->revoke(first, "next step");
  CHECK(f.e->stats().open_mappings == 1);  // the region's
  const auto second = f.lease(true);
  CHECK(f.fake->opens_of(f.handle) == 1);  // found, not opened again
  f.e->revoke(second, "next step");
  // A snapshot lease reads the same kept mapping.
  f.lease(false);
  CHECK(f.fake->opens_of(f.handle) == 1);
  CHECK(f.fake->total_opens() == 1);
  auto gone = f.e->unregister_region(f.region.id, me, false);
  REQUIRE_OK(gone);
  CHECK(*gone);
  CHECK(f.e->stats().open_mappings == 0);
}

TEST_CASE("engine lip commit: a kept region mapping stays open under a live lease after a forced unregister",
          "[registration][engine_snapshot]") {
  fixture f;
  const auto id = f.lease(true);
  auto retired = f.e->unregister_region(f.region.id, me, true);
  REQUIRE_OK(retired);
  CHECK_FALSE(*retired);  // retiring: the lease holds a reference
  CHECK(f.e->stats().open_mappings == 1);
  CHECK(f.read_artifact(t::expected_mi2(f.m.index().json(), f.m.canonical())) == f.m.canonical());
  f.e->revoke(id, "done");  // the last reference: the region goes, and its mapping
  CHECK(f.e->stats().open_mappings == 0);
  CHECK(f.e->stats().regions == 0);
}

TEST_CASE("engine snapshot lease: no device memory for the copy fails the commit and holds nothing",
          "[registration][engine_snapshot]") {
  auto fake = std::make_shared<fake_device_memory>(1);
  auto device = std::make_shared<snapshotting_device>(fake);
  device->out_of_memory = true;
  fixture f(fake, device);
  auto r = t::lip_begin(f.m.total_size(), me);
  r.plan = lease_options{.in_place = false};
  auto begun = f.e->begin(r);
  REQUIRE_OK(begun);
  std::map<std::string, storage_entry> entries{
      {"s0", region_entry("s0", f.region, f.m.storage("s0").bytes.size(), 0)},
      {"s1", region_entry("s1", f.region, f.m.storage("s1").bytes.size(), 512)},
  };
  REQUIRE_OK(f.e->feed(t::lip_feed(begun->registration_id, f.m, entries)));
  CHECK_ERROR(f.e->commit(begun->registration_id), errc::resource_exhausted,
              "cannot snapshot the lease: cannot allocate a " + std::to_string(f.m.total_size()) +
                  "-byte snapshot buffer on device 0: out of memory");
  const auto s = f.e->stats();
  CHECK(s.leases == 0);
  CHECK(s.artifacts == 0);
  CHECK(s.pending_registrations == 0);
  // Its region reference went with it.
  auto gone = f.e->unregister_region(f.region.id, me, false);
  REQUIRE_OK(gone);
  CHECK(*gone);
}
