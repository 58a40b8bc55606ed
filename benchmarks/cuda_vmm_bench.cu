// cuda_vmm_bench — CUDA VMM imports of the engine's device memory
// (device_memory_provider::import_vmm) against CUDA IPC opens (open_ipc) of as many
// allocations of the same size, from one client process (tensorreg_gpu_producer): N 2 MiB
// cuMemCreate allocations exported as POSIX fds (received over SCM_RIGHTS) and N 2 MiB
// cudaMalloc allocations exported as IPC handles.
//
//   cuda_vmm_bench [--producer PATH] [--count N] [--threads T] [--mib M] [--rounds R]
//
// Measures, in R rounds (default 3; the median round is reported), each on a fresh set of
// mappings: imports one after another and on T threads at
// once (µs per import = wall time / N), the same for IPC opens, releases, and the address
// space the N live imports reserve next to the bytes they map (the goal: exactly the imported
// bytes, where PyTorch reserves ~9/8 of the GPU per import). Goal for time: an import within
// 2x of a plain IPC open. Prints one JSON line per measurement, then a table. Host code only
// (.cu so the CPU benchmarks' *_bench.cpp glob does not take it).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "producer_process.hpp"
#include "tensorreg/cuda/device_memory_provider.hpp"

namespace {

using clock_type = std::chrono::steady_clock;
using source_ptr = std::shared_ptr<const tensorreg::memory::byte_source>;

double micros_since(clock_type::time_point t0) {
  return std::chrono::duration<double, std::micro>(clock_type::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

[[noreturn]] void die(const std::string& message) {
  std::fprintf(stderr, "cuda_vmm_bench: %s\n", message.c_str());
  std::exit(1);
}

/// Runs open(i) for i in [0, n) on `threads` threads (1: this thread, with per-call times in
/// `each`); returns the wall time in µs. `held[i]` keeps each result.
template <typename Open>
double run(std::size_t n, unsigned threads, std::vector<source_ptr>& held, std::vector<double>* each, Open open) {
  held.assign(n, nullptr);
  const auto t0 = clock_type::now();
  if (threads <= 1) {
    for (std::size_t i = 0; i < n; ++i) {
      const auto t = clock_type::now();
      held[i] = open(i);
      if (each != nullptr) each->push_back(micros_since(t));
    }
    return micros_since(t0);
  }
  std::atomic<std::size_t> next{0};
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&] {
      for (std::size_t i = next++; i < n; i = next++) held[i] = open(i);
    });
  }
  for (auto& th : pool) th.join();
  return micros_since(t0);
}

double release(std::vector<source_ptr>& held) {
  const auto t0 = clock_type::now();
  for (auto& h : held) h.reset();
  return micros_since(t0);
}

void usage(std::FILE* to) {
  std::fprintf(to, "usage: cuda_vmm_bench [--producer PATH] [--count N] [--threads T] [--mib M] [--rounds R]\n");
}

}  // namespace

