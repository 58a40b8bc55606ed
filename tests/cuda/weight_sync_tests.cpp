// tensorreg_gpu_tests: the daemon's side of the weight-sync loop (issue #17) on a real GPU —
// VRAM regions that keep their mapping across leases (registration.md §5.2), snapshot leases
// copied device-to-device into the daemon's memory (§5.4), device_memory_provider's snapshot
// and warm start. The client memory is a producer child's (tensorreg_gpu_producer): IPC handles
// cannot be opened by the process that exported them.
//
// Named *_tests.cpp so the CPU suite's glob does not pick it up; runs only where a CUDA device
// is present (gpu_main.cpp exits 77 otherwise).
#include "tensorreg/cuda/device_memory_provider.hpp"

#include <catch2/catch.hpp>

#include <cuda_runtime_api.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "client/raw_connection.hpp"
#include "cuda/batched_copier.hpp"
#include "gpu_fill.hpp"
#include "producer_process.hpp"
#include "provider_support.hpp"
#include "support/daemon_process.hpp"
#include "support/engine_helpers.hpp"
#include "tensorreg/identity/content_id.hpp"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/memory/segmented_view.hpp"

namespace {

using namespace tensorreg;
using tensorreg::cuda::device_memory_provider;
using tensorreg::cuda::testing::make_provider;
using tensorreg::cuda::testing::producer_process;
using tensorreg::cuda::testing::read_all;
namespace reg = tensorreg::registration;
namespace t = tensorreg::testing;

constexpr std::uint64_t mib = std::uint64_t{1} << 20;

// Two producer allocations (as a caching allocator's segments) and four float32 tensors taken
// from them at offsets, each allocation registered once as a VRAM region.
struct trainer {
  producer_process producer{
      std::vector<cuda::testing::producer_allocation>{{8 * mib, 41, false}, {4 * mib, 42, false}}};
  std::shared_ptr<device_memory_provider> provider;
  t::fake_clock clock;
  std::unique_ptr<reg::engine> e;
  t::model m;
  std::vector<regions::region_info> regions;
  std::map<std::string, reg::storage_entry> entries;

  struct piece {
    const char* id;
    std::size_t allocation;
    std::uint64_t offset;
    std::uint64_t length;
  };

  explicit trainer(device_memory_provider::options opts = {}) {
    provider = make_provider(opts);
    auto options = t::deterministic_options(clock);
    options.devices = provider;
    e = t::make_engine(options);
    const std::uint64_t sizes[] = {8 * mib, 4 * mib};
    const std::uint64_t seeds[] = {41, 42};
    for (std::size_t a = 0; a < 2; ++a) {
      regions::register_request r;
      r.kind = regions::memory_kind::vram;
      r.owner_pid = producer.pid();
      r.size_bytes = sizes[a];
      r.device_id = 0;
      r.cuda_ipc_handle = producer.ipc_handles().at(a);
      auto region = e->register_region(std::move(r));
      REQUIRE_OK(region);
      regions.push_back(*region);
    }
    // Neighbours in allocation 0 (the snapshot merges their runs where the canonical order
    // keeps them adjacent) and a tensor at an odd 4-byte offset.
    const piece pieces[] = {{"w.a", 0, 0, 1 * mib},
                            {"w.b", 0, 1 * mib, 3 * mib + 12},
                            {"w.c", 1, 512 * 1024, mib},
                            {"w.d", 1, 2 * mib + 4, 4096}};
    for (const auto& p : pieces) {
      m.storages.push_back({p.id, tensorreg::cuda::testing::pattern(seeds[p.allocation], p.offset, p.length)});
      m.tensors.push_back({p.id, p.id, {static_cast<std::int64_t>(p.length / 4)}, {1}, "torch.float32", 0, p.length});
      reg::storage_entry s;
      s.storage_id = p.id;
      s.device_id = 0;
      s.storage_length = p.length;
      s.source = reg::vram_region_source{regions[p.allocation].id};
      s.mapping_base_offset = p.offset;
      entries.emplace(p.id, s);
    }
  }

