// gpu_stable_put_bench — GPU → stable DRAM put through the engine, next to the copy it chases.
//
// For each size: a stable_dram registration with stage_on_gpu (Begin allocates the device
// staging buffer, a kernel fills it, Commit makes the host replica and its id) through
// registration::engine with the real cuda::device_memory_provider. Printed next to it, from
// the same run: one plain pinned cudaMemcpy D2H of the same size (the limit), the ratio, the
// goal (≥ 20 GiB/s and ≥ 80 % of the plain copy), the hashing placement the provider chose
// and the predictions it chose from; the host path of before (placement forced to host); the
// bulk copy (src/cuda/bulk_copy.hpp) called directly, without the engine; and what the first
// touch of a fresh memfd costs on this machine (the bound the copy meets there).
//
// The provider keeps a replica pool (options::replica_pool_bytes, src/devices/replica_pool.hpp):
// replicas it made come back resident and registered when dropped. Each size is measured as
//  * first put: a new artifact while the pool holds nothing of that size (a fresh memfd,
//    populated and registered chunk by chunk as the DMA fills it);
//  * identical puts: the same content again; each commit joins the artifact and drops its copy,
//    which returns to the pool for the next one;
//  * RL weight sync: new content every round (two seeds alternating), the previous round's
//    artifact deregistered after each put, so its replica returns to the pool;
//  * no pool: identical puts through a provider with the pool off (pinned staging into a new
//    memfd every time: the path before the pool).
//
//   gpu_stable_put_bench [--sizes-gib 1,4,8] [--repeat 3] [--bulk 1] [--sweep 0]
//                        [--placement measured|gpu] [--no-pool 1] [--host 1] [--cgid 0]
//
// --cgid 1 registers each put under a client-supplied `cgid:` id (registration.md §3): the
// engine computes no data hash then, so the put is the copy alone — what the copy path does
// when the 4 MiB-leaf hash (~107 ms flat on the GPU) is not its bound.
//
// --sweep 1 adds, at the largest size, the bulk copy over workers × chunk sizes (the defaults
// of bulk_copy_options were picked from this).
//
// Prints one JSON line per measurement, then a table. Host code only (.cu so the CPU
// benchmarks' *_bench.cpp glob does not take it).
#include <cuda_runtime_api.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "cuda/bulk_copy.hpp"
#include "cuda/speed_probe.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/cuda/device_memory_provider.hpp"
#include "tensorreg/cuda/gpu_tree_hash.hpp"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/memory/shared_memory.hpp"
#include "tensorreg/registration/engine.hpp"

namespace {

using namespace tensorreg;
namespace reg = tensorreg::registration;
using clock_type = std::chrono::steady_clock;
constexpr double gib = 1024.0 * 1024.0 * 1024.0;

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "gpu_stable_put_bench: %s\n", what.c_str());
  std::exit(1);
}

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) die(std::string("cannot ") + what + ": " + cudaGetErrorName(e));
}

