// cuda_tree_hash_bench — the GPU tree hash (tensorreg/cuda/gpu_tree_hash.hpp) against its goals.
//
// Prints the probe (device name, SMs, clocks, memory), then measures in one run:
//   * floor: one 4 MiB leaf hashed by a 1-block, 1-thread kernel (the latency of one SHA-256
//     chain of 65 536 compressions, which no size can beat);
//   * gpu_tree_hash: gpu_tree_hasher::tree_hash over 1, 4, 16, 32 and 64 GiB of random device
//     bytes (sizes above --max-gib, or that do not fit in free device memory, are skipped and
//     say which), wall time of the whole call (leaf kernel, tree kernels, root copy, sync),
//     median of --repeat;
//   * segmented: gpu_tree_hasher::tree_hash_pieces over a 16 GiB dict of 995 tensors in 868
//     allocations (pieces of the buffer, never contiguous in canonical order), next to the
//     contiguous 16 GiB row, and segmented_assembled: the same dict copied into one fresh
//     buffer first (what the daemon did before), both checked equal;
//   * cpu_tree_hash: hash::tree_hash of a 1 GiB pinned host buffer over a thread_pool with
//     hardware_concurrency threads in all (hardware_concurrency − 1 workers + the caller).
// Goals printed next to the numbers: at most 110 ms up to 32 GiB, and within 10% of the
// floor at every size. The GPU roots of the 1 GiB buffer and the CPU root are compared.
// --sweep also times the leaf kernel alone for both round layouts and 32..128 threads per
// block at a few leaf counts (CUDA events).
//
// Usage: cuda_tree_hash_bench [--repeat N] [--max-gib G] [--sweep] [--no-cpu]
// Output: one JSON object per line per measurement, then a table. GB = 1e9 bytes.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "cuda/tree_hash_kernels.hpp"
#include "gpu_fill.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/cuda/gpu_tree_hash.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/memory/byte_source.hpp"

namespace {

using clock_type = std::chrono::steady_clock;
namespace detail = tensorreg::cuda::detail;

constexpr std::uint64_t gib = std::uint64_t{1} << 30;
constexpr double goal_ms = 110.0;
constexpr double goal_ratio = 1.10;
constexpr std::uint64_t goal_max_bytes = 32 * gib;

void die_on(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "cuda_tree_hash_bench: %s: %s: %s\n", what, cudaGetErrorName(e), cudaGetErrorString(e));
    std::exit(1);
  }
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::string hex(const tensorreg::hash::digest& d) { return tensorreg::hash::to_hex(d); }

struct row {
  std::string what;
  std::uint64_t bytes = 0;
  std::uint64_t leaves = 0;
  double ms = 0;
  double min_ms = 0;
  std::string note;
};

std::string device_name;

void print_json(const row& r, double floor_ms) {
  const double gbps = static_cast<double>(r.bytes) / (r.ms * 1e-3) / 1e9;
  std::printf(
      "{\"bench\":\"cuda_tree_hash\",\"what\":\"%s\",\"device\":\"%s\",\"bytes\":%llu,\"leaves\":%llu,"
      "\"ms\":%.3f,\"min_ms\":%.3f,\"gb_per_s\":%.2f",
      r.what.c_str(), device_name.c_str(), static_cast<unsigned long long>(r.bytes),
      static_cast<unsigned long long>(r.leaves), r.ms, r.min_ms, gbps);
  if (r.what == "leaf_kernel" && floor_ms > 0) {
    std::printf(",\"floor_ms\":%.3f,\"ratio_to_floor\":%.3f", floor_ms, r.ms / floor_ms);
  }
  if (r.what == "gpu_tree_hash" && floor_ms > 0) {
    const double ratio = r.ms / floor_ms;
    const bool in_goal_range = r.bytes <= goal_max_bytes;
    std::printf(",\"floor_ms\":%.3f,\"ratio_to_floor\":%.3f,\"goal_ratio\":%.2f,\"meets_ratio_goal\":%s", floor_ms,
                ratio, goal_ratio, ratio <= goal_ratio ? "true" : "false");
    if (in_goal_range) {
      std::printf(",\"goal_ms\":%.0f,\"meets_ms_goal\":%s", goal_ms, r.ms <= goal_ms ? "true" : "false");
    }
  }
  if (!r.note.empty()) std::printf(",\"note\":\"%s\"", r.note.c_str());
  std::printf("}\n");
  std::fflush(stdout);
}

