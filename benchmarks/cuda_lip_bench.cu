// cuda_lip_bench — LIP registration of a 1 000-tensor GPU state dict through the engine with
// the real cuda::device_memory_provider: per-storage CUDA IPC handles vs one VRAM region per
// allocation.
//
// A producer process (this binary with --producer; IPC handles cannot be opened by the process
// that exported them) allocates like PyTorch's caching allocator: the tensors packed at
// 512-byte granularity into a few cudaMalloc blocks (3 by default), each block exported once.
// The bench then registers the whole dict, Begin → Feed → Commit (mi2: the data is hashed),
//   (a) with 1 000 storage entries, each the IPC handle of its block plus its offset (what a
//       client that exports per storage sends), and
//   (b) with one VRAM region registered per block and storages that reference it, and
//   (c) over VRAM regions registered once and kept, re-leased every round as a weight-sync loop
//       does (registration.md §5.2): the regions keep their mappings, so the goal there is no
//       new driver open at all (the provider's ipc_opens() over the measured rounds).
// It prints the mappings open after Commit (the provider's open_mappings(): the goal is one
// open per allocation) and the Begin → Commit time, median over repeats after a warm-up.
//
//   cuda_lip_bench [--tensors 1000] [--allocations 3] [--repeat 5]
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
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "tensorreg/cuda/device_memory_provider.hpp"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/registration/engine.hpp"

extern char** environ;

namespace {

using namespace tensorreg;
namespace reg = tensorreg::registration;
using clock_type = std::chrono::steady_clock;

double ms_since(clock_type::time_point t0) {
  return std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "cuda_lip_bench: %s\n", what.c_str());
  std::exit(1);
}

// --producer SIZE...: cudaMalloc each SIZE, fill it, print "handle <hex> <size>" per block and
// "ready", then wait for stdin to close.
int run_producer(int argc, char** argv) {
  std::vector<void*> blocks;
  for (int i = 2; i < argc; ++i) {
    const std::uint64_t size = std::strtoull(argv[i], nullptr, 10);
    void* p = nullptr;
    const cudaError_t e = size == 0 ? cudaErrorInvalidValue : cudaMalloc(&p, size);
    if (e != cudaSuccess || cudaMemset(p, 0x40 + i, size) != cudaSuccess) {
      std::fprintf(stderr, "cuda_lip_bench --producer: cannot allocate block %d of %llu bytes: %s\n", i - 2,
                   static_cast<unsigned long long>(size), cudaGetErrorName(e != cudaSuccess ? e : cudaGetLastError()));
      return 1;
    }
    blocks.push_back(p);
  }
  if (const cudaError_t e = cudaDeviceSynchronize(); e != cudaSuccess) {
    std::fprintf(stderr, "cuda_lip_bench --producer: cannot fill the blocks: %s\n", cudaGetErrorName(e));
    return 1;
  }
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    cudaIpcMemHandle_t h{};
    if (const cudaError_t e = cudaIpcGetMemHandle(&h, blocks[i]); e != cudaSuccess) {
      std::fprintf(stderr, "cuda_lip_bench --producer: cannot export block %zu: %s\n", i, cudaGetErrorName(e));
      return 1;
    }
    std::string hex;
    for (std::size_t b = 0; b < sizeof h; ++b) {
      char two[3];
      std::snprintf(two, sizeof two, "%02x", static_cast<unsigned char>(h.reserved[b]));
      hex += two;
    }
    std::printf("handle %s %s\n", hex.c_str(), argv[i + 2]);
  }
  std::printf("ready\n");
  std::fflush(stdout);
  char buffer[256];
  while (std::fread(buffer, 1, sizeof buffer, stdin) > 0) {
  }
  for (void* p : blocks) static_cast<void>(cudaFree(p));
  return 0;
}

struct producer {
  pid_t pid = -1;
  int to_child = -1;
  std::FILE* from_child = nullptr;
  std::vector<std::string> handles;

  explicit producer(const std::vector<std::uint64_t>& sizes) {
    const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
    int in[2];
    int out[2];
    if (::pipe(in) != 0 || ::pipe(out) != 0) die("cannot make pipes");
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, in[0], 0);
    posix_spawn_file_actions_adddup2(&actions, out[1], 1);
    posix_spawn_file_actions_addclose(&actions, in[1]);
    posix_spawn_file_actions_addclose(&actions, out[0]);
    std::vector<std::string> args{self, "--producer"};
    for (auto s : sizes) args.push_back(std::to_string(s));
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (::posix_spawn(&pid, self.c_str(), &actions, nullptr, argv.data(), environ) != 0)
      die("cannot start the producer");
    posix_spawn_file_actions_destroy(&actions);
    ::close(in[0]);
    ::close(out[1]);
    to_child = in[1];
    from_child = ::fdopen(out[0], "r");
    char line[512];
    while (std::fgets(line, sizeof line, from_child) != nullptr) {
      const std::string l = line;
      if (l.rfind("ready", 0) == 0) return;
      if (l.rfind("handle ", 0) != 0) continue;
      std::string bytes;
      for (std::size_t i = 7; i < 7 + 128; i += 2) bytes += static_cast<char>(std::stoi(l.substr(i, 2), nullptr, 16));
      handles.push_back(bytes);
    }
    die("the producer did not get ready");
  }
  ~producer() {
    ::close(to_child);
    int status = 0;
    ::waitpid(pid, &status, 0);
    std::fclose(from_child);
  }
};

