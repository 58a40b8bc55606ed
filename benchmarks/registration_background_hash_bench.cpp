// registration_background_hash_bench — a version usable before its hash (registration.md §4.8),
// in-process, on the host.
//
// One LIP registration of `--tensors` tensors over one HOST_SHARED region of `--bytes`, three
// ways, each Begin → Feed → Commit → (wait) → Revoke, in the same run:
//   mi2        the yardstick: a plain commit, which hashes before it answers;
//   usable     a cgid commit with hash_in_background: the time until the commit answers;
//   verified   the same, until WaitArtifactHash answers HASH_DONE.
// Prints the medians and usable/mi2 and verified/mi2: usable should be the metadata cost
// alone, verified close to mi2 (the same hash, started after the answer).
//
// Usage: registration_background_hash_bench [--bytes N] [--tensors N] [--repeats N] [--threads N]
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
#include "tensorreg/registration/engine.hpp"

namespace {

using namespace tensorreg;
using clock_type = std::chrono::steady_clock;

struct setup {
  regions::region_info region;
  registration::feed_request feed;
  std::uint64_t total = 0;
};

setup make_setup(registration::engine& e, std::uint64_t total, std::size_t tensors) {
  setup s;
  const std::uint64_t tensor_bytes = total / tensors / 4 * 4;
  s.total = tensor_bytes * tensors;
  regions::register_request r;
  r.kind = regions::memory_kind::host_shared;
  r.owner_pid = ::getpid();
  r.size_bytes = s.total;
  r.host_shared = regions::host_shared_spec{"", true, regions::host_shared_class::allocator};
  s.region = e.register_region(std::move(r)).value();
  auto writer = memory::shared_memory::adopt(s.region.memory->duplicate_fd().value(), s.total, true).value();
  auto bytes = writer.mutable_bytes();
  for (std::uint64_t i = 0; i + 8 <= s.total; i += 8) {
    const std::uint64_t v = i * 0x9E3779B97F4A7C15ull;
    std::memcpy(bytes.data() + i, &v, 8);
  }
  registration::lease_segments segments;
  for (std::size_t t = 0; t < tensors; ++t) {
    const std::string id = "s" + std::to_string(t);
    const std::uint64_t offset = t * tensor_bytes;
    registration::storage_entry se;
    se.storage_id = id;
    se.device_id = -1;
    se.storage_length = tensor_bytes;
    se.source = registration::region_ref_source{s.region.id, regions::memory_kind::host_shared, -1, s.total};
    se.mapping_base_offset = offset;
    s.feed.storage_entries.push_back(std::move(se));
    s.feed.tensor_aliases.push_back({"layers." + std::to_string(t) + ".weight",
                                     id,
                                     0,
                                     tensor_bytes,
                                     {static_cast<std::int64_t>(tensor_bytes / 4)},
                                     {1},
                                     "torch.float32"});
    segments.segments.push_back({id, 0, offset, tensor_bytes});
  }
  s.feed.payload = std::move(segments);
  return s;
}

struct times {
  double answered = 0;  // Begin → the commit's answer
  double verified = 0;  // Begin → the mi2 id known
};

times register_once(registration::engine& e, const setup& s, bool background, int round) {
  registration::begin_request b;
  b.device_id = -1;
  b.total_size = s.total;
  b.ttl_ms = 60'000;
  b.owner_pid = ::getpid();
  b.plan = registration::lease_options{};
  if (background) b.client_artifact_id = "cgid:bench~bg~" + std::to_string(round);
  auto f = s.feed;
  const auto t0 = clock_type::now();
  auto begun = e.begin(std::move(b)).value();
  f.registration_id = begun.registration_id;
  if (auto fed = e.feed(std::move(f)); !fed) {
    std::fprintf(stderr, "registration_background_hash_bench: %s\n", fed.error().message.c_str());
    std::exit(1);
  }
  registration::commit_options how;
  how.hash_in_background = background;
  auto committed = e.commit(begun.registration_id, how).value();
  const auto t1 = clock_type::now();
  times out;
  out.answered = std::chrono::duration<double>(t1 - t0).count();
  out.verified = out.answered;
  if (background) {
    auto st = e.wait_artifact_hash(committed.descriptor.artifact_id, std::chrono::milliseconds(0)).value();
    if (st.state != registration::hash_state::done) {
      std::fprintf(stderr, "registration_background_hash_bench: hash not done: %s\n", st.message.c_str());
      std::exit(1);
    }
    out.verified = std::chrono::duration<double>(clock_type::now() - t0).count();
  }
  e.revoke(begun.registration_id, "bench");
  return out;
}

void usage(std::FILE* to) {
  std::fprintf(to, "usage: registration_background_hash_bench [--bytes N] [--tensors N] [--repeats N] [--threads N]\n");
}

}  // namespace