// Forwards to the real provider and remembers the buffers Begin allocates: the bench writes
// the staging buffer through its device pointer (its IPC handle cannot be opened by the
// process that exported it).
class recording_devices final : public reg::device_memory {
 public:
  explicit recording_devices(std::shared_ptr<cuda::device_memory_provider> real) : real_(std::move(real)) {}
  result<std::shared_ptr<const memory::byte_source>> open_ipc(std::int32_t pid, std::int32_t device,
                                                              std::string_view handle, std::uint64_t min) override {
    return real_->open_ipc(pid, device, handle, min);
  }
  result<reg::device_buffer> allocate(std::int32_t device, std::uint64_t bytes) override {
    auto out = real_->allocate(device, bytes);
    if (out) {
      std::lock_guard lock(mutex_);
      last_ = out->bytes;
    }
    return out;
  }
  std::size_t open_mappings() const override { return real_->open_mappings(); }
  std::optional<result<hash::digest>> tree_hash_on_device(const memory::segmented_view& canonical) override {
    return real_->tree_hash_on_device(canonical);
  }
  std::optional<result<reg::host_copy>> copy_to_host(const memory::byte_source& source, bool want_digest,
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

// Eight float32 tensors of size/8 bytes each, one storage each: a state dict of 8 big tensors.
index::canonical_index make_index(std::uint64_t size) {
  std::vector<index::tensor_desc> descs;
  const std::uint64_t each = size / 8;
  for (int i = 0; i < 8; ++i) {
    const auto elems = static_cast<std::int64_t>(each / 4);
    descs.push_back(
        {"layer" + std::to_string(i) + ".weight", "torch.float32", {elems}, {1}, "s" + std::to_string(i), each, 0});
  }
  auto built = index::canonical_index::build(descs);
  if (!built) die(built.error().message);
  return std::move(*built);
}

__global__ void fill_kernel(std::uint32_t* p, std::uint64_t words, std::uint32_t seed) {
  for (std::uint64_t i = blockIdx.x * std::uint64_t{blockDim.x} + threadIdx.x; i < words;
       i += std::uint64_t{gridDim.x} * blockDim.x) {
    p[i] = static_cast<std::uint32_t>(i * 2654435761u) ^ seed;
  }
}

struct put_result {
  double seconds = 0;
  std::uint64_t device_hashes = 0;  // GPU hashes during the commit
  std::string artifact_id;
};

// Set by --cgid 1: puts carry a client-supplied id, so no data hash is computed.
bool use_cgid = false;

// One Begin (stage_on_gpu) → fill → Commit; only the Commit is timed.
put_result put_once(reg::engine& e, recording_devices& devices, cuda::device_memory_provider& provider,
                    const index::canonical_index& idx, std::uint32_t seed) {
  reg::begin_request r;
  r.owner_pid = static_cast<std::int32_t>(::getpid());
  r.total_size = idx.total_size();
  r.tensor_index_data = reg::index_data{idx.json(), "v3", "json"};
  r.plan = reg::stable_dram_options{.stage_on_gpu = true};
  if (use_cgid) r.client_artifact_id = "cgid:bench." + std::to_string(seed) + "." + std::to_string(idx.total_size());
  auto begun = e.begin(r);
  if (!begun) die(begun.error().message);
  auto buffer = devices.take_last();
  const auto* dev = cuda::as_device_source(*buffer);
  if (dev == nullptr) die("the staging buffer is not device memory");
  fill_kernel<<<1024, 256>>>(static_cast<std::uint32_t*>(const_cast<void*>(dev->device_pointer())), buffer->size() / 4,
                             seed);
  cuda_ok(cudaDeviceSynchronize(), "fill the staging buffer");
  buffer.reset();
  const std::uint64_t hashes = provider.device_hashes();
  const auto t0 = clock_type::now();
  auto committed = e.commit(begun->registration_id);
  const double s = seconds_since(t0);
  if (!committed) die(committed.error().message);
  return {s, provider.device_hashes() - hashes, committed->descriptor.artifact_id};
}

void drop(reg::engine& e, const std::string& artifact_id) {
  auto done = e.deregister({artifact_id, true, 0, static_cast<std::int32_t>(::getpid())});
  if (!done) die(done.error().message);
}

std::vector<std::uint64_t> parse_list(const std::string& s) {
  std::vector<std::uint64_t> out;
  std::size_t at = 0;
  while (at < s.size()) {
    auto comma = s.find(',', at);
    if (comma == std::string::npos) comma = s.size();
    out.push_back(std::strtoull(s.substr(at, comma - at).c_str(), nullptr, 10));
    at = comma + 1;
  }
  return out;
}

void usage(std::FILE* to) {
  std::fprintf(to,
               "usage: gpu_stable_put_bench [--sizes-gib 1,4,8] [--repeat 3] [--bulk 1] [--sweep 0]\n"
               "                            [--placement measured|gpu] [--no-pool 1] [--host 1] [--cgid 0]\n");
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::uint64_t> sizes_gib{1, 4, 8};
  int repeat = 3;
  bool bulk_alone = true;
  bool sweep = false;
  bool no_pool = true;
  bool host_path = true;
  std::string placement_flag = "measured";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      usage(stdout);
      return 0;
    }
    const bool known = a == "--sizes-gib" || a == "--repeat" || a == "--bulk" || a == "--sweep" || a == "--no-pool" ||
                       a == "--host" || a == "--placement" || a == "--cgid";
    if (!known || i + 1 >= argc) {
      std::fprintf(stderr, "gpu_stable_put_bench: %s %s\n", known ? "missing the value of" : "unknown option",
                   a.c_str());
      usage(stderr);
      return 2;
    }
    const char* v = argv[++i];
    if (a == "--sizes-gib")
      sizes_gib = parse_list(v);
    else if (a == "--repeat")
      repeat = std::max(1, std::atoi(v));
    else if (a == "--bulk")
      bulk_alone = std::atoi(v) != 0;
    else if (a == "--sweep")
      sweep = std::atoi(v) != 0;
    else if (a == "--no-pool")
      no_pool = std::atoi(v) != 0;
    else if (a == "--host")
      host_path = std::atoi(v) != 0;
    else if (a == "--placement")
      placement_flag = v;
    else
      use_cgid = std::atoi(v) != 0;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    std::fprintf(stderr, "gpu_stable_put_bench: no CUDA device\n");
    return 77;
  }
  std::printf("# device 0: %s, %u host threads\n", prop.name, std::max(1u, std::thread::hardware_concurrency()));