// One tensor of the dict: its block, its offset there, its bytes.
struct placed_tensor {
  std::string name;
  std::size_t block = 0;
  std::uint64_t offset = 0;
  std::uint64_t bytes = 0;
};

struct layout {
  std::vector<placed_tensor> tensors;
  std::vector<std::uint64_t> block_bytes;
};

// The caching allocator's packing: tensors of 4–64 KiB in turn fill `blocks` blocks, each
// tensor at the next 512-byte boundary, each block rounded up to 2 MiB. Every block gets one
// tensor at least: with ceil(tensors / blocks) per block, 995 tensors in 868 blocks filled only
// 498 of them and the producer could not allocate the empty rest (REQUIRES blocks <= tensors).
layout make_layout(std::size_t tensors, std::size_t blocks) {
  layout out;
  out.block_bytes.assign(blocks, 0);
  for (std::size_t i = 0; i < tensors; ++i) {
    placed_tensor t;
    t.name = "layers." + std::to_string(i / 4) + ".w" + std::to_string(i % 4);
    t.block = i * blocks / tensors;
    t.bytes = 4096 * (1 + (i * 7919) % 16);
    auto& cursor = out.block_bytes[t.block];
    t.offset = (cursor + 511) / 512 * 512;
    cursor = t.offset + t.bytes;
    out.tensors.push_back(t);
  }
  for (auto& b : out.block_bytes) b = (b + (2u << 20) - 1) / (2u << 20) * (2u << 20);
  return out;
}