  // Begin, feed and commit a lease of the tensors; the registration id and the commit's answer.
  std::pair<std::string, reg::commit_response> lease(bool in_place) {
    auto r = t::lip_begin(m.total_size(), producer.pid());
    r.plan = reg::lease_options{.in_place = in_place};
    auto begun = e->begin(r);
    REQUIRE_OK(begun);
    REQUIRE_OK(e->feed(t::lip_feed(begun->registration_id, m, entries)));
    auto committed = e->commit(begun->registration_id);
    REQUIRE_OK(committed);
    CHECK(committed->descriptor.artifact_id == t::expected_mi2(m.index().json(), m.canonical()));
    return {begun->registration_id, *committed};
  }

  std::string artifact_bytes(const std::string& artifact_id) {
    auto bytes = e->open_bytes(artifact_id);
    REQUIRE_OK(bytes);
    return read_all(**bytes, 0, (*bytes)->size());
  }

  // The trainer's next step: writes over allocation `a` through the daemon's own mapping of it
  // (found in the provider's cache: it opens nothing).
  void overwrite(std::size_t a, std::uint64_t bytes, int value) {
    auto mapped = provider->open_ipc(producer.pid(), 0, producer.ipc_handles().at(a), bytes);
    REQUIRE_OK(mapped);
    const auto* dev = cuda::as_device_source(**mapped);
    REQUIRE(dev != nullptr);
    REQUIRE(cudaMemset(const_cast<void*>(dev->device_pointer()), value, bytes) == cudaSuccess);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  }
};

}  // namespace

TEST_CASE("cuda weight sync: leases over kept regions open each allocation once, however many steps",
          "[cuda][weight_sync][engine]") {
  trainer tr;
  const auto before = tr.provider->ipc_opens();
  for (int step = 0; step < 3; ++step) {
    INFO("step " << step);
    auto [id, committed] = tr.lease(true);
    CHECK(tr.provider->ipc_opens() == before + 2);  // the first step opened both regions
    CHECK(tr.e->stats().ipc_opens == tr.provider->ipc_opens());
    CHECK(tr.artifact_bytes(committed.descriptor.artifact_id) == tr.m.canonical());
    tr.e->revoke(id, "next step");
    CHECK(tr.provider->open_mappings() == 2);  // kept by the regions between steps
  }
  // A region that goes closes its mapping; the other keeps its own.
  REQUIRE(tr.e->unregister_region(tr.regions[0].id, tr.producer.pid(), false).value());
  CHECK(tr.provider->open_mappings() == 1);
  REQUIRE(tr.e->unregister_region(tr.regions[1].id, tr.producer.pid(), false).value());
  CHECK(tr.provider->open_mappings() == 0);
  CHECK(tr.provider->ipc_opens() == before + 2);
}

TEST_CASE("cuda weight sync: a snapshot lease keeps the bytes of its commit while the trainer overwrites its memory",
          "[cuda][weight_sync][snapshot][engine]") {
  // The id comes from the copy either way: hashed in place on the GPU, or staged to the host.
  const bool on_gpu = GENERATE(false, true);
  device_memory_provider::options opts;
  opts.placement = on_gpu ? device_memory_provider::options::hash_placement::gpu
                          : device_memory_provider::options::hash_placement::host;
  trainer tr(opts);
  auto [id, committed] = tr.lease(false);
  const auto& artifact = committed.descriptor.artifact_id;
  CHECK(tr.provider->device_hashes() == (on_gpu ? 1u : 0u));

  // The client's memory is released from the lease: no region reference is held, so both
  // regions unregister at once, and every mapping of the client's memory closes.
  tr.overwrite(0, 8 * mib, 0xee);
  tr.overwrite(1, 4 * mib, 0x11);
  REQUIRE(tr.e->unregister_region(tr.regions[0].id, tr.producer.pid(), false).value());
  REQUIRE(tr.e->unregister_region(tr.regions[1].id, tr.producer.pid(), false).value());
  CHECK(tr.provider->open_mappings() == 0);
  CHECK(tr.artifact_bytes(artifact) == tr.m.canonical());

  // Readers open the daemon's copy: one allocation holding the canonical buffer, PAD zero.
  auto layout = tr.e->device_layout_of(artifact);
  REQUIRE_OK(layout);
  REQUIRE(layout->allocations.size() == 1);
  CHECK(layout->allocations[0].device_id == 0);
  CHECK(layout->allocations[0].size_bytes == tr.m.total_size());
  CHECK(layout->allocations[0].cuda_ipc_handle.size() == sizeof(cudaIpcMemHandle_t));
  auto summary = tr.e->get(artifact);
  REQUIRE_OK(summary);
  CHECK(summary->vram_snapshots == 1);

  // The producer may even exit: the copy is the daemon's.
  tr.producer.end(false);
  CHECK(tr.artifact_bytes(artifact) == tr.m.canonical());
  tr.e->revoke(id, "done");
  CHECK(tr.e->stats().leases == 0);
}