  const auto make = [](cuda::device_memory_provider::options::hash_placement placement,
                       std::uint64_t pool_bytes = cuda::device_memory_provider::options::replica_pool_auto) {
    cuda::device_memory_provider::options opts;
    opts.placement = placement;
    opts.replica_pool_bytes = pool_bytes;
    auto provider = cuda::device_memory_provider::create(opts);
    if (!provider) die(provider.error().message);
    auto devices = std::make_shared<recording_devices>(*provider);
    reg::engine_options options;
    options.devices = devices;
    auto e = reg::engine::create(options);
    if (!e) die(e.error().message);
    return std::make_tuple(*provider, devices, std::move(*e));
  };
  using placement = cuda::device_memory_provider::options::hash_placement;
  if (placement_flag != "measured" && placement_flag != "gpu") die("--placement must be measured or gpu");
  const auto chosen_placement = placement_flag == "gpu" ? placement::gpu : placement::measured;
  auto [provider, devices, engine] = make(chosen_placement);
  auto [host_provider, host_devices, host_engine] = make(placement::host, 0);
  auto [plain_provider, plain_devices, plain_engine] = make(chosen_placement, 0);
  std::printf("# replica pool: up to %.1f GiB idle (options::replica_pool_bytes default), placement %s\n",
              static_cast<double>(provider->replica_pool_max_bytes()) / gib, placement_flag.c_str());

  auto speeds = cuda::detail::measured_speeds(0);
  if (!speeds) die(speeds.error().message);
  speeds->host_threads = std::max(1u, std::thread::hardware_concurrency());
  std::printf(
      "# measured: GPU hash flat %.1f ms (%llu leaves at once), host SHA-256 %.2f GB/s/core, memcpy %.2f GB/s/core, "
      "D2H %.1f GiB/s, D2D %.0f GiB/s\n",
      speeds->gpu_flat_seconds * 1e3, static_cast<unsigned long long>(speeds->gpu_parallel_leaves),
      speeds->host_core_hash_rate / 1e9, speeds->host_core_copy_rate / 1e9, speeds->d2h_rate / gib,
      speeds->d2d_rate / gib);