void usage(std::FILE* to) {
  std::fprintf(to, "usage: cuda_lip_bench [--tensors 1000] [--allocations 3] [--repeat 5]\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && std::string(argv[1]) == "--producer") return run_producer(argc, argv);
  std::size_t tensors = 1000;
  std::size_t allocations = 3;
  int repeat = 5;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      usage(stdout);
      return 0;
    }
    const bool known = a == "--tensors" || a == "--allocations" || a == "--repeat";
    if (!known || i + 1 >= argc) {
      std::fprintf(stderr, "cuda_lip_bench: %s %s\n", known ? "missing the value of" : "unknown option", a.c_str());
      usage(stderr);
      return 2;
    }
    const char* v = argv[++i];
    if (a == "--tensors")
      tensors = std::strtoull(v, nullptr, 10);
    else if (a == "--allocations")
      allocations = std::strtoull(v, nullptr, 10);
    else
      repeat = std::max(1, std::atoi(v));
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    std::fprintf(stderr, "cuda_lip_bench: no CUDA device\n");
    return 77;
  }
  if (allocations == 0 || allocations > tensors) {
    std::fprintf(stderr, "cuda_lip_bench: --allocations must be 1..--tensors (%zu), not %zu\n", tensors, allocations);
    return 2;
  }
  const auto lay = make_layout(tensors, allocations);
  producer p(lay.block_bytes);
  if (p.handles.size() != allocations) die("the producer exported " + std::to_string(p.handles.size()) + " blocks");

  // The canonical layout of the dict (one storage per tensor, as PyTorch's state_dict has).
  std::vector<index::tensor_desc> descs;
  for (const auto& t : lay.tensors) {
    descs.push_back({t.name, "torch.float32", {static_cast<std::int64_t>(t.bytes / 4)}, {1}, t.name, t.bytes, 0});
  }
  auto idx = index::canonical_index::build(descs);
  if (!idx) die(idx.error().message);
  std::uint64_t data_bytes = 0;
  for (const auto& t : lay.tensors) data_bytes += t.bytes;
  std::printf("# device 0: %s; %zu tensors, %.1f MiB, in %zu allocations\n", prop.name, tensors,
              static_cast<double>(data_bytes) / (1 << 20), allocations);

  auto provider = cuda::device_memory_provider::create();
  if (!provider) die(provider.error().message);
  reg::engine_options options;
  options.devices = *provider;
  auto e = reg::engine::create(options);
  if (!e) die(e.error().message);

  struct outcome {
    std::string what;
    double ms = 0;
    double region_ms = 0;
    std::size_t opens = 0;
    std::string id;
  };
  // kept: regions registered once, before the rounds, and re-leased every round.
  const auto run = [&](bool regions, bool kept = false) {
    outcome out;
    out.what = kept      ? "kept VRAM regions, re-leased (new opens)"
               : regions ? "one VRAM region per allocation"
                         : "per-storage IPC handles + offsets";
    std::vector<double> times;
    std::vector<double> region_times;
    std::vector<std::string> kept_ids;
    std::uint64_t opens_before = 0;
    for (int round = 0; round <= repeat; ++round) {  // round 0 warms up (speed measurement, first opens)
      std::vector<std::string> region_ids = kept_ids;
      if (regions && (!kept || round == 0)) {
        region_ids.clear();
        const auto t0 = clock_type::now();
        for (std::size_t b = 0; b < allocations; ++b) {
          regions::register_request r;
          r.kind = regions::memory_kind::vram;
          r.owner_pid = p.pid;
          r.size_bytes = lay.block_bytes[b];
          r.device_id = 0;
          r.cuda_ipc_handle = p.handles[b];
          auto region = (*e)->register_region(std::move(r));
          if (!region) die(region.error().message);
          region_ids.push_back(region->id);
        }
        if (round > 0) region_times.push_back(ms_since(t0));
        if (kept) kept_ids = region_ids;
      }
      if (round == 1) opens_before = (*provider)->ipc_opens();
      reg::begin_request r;
      r.owner_pid = p.pid;
      r.total_size = idx->total_size();
      r.plan = reg::lease_options{};
      reg::feed_request f;
      reg::lease_segments segments;
      for (const auto& t : lay.tensors) {
        reg::storage_entry s;
        s.storage_id = t.name;
        s.device_id = 0;
        s.storage_length = t.bytes;
        if (regions) {
          s.source = reg::vram_region_source{region_ids[t.block]};
        } else {
          s.source = reg::cuda_ipc_source{p.handles[t.block]};
        }
        s.mapping_base_offset = t.offset;
        f.storage_entries.push_back(std::move(s));
        segments.segments.push_back({t.name, 0, idx->find(t.name)->offset, t.bytes});
        f.tensor_aliases.push_back(
            {t.name, t.name, 0, t.bytes, {static_cast<std::int64_t>(t.bytes / 4)}, {1}, "torch.float32"});
      }
      f.payload = std::move(segments);

      const auto t0 = clock_type::now();
      auto begun = (*e)->begin(r);
      if (!begun) die(begun.error().message);
      f.registration_id = begun->registration_id;
      if (auto fed = (*e)->feed(std::move(f)); !fed) die(fed.error().message);
      auto committed = (*e)->commit(begun->registration_id);
      const double ms = ms_since(t0);
      if (!committed) die(committed.error().message);
      if (round > 0) times.push_back(ms);
      out.opens = (*provider)->open_mappings();
      out.id = committed->descriptor.artifact_id;
      (*e)->revoke(begun->registration_id, "bench round done");
      if (kept) continue;
      for (const auto& id : region_ids) {
        if (auto gone = (*e)->unregister_region(id, p.pid, true); !gone) die(gone.error().message);
      }
      if ((*provider)->open_mappings() != 0) die("mappings stayed open after revoke");
    }
    if (kept) {
      out.opens = static_cast<std::size_t>((*provider)->ipc_opens() - opens_before);
      for (const auto& id : kept_ids) {
        if (auto gone = (*e)->unregister_region(id, p.pid, true); !gone) die(gone.error().message);
      }
      if ((*provider)->open_mappings() != 0) die("mappings stayed open after the regions went");
    }
    out.ms = median(times);
    out.region_ms = kept ? 0 : median(region_times);
    return out;
  };

  std::vector<outcome> rows{run(false), run(true), run(true, true)};
  if (rows[2].id != rows[0].id) die("the re-leases gave another id: " + rows[2].id);
  if (rows[0].id != rows[1].id) die("the two registrations gave different ids: " + rows[0].id + " vs " + rows[1].id);
  // The goal per row: one open per allocation, and none for re-leases of kept regions.
  const auto goal = [&](std::size_t row) { return row == 2 ? std::size_t{0} : allocations; };
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const auto& o = rows[i];
    std::printf(
        "{\"bench\":\"cuda_lip\",\"what\":\"%s\",\"tensors\":%zu,\"allocations\":%zu,\"opens\":%zu,"
        "\"begin_commit_ms\":%.3f,\"register_regions_ms\":%.3f,\"goal_opens\":%zu,\"goal_met\":%s}\n",
        o.what.c_str(), tensors, allocations, o.opens, o.ms, o.region_ms, goal(i),
        o.opens == goal(i) ? "true" : "false");
  }
  std::printf(
      "\n| registration | tensors | allocations | opens | Begin→Commit ms | region registration ms | goal: one open "
      "per allocation, none to re-lease kept regions |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const auto& o = rows[i];
    std::printf("| %s | %zu | %zu | %zu | %.3f | %.3f | %s |\n", o.what.c_str(), tensors, allocations, o.opens, o.ms,
                o.region_ms, o.opens == goal(i) ? "ok" : "NOT MET");
  }
  std::printf("# both give %s\n", rows[0].id.c_str());
  return 0;
}