TEST_CASE("cuda weight sync: snapshot_to_device copies device runs with zero gaps, and refuses host bytes",
          "[cuda][weight_sync][snapshot]") {
  // Without and with a spare made ahead for the next snapshot of the same size.
  device_memory_provider::options opts;
  opts.snapshot_spare_bytes = GENERATE(std::uint64_t{0}, 64 * mib);
  auto provider = make_provider(opts);
  // Three device buffers of the daemon's own (allocate: zeroed, exported), filled with patterns.
  std::vector<std::shared_ptr<const memory::byte_source>> buffers;
  for (std::uint64_t seed = 1; seed <= 3; ++seed) {
    auto b = provider->allocate(0, 2 * mib);
    REQUIRE_OK(b);
    const auto* dev = cuda::as_device_source(*b->bytes);
    REQUIRE(dev != nullptr);
    REQUIRE(cuda::testing::fill_random(const_cast<void*>(dev->device_pointer()), 2 * mib, seed) == cudaSuccess);
    buffers.push_back(b->bytes);
  }
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  // Canonical: [0, 1 MiB) of buffer 0, a 100-byte gap, [1 MiB, 2 MiB) of buffer 0 (not after
  // the first run in the canonical buffer: no merge), all of buffer 1 (its two halves as two
  // adjacent segments: merged), 3 bytes of buffer 2 at an odd offset, a tail gap.
  std::vector<memory::segment> segments = {
      {0, mib, buffers[0].get(), 0},
      {mib + 100, mib, buffers[0].get(), mib},
      {2 * mib + 100, mib, buffers[1].get(), 0},
      {3 * mib + 100, mib, buffers[1].get(), mib},
      {4 * mib + 100, 3, buffers[2].get(), 7},
  };
  const std::uint64_t total = 4 * mib + 200;
  auto view = memory::segmented_view::create(total, segments);
  REQUIRE_OK(view);
  std::string expected(total, '\0');
  const auto put = [&](std::uint64_t at, std::uint64_t seed, std::uint64_t from, std::uint64_t length) {
    const auto bytes = cuda::testing::pattern(seed, from, length);
    std::memcpy(expected.data() + at, bytes.data(), length);
  };
  put(0, 1, 0, mib);
  put(mib + 100, 1, mib, mib);
  put(2 * mib + 100, 2, 0, 2 * mib);
  put(4 * mib + 100, 3, 7, 3);

  auto copy = provider->snapshot_to_device(*view);
  REQUIRE(copy.has_value());
  REQUIRE_OK(*copy);
  const auto& buffer = **copy;
  CHECK(buffer.device_id == 0);
  CHECK(buffer.ipc_handle.size() == sizeof(cudaIpcMemHandle_t));
  REQUIRE(buffer.bytes->size() == total);
  const auto* dev = cuda::as_device_source(*buffer.bytes);
  REQUIRE(dev != nullptr);
  CHECK(dev->device() == 0);
  // The copy is its own memory: clearing a source leaves it as it was.
  REQUIRE(cudaMemset(const_cast<void*>(cuda::as_device_source(*buffers[1])->device_pointer()), 0, 2 * mib) ==
          cudaSuccess);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  CHECK(read_all(*buffer.bytes, 0, total) == expected);

  // The next snapshot (into the spare, where there is one) is as right, and its own memory.
  auto next = provider->snapshot_to_device(*view);
  REQUIRE(next.has_value());
  REQUIRE_OK(*next);
  CHECK(cuda::as_device_source(*(*next)->bytes)->device_pointer() != dev->device_pointer());
  std::memset(expected.data() + 2 * mib + 100, 0, 2 * mib);  // buffer 1 is zero now
  CHECK(read_all(*(*next)->bytes, 0, total) == expected);
  CHECK(provider->snapshot_kernel_copies() == 2);  // each in one launch of the batched copy

  // Host bytes are not this provider's to snapshot: the engine copies them on the host.
  t::owned_bytes host(std::string(64, 'h'));
  CHECK_FALSE(provider->snapshot_to_device(host).has_value());
}