  // What a fresh replica's first touch costs here: 2 GiB memfds populated by every thread
  // (MADV_POPULATE_WRITE), with 4 KiB pages and with MADV_HUGEPAGE (shmem THP).
  {
    std::string thp = "unknown";
    if (std::FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/shmem_enabled", "r")) {
      char line[256] = {};
      if (std::fgets(line, sizeof line, f) != nullptr) thp = line;
      std::fclose(f);
      if (!thp.empty() && thp.back() == '\n') thp.pop_back();
    }
    thread_pool touch_pool(std::max(1u, std::thread::hardware_concurrency()) - 1);
    for (const bool huge : {false, true}) {
      std::vector<double> rates;
      for (int i = 0; i < 2; ++i) {
        auto m = memory::shared_memory::create(std::uint64_t{2} << 30, "bench-touch");
        if (!m) die(m.error().message);
        auto bytes = m->mutable_bytes();
        if (huge) static_cast<void>(::madvise(bytes.data(), bytes.size(), MADV_HUGEPAGE));
        const std::size_t parts = touch_pool.size() + 1;
        const auto t0 = clock_type::now();
        static_cast<void>(touch_pool.parallel_for(parts, [&](std::size_t k) -> status {
          const std::size_t each = bytes.size() / parts / 4096 * 4096;
          const std::size_t begin = k * each;
          const std::size_t length = k + 1 == parts ? bytes.size() - begin : each;
          if (::madvise(bytes.data() + begin, length, 23 /* MADV_POPULATE_WRITE */) != 0) {
            std::memset(bytes.data() + begin, 0, length);
          }
          return {};
        }));
        rates.push_back(2.0 / seconds_since(t0));
      }
      std::printf(
          "{\"bench\":\"gpu_stable_put_first_touch\",\"shmem_thp\":\"%s\",\"madv_hugepage\":%s,"
          "\"threads\":%u,\"gib_s\":%.2f}\n",
          thp.c_str(), huge ? "true" : "false", touch_pool.size() + 1, median(rates));
      std::fflush(stdout);
    }
  }

  struct row {
    double size_gib;
    double plain;
    double first;      // first put, nothing of that size pooled
    double identical;  // identical puts (joins), copies recycled
    double sync;       // new content each round, previous artifact deregistered
    double no_pool;    // identical puts, pool off
    std::string placement;
    double host_path;
    double bulk;
  };
  const auto meets = [](double put, double plain) { return put >= 20.0 && put / plain >= 0.8; };
  std::vector<row> rows;
  const std::uint64_t max_bytes = *std::max_element(sizes_gib.begin(), sizes_gib.end()) << 30;
  void* pinned = nullptr;
  cuda_ok(cudaHostAlloc(&pinned, max_bytes, cudaHostAllocDefault), "allocate the pinned baseline buffer");
  void* device = nullptr;
  cuda_ok(cudaMalloc(&device, max_bytes), "allocate the baseline device buffer");
  cuda_ok(cudaMemset(device, 0x5a, max_bytes), "fill the baseline device buffer");
  thread_pool pool(std::max(1u, std::thread::hardware_concurrency()) - 1);