int main(int argc, char** argv) {
  std::uint64_t total = 256ull << 20;
  std::size_t tensors = 256;
  int repeats = 7;
  unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      usage(stdout);
      return 0;
    }
    const bool known = a == "--bytes" || a == "--tensors" || a == "--repeats" || a == "--threads";
    if (!known || i + 1 >= argc) {
      std::fprintf(stderr, "registration_background_hash_bench: %s %s\n",
                   known ? "missing the value of" : "unknown option", a.c_str());
      usage(stderr);
      return 2;
    }
    const std::string v = argv[++i];
    if (a == "--bytes") {
      const auto parsed = bench::parse_bytes(v);
      if (!parsed || *parsed == 0) {
        std::fprintf(stderr, "registration_background_hash_bench: bad --bytes %s\n", v.c_str());
        return 2;
      }
      total = *parsed;
    } else if (a == "--tensors") {
      tensors = std::max<std::size_t>(1, std::stoul(v));
    } else if (a == "--repeats") {
      repeats = std::max(1, std::stoi(v));
    } else {
      threads = static_cast<unsigned>(std::max(1ul, std::stoul(v)));
    }
  }
  registration::engine_options o;
  o.hash_threads = threads;
  o.sweep_interval = std::chrono::milliseconds(0);
  auto e = registration::engine::create(o).value();
  auto s = make_setup(*e, total, tensors);

  std::vector<double> mi2, usable, verified;
  (void)register_once(*e, s, false, -1);  // warm-up: page in the region
  for (int r = 0; r < repeats; ++r) {
    mi2.push_back(register_once(*e, s, false, r).answered);
    const auto bg = register_once(*e, s, true, r);
    usable.push_back(bg.answered);
    verified.push_back(bg.verified);
  }
  const double m = bench::median(mi2), u = bench::median(usable), v = bench::median(verified);
  fmt::print("# registration_background_hash_bench: {} B in {} tensors, {} hash threads, median of {}\n", s.total,
             tensors, threads, repeats);
  fmt::print("{:>12} {:>12} {:>12} {:>12} {:>16}\n", "mi2_ms", "usable_ms", "verified_ms", "usable/mi2",
             "verified/mi2");
  fmt::print("{:>12.3f} {:>12.3f} {:>12.3f} {:>12.4f} {:>16.3f}\n", m * 1e3, u * 1e3, v * 1e3, u / m, v / m);
  fmt::print(
      "{{\"bench\":\"background_hash\",\"bytes\":{},\"tensors\":{},\"threads\":{},\"mi2_ms\":{:.4f},"
      "\"usable_ms\":{:.4f},\"verified_ms\":{:.4f},\"usable_over_mi2\":{:.5f},\"verified_over_mi2\":{:.4f}}}\n",
      s.total, tensors, threads, m * 1e3, u * 1e3, v * 1e3, u / m, v / m);
  (void)e->unregister_region(s.region.id, ::getpid(), true);
  return 0;
}
