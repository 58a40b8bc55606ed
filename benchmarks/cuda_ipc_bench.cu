// cuda_ipc_bench — CUDA IPC mappings of the engine's device memory
// (tensorreg/cuda/device_memory_provider.hpp), against a client process (tensorreg_gpu_producer):
//
//   * first open_ipc of a handle (cudaIpcOpenMemHandle + checks) vs a cached open;
//   * visit() D2H through the pinned double-buffered staging, one thread and several, next to
//     one plain cudaMemcpy D2H of the same mapping into pinned memory, in the same run.
//
//   cuda_ipc_bench [--producer PATH] [--handles N] [--gib G] [--chunks-mib 4,16] [--repeat R]
//
// Prints one JSON line per measurement, then a table. Host code only (.cu so the CPU
// benchmarks' *_bench.cpp glob does not take it).
#include <cuda_runtime_api.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "tensorreg/cuda/device_memory_provider.hpp"

extern char** environ;

namespace {

using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

struct producer {
  pid_t pid = -1;
  int to_child = -1;
  std::FILE* from_child = nullptr;
  std::vector<std::string> handles;

  producer(const std::string& path, const std::vector<std::string>& specs) {
    int in[2];
    int out[2];
    if (::pipe(in) != 0 || ::pipe(out) != 0) std::abort();
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, in[0], 0);
    posix_spawn_file_actions_adddup2(&actions, out[1], 1);
    posix_spawn_file_actions_addclose(&actions, in[1]);
    posix_spawn_file_actions_addclose(&actions, out[0]);
    std::vector<char*> argv{const_cast<char*>(path.c_str())};
    for (const auto& s : specs) argv.push_back(const_cast<char*>(s.c_str()));
    argv.push_back(nullptr);
    if (::posix_spawn(&pid, path.c_str(), &actions, nullptr, argv.data(), environ) != 0) {
      std::fprintf(stderr, "cuda_ipc_bench: cannot start %s\n", path.c_str());
      std::exit(1);
    }
    posix_spawn_file_actions_destroy(&actions);
    ::close(in[0]);
    ::close(out[1]);
    to_child = in[1];
    from_child = ::fdopen(out[0], "r");
    char line[512];
    while (std::fgets(line, sizeof line, from_child) != nullptr) {
      std::string l = line;
      if (l.rfind("ready", 0) == 0) return;
      if (l.rfind("handle ", 0) != 0) continue;
      std::string bytes;
      for (std::size_t i = 7; i + 1 < 7 + 128; i += 2) {
        bytes += static_cast<char>(std::stoi(l.substr(i, 2), nullptr, 16));
      }
      handles.push_back(bytes);
    }
    std::fprintf(stderr, "cuda_ipc_bench: the producer did not get ready\n");
    std::exit(1);
  }
  ~producer() {
    ::close(to_child);
    int status = 0;
    ::waitpid(pid, &status, 0);
    std::fclose(from_child);
  }
};

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
               "usage: cuda_ipc_bench [--producer PATH] [--handles N] [--gib G] [--chunks-mib 4,16] [--repeat R]\n");
}

}  // namespace