  for (const auto size_g : sizes_gib) {
    const auto idx = make_index(size_g << 30);
    const std::uint64_t bytes = idx.total_size();
    const double size = static_cast<double>(bytes) / gib;
    const auto seed = static_cast<std::uint32_t>(size_g);

    // The limit: one plain pinned D2H of the same size.
    std::vector<double> plain;
    for (int i = 0; i <= repeat; ++i) {
      const auto t0 = clock_type::now();
      cuda_ok(cudaMemcpy(pinned, device, bytes, cudaMemcpyDeviceToHost), "copy the baseline");
      if (i > 0) plain.push_back(size / seconds_since(t0));  // the first warms the path up
    }

    // The provider's speed measurement and pinned slots are made on first use: warm them up
    // with a small put, so that the first put of this size measures the copy alone.
    {
      const auto small = make_index(std::uint64_t{64} << 20);
      drop(*engine, put_once(*engine, *devices, *provider, small, seed + 500).artifact_id);
    }
    // First put: a fresh memfd (the pool holds nothing of this size yet).
    put_result last = put_once(*engine, *devices, *provider, idx, seed);
    const double first = size / last.seconds;
    const std::string chosen = last.device_hashes == 1 ? "gpu" : "host";

    // Identical puts: each joins the artifact and drops its copy back into the pool.
    std::vector<double> identical;
    for (int i = 0; i <= repeat; ++i) {
      last = put_once(*engine, *devices, *provider, idx, seed);
      if (i > 0) identical.push_back(size / last.seconds);  // the first join's copy was fresh
    }
    // RL weight sync: new content every round, the previous artifact deregistered after it.
    std::vector<double> sync;
    std::string previous = last.artifact_id;
    for (int i = 0; i <= repeat; ++i) {
      last = put_once(*engine, *devices, *provider, idx, seed + 1000 + static_cast<std::uint32_t>(i % 2));
      drop(*engine, previous);
      previous = last.artifact_id;
      sync.push_back(size / last.seconds);
    }
    drop(*engine, previous);
    const auto plan = tensorreg::devices::plan_copy(*speeds, bytes, true);

    // No pool: pinned staging into a new memfd every time (the path before the pool).
    std::vector<double> unpooled;
    if (no_pool) {
      for (int i = 0; i <= std::min(repeat, 2); ++i) {
        const auto r = put_once(*plain_engine, *plain_devices, *plain_provider, idx, seed);
        if (i > 0) unpooled.push_back(size / r.seconds);
      }
      drop(*plain_engine, put_once(*plain_engine, *plain_devices, *plain_provider, idx, seed).artifact_id);
    }

    // Before: copied and hashed on the host (staged leaves).
    std::vector<double> host;
    for (int i = 0; host_path && i < std::min(repeat, 2); ++i) {
      host.push_back(size / put_once(*host_engine, *host_devices, *host_provider, idx, seed).seconds);
    }
    if (host_path) drop(*host_engine, put_once(*host_engine, *host_devices, *host_provider, idx, seed).artifact_id);

    // The bulk copy alone, snapshot + GPU hash included, straight through the copier.
    double bulk = 0;
    if (bulk_alone) {
      auto hasher = cuda::gpu_tree_hasher::create(0);
      if (!hasher) die(hasher.error().message);
      const cuda::detail::snapshot_hasher hash = [&](const void* p, std::uint64_t n, cuda::stream_view s) {
        return hasher->tree_hash(p, n, s);
      };
      const std::vector<cuda::detail::device_range> whole{{0, static_cast<const std::byte*>(device), bytes}};
      cuda::detail::bulk_copier copier;
      std::vector<double> rates;
      for (int i = 0; i <= repeat; ++i) {
        const auto t0 = clock_type::now();
        auto copy = copier.copy(0, whole, bytes, &hash, pool);
        const double s = seconds_since(t0);
        if (!copy) die(copy.error().message);
        if (i > 0) rates.push_back(size / s);
      }
      bulk = median(rates);
    }

    row r{size, median(plain), first, median(identical), median(sync), median(unpooled), chosen, median(host), bulk};
    // At a size the GPU hash's flat time bounds, the best any path can do is the faster of
    // size / flat and the host's copy + hash rate: print that bound too.
    const double bound = size / std::min(plan.host_seconds, std::max(plan.gpu_seconds, speeds->gpu_flat_seconds));
    const std::pair<const char*, double> cases[] = {
        {"first", r.first}, {"identical", r.identical}, {"rl_sync", r.sync}, {"no_pool", r.no_pool}};
    for (const auto& [name, put] : cases) {
      if (put == 0) continue;
      std::printf(
          "{\"bench\":\"gpu_stable_put\",\"case\":\"%s\",\"gib\":%.3f,\"put_gib_s\":%.2f,"
          "\"plain_d2h_gib_s\":%.2f,\"ratio\":%.3f,\"placement\":\"%s\",\"predicted_host_ms\":%.1f,"
          "\"predicted_gpu_ms\":%.1f,\"model_bound_gib_s\":%.2f,\"goal\":\">= 20 GiB/s and >= 0.80 x plain\","
          "\"goal_met\":%s}\n",
          name, size, put, r.plain, put / r.plain, chosen.c_str(), plan.host_seconds * 1e3, plan.gpu_seconds * 1e3,
          bound, meets(put, r.plain) ? "true" : "false");
    }
    std::printf(
        "{\"bench\":\"gpu_stable_put_before\",\"gib\":%.3f,\"host_path_gib_s\":%.2f,\"bulk_copy_gib_s\":%.2f}\n", size,
        r.host_path, bulk);
    std::fflush(stdout);
    rows.push_back(r);
  }
  if (sweep) {
    auto hasher = cuda::gpu_tree_hasher::create(0);
    if (!hasher) die(hasher.error().message);
    const cuda::detail::snapshot_hasher hash = [&](const void* p, std::uint64_t n, cuda::stream_view s) {
      return hasher->tree_hash(p, n, s);
    };
    const std::vector<cuda::detail::device_range> whole{{0, static_cast<const std::byte*>(device), max_bytes}};
    const double size = static_cast<double>(max_bytes) / gib;
    {
      for (const unsigned workers : {4u, 8u, 16u}) {
        for (const std::uint64_t chunk_mib : {16u, 64u}) {
          cuda::detail::bulk_copier copier;
          cuda::detail::bulk_copy_options opts;
          opts.workers = workers;
          opts.chunk_bytes = chunk_mib << 20;
          std::vector<double> rates;
          for (int i = 0; i <= std::min(repeat, 2); ++i) {
            const auto t0 = clock_type::now();
            auto copy = copier.copy(0, whole, max_bytes, &hash, pool, opts);
            const double s = seconds_since(t0);
            if (!copy) die(copy.error().message);
            if (i > 0) rates.push_back(size / s);
          }
          std::printf(
              "{\"bench\":\"gpu_stable_put_sweep\",\"gib\":%.0f,\"workers\":%u,"
              "\"chunk_mib\":%llu,\"gib_s\":%.2f,\"plain_d2h_gib_s\":%.2f}\n",
              size, workers, static_cast<unsigned long long>(chunk_mib), median(rates), rows.back().plain);
          std::fflush(stdout);
        }
      }
    }
  }
  cuda_ok(cudaFree(device), "free the baseline device buffer");
  cuda_ok(cudaFreeHost(pinned), "free the pinned baseline buffer");