TEST_CASE("cuda weight sync: a snapshot of many runs of odd sizes and alignments holds their bytes, in one launch",
          "[cuda][weight_sync][snapshot]") {
  device_memory_provider::options opts;
  opts.snapshot_spare_bytes = GENERATE(std::uint64_t{0}, 64 * mib);
  auto provider = make_provider(opts);
  constexpr std::uint64_t source_bytes = 8 * mib;
  std::vector<std::shared_ptr<const memory::byte_source>> buffers;
  for (std::uint64_t seed = 11; seed <= 13; ++seed) {
    auto b = provider->allocate(0, source_bytes);
    REQUIRE_OK(b);
    const auto* dev = cuda::as_device_source(*b->bytes);
    REQUIRE(dev != nullptr);
    REQUIRE(cuda::testing::fill_random(const_cast<void*>(dev->device_pointer()), source_bytes, seed) == cudaSuccess);
    buffers.push_back(b->bytes);
  }
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  // 150 runs over the three buffers: sizes of 1, 3, 17 and 4096 + 5 bytes among 16-aligned large
  // ones, source offsets at every alignment (a run whose source and destination disagree modulo
  // 16 is copied in narrower units), gaps of 0 to 100 bytes between them and a tail gap.
  const std::uint64_t sizes[] = {1, 3, 17, 4096 + 5, 64 * 1024, mib + 16, 2, 4096, 3 * mib / 2, 100, 48};
  const std::uint64_t misalignments[] = {0, 1, 3, 7, 8, 12, 15, 4, 0};
  const std::uint64_t gaps[] = {0, 1, 5, 16, 100, 0, 3, 0};
  std::vector<memory::segment> segments;
  struct expected_run {
    std::uint64_t at, seed, from, length;
  };
  std::vector<expected_run> runs;
  std::uint64_t at = 0;
  for (std::uint64_t i = 0; i < 150; ++i) {
    const std::uint64_t length = sizes[i % std::size(sizes)];
    const std::size_t b = i % buffers.size();
    const std::uint64_t from =
        (i * 65537) % (source_bytes - 2 * mib) / 16 * 16 + misalignments[i % std::size(misalignments)];
    at += gaps[i % std::size(gaps)];
    segments.push_back({at, length, buffers[b].get(), from});
    runs.push_back({at, 11 + b, from, length});
    at += length;
  }
  const std::uint64_t total = at + 7;
  auto view = memory::segmented_view::create(total, segments);
  REQUIRE_OK(view);
  std::string expected(total, '\0');
  for (const auto& r : runs) {
    const auto bytes = cuda::testing::pattern(r.seed, r.from, r.length);
    std::memcpy(expected.data() + r.at, bytes.data(), r.length);
  }

  // A snapshot of the same size whose bytes are all nonzero goes first, so that the buffer the
  // gapped one gets (cudaMalloc's reuse, or the spare) is unlikely to be zero where its gaps are.
  {
    std::vector<memory::segment> whole;
    for (std::uint64_t a = 0; a < total; a += source_bytes) {
      whole.push_back({a, std::min(source_bytes, total - a), buffers[0].get(), 0});
    }
    auto full = memory::segmented_view::create(total, whole);
    REQUIRE_OK(full);
    auto filled = provider->snapshot_to_device(*full);
    REQUIRE(filled.has_value());
    REQUIRE_OK(*filled);
  }
  for (int round = 0; round < 2; ++round) {
    INFO("snapshot " << round);
    auto copy = provider->snapshot_to_device(*view);
    REQUIRE(copy.has_value());
    REQUIRE_OK(*copy);
    REQUIRE((*copy)->bytes->size() == total);
    const std::string got = read_all(*(*copy)->bytes, 0, total);
    for (std::size_t k = 0; k < runs.size() && got != expected; ++k) {
      const auto& r = runs[k];
      INFO("run " << k << ": " << r.length << " bytes at " << r.at << " from offset " << r.from);
      CHECK(got.compare(r.at, r.length, expected, r.at, r.length) == 0);
    }
    CHECK(got == expected);
  }
  CHECK(provider->snapshot_kernel_copies() == 3);
}