int main(int argc, char** argv) try {
  std::string producer_path = tensorreg::cuda::testing::producer_process::producer_path();
  std::size_t count = 1000;
  unsigned threads = 8;
  std::uint64_t mib = 2;
  int rounds = 3;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      usage(stdout);
      return 0;
    }
    const bool known = a == "--producer" || a == "--count" || a == "--threads" || a == "--mib" || a == "--rounds";
    if (!known || i + 1 >= argc) {
      std::fprintf(stderr, "cuda_vmm_bench: %s %s\n", known ? "missing the value of" : "unknown option", a.c_str());
      usage(stderr);
      return 2;
    }
    const char* v = argv[++i];
    if (a == "--producer")
      producer_path = v;
    else if (a == "--count")
      count = std::strtoull(v, nullptr, 10);
    else if (a == "--threads")
      threads = static_cast<unsigned>(std::atoi(v));
    else if (a == "--mib")
      mib = std::strtoull(v, nullptr, 10);
    else
      rounds = std::max(1, std::atoi(v));
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    std::fprintf(stderr, "cuda_vmm_bench: no CUDA device\n");
    return 77;
  }
  std::printf("# device 0: %s, %.1f GiB\n", prop.name, static_cast<double>(prop.totalGlobalMem) / (1 << 30));
  struct row {
    std::string what;
    double value;
    std::string unit;
  };
  std::vector<row> rows;
  const auto report = [&](const std::string& what, double value, const std::string& unit) {
    std::printf("{\"bench\":\"cuda_vmm\",\"what\":\"%s\",\"value\":%.3f,\"unit\":\"%s\"}\n", what.c_str(), value,
                unit.c_str());
    rows.push_back({what, value, unit});
  };

  const std::uint64_t bytes = mib << 20;
  std::vector<tensorreg::cuda::testing::producer_allocation> specs;
  for (std::size_t i = 0; i < count; ++i) specs.push_back({bytes, i + 1, true});
  for (std::size_t i = 0; i < count; ++i) specs.push_back({bytes, count + i + 1, false});
  const auto t_producer = clock_type::now();
  tensorreg::cuda::testing::producer_process producer(specs, 0, producer_path);
  std::printf("# producer: %zu VMM + %zu IPC allocations of %llu MiB in %.0f ms (granularity %llu)\n", count, count,
              static_cast<unsigned long long>(mib), micros_since(t_producer) / 1000,
              static_cast<unsigned long long>(producer.granularity()));
  const auto& fds = producer.vmm_fds();
  const auto& handles = producer.ipc_handles();
  if (fds.size() != count || handles.size() != count) die("the producer handed over too few allocations");

  auto made = tensorreg::cuda::device_memory_provider::create();
  if (!made) die(made.error().message);
  auto provider = *made;
  const pid_t pid = producer.pid();
  const std::vector<std::uint64_t> one{bytes};
  const auto import = [&](std::size_t i) -> source_ptr {
    auto r = provider->import_vmm(pid, 0, std::span<const int>(&fds[i], 1), one);
    if (!r) die(r.error().message);
    return *r;
  };
  const auto open = [&](std::size_t i) -> source_ptr {
    auto r = provider->open_ipc(pid, 0, handles[i], bytes);
    if (!r) die(r.error().message);
    return *r;
  };
  // First use of each path (context binding, the granularity query, lazy peer setup) is not
  // what a daemon pays per region: one of each, released, before measuring.
  {
    auto warm = import(0);
    auto warm_ipc = open(0);
  }

  std::vector<source_ptr> held;
  const double n = static_cast<double>(count);
  const std::string per = " per 2 MiB allocation, " + std::to_string(count) + " of them";

  // Each round on fresh mappings; the median round of each measurement is reported (the
  // host runs other work, and single rounds of IPC opens varied 2x between runs).
  std::vector<double> vmm_each, ipc_each;
  std::vector<double> vmm_seq_r, vmm_par_r, vmm_release_r, ipc_seq_r, ipc_par_r, ipc_release_r;
  std::uint64_t reserved = 0;
  std::uint64_t reserved_par = 0;
  const std::uint64_t imported = static_cast<std::uint64_t>(count) * bytes;
  for (int r = 0; r < rounds; ++r) {
    vmm_seq_r.push_back(run(count, 1, held, &vmm_each, import) / n);
    reserved = provider->vmm_reserved_bytes();
    vmm_release_r.push_back(release(held) / n);
    vmm_par_r.push_back(run(count, threads, held, nullptr, import) / n);
    reserved_par = provider->vmm_reserved_bytes();
    static_cast<void>(release(held));

    ipc_seq_r.push_back(run(count, 1, held, &ipc_each, open) / n);
    ipc_release_r.push_back(release(held) / n);
    ipc_par_r.push_back(run(count, threads, held, nullptr, open) / n);
    static_cast<void>(release(held));
  }
  const double vmm_seq = median(vmm_seq_r);
  const double vmm_par = median(vmm_par_r);
  const double vmm_release = median(vmm_release_r);
  const double ipc_seq = median(ipc_seq_r);
  const double ipc_par = median(ipc_par_r);
  const double ipc_release = median(ipc_release_r);

  report("import_vmm, one after another, mean" + per + ", median of " + std::to_string(rounds) + " rounds", vmm_seq,
         "us");
  report("import_vmm, one after another, median of all calls", median(vmm_each), "us");
  report("import_vmm on " + std::to_string(threads) + " threads, wall / count", vmm_par, "us");
  report("open_ipc (first open), one after another, mean" + per, ipc_seq, "us");
  report("open_ipc (first open), one after another, median of all calls", median(ipc_each), "us");
  report("open_ipc on " + std::to_string(threads) + " threads, wall / count", ipc_par, "us");
  report("release of an import (unmap, free VA, release handle)", vmm_release, "us");
  report("release of an IPC mapping (cudaIpcCloseMemHandle)", ipc_release, "us");
  const double ratio = vmm_seq / ipc_seq;
  const double ratio_par = vmm_par / ipc_par;
  report("import / IPC open, one after another (goal: <= 2)", ratio, "x");
  report("import / IPC open, " + std::to_string(threads) + " threads (goal: <= 2)", ratio_par, "x");
  report("VA reserved by " + std::to_string(count) + " live imports", static_cast<double>(reserved) / (1 << 20), "MiB");
  report("bytes imported", static_cast<double>(imported) / (1 << 20), "MiB");
  report("VA reserved, imports made on " + std::to_string(threads) + " threads",
         static_cast<double>(reserved_par) / (1 << 20), "MiB");
  report("VA PyTorch would reserve (9/8 of the GPU per import)",
         static_cast<double>(count) * 9.0 / 8.0 * static_cast<double>(prop.totalGlobalMem) / (1 << 20), "MiB");
  report("VA reserved after release", static_cast<double>(provider->vmm_reserved_bytes()) / (1 << 20), "MiB");

  std::printf("\n| what | value | unit |\n|---|---|---|\n");
  for (const auto& r : rows) std::printf("| %s | %.2f | %s |\n", r.what.c_str(), r.value, r.unit.c_str());
  std::printf(
      "\ngoal \"within 2x of plain IPC\": %s (sequential %.2fx, %u threads %.2fx); reserved VA %s imported "
      "bytes\n",
      ratio <= 2.0 && ratio_par <= 2.0 ? "met" : "NOT met", ratio, threads, ratio_par,
      reserved == imported ? "==" : "!=");
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "cuda_vmm_bench: %s\n", e.what());
  return 1;
}
