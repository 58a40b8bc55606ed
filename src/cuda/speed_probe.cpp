#include "cuda/speed_probe.hpp"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "cuda/cuda_check.hpp"
#include "tensorreg/cuda/gpu_tree_hash.hpp"
#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/memory/shared_memory.hpp"

namespace tensorreg::cuda::detail {
namespace {

using devices::hash_speeds;

constexpr std::uint64_t device_probe_bytes = std::uint64_t{64} << 20;
constexpr std::size_t host_probe_bytes = std::size_t{16} << 20;
constexpr std::uint64_t fresh_probe_bytes = std::uint64_t{256} << 20;

// Leaves the GPU hash is known to finish in its flat time, per SM: a lower bound from the
// measured flat hash of many leaves per SM (benchmarks/RESULTS.md), so the model never counts
// on more parallelism than was seen.
constexpr std::uint64_t leaves_per_sm = 124;

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct device_memory_owner {
  void* ptr = nullptr;
  ~device_memory_owner() { check_release(cudaFree(ptr), "free a speed probe buffer"); }
};
struct pinned_memory_owner {
  void* ptr = nullptr;
  ~pinned_memory_owner() { check_release(cudaFreeHost(ptr), "free a pinned speed probe buffer"); }
};
struct stream_owner {
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr;
  cudaEvent_t stop = nullptr;
  ~stream_owner() {
    if (start != nullptr) check_release(cudaEventDestroy(start), "destroy a speed probe event");
    if (stop != nullptr) check_release(cudaEventDestroy(stop), "destroy a speed probe event");
    if (stream != nullptr) check_release(cudaStreamDestroy(stream), "destroy a speed probe stream");
  }
};

// The rate of one async copy, timed with events; the first of two runs warms the path up.
result<double> copy_rate(stream_owner& s, void* to, const void* from, std::uint64_t bytes, cudaMemcpyKind kind) {
  float ms = 0;
  for (int run = 0; run < 2; ++run) {
    TENSORREG_CUDA_TRY(cudaEventRecord(s.start, s.stream), "time a speed probe copy");
    TENSORREG_CUDA_TRY(cudaMemcpyAsync(to, from, bytes, kind, s.stream), "run a speed probe copy");
    TENSORREG_CUDA_TRY(cudaEventRecord(s.stop, s.stream), "time a speed probe copy");
    TENSORREG_CUDA_TRY(cudaEventSynchronize(s.stop), "run a speed probe copy");
    TENSORREG_CUDA_TRY(cudaEventElapsedTime(&ms, s.start, s.stop), "time a speed probe copy");
  }
  return static_cast<double>(bytes) / (static_cast<double>(ms) / 1e3);
}

// Every hardware thread writing its stripe of a new memfd, as the host path and a fresh replica
// do: the aggregate rate of first touches, which one core's rate times the threads overstates
// wherever page faults serialize (a VM). 0 when no memfd can be made (then not counted).
double fresh_write_rate() {
  auto memfd = memory::shared_memory::create(fresh_probe_bytes, "tensorreg-speed-probe");
  if (!memfd) return 0;
  auto bytes = memfd->mutable_bytes();
  const std::uint64_t threads = std::max(1u, std::thread::hardware_concurrency());
  const std::uint64_t stripe = (fresh_probe_bytes / threads + 4095) / 4096 * 4096;
  const auto t0 = std::chrono::steady_clock::now();
  {
    std::vector<std::jthread> writers;
    for (std::uint64_t t = 0; t < threads && t * stripe < fresh_probe_bytes; ++t) {
      writers.emplace_back([&, t] {
        const std::uint64_t at = t * stripe;
        std::memset(bytes.data() + at, 0x5a, std::min(stripe, fresh_probe_bytes - at));
      });
    }
  }
  return static_cast<double>(fresh_probe_bytes) / seconds_since(t0);
}

result<hash_speeds> measure(int device) {
  TENSORREG_TRY_ASSIGN(auto guard, device_guard::create(device));
  (void)guard;
  hash_speeds s;
  device_memory_owner buffer;
  TENSORREG_CUDA_TRY(cudaMalloc(&buffer.ptr, 2 * device_probe_bytes), "allocate a speed probe buffer");
  auto* bytes = static_cast<std::byte*>(buffer.ptr);
  TENSORREG_CUDA_TRY(cudaMemset(bytes, 0x5a, 2 * device_probe_bytes), "fill a speed probe buffer");

  // The flat time: one leaf, hashed by one GPU thread, after a tiny hash loaded the kernels.
  TENSORREG_TRY_ASSIGN(auto hasher, gpu_tree_hasher::create(device));
  TENSORREG_TRY_ASSIGN(const auto warm, hasher.tree_hash(bytes, 64));
  static_cast<void>(warm);
  const auto t0 = std::chrono::steady_clock::now();
  TENSORREG_TRY_ASSIGN(const auto leaf, hasher.tree_hash(bytes, hash::leaf_bytes));
  s.gpu_flat_seconds = seconds_since(t0);
  static_cast<void>(leaf);
  int sms = 0;
  TENSORREG_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "count the SMs");
  s.gpu_parallel_leaves = static_cast<std::uint64_t>(sms) * leaves_per_sm;

