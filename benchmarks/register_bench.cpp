// register_bench — LIP registrations of many tensors over one HOST_SHARED region, in-process.
//
// For 1, 100, 1 000 and 10 000 tensors, times Begin → Feed → Commit twice: once as a cgid
// artifact (no data hash: the metadata path alone — tables, index rebuild, validation,
// mapping) and once as an mi2 artifact (metadata + the 4 MiB-leaf tree hash). Prints the
// metadata time next to its goal (≤ 1 ms for 1 000 tensors) and the hashing rate next to the
// tree-hash rate of the same bytes measured in the same run (the goal: the same).
//
// Usage: register_bench [--tensor-bytes N] [--repeats N] [--threads N] [--metadata-only] [--tensors N]
#include <fmt/core.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "bench_support.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/registration/engine.hpp"

namespace {

using namespace tensorreg;
using clock_type = std::chrono::steady_clock;

struct setup {
  regions::region_info region;
  std::vector<registration::storage_entry> storages;
  std::vector<registration::tensor_alias> aliases;
  std::vector<registration::leased_segment> segments;
  std::uint64_t total = 0;
};

setup make_setup(registration::engine& e, std::size_t tensors, std::uint64_t tensor_bytes) {
  setup s;
  s.total = tensors * tensor_bytes;
  regions::register_request r;
  r.kind = regions::memory_kind::host_shared;
  r.owner_pid = ::getpid();
  r.size_bytes = s.total;
  r.host_shared = regions::host_shared_spec{"", true, regions::host_shared_class::allocator};
  s.region = e.register_region(std::move(r)).value();
  // Fill the region as a client would, through its own mapping of the slab.
  auto writer = memory::shared_memory::adopt(s.region.memory->duplicate_fd().value(), s.total, true).value();
  auto bytes = writer.mutable_bytes();
  for (std::uint64_t i = 0; i < s.total; i += 8) {
    const std::uint64_t v = i * 0x9E3779B97F4A7C15ull;
    std::memcpy(bytes.data() + i, &v, std::min<std::uint64_t>(8, s.total - i));
  }
  for (std::size_t t = 0; t < tensors; ++t) {
    const std::string id = "s" + std::to_string(t);
    const std::uint64_t offset = t * tensor_bytes;
    registration::storage_entry se;
    se.storage_id = id;
    se.device_id = -1;
    se.storage_length = tensor_bytes;
    se.source = registration::region_ref_source{s.region.id, regions::memory_kind::host_shared, -1, s.total};
    se.mapping_base_offset = offset;
    s.storages.push_back(std::move(se));
    s.aliases.push_back({"layers." + std::to_string(t) + ".weight",
                         id,
                         0,
                         tensor_bytes,
                         {static_cast<std::int64_t>(tensor_bytes / 4)},
                         {1},
                         "torch.float32"});
    s.segments.push_back({id, 0, offset, tensor_bytes});
  }
  return s;
}

// One Begin → Feed → Commit → Revoke; returns the Begin→Commit seconds.
double register_once(registration::engine& e, const setup& s, bool with_data_hash) {
  registration::begin_request b;
  b.device_id = -1;
  b.total_size = s.total;
  b.ttl_ms = 60'000;
  b.owner_pid = ::getpid();
  b.plan = registration::lease_options{};
  if (!with_data_hash) b.client_artifact_id = "cgid:bench~lip~" + std::to_string(s.storages.size());
  registration::feed_request f;
  f.storage_entries = s.storages;
  f.tensor_aliases = s.aliases;
  f.payload = registration::lease_segments{s.segments};
  const auto t0 = clock_type::now();
  auto begun = e.begin(std::move(b)).value();
  f.registration_id = begun.registration_id;
  if (auto fed = e.feed(std::move(f)); !fed) {
    std::fprintf(stderr, "register_bench: %s\n", fed.error().message.c_str());
    std::exit(1);
  }
  auto committed = e.commit(begun.registration_id).value();
  const auto t1 = clock_type::now();
  e.revoke(begun.registration_id, "bench");
  (void)committed;
  return std::chrono::duration<double>(t1 - t0).count();
}

void usage(std::FILE* to) {
  std::fprintf(
      to, "usage: register_bench [--tensor-bytes N] [--repeats N] [--threads N] [--metadata-only] [--tensors N]\n");
}

}  // namespace