// Times `fn` (which enqueues device work on the legacy stream) with events: median over repeat.
template <typename Fn>
std::vector<double> time_events(int repeat, Fn&& fn) {
  cudaEvent_t start = nullptr;
  cudaEvent_t stop = nullptr;
  die_on(cudaEventCreate(&start), "create event");
  die_on(cudaEventCreate(&stop), "create event");
  std::vector<double> out;
  for (int r = 0; r < repeat; ++r) {
    die_on(cudaEventRecord(start), "record");
    fn();
    die_on(cudaEventRecord(stop), "record");
    die_on(cudaEventSynchronize(stop), "sync");
    float ms = 0;
    die_on(cudaEventElapsedTime(&ms, start, stop), "elapsed");
    out.push_back(static_cast<double>(ms));
  }
  die_on(cudaEventDestroy(start), "destroy event");
  die_on(cudaEventDestroy(stop), "destroy event");
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  int repeat = 5;
  double max_gib = 64;
  bool sweep = false;
  bool cpu = true;
  const char* const usage = "usage: cuda_tree_hash_bench [--repeat N] [--max-gib G] [--sweep] [--no-cpu]\n";
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::fputs(usage, stdout);
      return 0;
    } else if (arg == "--repeat" && i + 1 < argc) {
      repeat = std::max(1, std::atoi(argv[++i]));
    } else if (arg == "--max-gib" && i + 1 < argc) {
      max_gib = std::atof(argv[++i]);
    } else if (arg == "--sweep") {
      sweep = true;
    } else if (arg == "--no-cpu") {
      cpu = false;
    } else {
      std::fprintf(stderr, "cuda_tree_hash_bench: unknown option or missing value: %s\n", argv[i]);
      std::fputs(usage, stderr);
      return 2;
    }
  }

  // Probe.
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "cuda_tree_hash_bench: no CUDA device\n");
    return 77;
  }
  cudaDeviceProp prop{};
  die_on(cudaGetDeviceProperties(&prop, 0), "get device properties");
  device_name = prop.name;
  int driver = 0;
  int runtime = 0;
  die_on(cudaDriverGetVersion(&driver), "driver version");
  die_on(cudaRuntimeGetVersion(&runtime), "runtime version");
  int clock_khz = 0;
  int mem_clock_khz = 0;
  die_on(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0), "clock rate");
  die_on(cudaDeviceGetAttribute(&mem_clock_khz, cudaDevAttrMemoryClockRate, 0), "memory clock rate");
  std::size_t free_bytes = 0;
  std::size_t total_bytes = 0;
  die_on(cudaMemGetInfo(&free_bytes, &total_bytes), "memory info");
  std::printf(
      "{\"bench\":\"cuda_tree_hash\",\"what\":\"probe\",\"device\":\"%s\",\"sm\":\"%d%d\",\"sms\":%d,"
      "\"clock_mhz\":%d,\"mem_clock_mhz\":%d,\"total_bytes\":%zu,\"free_bytes\":%zu,\"driver\":%d,"
      "\"runtime\":%d,\"host_threads\":%u}\n",
      prop.name, prop.major, prop.minor, prop.multiProcessorCount, clock_khz / 1000, mem_clock_khz / 1000, total_bytes,
      free_bytes, driver, runtime, std::thread::hardware_concurrency());

  // One buffer for every size: the largest within --max-gib that fits (free memory less 2 GiB
  // of headroom for the scratch and the runtime), filled once with random bytes. The two
  // bounds are kept apart so that a skipped size says which one it is above.
  const std::uint64_t wanted_sizes[] = {1 * gib, 4 * gib, 16 * gib, 32 * gib, 64 * gib};
  const std::uint64_t headroom = 2 * gib;
  const auto max_bytes = static_cast<std::uint64_t>(std::max(0.0, max_gib) * static_cast<double>(gib));
  const std::uint64_t fit_bytes = free_bytes > headroom ? free_bytes - headroom : 0;
  const auto skip_reason = [&](std::uint64_t s) -> const char* {
    if (s > max_bytes) return "above --max-gib";
    if (s > fit_bytes) return "does not fit in free device memory";
    return nullptr;
  };
  std::uint64_t buffer_bytes = 0;
  for (std::uint64_t s : wanted_sizes) {
    if (skip_reason(s) == nullptr) buffer_bytes = s;
  }
  if (buffer_bytes == 0) {
    std::fprintf(
        stderr, "cuda_tree_hash_bench: %s\n",
        max_bytes < gib ? "--max-gib is below the smallest size, 1 GiB" : "not even 1 GiB of device memory free");
    return 1;
  }
  void* buffer = nullptr;
  die_on(cudaMalloc(&buffer, buffer_bytes), "allocate the benchmark buffer");
  die_on(tensorreg::cuda::testing::fill_random(buffer, buffer_bytes, 2024), "fill");
  die_on(cudaDeviceSynchronize(), "fill");

  std::vector<row> rows;

  // Floor: one leaf, one thread (both round layouts; the default layout's is the goal's).
  std::uint32_t* floor_out = nullptr;
  die_on(cudaMalloc(reinterpret_cast<void**>(&floor_out), 32), "allocate");
  double floor_ms = 0;
  double variant_floor_ms[std::size(detail::all_leaf_variants)] = {};
  for (auto variant : detail::all_leaf_variants) {
    const bool is_default = variant == detail::default_leaf_variant;
    die_on(detail::launch_single_leaf_floor(buffer, buffer_bytes, floor_out, nullptr, variant), "floor warm-up");
    const auto times = time_events(repeat, [&] {
      die_on(detail::launch_single_leaf_floor(buffer, buffer_bytes, floor_out, nullptr, variant), "floor");
    });
    row r{is_default ? "floor" : "floor_other_variant",  tensorreg::hash::leaf_bytes,  1, median(times),
          *std::min_element(times.begin(), times.end()), detail::variant_name(variant)};
    if (is_default) floor_ms = r.ms;
    variant_floor_ms[static_cast<std::size_t>(variant)] = r.ms;
    print_json(r, 0);
    rows.push_back(r);
  }

  // The API over each size.
  auto hasher = tensorreg::cuda::gpu_tree_hasher::create(0, buffer_bytes);
  if (!hasher) {
    std::fprintf(stderr, "cuda_tree_hash_bench: %s\n", hasher.error().message.c_str());
    return 1;
  }
  tensorreg::hash::digest root_1g{};
  for (std::uint64_t s : wanted_sizes) {
    if (const char* reason = skip_reason(s)) {
      row skipped{"gpu_tree_hash", s, tensorreg::hash::leaf_count(s), 0, 0, std::string("skipped: ") + reason};
      std::printf(
          "{\"bench\":\"cuda_tree_hash\",\"what\":\"gpu_tree_hash\",\"bytes\":%llu,\"skipped\":true,"
          "\"reason\":\"%s\",\"free_bytes\":%zu}\n",
          static_cast<unsigned long long>(s), reason, free_bytes);
      rows.push_back(skipped);
      continue;
    }
    auto warm = hasher->tree_hash(buffer, s);
    if (!warm) {
      std::fprintf(stderr, "cuda_tree_hash_bench: %s\n", warm.error().message.c_str());
      return 1;
    }
    if (s == gib) root_1g = *warm;
    std::vector<double> times;
    for (int r = 0; r < repeat; ++r) {
      const auto t0 = clock_type::now();
      auto got = hasher->tree_hash(buffer, s);
      const auto t1 = clock_type::now();
      if (!got || *got != *warm) {
        std::fprintf(stderr, "cuda_tree_hash_bench: repeated hash of %llu bytes differs or failed\n",
                     static_cast<unsigned long long>(s));
        return 1;
      }
      times.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    }
    row r{"gpu_tree_hash",
          s,
          tensorreg::hash::leaf_count(s),
          median(times),
          *std::min_element(times.begin(), times.end()),
          ""};
    print_json(r, floor_ms);
    rows.push_back(r);
  }

  // Segmented: a 16 GiB state dict of 995 tensors in 868 allocations, as the daemon hashes a
  // leased dict (gpu_tree_hasher::tree_hash_pieces), next to the contiguous 16 GiB row above;
  // and the canonical copy the daemon assembled before (cudaMalloc, zeroing, one copy per
  // tensor, hash, cudaFree), for the overhead both add to the kernel.
  if (skip_reason(16 * gib) == nullptr) {
    constexpr std::size_t tensors = 995;
    constexpr std::size_t allocations = 868;
    const std::uint64_t data_bytes = 16 * gib - 64 * (std::uint64_t{1} << 20);
    std::vector<std::uint64_t> sizes(tensors);
    const std::uint64_t mean = data_bytes / tensors;
    for (std::size_t i = 0; i < tensors; ++i) {
      const double f = 0.5 + static_cast<double>((i * 7919) % 1000) / 1000.0;
      sizes[i] = std::max<std::uint64_t>(512, static_cast<std::uint64_t>(static_cast<double>(mean) * f) / 512 * 512);
    }
    // Allocation a holds tensors {2a, 2a+1} for the first (tensors - allocations), one after;
    // allocations lie in the buffer from the back so canonical neighbours are never neighbours
    // in memory. Canonical offsets are 64-byte aligned (PAD between), as a safetensors body.
    std::vector<std::vector<std::size_t>> members(allocations);
    for (std::size_t t = 0, a = 0; t < tensors; ++a) {
      members[a].push_back(t++);
      if (a < tensors - allocations) members[a].push_back(t++);
    }
    std::vector<std::uint64_t> source(tensors);
    std::uint64_t src_at = 0;
    for (std::size_t a = allocations; a-- > 0;) {
      src_at = (src_at + 511) / 512 * 512;
      for (auto t : members[a]) {
        source[t] = src_at;
        src_at += sizes[t];
      }
    }
    std::vector<tensorreg::cuda::device_piece> pieces;
    std::uint64_t at = 0;
    for (std::size_t t = 0; t < tensors; ++t) {
      pieces.push_back({at, static_cast<const unsigned char*>(buffer) + source[t], sizes[t]});
      at = (at + sizes[t] + 63) / 64 * 64;
    }
    const std::uint64_t total = at;
    if (src_at <= buffer_bytes) {
      const auto t_cold = clock_type::now();
      auto cold = hasher->tree_hash_pieces(pieces, total);
      const double cold_ms = std::chrono::duration<double, std::milli>(clock_type::now() - t_cold).count();
      if (!cold) {
        std::fprintf(stderr, "cuda_tree_hash_bench: %s\n", cold.error().message.c_str());
        return 1;
      }
      std::vector<double> times;
      for (int r = 0; r < repeat; ++r) {
        const auto t0 = clock_type::now();
        auto got = hasher->tree_hash_pieces(pieces, total);
        times.push_back(std::chrono::duration<double, std::milli>(clock_type::now() - t0).count());
        if (!got || *got != *cold) {
          std::fprintf(stderr, "cuda_tree_hash_bench: repeated segmented hash differs or failed\n");
          return 1;
        }
      }
      char note[160];
      std::snprintf(
          note, sizeof note, "%zu tensors in %zu allocations; %.1f GiB of leaves gathered; first call %.1f ms", tensors,
          allocations, static_cast<double>(hasher->gather_capacity_bytes()) / static_cast<double>(gib), cold_ms);
      row r{"segmented",
            total,
            tensorreg::hash::leaf_count(total),
            median(times),
            *std::min_element(times.begin(), times.end()),
            note};
      print_json(r, floor_ms);
      rows.push_back(r);

      // The canonical copy, as tree_hash_on_device assembled it before tree_hash_pieces.
      std::vector<double> assembled;
      for (int r2 = 0; r2 < repeat; ++r2) {
        const auto t0 = clock_type::now();
        void* copy = nullptr;
        die_on(cudaMalloc(&copy, total), "allocate the canonical copy");
        auto* base = static_cast<unsigned char*>(copy);
        die_on(cudaMemsetAsync(base, 0, total, nullptr), "zero the canonical copy");
        for (const auto& piece : pieces) {
          die_on(cudaMemcpyAsync(base + piece.at, piece.src, piece.length, cudaMemcpyDeviceToDevice, nullptr),
                 "assemble the canonical copy");
        }
        die_on(cudaStreamSynchronize(nullptr), "assemble the canonical copy");
        auto got = hasher->tree_hash(base, total);
        die_on(cudaFree(copy), "free the canonical copy");
        assembled.push_back(std::chrono::duration<double, std::milli>(clock_type::now() - t0).count());
        if (!got || *got != *cold) {
          std::fprintf(stderr, "cuda_tree_hash_bench: the assembled copy hashes differently from the pieces\n");
          return 1;
        }
      }
      row a{"segmented_assembled",
            total,
            tensorreg::hash::leaf_count(total),
            median(assembled),
            *std::min_element(assembled.begin(), assembled.end()),
            "the same dict copied into one cudaMalloc'd buffer, hashed, freed (the old path)"};
      print_json(a, floor_ms);
      rows.push_back(a);

      // The leaf kernel alone over this dict's leaf plan, one row per segment walk (CUDA
      // events), the leaf digests of both compared.
      auto plan = detail::plan_leaves(pieces, total, tensorreg::hash::leaf_count(total));
      if (plan.tasks.empty()) {
        const auto leaves = static_cast<std::uint32_t>(tensorreg::hash::leaf_count(total));
        const std::size_t segment_bytes = plan.segments.size() * sizeof(detail::leaf_segment);
        const std::size_t first_bytes = plan.first.size() * sizeof(std::uint32_t);
        unsigned char* table = nullptr;
        std::uint32_t* words[2] = {nullptr, nullptr};
        die_on(cudaMalloc(reinterpret_cast<void**>(&table), segment_bytes + first_bytes), "allocate the leaf table");
        die_on(cudaMemcpy(table, plan.segments.data(), segment_bytes, cudaMemcpyHostToDevice), "upload the segments");
        die_on(cudaMemcpy(table + segment_bytes, plan.first.data(), first_bytes, cudaMemcpyHostToDevice),
               "upload the leaf starts");
        std::vector<std::uint32_t> host[2];
        const detail::segment_walk walks[2] = {detail::segment_walk::branching, detail::segment_walk::flat};
        for (int k = 0; k < 2; ++k) {
          die_on(cudaMalloc(reinterpret_cast<void**>(&words[k]), 32 * std::size_t{leaves}), "allocate leaf words");
          const auto times = time_events(repeat, [&] {
            die_on(detail::launch_leaf_segments_kernel(
                       reinterpret_cast<const detail::leaf_segment*>(table),
                       reinterpret_cast<const std::uint32_t*>(table + segment_bytes), total, leaves, words[k],
                       detail::leaf_threads_per_block(leaves, prop.multiProcessorCount), nullptr, walks[k]),
                   "segment leaf kernel");
          });
          host[k].resize(8 * std::size_t{leaves});
          die_on(cudaMemcpy(host[k].data(), words[k], 32 * std::size_t{leaves}, cudaMemcpyDeviceToHost),
                 "copy leaf words");
          char note[128];
          std::snprintf(note, sizeof note, "leaf kernel alone, %s walk, %zu segments%s",
                        walks[k] == detail::segment_walk::flat ? "flat" : "branching", plan.segments.size(),
                        walks[k] == detail::default_segment_walk ? " (default)" : "");
          row w{
              "segment_leaf_kernel", total, leaves, median(times), *std::min_element(times.begin(), times.end()), note};
          print_json(w, floor_ms);
          rows.push_back(w);
        }
        if (host[0] != host[1]) {
          std::fprintf(stderr, "cuda_tree_hash_bench: the two segment walks give different leaf digests\n");
          return 1;
        }
        for (auto* w : words) die_on(cudaFree(w), "free leaf words");
        die_on(cudaFree(table), "free the leaf table");
      }
    }
  }

  // Leaf kernel alone: layouts × threads per block at a few leaf counts.
  if (sweep) {
    std::uint32_t* words = nullptr;
    const std::uint64_t max_leaves = tensorreg::hash::leaf_count(buffer_bytes);
    die_on(cudaMalloc(reinterpret_cast<void**>(&words), 32 * max_leaves), "allocate");
    for (std::uint64_t leaves : {std::uint64_t{32}, std::uint64_t{256}, std::uint64_t{1024}, std::uint64_t{4096},
                                 std::uint64_t{8192}, std::uint64_t{16384}}) {
      if (leaves > max_leaves) continue;
      for (auto variant : detail::all_leaf_variants) {
        for (unsigned threads : {32U, 64U, 128U}) {
          const std::uint64_t bytes = leaves * tensorreg::hash::leaf_bytes;
          const auto times = time_events(std::max(1, repeat / 2), [&] {
            die_on(detail::launch_leaf_kernel(buffer, bytes, static_cast<std::uint32_t>(leaves), words, threads,
                                              nullptr, variant),
                   "leaf kernel");
          });
          char note[96];
          std::snprintf(note, sizeof note, "%s, %u threads per block%s", detail::variant_name(variant), threads,
                        threads == detail::leaf_threads_per_block(leaves, prop.multiProcessorCount) ? " (chosen)" : "");
          row r{"leaf_kernel", bytes, leaves, median(times), *std::min_element(times.begin(), times.end()), note};
          print_json(r, variant_floor_ms[static_cast<std::size_t>(variant)]);
          rows.push_back(r);
        }
      }
    }
    die_on(cudaFree(words), "free");
  }

  // CPU: 1 GiB of pinned host memory, all cores.
  if (cpu) {
    void* host = nullptr;
    die_on(cudaMallocHost(&host, gib), "allocate 1 GiB pinned");
    die_on(cudaMemcpy(host, buffer, gib, cudaMemcpyDeviceToHost), "copy 1 GiB to the host");
    const unsigned threads = std::max(1U, std::thread::hardware_concurrency());
    tensorreg::thread_pool pool(threads - 1);
    const tensorreg::memory::host_bytes_view view(std::span<const std::byte>(static_cast<std::byte*>(host), gib));
    std::vector<double> times;
    tensorreg::hash::digest cpu_root{};
    for (int r = 0; r < std::max(1, repeat / 2); ++r) {
      const auto t0 = clock_type::now();
      auto got = tensorreg::hash::tree_hash(view, &pool);
      const auto t1 = clock_type::now();
      if (!got) return 1;
      cpu_root = *got;
      times.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    }
    const bool same = cpu_root == root_1g;
    row r{"cpu_tree_hash",
          gib,
          tensorreg::hash::leaf_count(gib),
          median(times),
          *std::min_element(times.begin(), times.end()),
          std::to_string(threads) + " threads, pinned; gpu root " + (same ? "equal" : "DIFFERENT")};
    print_json(r, 0);
    rows.push_back(r);
    std::fprintf(stderr, "1 GiB root: gpu %s cpu %s\n", hex(root_1g).c_str(), hex(cpu_root).c_str());
    die_on(cudaFreeHost(host), "free pinned");
    if (!same) {
      std::fprintf(stderr, "cuda_tree_hash_bench: GPU and CPU roots of 1 GiB differ\n");
      return 1;
    }
  }

  // Table.
  std::printf("\n%-20s %10s %8s %10s %10s %9s  %s\n", "what", "GiB", "leaves", "ms", "GB/s", "x floor", "goal / note");
  for (const row& r : rows) {
    const double gibs = static_cast<double>(r.bytes) / static_cast<double>(gib);
    if (r.ms == 0) {
      std::printf("%-20s %10.3f %8llu %10s %10s %9s  %s\n", r.what.c_str(), gibs,
                  static_cast<unsigned long long>(r.leaves), "-", "-", "-", r.note.c_str());
      continue;
    }
    const double gbps = static_cast<double>(r.bytes) / (r.ms * 1e-3) / 1e9;
    std::string goal = r.note;
    char ratio_text[32] = "-";
    if (r.what == "gpu_tree_hash" && floor_ms > 0) {
      const double ratio = r.ms / floor_ms;
      std::snprintf(ratio_text, sizeof ratio_text, "%.3f", ratio);
      goal = std::string(ratio <= goal_ratio ? "ok" : "MISS") + " <=1.10x floor";
      if (r.bytes <= goal_max_bytes) goal += std::string(", ") + (r.ms <= goal_ms ? "ok" : "MISS") + " <=110 ms";
    }
    std::printf("%-20s %10.3f %8llu %10.3f %10.2f %9s  %s\n", r.what.c_str(), gibs,
                static_cast<unsigned long long>(r.leaves), r.ms, gbps, ratio_text, goal.c_str());
  }
  die_on(cudaFree(floor_out), "free");
  die_on(cudaFree(buffer), "free");
  return 0;
}
