// tensorreg_gpu_tests: the snapshot + D2H + GPU hash of copy_to_host (src/cuda/bulk_copy.hpp)
// against the bytes and the host tree hash, through pinned staging and through the replica
// pool (fresh registered memfds, recycled arenas, exported replicas). Runs only
// where a CUDA device is present (gpu_main.cpp exits 77 otherwise).
#include "cuda/bulk_copy.hpp"

#include <catch2/catch.hpp>

#include <cuda_runtime_api.h>

#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "devices/replica_pool.hpp"
#include "gpu_fill.hpp"
#include "support/engine_helpers.hpp"
#include "tensorreg/cuda/device_memory_provider.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/registration/engine.hpp"

namespace {

using namespace tensorreg;
namespace cd = tensorreg::cuda::detail;

struct device_bytes {
  void* ptr = nullptr;
  explicit device_bytes(std::uint64_t n) { REQUIRE(cudaMalloc(&ptr, n) == cudaSuccess); }
  ~device_bytes() { static_cast<void>(cudaFree(ptr)); }
  device_bytes(const device_bytes&) = delete;
  device_bytes& operator=(const device_bytes&) = delete;
};

// The canonical bytes `ranges` of `host_source` (the device source's copy) make, gaps zero.
std::vector<std::byte> expected_bytes(const std::vector<cd::device_range>& ranges, const std::byte* device_base,
                                      const std::vector<std::byte>& host_source, std::uint64_t size) {
  std::vector<std::byte> expected(size, std::byte{0});
  for (const auto& r : ranges)
    std::memcpy(expected.data() + r.dst, host_source.data() + (r.src - device_base), r.length);
  return expected;
}

hash::digest host_tree_hash(const std::vector<std::byte>& bytes) {
  auto want = hash::tree_hash(memory::host_bytes_view(std::span<const std::byte>(bytes)));
  REQUIRE_OK(want);
  return *want;
}

// Forwards to the real provider and remembers the device buffers Begin allocates, so the test
// can write the stage_on_gpu staging buffer through its device pointer.
class recording_devices final : public registration::device_memory {
 public:
  explicit recording_devices(std::shared_ptr<cuda::device_memory_provider> real) : real_(std::move(real)) {}
  result<std::shared_ptr<const memory::byte_source>> open_ipc(std::int32_t pid, std::int32_t device,
                                                              std::string_view handle, std::uint64_t min) override {
    return real_->open_ipc(pid, device, handle, min);
  }
  result<registration::device_buffer> allocate(std::int32_t device, std::uint64_t bytes) override {
    auto out = real_->allocate(device, bytes);
    if (out) {
      std::lock_guard lock(mutex_);
      last_ = out->bytes;
    }
    return out;
  }
  [[nodiscard]] std::size_t open_mappings() const override { return real_->open_mappings(); }
  [[nodiscard]] std::optional<result<registration::host_copy>> copy_to_host(const memory::byte_source& source,
                                                                            bool want_digest,
                                                                            thread_pool& pool) override {
    return real_->copy_to_host(source, want_digest, pool);
  }
  std::shared_ptr<const memory::byte_source> take_last() {
    std::lock_guard lock(mutex_);
    return std::move(last_);
  }

 private:
  std::shared_ptr<cuda::device_memory_provider> real_;
  std::mutex mutex_;
  std::shared_ptr<const memory::byte_source> last_;
};

}  // namespace

