// tensorreg_gpu_tests: the GPU device paths of the wire format through the real tensorregd
// (docs/wire-format.md §12–13): a producer's CUDA VMM allocations registered as one region by
// their fds, devices named by UUID whatever the ordinal says, and OpenArtifactDevice handing a
// reader each allocation once, from which it reads back every canonical byte.
//
// Named *_tests.cpp so the CPU suite's glob does not pick it up; runs only where a CUDA device
// is present (gpu_main.cpp exits 77 otherwise).
#include <catch2/catch.hpp>

#include <cuda_runtime_api.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include "client/raw_connection.hpp"
#include "producer_process.hpp"
#include "provider_support.hpp"
#include "support/daemon_process.hpp"
#include "support/engine_helpers.hpp"
#include "tensorreg/cuda/device_memory_provider.hpp"
#include "tensorreg/identity/content_id.hpp"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/memory/byte_source.hpp"

namespace {

using namespace tensorreg;
using tensorreg::cuda::testing::pattern;
using tensorreg::cuda::testing::producer_process;
namespace wv1 = tensorreg::wire::v1;
namespace v2 = tensorcast::daemon::v2;

constexpr std::uint64_t mib = std::uint64_t{1} << 20;

using tensorreg::cuda::testing::read_all;

// One storage of the artifact: `length` bytes at `base` of the VMM region, or of IPC
// allocation 0 when `in_region` is false. Each is one uint8 tensor of the same name.
struct piece {
  std::string name;
  bool in_region;
  std::uint64_t base, length;
};

// Feeds one uint8 tensor `name` over the whole storage of the same name, `length` bytes, placed at
// `artifact_offset`: its segment and its alias.
void add_uint8_tensor(v2::FeedRegisterArtifactStreamRequest& feed, const std::string& name, std::uint64_t length,
                      std::uint64_t artifact_offset) {
  auto* seg = feed.mutable_lease_segments()->add_segments();
  seg->set_storage_id(name);
  seg->set_artifact_offset(artifact_offset);
  seg->set_length(length);
  auto* a = feed.add_tensor_aliases();
  a->set_name(name);
  a->set_storage_id(name);
  a->set_logical_length(length);
  a->add_shape(static_cast<std::int64_t>(length));
  a->add_stride(1);
  a->set_dtype("torch.uint8");
}

// Registers a VRAM region of the producer's VMM allocations [first, first + count), each one
// chunk of `chunk` bytes, with their fds; returns the daemon's ref to it.
v2::RegionRef register_vmm_region(tensorreg::client::raw::connection& c, const producer_process& p, int first,
                                  int count, std::uint64_t chunk) {
  wv1::Request req;
  auto* rr = req.mutable_register_region();
  rr->set_memory_kind(v2::REGION_MEMORY_KIND_VRAM);
  rr->set_owner_pid(static_cast<std::int32_t>(::getpid()));
  rr->set_size_bytes(static_cast<std::uint64_t>(count) * chunk);
  for (int i = 0; i < count; ++i) rr->mutable_cuda_vmm()->add_chunk_bytes(chunk);
  auto made = c.call(req, std::span<const int>(p.vmm_fds().data() + first, static_cast<std::size_t>(count)));
  REQUIRE_OK(made);
  return made->response.register_region().region();
}

}  // namespace