TEST_CASE("cuda weight sync: the batched copier writes runs and zero gaps over old bytes, its tables grown on demand",
          "[cuda][weight_sync][snapshot]") {
  namespace cd = tensorreg::cuda::detail;
  REQUIRE(cudaSetDevice(0) == cudaSuccess);
  const std::uint64_t chunk_bytes = GENERATE(std::uint64_t{256} << 10, std::uint64_t{16}, std::uint64_t{4096});
  INFO("chunks of " << chunk_bytes << " bytes");
  auto copier = cd::batched_copier::create(0, {.chunk_bytes = chunk_bytes, .blocks_per_sm = 8});
  REQUIRE_OK(copier);
  constexpr std::uint64_t source_bytes = 4 * mib;
  void* source = nullptr;
  void* out = nullptr;
  REQUIRE(cudaMalloc(&source, source_bytes) == cudaSuccess);
  REQUIRE(cudaMalloc(&out, 2 * source_bytes) == cudaSuccess);
  struct freer {
    void* a;
    void* b;
    ~freer() {
      static_cast<void>(cudaFree(a));
      static_cast<void>(cudaFree(b));
    }
  } free_both{source, out};
  REQUIRE(cuda::testing::fill_random(source, source_bytes, 7) == cudaSuccess);
  // Old bytes where the snapshots go, so that a gap left unwritten shows.
  REQUIRE(cudaMemset(out, 0xAB, 2 * source_bytes) == cudaSuccess);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);  // the copier's stream does not wait for the null stream
  cudaStream_t stream = nullptr;
  REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess);
  const auto* s = static_cast<const unsigned char*>(source);

  // A small layout, then a larger one enqueued right behind it with no synchronize between
  // them: its tables grow while the first copy may still read them (the copier waits for it).
  const std::vector<std::vector<cuda::device_piece>> layouts = {
      {{3, s + 7, 1}, {5, s + 1001, 3}, {8, s + 8, 17}, {25, s + 3000, 4096 + 5}},
      {{0, s + 16, 16},
       {16, s + 4096 + 1, 17},
       {100, s + 12, 4096 + 5},
       {8192, s + 65536, 2 * mib},
       {8192 + 2 * mib, s + 3 * mib + 3, 4096 + 5},
       {3 * mib, s + 5, 1}}};
  const std::uint64_t sizes[] = {8192, 3 * mib + 77};
  auto* to = static_cast<unsigned char*>(out);
  for (std::size_t l = 0; l < layouts.size(); ++l) {
    INFO("layout " << l);
    REQUIRE_OK(copier->enqueue(to + l * source_bytes, sizes[l], layouts[l], stream));
    CHECK(copier->last_chunks() == cd::count_copy_chunks(layouts[l], sizes[l], chunk_bytes));
    CHECK(copier->table_capacity_bytes() >= copier->last_chunks() * sizeof(cd::copy_chunk));
  }
  REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
  for (std::size_t l = 0; l < layouts.size(); ++l) {
    INFO("layout " << l);
    std::string got(sizes[l], '\0');
    REQUIRE(cudaMemcpy(got.data(), to + l * source_bytes, sizes[l], cudaMemcpyDeviceToHost) == cudaSuccess);
    std::string expected(sizes[l], '\0');
    for (const auto& r : layouts[l]) {
      const auto from = static_cast<std::uint64_t>(static_cast<const unsigned char*>(r.src) - s);
      const auto bytes = cuda::testing::pattern(7, from, r.length);
      std::memcpy(expected.data() + r.at, bytes.data(), r.length);
    }
    CHECK(got == expected);
  }
  REQUIRE(cudaStreamDestroy(stream) == cudaSuccess);
}