  const auto verdict = [&](double put, double plain) { return put == 0 ? "-" : meets(put, plain) ? "ok" : "NOT MET"; };
  std::printf(
      "\n| GiB | plain D2H GiB/s | first put GiB/s | identical puts GiB/s | RL sync GiB/s | no pool GiB/s | "
      "placement | host path GiB/s | bulk copy alone (no pool) GiB/s |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|\n");
  for (const auto& r : rows) {
    // Cases turned off by a flag print "-", not a rate of 0.
    const auto rate = [](double v) {
      return v == 0 ? std::string("-") : std::to_string(v).substr(0, std::to_string(v).find('.') + 3);
    };
    std::printf("| %.0f | %.2f | %.2f (%.2f, %s) | %.2f (%.2f, %s) | %.2f (%.2f, %s) | %s | %s | %s | %s |\n",
                r.size_gib, r.plain, r.first, r.first / r.plain, verdict(r.first, r.plain), r.identical,
                r.identical / r.plain, verdict(r.identical, r.plain), r.sync, r.sync / r.plain,
                verdict(r.sync, r.plain), rate(r.no_pool).c_str(), r.placement.c_str(), rate(r.host_path).c_str(),
                rate(r.bulk).c_str());
  }
  std::printf("goal: >= 20 GiB/s and >= 0.80 x plain D2H; (ratio, verdict) per case%s\n",
              use_cgid ? "; cgid puts: no data hash, the copy alone" : "");
  return 0;
}