int main(int argc, char** argv) {
  std::uint64_t tensor_bytes = 64 * 1024;
  int repeats = 5;
  unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  bool metadata_only = false;                            // --metadata-only: skip the hashing runs (for profiling)
  std::vector<std::size_t> counts{1, 100, 1000, 10000};  // --tensors N: only that count
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      usage(stdout);
      return 0;
    }
    if (a == "--metadata-only") {
      metadata_only = true;
      continue;
    }
    const bool known = a == "--tensor-bytes" || a == "--repeats" || a == "--threads" || a == "--tensors";
    if (!known || i + 1 >= argc) {
      std::fprintf(stderr, "register_bench: %s %s\n", known ? "missing the value of" : "unknown option", a.c_str());
      usage(stderr);
      return 2;
    }
    const std::string v = argv[++i];
    if (a == "--tensor-bytes")
      tensor_bytes = std::stoull(v);
    else if (a == "--repeats")
      repeats = std::stoi(v);
    else if (a == "--threads")
      threads = static_cast<unsigned>(std::stoul(v));
    else
      counts = {static_cast<std::size_t>(std::stoul(v))};
  }
  registration::engine_options o;
  o.hash_threads = threads;
  o.sweep_interval = std::chrono::milliseconds(0);
  auto e = registration::engine::create(o).value();
  thread_pool pool(threads - 1);

  fmt::print("# register_bench: LIP over one HOST_SHARED region, {} B per tensor, {} hash threads, median of {}\n",
             tensor_bytes, threads, repeats);
  fmt::print("{:>8} {:>12} {:>14} {:>10} {:>12} {:>14} {:>16}\n", "tensors", "bytes", "metadata_ms", "goal_ms",
             "total_ms", "hash_GB/s", "tree_hash_GB/s");
  for (std::size_t tensors : counts) {
    auto s = make_setup(*e, tensors, tensor_bytes);
    std::vector<double> meta, full, plain;
    for (int r = 0; r < repeats; ++r) {
      meta.push_back(register_once(*e, s, false));
      if (metadata_only) {
        full.push_back(meta.back());
        plain.push_back(1);
        continue;
      }
      full.push_back(register_once(*e, s, true));
      const auto t0 = clock_type::now();
      (void)hash::tree_hash(*s.region.memory, &pool).value();
      plain.push_back(std::chrono::duration<double>(clock_type::now() - t0).count());
    }
    const double m = bench::median(meta), f = bench::median(full), p = bench::median(plain);
    if (metadata_only) {
      fmt::print("{:>8} {:>12} {:>14.3f} {:>10.3f} {:>12} {:>14} {:>16}\n", tensors, s.total, m * 1e3,
                 static_cast<double>(tensors) / 1000.0, "-", "-", "-");
      (void)e->unregister_region(s.region.id, ::getpid(), true);
      continue;
    }
    const double hash_seconds = std::max(f - m, 1e-9);
    const double goal_ms = static_cast<double>(tensors) / 1000.0;  // 1 ms per 1 000 tensors
    fmt::print("{:>8} {:>12} {:>14.3f} {:>10.3f} {:>12.3f} {:>14.2f} {:>16.2f}\n", tensors, s.total, m * 1e3, goal_ms,
               f * 1e3, static_cast<double>(s.total) / hash_seconds / 1e9, static_cast<double>(s.total) / p / 1e9);
    fmt::print(
        "{{\"bench\":\"register\",\"tensors\":{},\"bytes\":{},\"metadata_ms\":{:.4f},\"goal_metadata_ms\":{:.3f},"
        "\"total_ms\":{:.4f},\"hash_gbps\":{:.3f},\"tree_hash_gbps\":{:.3f},\"threads\":{}}}\n",
        tensors, s.total, m * 1e3, goal_ms, f * 1e3, static_cast<double>(s.total) / hash_seconds / 1e9,
        static_cast<double>(s.total) / p / 1e9, threads);
    (void)e->unregister_region(s.region.id, ::getpid(), true);
  }
  return 0;
}