TEST_CASE("cuda weight sync: after warm_up the first small GPU hash costs about what the second does",
          "[cuda][weight_sync][warm_start]") {
  device_memory_provider::options opts;
  opts.placement = device_memory_provider::options::hash_placement::gpu;
  auto provider = make_provider(opts);
  REQUIRE_OK(provider->warm_up());
  REQUIRE_OK(provider->warm_up());  // idempotent
  auto buffer = provider->allocate(0, 8 * mib);
  REQUIRE_OK(buffer);
  auto view = memory::segmented_view::create(8 * mib, {{0, 8 * mib, buffer->bytes.get(), 0}});
  REQUIRE_OK(view);
  const auto timed = [&] {
    const auto t0 = std::chrono::steady_clock::now();
    auto digest = provider->tree_hash_on_device(*view);
    REQUIRE(digest.has_value());
    REQUIRE_OK(*digest);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  const double first = timed();
  const double second = timed();
  WARN("GPU hash of 8 MiB after warm_up: first " << first * 1e3 << " ms, second " << second * 1e3 << " ms");
  // Only a gross regression is a failure here (kernel loading, context start: ~0.3 s); the
  // figures belong in the benchmarks.
  CHECK(first < 10 * second + 0.005);
  CHECK(provider->device_hashes() == 2);
}

TEST_CASE("cuda weight sync: a VMM region imported at registration serves every lease without a new import",
          "[cuda][weight_sync][vmm][engine]") {
  constexpr std::uint64_t chunk = 2 * mib;  // the VMM granularity of every GPU we run on
  producer_process p({{chunk, 61, true}, {chunk, 62, true}});
  REQUIRE(chunk % p.granularity() == 0);
  auto provider = make_provider();
  t::fake_clock clock;
  auto options = t::deterministic_options(clock);
  options.devices = provider;
  auto e = t::make_engine(options);

  auto chunks = std::make_shared<regions::vmm_chunks>();
  for (const int fd : p.vmm_fds()) chunks->fds.emplace_back(::dup(fd));
  chunks->chunk_bytes = {chunk, chunk};
  regions::register_request r;
  r.kind = regions::memory_kind::vram;
  r.owner_pid = p.pid();
  r.size_bytes = 2 * chunk;
  r.device_id = 0;
  r.vmm = chunks;
  std::string region_id;
  {
    // The region_info handed back shares the import's mapping (every copy of it does, as a
    // lease's does): held to the end, it would keep the 4 MiB mapped after the unregister.
    auto region = e->register_region(std::move(r));
    REQUIRE_OK(region);
    region_id = region->id;
  }
  CHECK(provider->vmm_imports() == 1);
  CHECK(provider->vmm_reserved_bytes() == 2 * chunk);

  // One tensor across the two allocations' boundary, one inside the second.
  t::model m;
  m.storages = {{"x", cuda::testing::pattern(61, chunk - 4096, 4096) + cuda::testing::pattern(62, 0, 4096)},
                {"y", cuda::testing::pattern(62, mib, 8192)}};
  m.tensors = {{"x", "x", {2048}, {1}, "torch.float32", 0, 8192}, {"y", "y", {2048}, {1}, "torch.float32", 0, 8192}};
  std::map<std::string, reg::storage_entry> entries;
  const std::pair<const char*, std::uint64_t> at[] = {{"x", chunk - 4096}, {"y", chunk + mib}};
  for (const auto& [id, offset] : at) {
    reg::storage_entry s;
    s.storage_id = id;
    s.device_id = 0;
    s.storage_length = 8192;
    s.source = reg::vram_region_source{region_id};
    s.mapping_base_offset = offset;
    entries.emplace(id, s);
  }
  for (const bool in_place : {true, true, false}) {
    INFO("in_place " << in_place);
    auto begin = t::lip_begin(m.total_size(), p.pid());
    begin.plan = reg::lease_options{.in_place = in_place};
    auto begun = e->begin(begin);
    REQUIRE_OK(begun);
    REQUIRE_OK(e->feed(t::lip_feed(begun->registration_id, m, entries)));
    auto committed = e->commit(begun->registration_id);
    REQUIRE_OK(committed);
    CHECK(committed->descriptor.artifact_id == t::expected_mi2(m.index().json(), m.canonical()));
    auto bytes = e->open_bytes(committed->descriptor.artifact_id);
    REQUIRE_OK(bytes);
    CHECK(read_all(**bytes, 0, (*bytes)->size()) == m.canonical());
    bytes->reset();
    e->revoke(begun->registration_id, "next step");
  }
  CHECK(provider->vmm_imports() == 1);
  CHECK(e->stats().vmm_imports == 1);
  CHECK(provider->vmm_reserved_bytes() == 2 * chunk);  // the region keeps it between leases
  REQUIRE(e->unregister_region(region_id, p.pid(), false).value());
  CHECK(provider->vmm_reserved_bytes() == 0);
}

TEST_CASE("cuda weight sync: through tensorregd, re-leases of a kept region open nothing and a snapshot is read back",
          "[cuda][weight_sync][daemon]") {
  namespace wv1 = tensorreg::wire::v1;
  namespace v2 = tensorcast::daemon::v2;
  producer_process p(std::vector<cuda::testing::producer_allocation>{{4 * mib, 81, false}});
  testing::daemon_process d({"--snapshot-spare-bytes", "67108864"});
  CHECK(d.output().find("warmed up ") != std::string::npos);  // before its ready line
  auto connected = tensorreg::client::raw::connection::connect(d.socket_path());
  REQUIRE_OK(connected);
  auto& c = **connected;
  const auto me = static_cast<std::int32_t>(::getpid());
  const auto stats = [&] {
    wv1::Request req;
    req.mutable_get_stats();
    auto st = c.call(req);
    REQUIRE_OK(st);
    return st->response.get_stats();
  };
  const auto opens_before = stats().ipc_opens();

  wv1::Request region_req;
  auto* r = region_req.mutable_register_region();
  r->set_memory_kind(v2::REGION_MEMORY_KIND_VRAM);
  r->set_owner_pid(me);
  r->set_size_bytes(4 * mib);
  r->set_device_id(0);
  r->set_cuda_ipc_handle(p.ipc_handles().at(0));
  auto region = c.call(region_req);
  REQUIRE_OK(region);
  const auto ref = region->response.register_region().region();

  // One uint8 tensor of 1 MiB at 512 KiB into the allocation.
  constexpr std::uint64_t base = 512 * 1024, length = mib;
  const std::vector<index::tensor_desc> descs = {
      {"w", "torch.uint8", {static_cast<std::int64_t>(length)}, {1}, "w", length, 0}};
  auto idx = index::canonical_index::build(descs);
  REQUIRE_OK(idx);
  std::string canonical(idx->total_size(), '\0');
  const auto bytes = cuda::testing::pattern(81, base, length);
  std::memcpy(canonical.data() + idx->find("w")->offset, bytes.data(), length);
  memory::host_bytes_view canonical_view(std::as_bytes(std::span<const char>(canonical)));
  auto expected = identity::content_id(idx->json(), canonical_view, nullptr);
  REQUIRE_OK(expected);

  auto provider = make_provider();  // the reader's side
  for (const bool in_place : {true, true, false}) {
    INFO("in_place " << in_place);
    wv1::Request begin;
    auto* b = begin.mutable_begin_register_artifact();
    b->set_device_id(0);
    b->set_total_size(idx->total_size());
    b->set_ttl_ms(600'000);
    b->set_owner_pid(me);
    b->mutable_lease()->set_in_place(in_place);
    auto begun = c.call(begin);
    REQUIRE_OK(begun);
    const auto reg_id = begun->response.begin_register_artifact().registration_id();
    v2::FeedRegisterArtifactStreamRequest feed;
    feed.set_registration_id(reg_id);
    auto* se = feed.add_storage_entries();
    se->set_storage_id("w");
    se->set_device_id(0);
    se->set_storage_length(length);
    *se->mutable_region_ref() = ref;
    se->set_mapping_base_offset(base);
    auto* seg = feed.mutable_lease_segments()->add_segments();
    seg->set_storage_id("w");
    seg->set_artifact_offset(idx->find("w")->offset);
    seg->set_length(length);
    auto* a = feed.add_tensor_aliases();
    a->set_name("w");
    a->set_storage_id("w");
    a->set_logical_length(length);
    a->add_shape(static_cast<std::int64_t>(length));
    a->add_stride(1);
    a->set_dtype("torch.uint8");
    REQUIRE_OK(c.feed({feed}));
    wv1::Request commit;
    commit.mutable_commit_registered_artifact()->set_registration_id(reg_id);
    auto committed = c.call(commit);
    REQUIRE_OK(committed);
    const auto artifact_id = committed->response.commit_registered_artifact().artifact_descriptor().artifact_id();
    CHECK(artifact_id == expected->to_string());
    CHECK(stats().ipc_opens() == opens_before + 1);  // the region, opened by the first lease only

    wv1::Request open;
    open.mutable_open_artifact_device()->set_artifact_id(artifact_id);
    auto opened = c.call(open);
    REQUIRE_OK(opened);
    const auto& layout = opened->response.open_artifact_device();
    REQUIRE(layout.allocations_size() == 1);
    const auto& alloc = layout.allocations(0);
    if (in_place) {
      CHECK(alloc.cuda_ipc_handle() == p.ipc_handles().at(0));
    } else {
      // The daemon's own buffer, exported by the daemon's process.
      CHECK(alloc.cuda_ipc_handle() != p.ipc_handles().at(0));
      CHECK(alloc.size_bytes() == idx->total_size());
      auto mapped = provider->open_ipc(d.pid(), 0, alloc.cuda_ipc_handle(), alloc.size_bytes());
      REQUIRE_OK(mapped);
      std::string read_back(layout.total_size(), '\0');
      for (const auto& sg : layout.segments()) {
        const auto got = read_all(**mapped, sg.allocation_offset(), sg.length());
        std::memcpy(read_back.data() + sg.artifact_offset(), got.data(), got.size());
      }
      CHECK(read_back == canonical);
      wv1::Request list;
      list.mutable_list_artifacts();
      auto listed = c.call(list);
      REQUIRE_OK(listed);
      REQUIRE(listed->response.list_artifacts().artifacts_size() == 1);
      const auto& tiers = listed->response.list_artifacts().artifacts(0).tiers();
      CHECK(std::find(tiers.begin(), tiers.end(), wv1::TIER_VRAM) != tiers.end());
      CHECK(std::find(tiers.begin(), tiers.end(), wv1::TIER_VRAM_LEASED) == tiers.end());
    }
    wv1::Request revoke;
    revoke.mutable_revoke_registered_artifact()->set_registration_id(reg_id);
    REQUIRE_OK(c.call(revoke));
  }
  CHECK(stats().open_mappings() == 1);  // the region's, kept
  wv1::Request un;
  un.mutable_unregister_region()->set_region_id(ref.region_id());
  un.mutable_unregister_region()->set_owner_pid(me);
  REQUIRE_OK(c.call(un));
  CHECK(stats().open_mappings() == 0);
  CHECK(d.stop() == 0);
}