  stream_owner st;
  TENSORREG_CUDA_TRY(cudaStreamCreateWithFlags(&st.stream, cudaStreamNonBlocking), "create a speed probe stream");
  TENSORREG_CUDA_TRY(cudaEventCreate(&st.start), "create a speed probe event");
  TENSORREG_CUDA_TRY(cudaEventCreate(&st.stop), "create a speed probe event");
  pinned_memory_owner pinned;
  TENSORREG_CUDA_TRY(cudaHostAlloc(&pinned.ptr, device_probe_bytes, cudaHostAllocDefault),
                     "allocate a pinned speed probe buffer");
  TENSORREG_TRY_ASSIGN(s.d2h_rate, copy_rate(st, pinned.ptr, bytes, device_probe_bytes, cudaMemcpyDeviceToHost));
  TENSORREG_TRY_ASSIGN(s.d2d_rate,
                       copy_rate(st, bytes + device_probe_bytes, bytes, device_probe_bytes, cudaMemcpyDeviceToDevice));

  // One host core: SHA-256 of warm memory, and memcpy into pages touched for the first time
  // (as a new replica's are).
  std::vector<std::byte> source(host_probe_bytes, std::byte{0x5a});
  static_cast<void>(hash::sha256(std::span<const std::byte>(source).first(1 << 20)));
  auto t1 = std::chrono::steady_clock::now();
  const auto digest = hash::sha256(std::span<const std::byte>(source));
  s.host_core_hash_rate = static_cast<double>(host_probe_bytes) / seconds_since(t1);
  static_cast<void>(digest);
  const std::unique_ptr<std::byte[]> fresh(new std::byte[host_probe_bytes]);
  t1 = std::chrono::steady_clock::now();
  std::memcpy(fresh.get(), source.data(), host_probe_bytes);
  // Read the copy back, so the compiler cannot drop a memcpy into memory nobody reads.
  const volatile std::byte* check = fresh.get();
  static_cast<void>(check[host_probe_bytes - 1]);
  s.host_core_copy_rate = static_cast<double>(host_probe_bytes) / seconds_since(t1);
  s.host_fresh_write_rate = fresh_write_rate();
  return s;
}

}  // namespace

result<hash_speeds> measured_speeds(int device) {
  // One mutex for all devices: a measurement runs once per device and process, and two at
  // once would time each other.
  static std::mutex mutex;
  static std::map<int, hash_speeds> known;
  std::lock_guard lock(mutex);
  if (auto it = known.find(device); it != known.end()) return it->second;
  TENSORREG_TRY_ASSIGN(auto s, measure(device));
  known.emplace(device, s);
  return s;
}

}  // namespace tensorreg::cuda::detail