TEST_CASE(
    "cuda daemon: a VMM region by fds and an IPC allocation, named by UUID, are leased under the digest id and opened "
    "by id",
    "[cuda][daemon][vmm][uuid]") {
  constexpr std::uint64_t chunk = 2 * mib;
  // Three 2 MiB VMM allocations mapped back to back make the region; one cudaMalloc of 4 MiB.
  producer_process p({{chunk, 71, true}, {chunk, 72, true}, {chunk, 73, true}, {4 * mib, 74, false}});
  REQUIRE(p.granularity() != 0);
  REQUIRE(chunk % p.granularity() == 0);
  auto provider = cuda::device_memory_provider::create();
  REQUIRE_OK(provider);
  const std::string uuid = (*provider)->uuid_of(0);
  REQUIRE(uuid.rfind("GPU-", 0) == 0);

  testing::daemon_process d;
  auto connected = tensorreg::client::raw::connection::connect(d.socket_path());
  REQUIRE_OK(connected);
  auto& c = **connected;
  const auto me = static_cast<std::int32_t>(::getpid());

  // The region: a client's ordinal (5) means nothing to the daemon; the UUID names device 0.
  wv1::Request region_req;
  auto* r = region_req.mutable_register_region();
  r->set_memory_kind(v2::REGION_MEMORY_KIND_VRAM);
  r->set_owner_pid(me);
  r->set_size_bytes(3 * chunk);
  r->set_device_id(5);
  r->set_device_uuid(uuid);
  for (int i = 0; i < 3; ++i) r->mutable_cuda_vmm()->add_chunk_bytes(chunk);
  auto region = c.call(region_req, p.vmm_fds());
  REQUIRE_OK(region);
  const auto& ref = region->response.register_region().region();
  CHECK(ref.device_id() == 0);
  CHECK(ref.size_bytes() == 3 * chunk);

  // Another GPU's UUID (or a made-up one) maps nothing.
  wv1::Request wrong = region_req;
  wrong.mutable_register_region()->set_device_uuid("GPU-00000000-1111-2222-3333-444444444444");
  auto refused = c.call(wrong, p.vmm_fds());
  REQUIRE_FALSE(refused);
  CHECK(refused.error().code == errc::failed_precondition);

  // Storages: one straddling VMM chunks 0 and 1, one inside chunk 2, and the IPC allocation.
  const std::vector<piece> pieces = {{"a", true, mib, 3 * mib}, {"b", true, 5 * mib, mib}, {"c", false, 0, 4 * mib}};
  std::vector<index::tensor_desc> descs;
  for (const auto& pc : pieces) {
    descs.push_back({pc.name, "torch.uint8", {static_cast<std::int64_t>(pc.length)}, {1}, pc.name, pc.length, 0});
  }
  auto idx = index::canonical_index::build(descs);
  REQUIRE_OK(idx);
  // The producer's bytes, by region offset (chunk i holds stream 71 + i from its offset 0).
  const auto region_bytes = [&](std::uint64_t at, std::uint64_t length) {
    std::string out;
    while (length > 0) {
      const std::uint64_t i = at / chunk, in = at % chunk, n = std::min(length, chunk - in);
      out += pattern(71 + i, in, n);
      at += n;
      length -= n;
    }
    return out;
  };
  std::string canonical(idx->total_size(), '\0');
  for (const auto& pc : pieces) {
    const auto bytes = pc.in_region ? region_bytes(pc.base, pc.length) : pattern(74, pc.base, pc.length);
    std::memcpy(canonical.data() + idx->find(pc.name)->offset, bytes.data(), bytes.size());
  }
  memory::host_bytes_view canonical_view(std::as_bytes(std::span<const char>(canonical)));
  auto expected = identity::content_id(idx->json(), canonical_view, nullptr);
  REQUIRE_OK(expected);

  wv1::Request begin;
  auto* b = begin.mutable_begin_register_artifact();
  b->set_device_id(3);
  b->set_device_uuid(uuid);
  b->set_total_size(idx->total_size());
  b->set_ttl_ms(600'000);
  b->set_owner_pid(me);
  b->mutable_lease()->set_in_place(true);
  auto begun = c.call(begin);
  REQUIRE_OK(begun);
  CHECK(begun->response.begin_register_artifact().device_id() == 0);
  const auto reg_id = begun->response.begin_register_artifact().registration_id();

  v2::FeedRegisterArtifactStreamRequest feed;
  feed.set_registration_id(reg_id);
  for (const auto& pc : pieces) {
    auto* s = feed.add_storage_entries();
    s->set_storage_id(pc.name);
    s->set_device_id(9);  // the client's ordinal: ignored, the UUID decides
    s->set_device_uuid(uuid);
    s->set_storage_length(pc.length);
    if (pc.in_region) {
      *s->mutable_region_ref() = ref;
    } else {
      s->set_cuda_ipc_handle(p.ipc_handles().at(0));
    }
    s->set_mapping_base_offset(pc.base);
    add_uint8_tensor(feed, pc.name, pc.length, idx->find(pc.name)->offset);
  }
  REQUIRE_OK(c.feed({feed}));
  wv1::Request commit;
  commit.mutable_commit_registered_artifact()->set_registration_id(reg_id);
  auto committed = c.call(commit);
  REQUIRE_OK(committed);
  const auto artifact_id = committed->response.commit_registered_artifact().artifact_descriptor().artifact_id();
  CHECK(artifact_id == expected->to_string());

  // A reader: each allocation once, VMM chunks as fds; it maps them and reads every byte back.
  wv1::Request open;
  open.mutable_open_artifact_device()->set_artifact_id(artifact_id);
  auto opened = c.call(open);
  REQUIRE_OK(opened);
  const auto& layout = opened->response.open_artifact_device();
  CHECK(layout.tensor_index_data() == idx->json());
  REQUIRE(layout.allocations_size() == 2);
  CHECK(opened->fds.size() == 3);
  std::vector<std::shared_ptr<const memory::byte_source>> mapped;
  for (const auto& a : layout.allocations()) {
    CHECK(a.device_id() == 0);
    CHECK(a.device_uuid() == uuid);
    if (a.has_vmm()) {
      REQUIRE(a.vmm().chunks_size() == 3);
      std::vector<int> fds;
      std::vector<std::uint64_t> sizes;
      for (const auto& ch : a.vmm().chunks()) {
        REQUIRE(ch.fd_index() < opened->fds.size());
        fds.push_back(opened->fds[ch.fd_index()].get());
        sizes.push_back(ch.size_bytes());
      }
      CHECK(a.size_bytes() == 3 * chunk);
      auto imported = (*provider)->import_vmm(me, 0, fds, sizes);
      REQUIRE_OK(imported);
      mapped.push_back(*imported);
    } else {
      REQUIRE(a.cuda_ipc_handle() == p.ipc_handles().at(0));
      auto ipc = (*provider)->open_ipc(p.pid(), 0, a.cuda_ipc_handle(), a.size_bytes());
      REQUIRE_OK(ipc);
      mapped.push_back(*ipc);
    }
  }
  REQUIRE(layout.segments_size() == 3);
  std::string read_back(layout.total_size(), '\0');
  for (const auto& s : layout.segments()) {
    REQUIRE(s.allocation() < mapped.size());
    const auto bytes = read_all(*mapped[s.allocation()], s.allocation_offset(), s.length());
    std::memcpy(read_back.data() + s.artifact_offset(), bytes.data(), bytes.size());
  }
  CHECK(read_back == canonical);

  // One mapping per allocation in the daemon, whatever the number of storages.
  wv1::Request stats;
  stats.mutable_get_stats();
  auto st = c.call(stats);
  REQUIRE_OK(st);
  CHECK(st->response.get_stats().open_mappings() == 2);
  CHECK(d.stop() == 0);
}

TEST_CASE("cuda daemon: OpenArtifactDevice pages VMM fds 250 at most an answer, whole allocations each",
          "[cuda][daemon][vmm]") {
  constexpr std::uint64_t chunk = 2 * mib;
  constexpr int per_region = 150;  // two regions: 300 fds, more than one answer carries
  std::vector<tensorreg::cuda::testing::producer_allocation> asked;
  for (int i = 0; i < 2 * per_region; ++i) asked.push_back({chunk, static_cast<std::uint64_t>(100 + i), true});
  producer_process p(asked);
  testing::daemon_process d;
  auto connected = tensorreg::client::raw::connection::connect(d.socket_path());
  REQUIRE_OK(connected);
  auto& c = **connected;
  const auto me = static_cast<std::int32_t>(::getpid());

  std::vector<v2::RegionRef> regions;
  for (int r = 0; r < 2; ++r) regions.push_back(register_vmm_region(c, p, r * per_region, per_region, chunk));
  // One tensor over each whole region.
  std::vector<index::tensor_desc> descs;
  for (int r = 0; r < 2; ++r) {
    const std::string name = "t" + std::to_string(r);
    descs.push_back(
        {name, "torch.uint8", {static_cast<std::int64_t>(per_region * chunk)}, {1}, name, per_region * chunk, 0});
  }
  auto idx = index::canonical_index::build(descs);
  REQUIRE_OK(idx);
  wv1::Request begin;
  auto* b = begin.mutable_begin_register_artifact();
  b->set_total_size(idx->total_size());
  b->set_owner_pid(me);
  b->mutable_lease()->set_in_place(true);
  auto begun = c.call(begin);
  REQUIRE_OK(begun);
  const auto reg_id = begun->response.begin_register_artifact().registration_id();
  v2::FeedRegisterArtifactStreamRequest feed;
  feed.set_registration_id(reg_id);
  for (int r = 0; r < 2; ++r) {
    const std::string name = "t" + std::to_string(r);
    auto* s = feed.add_storage_entries();
    s->set_storage_id(name);
    s->set_storage_length(per_region * chunk);
    *s->mutable_region_ref() = regions[static_cast<std::size_t>(r)];
    add_uint8_tensor(feed, name, per_region * chunk, idx->find(name)->offset);
  }
  REQUIRE_OK(c.feed({feed}));
  wv1::Request commit;
  commit.mutable_commit_registered_artifact()->set_registration_id(reg_id);
  auto committed = c.call(commit);
  REQUIRE_OK(committed);
  const auto artifact_id = committed->response.commit_registered_artifact().artifact_descriptor().artifact_id();

  wv1::Request open;
  open.mutable_open_artifact_device()->set_artifact_id(artifact_id);
  auto page0 = c.call(open);
  REQUIRE_OK(page0);
  const auto& first = page0->response.open_artifact_device();
  REQUIRE(first.allocations_size() == 2);
  CHECK(first.end_allocation() == 1);
  CHECK(page0->fds.size() == per_region);
  CHECK(first.allocations(1).vmm().chunks(0).fd_index() == 0xFFFFFFFFu);
  open.mutable_open_artifact_device()->set_first_allocation(1);
  auto page1 = c.call(open);
  REQUIRE_OK(page1);
  CHECK(page1->response.open_artifact_device().end_allocation() == 2);
  CHECK(page1->fds.size() == per_region);
  CHECK(page1->response.open_artifact_device().allocations(1).vmm().chunks(per_region - 1).fd_index() ==
        static_cast<std::uint32_t>(per_region - 1));
  open.mutable_open_artifact_device()->set_first_allocation(2);
  auto past = c.call(open);
  REQUIRE_FALSE(past);
  CHECK(past.error().code == errc::invalid_argument);

  // The second page's fds are the second region's allocations: import them and read them back.
  auto provider = cuda::device_memory_provider::create();
  REQUIRE_OK(provider);
  std::vector<int> fds;
  std::vector<std::uint64_t> sizes(per_region, chunk);
  for (const auto& fd : page1->fds) fds.push_back(fd.get());
  auto imported = (*provider)->import_vmm(me, 0, fds, sizes);
  REQUIRE_OK(imported);
  CHECK(read_all(**imported, (per_region - 1) * chunk + 5, 100) == pattern(100 + 2 * per_region - 1, 5, 100));
  CHECK(d.stop() == 0);
}

TEST_CASE("cuda daemon: 1 000 VMM allocations imported into one daemon reserve only the imported bytes",
          "[cuda][daemon][vmm]") {
  constexpr std::uint64_t chunk = 2 * mib;
  constexpr int regions = 4, per_region = 250;  // 1 000 allocations, one frame of fds a region
  std::vector<tensorreg::cuda::testing::producer_allocation> asked;
  for (int i = 0; i < regions * per_region; ++i) asked.push_back({chunk, static_cast<std::uint64_t>(500 + i), true});
  producer_process p(asked);
  REQUIRE(chunk % p.granularity() == 0);
  testing::daemon_process d;
  auto connected = tensorreg::client::raw::connection::connect(d.socket_path());
  REQUIRE_OK(connected);
  auto& c = **connected;
  const auto me = static_cast<std::int32_t>(::getpid());
  wv1::Request stats;
  stats.mutable_get_stats();

  std::vector<std::string> ids;
  for (int r = 0; r < regions; ++r)
    ids.push_back(register_vmm_region(c, p, r * per_region, per_region, chunk).region_id());
  auto held = c.call(stats);
  REQUIRE_OK(held);
  // PyTorch's own import reserves ~9/8 of the GPU per handle (1 000 x ~89 GiB); ours, the bytes.
  CHECK(held->response.get_stats().vmm_reserved_bytes() == std::uint64_t{regions} * per_region * chunk);
  CHECK(held->response.get_stats().regions() == regions);

  for (const auto& id : ids) {
    wv1::Request un;
    un.mutable_unregister_region()->set_region_id(id);
    un.mutable_unregister_region()->set_owner_pid(me);
    REQUIRE_OK(c.call(un));
  }
  auto after = c.call(stats);
  REQUIRE_OK(after);
  CHECK(after->response.get_stats().vmm_reserved_bytes() == 0);
  CHECK(d.stop() == 0);
}