TEST_CASE("cuda bulk_copy: the replica holds the runs with zero gaps and the digest is the host tree hash",
          "[cuda][bulk_copy]") {
  const bool want_digest = GENERATE(true, false);
  // Chunks of 64 KiB over 3 workers: many stripes, a short last chunk ending mid-page, and
  // two 4 MiB leaves plus a short one for the tree.
  constexpr std::uint64_t size = (std::uint64_t{8} << 20) + 12345;
  constexpr std::uint64_t source_bytes = std::uint64_t{9} << 20;
  device_bytes source(source_bytes);
  REQUIRE(cuda::testing::fill_random(source.ptr, source_bytes, 77) == cudaSuccess);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  std::vector<std::byte> host_source(source_bytes);
  cuda::testing::fill_random_host(host_source.data(), source_bytes, 77);

  const auto* src = static_cast<const std::byte*>(source.ptr);
  const std::vector<cd::device_range> ranges{
      {100, src + 5, 100'000},                         // a gap before it
      {300'000, src + 1'000'000, 4'500'000},           // crosses the first leaf boundary
      {4'800'000, src + 5'000'000, size - 4'800'000},  // runs to the end
  };
  std::vector<std::byte> expected(size, std::byte{0});
  for (const auto& r : ranges) {
    std::memcpy(expected.data() + r.dst, host_source.data() + (r.src - src), r.length);
  }

  cd::bulk_copier copier;
  auto hasher = cuda::gpu_tree_hasher::create(0);
  REQUIRE_OK(hasher);
  const cd::snapshot_hasher hash = [&](const void* p, std::uint64_t n, cuda::stream_view stream) {
    return hasher->tree_hash(p, n, stream);
  };
  thread_pool pool(3);
  cd::bulk_copy_options opts;
  opts.chunk_bytes = 64 << 10;
  opts.workers = 3;
  for (int round = 0; round < 2; ++round) {  // the second reuses the kept staging slots
    auto copy = copier.copy(0, ranges, size, want_digest ? &hash : nullptr, pool, opts);
    REQUIRE_OK(copy);
    REQUIRE(copy->replica->size() == size);
    CHECK(std::memcmp(copy->replica->bytes().data(), expected.data(), size) == 0);
    if (want_digest) {
      REQUIRE(copy->data_digest.has_value());
      auto want = hash::tree_hash(memory::host_bytes_view(std::span<const std::byte>(expected)));
      REQUIRE_OK(want);
      CHECK(*copy->data_digest == *want);
    } else {
      CHECK_FALSE(copy->data_digest.has_value());
    }
  }
}

TEST_CASE("cuda bulk_copy: a snapshot larger than the device is RESOURCE_EXHAUSTED, so the caller copies on the host",
          "[cuda][bulk_copy]") {
  std::size_t free_bytes = 0;
  std::size_t total_bytes = 0;
  REQUIRE(cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess);
  const std::uint64_t size = 2 * static_cast<std::uint64_t>(total_bytes);
  cd::bulk_copier copier;
  thread_pool pool(1);
  auto copy = copier.copy(0, {}, size, nullptr, pool);
  REQUIRE_FALSE(copy);
  CHECK(copy.error().code == errc::resource_exhausted);
  CHECK_THAT(copy.error().message,
             Catch::Contains("cannot allocate a " + std::to_string(size) + "-byte snapshot buffer on device 0"));
}

TEST_CASE("cuda bulk_copy: a recycled arena full of old bytes holds exactly the new runs, zero gaps and their digest",
          "[cuda][bulk_copy][replica_pool]") {
  constexpr std::uint64_t size = (std::uint64_t{8} << 20) + 12345;
  constexpr std::uint64_t source_bytes = std::uint64_t{9} << 20;
  device_bytes source(source_bytes);
  REQUIRE(cuda::testing::fill_random(source.ptr, source_bytes, 91) == cudaSuccess);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  std::vector<std::byte> host_source(source_bytes);
  cuda::testing::fill_random_host(host_source.data(), source_bytes, 91);
  const auto* src = static_cast<const std::byte*>(source.ptr);
  // The second put has gaps where the first had data, at both ends and inside.
  const std::vector<cd::device_range> first{{0, src, size}};
  const std::vector<cd::device_range> second{
      {4096, src + 7, 1'000'000},
      {3'000'000, src + 2'000'000, 2'000'000},
      {6'000'000, src + 100, size - 6'000'000 - 777},
  };

  auto replicas = devices::replica_pool::create(std::uint64_t{64} << 20);
  cd::bulk_copier copier;
  auto hasher = cuda::gpu_tree_hasher::create(0);
  REQUIRE_OK(hasher);
  const cd::snapshot_hasher hash = [&](const void* p, std::uint64_t n, cuda::stream_view stream) {
    return hasher->tree_hash(p, n, stream);
  };
  thread_pool pool(3);
  cd::bulk_copy_options opts;
  opts.chunk_bytes = 64 << 10;
  opts.workers = 3;
  opts.replicas = replicas.get();

  // A fresh memfd, registered chunk by chunk as it is filled.
  auto fresh = copier.copy(0, first, size, &hash, pool, opts);
  REQUIRE_OK(fresh);
  const auto want_first = expected_bytes(first, src, host_source, size);
  CHECK(std::memcmp(fresh->replica->bytes().data(), want_first.data(), size) == 0);
  CHECK(*fresh->data_digest == host_tree_hash(want_first));
  const void* address = fresh->replica->bytes().data();
  // Garbage everywhere, so that any byte the next put does not write shows.
  std::memset(fresh->replica->mutable_bytes().data(), 0xa5, size);
  fresh->replica.reset();
  CHECK(replicas->idle_bytes() == size);

  // A different chunk size: the recycled arena's DMAs follow its own registrations.
  opts.chunk_bytes = 1 << 20;
  auto again = copier.copy(0, second, size, &hash, pool, opts);
  REQUIRE_OK(again);
  CHECK(again->replica->bytes().data() == address);  // the same arena
  CHECK(replicas->idle_bytes() == 0);
  CHECK(replicas->stats().hits == 1);
  const auto want_second = expected_bytes(second, src, host_source, size);
  CHECK(std::memcmp(again->replica->bytes().data(), want_second.data(), size) == 0);
  REQUIRE(again->data_digest.has_value());
  CHECK(*again->data_digest == host_tree_hash(want_second));
}

TEST_CASE("cuda bulk_copy: a replica whose fd left the process is never recycled", "[cuda][bulk_copy][replica_pool]") {
  constexpr std::uint64_t size = std::uint64_t{2} << 20;
  device_bytes source(size);
  auto replicas = devices::replica_pool::create(std::uint64_t{64} << 20);
  cd::bulk_copier copier;
  thread_pool pool(2);
  cd::bulk_copy_options opts;
  opts.chunk_bytes = 256 << 10;
  opts.replicas = replicas.get();
  const std::vector<cd::device_range> whole{{0, static_cast<const std::byte*>(source.ptr), size}};

  REQUIRE(cudaMemset(source.ptr, 0x11, size) == cudaSuccess);
  auto shared = copier.copy(0, whole, size, nullptr, pool, opts);
  REQUIRE_OK(shared);
  auto fd = shared->replica->duplicate_fd();
  REQUIRE_OK(fd);
  shared->replica.reset();
  CHECK(replicas->idle_bytes() == 0);
  CHECK(replicas->stats().refused_exported == 1);

  REQUIRE(cudaMemset(source.ptr, 0x22, size) == cudaSuccess);
  auto next = copier.copy(0, whole, size, nullptr, pool, opts);
  REQUIRE_OK(next);
  CHECK(replicas->stats().hits == 0);
  CHECK(next->replica->bytes()[size - 1] == std::byte{0x22});
  // The reader's memory still holds what it was given.
  void* mapped = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd->get(), 0);
  REQUIRE(mapped != MAP_FAILED);
  const auto* bytes = static_cast<const unsigned char*>(mapped);
  CHECK(bytes[0] == 0x11);
  CHECK(bytes[size - 1] == 0x11);
  ::munmap(mapped, size);
}

TEST_CASE("cuda bulk_copy: the engine's replicas return to the provider's pool unless GetArtifactMemfd handed them out",
          "[cuda][bulk_copy][replica_pool][engine]") {
  namespace t = tensorreg::testing;
  constexpr std::uint64_t mib = 1 << 20;
  cuda::device_memory_provider::options popts;
  popts.placement = cuda::device_memory_provider::options::hash_placement::gpu;
  popts.replica_pool_bytes = 256 * mib;
  auto provider = cuda::device_memory_provider::create(popts);
  REQUIRE_OK(provider);
  CHECK((*provider)->replica_pool_max_bytes() == 256 * mib);
  auto devices = std::make_shared<recording_devices>(*provider);
  t::fake_clock clock;
  auto options = t::deterministic_options(clock);
  options.devices = devices;
  auto e = t::make_engine(options);
  const auto me = static_cast<std::int32_t>(::getpid());

  const auto model_of = [&](std::uint32_t seed) {
    t::model m = t::small_model();
    m.storages.push_back({"big", t::pattern(9 * mib + 12, seed)});
    m.tensors.push_back(
        {"big", "big", {static_cast<std::int64_t>((9 * mib + 12) / 4)}, {1}, "torch.float32", 0, 9 * mib + 12});
    return m;
  };
  // stage_on_gpu: Begin allocates the device staging buffer, we write it (PAD as 0xcd), Commit.
  const auto put = [&](const t::model& m) {
    auto begin = t::stable_begin(m, me);
    begin.plan = registration::stable_dram_options{.stage_on_gpu = true};
    auto begun = e->begin(begin);
    REQUIRE_OK(begun);
    auto buffer = devices->take_last();
    REQUIRE(buffer != nullptr);
    const auto* device = cuda::as_device_source(*buffer);
    REQUIRE(device != nullptr);
    const std::string uploaded = m.canonical_with_pad('\xcd');
    REQUIRE(cudaMemcpy(const_cast<void*>(device->device_pointer()), uploaded.data(), uploaded.size(),
                       cudaMemcpyHostToDevice) == cudaSuccess);
    buffer.reset();
    auto committed = e->commit(begun->registration_id);
    REQUIRE_OK(committed);
    CHECK(committed->descriptor.artifact_id == t::expected_mi2(m.index().json(), m.canonical()));
    auto bytes = e->open_bytes(committed->descriptor.artifact_id);
    REQUIRE_OK(bytes);
    std::string read((*bytes)->size(), '\0');
    REQUIRE_OK((*bytes)->read(0, std::as_writable_bytes(std::span<char>(read))));
    CHECK(read == m.canonical());  // PAD zero, though the arena held the previous replica's bytes
    return committed->descriptor.artifact_id;
  };
  const auto a = model_of(19), b = model_of(23), c = model_of(29);
  const std::uint64_t size = a.total_size();

  const auto first = put(a);
  CHECK((*provider)->replica_pool_idle_bytes() == 0);
  REQUIRE_OK(e->deregister({first, true, 0, me}));
  CHECK((*provider)->replica_pool_idle_bytes() == size);  // dropped: back in the pool

  const auto second = put(b);  // recycles it
  CHECK((*provider)->replica_pool_idle_bytes() == 0);
  auto exported = e->stable_replica_fd(second);
  REQUIRE_OK(exported);
  REQUIRE_OK(e->deregister({second, true, 0, me}));
  CHECK((*provider)->replica_pool_idle_bytes() == 0);  // a reader may still map it: freed, not pooled

  const auto third = put(c);
  CHECK_FALSE(third.empty());
  void* mapped = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, exported->second.get(), 0);
  REQUIRE(mapped != MAP_FAILED);
  CHECK(std::string(static_cast<const char*>(mapped), size) == b.canonical());
  ::munmap(mapped, size);
}