int main(int argc, char** argv) {
  std::string producer_path;
  {
    std::error_code ec;
    auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
    producer_path = (ec ? std::string(".") : exe.parent_path().string()) + "/tensorreg_gpu_producer";
  }
  int handles = 64;
  std::uint64_t gib = 2;
  std::vector<std::uint64_t> chunks_mib{4, 16};
  int repeat = 3;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      usage(stdout);
      return 0;
    }
    const bool known = a == "--producer" || a == "--handles" || a == "--gib" || a == "--chunks-mib" || a == "--repeat";
    if (!known || i + 1 >= argc) {
      std::fprintf(stderr, "cuda_ipc_bench: %s %s\n", known ? "missing the value of" : "unknown option", a.c_str());
      usage(stderr);
      return 2;
    }
    const char* v = argv[++i];
    if (a == "--producer")
      producer_path = v;
    else if (a == "--handles")
      handles = std::atoi(v);
    else if (a == "--gib")
      gib = std::strtoull(v, nullptr, 10);
    else if (a == "--chunks-mib")
      chunks_mib = parse_list(v);
    else
      repeat = std::atoi(v);
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    std::fprintf(stderr, "cuda_ipc_bench: no CUDA device\n");
    return 77;
  }
  std::printf("# device 0: %s\n", prop.name);
  struct row {
    std::string what;
    double value;
    std::string unit;
  };
  std::vector<row> rows;
  const auto report = [&](const std::string& what, double value, const std::string& unit) {
    std::printf("{\"bench\":\"cuda_ipc\",\"what\":\"%s\",\"value\":%.3f,\"unit\":\"%s\"}\n", what.c_str(), value,
                unit.c_str());
    rows.push_back({what, value, unit});
  };

  // ---- open latency: first vs cached ----
  {
    std::vector<std::string> specs;
    for (int i = 0; i < handles; ++i) specs.push_back(std::to_string(2 << 20) + ":" + std::to_string(i + 1));
    producer p(producer_path, specs);
    auto provider = tensorreg::cuda::device_memory_provider::create();
    if (!provider) {
      std::fprintf(stderr, "cuda_ipc_bench: %s\n", provider.error().message.c_str());
      return 1;
    }
    std::vector<std::shared_ptr<const tensorreg::memory::byte_source>> held;
    std::vector<double> first;
    std::vector<double> cached;
    for (const auto& h : p.handles) {
      const auto t0 = clock_type::now();
      auto m = (*provider)->open_ipc(p.pid, 0, h, 1);
      first.push_back(seconds_since(t0) * 1e6);
      if (!m) {
        std::fprintf(stderr, "cuda_ipc_bench: %s\n", m.error().message.c_str());
        return 1;
      }
      held.push_back(*m);
    }
    for (const auto& h : p.handles) {
      const auto t0 = clock_type::now();
      auto m = (*provider)->open_ipc(p.pid, 0, h, 1);
      cached.push_back(seconds_since(t0) * 1e6);
    }
    report("first open_ipc, median of " + std::to_string(handles) + " 2 MiB allocations", median(first), "us");
    report("first open_ipc, the very first", first.front(), "us");
    report("cached open_ipc, median", median(cached), "us");
    held.clear();
    std::vector<double> reopen;
    for (const auto& h : p.handles) {
      const auto t0 = clock_type::now();
      auto m = (*provider)->open_ipc(p.pid, 0, h, 1);
      reopen.push_back(seconds_since(t0) * 1e6);
    }  // each closed again as it goes
    report("open_ipc after close (open + close per handle), median", median(reopen), "us");
  }

  // ---- D2H: visit() vs plain cudaMemcpy ----
  {
    const std::uint64_t bytes = gib << 30;
    producer p(producer_path, {std::to_string(bytes) + ":99"});
    void* pinned = nullptr;
    if (cudaMallocHost(&pinned, bytes) != cudaSuccess) {
      std::fprintf(stderr, "cuda_ipc_bench: cannot allocate %llu pinned bytes\n",
                   static_cast<unsigned long long>(bytes));
      return 1;
    }
    for (const auto chunk : chunks_mib) {
      tensorreg::cuda::device_memory_provider::options opts;
      opts.staging_chunk_bytes = chunk << 20;
      auto provider = tensorreg::cuda::device_memory_provider::create(opts);
      if (!provider) return 1;
      auto m = (*provider)->open_ipc(p.pid, 0, p.handles.at(0), bytes);
      if (!m) {
        std::fprintf(stderr, "cuda_ipc_bench: %s\n", m.error().message.c_str());
        return 1;
      }
      const auto* dev = tensorreg::cuda::as_device_source(**m);
      if (chunk == chunks_mib.front()) {
        std::vector<double> plain;
        for (int r = 0; r < repeat + 1; ++r) {
          const auto t0 = clock_type::now();
          if (cudaMemcpy(pinned, dev->device_pointer(), bytes, cudaMemcpyDeviceToHost) != cudaSuccess) return 1;
          if (r > 0) plain.push_back(static_cast<double>(bytes) / seconds_since(t0) / 1e9);
        }
        report("plain cudaMemcpy D2H into pinned, " + std::to_string(gib) + " GiB", median(plain), "GB/s");
      }
      for (const unsigned threads : {1u, 4u}) {
        std::vector<double> rates;
        for (int r = 0; r < repeat + 1; ++r) {
          std::vector<std::thread> pool;
          std::vector<unsigned char> sums(threads, 0);
          const auto t0 = clock_type::now();
          for (unsigned t = 0; t < threads; ++t) {
            pool.emplace_back([&, t] {
              const std::uint64_t part = bytes / threads;
              const std::uint64_t off = part * t;
              const std::uint64_t len = t + 1 == threads ? bytes - off : part;
              auto done = (*m)->visit(off, len, [&](std::span<const std::byte> piece) -> tensorreg::status {
                sums[t] = static_cast<unsigned char>(sums[t] ^ static_cast<unsigned char>(piece[piece.size() - 1]));
                return {};
              });
              if (!done) std::fprintf(stderr, "cuda_ipc_bench: %s\n", done.error().message.c_str());
            });
          }
          for (auto& th : pool) th.join();
          if (r > 0) rates.push_back(static_cast<double>(bytes) / seconds_since(t0) / 1e9);
        }
        report("visit() D2H, " + std::to_string(chunk) + " MiB chunks, " + std::to_string(threads) + " thread(s), " +
                   std::to_string(gib) + " GiB",
               median(rates), "GB/s");
      }
    }
    cudaFreeHost(pinned);
  }

  std::printf("\n| what | value | unit |\n|---|---|---|\n");
  for (const auto& r : rows) std::printf("| %s | %.2f | %s |\n", r.what.c_str(), r.value, r.unit.c_str());
  return 0;
}
