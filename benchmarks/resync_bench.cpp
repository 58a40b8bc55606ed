// resync_bench — the daemon's cost per version of the weight-sync loop (#17), on the CPU.
//
// A trainer re-registers the same memory every step: a lease-in-place registration with a cgid
// per version (`cgid:wsync~<name>~<n>`, python/tensorreg/weight_sync.py) over regions it keeps
// (one per allocation), its unchanged layout named by tensor_index_key at Begin and the same
// Feed each time; the previous version is released once the new one is committed (keep = 1),
// and a reader asks for the newest version and its index.
//
// The layout is the MoE-shaped dict of bench_state_dicts.py (995 bf16 tensors), each matrix's
// first dimension scaled so the whole is --mib MiB of HOST_SHARED regions. Regions follow the
// caching allocator's split at the full size: a tensor of more than 1 MiB gets a region of its
// own, smaller ones share 2 MiB blocks.
//
// Two runs, each timing --versions versions after --warmup:
//   1. engine: the registration engine in this process (begin → feed → commit; revoke; get +
//      index_of), no wire;
//   2. daemon: a real tensorregd (path as the first argument or env TENSORREGD) over its Unix
//      socket: Begin, Feed (one frame), Commit; Revoke of the old version; ListArtifacts +
//      GetArtifactIndexById for the reader. Yardstick in the same run: the median round trip of
//      GetServerConfig times the number of RPCs of each step.
// Reported: median and p90 in ms of each step; the daemon's own time is publish minus 3 trivial
// round trips minus the client's serialisation of the Feed (printed too). On a shared machine
// wall time also waits for cores, so the on-CPU time of the daemon's threads is reported too:
// in each publish (read from /proc between the steps) and per version over all steps. Goal:
// ≤ 2 ms of daemon time per version for 995 storages.
//
// Usage: resync_bench [TENSORREGD] [--mib N] [--versions N] [--warmup N] [--engine-only]
//                     [--daemon-only] [--hash-in-background] [--republish]
// Output: one JSON line per run, then a table.
#include <fcntl.h>
#include <fmt/core.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "bench_support.hpp"
#include "client/raw_connection.hpp"
#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/registration/engine.hpp"

namespace {

namespace fs = std::filesystem;
using namespace tensorreg;
using clock_type = std::chrono::steady_clock;
namespace v2 = ::tensorcast::daemon::v2;
namespace wire = ::tensorreg::wire::v1;

constexpr const char* kUsage =
    "usage: resync_bench [TENSORREGD] [--mib N] [--versions N] [--warmup N] [--engine-only] [--daemon-only]\n"
    "                    [--hash-in-background] [--republish]\n"
    "  TENSORREGD            the daemon binary (default: env TENSORREGD)\n"
    "  --mib N               host bytes of the dict in MiB (default 1024)\n"
    "  --versions N          versions timed per run (default 60)\n"
    "  --warmup N            versions before those (default 3)\n"
    "  --engine-only         only the in-process engine run\n"
    "  --daemon-only         only the tensorregd run\n"
    "  --hash-in-background  commit each version with hash_in_background and wait for the hash\n"
    "  --republish           versions after the first: one RepublishLease that also ends the previous\n"
    "                        (outside the timed steps) before the next\n";

[[noreturn]] void die(const std::string& why) {
  fmt::print(stderr, "resync_bench: {}\n", why);
  std::exit(1);
}

template <typename T>
T must(result<T> r, std::string_view what) {
  if (!r) die(fmt::format("{}: {}: {}", what, errc_name(r.error().code), r.error().message));
  return std::move(*r);
}
void must(const status& s, std::string_view what) {
  if (!s) die(fmt::format("{}: {}: {}", what, errc_name(s.error().code), s.error().message));
}

double ms_between(clock_type::time_point a, clock_type::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

double p90(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<std::size_t>(std::ceil(0.9 * static_cast<double>(v.size()))) - 1)];
}

// ---- the layout -----------------------------------------------------------------------------

struct tensor_spec {
  std::string name;
  std::vector<std::int64_t> shape;
  std::uint64_t full_bytes = 0;  // at the model's size: decides the allocation
  std::uint64_t bytes = 0;       // scaled
};

std::vector<tensor_spec> moe_shapes() {
  const std::int64_t layers = 32, h = 4096, kv = 1024, experts = 8, inter = 2240, vocab = 32000;
  std::vector<std::pair<std::string, std::vector<std::int64_t>>> out;
  out.push_back({"model.embed_tokens.weight", {vocab, h}});
  for (std::int64_t l = 0; l < layers; ++l) {
    const auto p = fmt::format("model.layers.{}.", l);
    out.push_back({p + "input_layernorm.weight", {h}});
    out.push_back({p + "post_attention_layernorm.weight", {h}});
    out.push_back({p + "self_attn.q_proj.weight", {h, h}});
    out.push_back({p + "self_attn.k_proj.weight", {kv, h}});
    out.push_back({p + "self_attn.v_proj.weight", {kv, h}});
    out.push_back({p + "self_attn.o_proj.weight", {h, h}});
    out.push_back({p + "block_sparse_moe.gate.weight", {experts, h}});
    for (std::int64_t e = 0; e < experts; ++e) {
      const auto q = fmt::format("{}block_sparse_moe.experts.{}.", p, e);
      out.push_back({q + "w1.weight", {inter, h}});
      out.push_back({q + "w2.weight", {h, inter}});
      out.push_back({q + "w3.weight", {inter, h}});
    }
  }
  out.push_back({"model.norm.weight", {h}});
  out.push_back({"lm_head.weight", {vocab, h}});
  std::vector<tensor_spec> specs;
  for (auto& [name, shape] : out) {
    std::uint64_t n = 2;
    for (auto d : shape) n *= static_cast<std::uint64_t>(d);
    specs.push_back({name, shape, n, n});
  }
  return specs;
}

// Scales every matrix's first dimension so that the whole is about `bytes`.
void scale(std::vector<tensor_spec>& specs, std::uint64_t bytes) {
  std::uint64_t full = 0;
  for (const auto& s : specs) full += s.full_bytes;
  const double f = static_cast<double>(bytes) / static_cast<double>(full);
  for (auto& s : specs) {
    if (s.shape.size() > 1) s.shape[0] = std::max<std::int64_t>(1, std::llround(static_cast<double>(s.shape[0]) * f));
    std::uint64_t n = 2;
    for (auto d : s.shape) n *= static_cast<std::uint64_t>(d);
    s.bytes = n;
  }
}

struct placed {
  std::size_t region = 0;
  std::uint64_t offset = 0;  // in the region
};

// One region per allocation, as the caching allocator lays the dict out at its full size:
// more than 1 MiB gets an allocation of its own, smaller tensors share 2 MiB blocks (sizes
// rounded to 512 bytes). Returns region sizes (scaled) and where each tensor lies.
std::vector<std::uint64_t> allocate(const std::vector<tensor_spec>& specs, std::vector<placed>& where) {
  constexpr std::uint64_t small_limit = 1 << 20, block = 2 << 20, align = 512;
  std::vector<std::uint64_t> sizes;
  std::size_t open_block = SIZE_MAX;
  std::uint64_t block_used_full = 0;
  for (const auto& s : specs) {
    const auto rounded_full = (s.full_bytes + align - 1) / align * align;
    const auto rounded = (s.bytes + align - 1) / align * align;
    if (s.full_bytes > small_limit) {
      where.push_back({sizes.size(), 0});
      sizes.push_back(rounded);
      continue;
    }
    if (open_block == SIZE_MAX || block_used_full + rounded_full > block) {
      open_block = sizes.size();
      sizes.push_back(0);
      block_used_full = 0;
    }
    where.push_back({open_block, sizes[open_block]});
    sizes[open_block] += rounded;
    block_used_full += rounded_full;
  }
  return sizes;
}

// The Feed of one version: a storage per tensor in its region, a segment each (canonical order
// = the dict's order, 512-byte aligned), and the aliases sorted by name (as the clients send).
struct layout {
  std::uint64_t total = 0;
  std::vector<registration::storage_entry> storages;
  std::vector<registration::leased_segment> segments;
  std::vector<registration::tensor_alias> aliases;
};

layout make_layout(const std::vector<tensor_spec>& specs, const std::vector<placed>& where,
                   const std::vector<regions::region_info>& regions) {
  layout l;
  for (std::size_t k = 0; k < specs.size(); ++k) {
    const auto& s = specs[k];
    const auto& r = regions[where[k].region];
    const std::string sid = "s" + std::to_string(k);
    registration::storage_entry e;
    e.storage_id = sid;
    e.device_id = -1;
    e.storage_length = s.bytes;
    e.source = registration::region_ref_source{r.id, regions::memory_kind::host_shared, -1, r.size_bytes};
    e.mapping_base_offset = where[k].offset;
    l.storages.push_back(std::move(e));
    l.segments.push_back({sid, 0, l.total, s.bytes});
    std::vector<std::int64_t> stride(s.shape.size(), 1);
    for (std::size_t d = s.shape.size(); d-- > 1;) stride[d - 1] = stride[d] * s.shape[d];
    l.aliases.push_back({s.name, sid, 0, s.bytes, s.shape, stride, "torch.bfloat16"});
    l.total += (s.bytes + 511) / 512 * 512;
  }
  std::sort(l.aliases.begin(), l.aliases.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  return l;
}

struct samples {
  std::vector<double> publish, release, read, serialise;
  double cpu_ms_per_version = 0;    // the engine's process, or the daemon's, over the timed versions
  std::vector<double> publish_cpu;  // the daemon's on-CPU ms in each publish
};

// On-CPU nanoseconds of every thread of `pid` (/proc/PID/task/*/schedstat): what the daemon's
// work costs apart from the time it waits for a core on a shared machine.
double cpu_ms_of(pid_t pid) {
  std::uint64_t ns = 0;
  std::error_code ec;
  for (const auto& task : fs::directory_iterator(fmt::format("/proc/{}/task", pid), ec)) {
    std::FILE* f = std::fopen((task.path() / "schedstat").c_str(), "r");
    if (f == nullptr) continue;
    unsigned long long on_cpu = 0;
    if (std::fscanf(f, "%llu", &on_cpu) == 1) ns += on_cpu;
    std::fclose(f);
  }
  return static_cast<double>(ns) / 1e6;
}

void print_row(std::string_view run, std::string_view step, const std::vector<double>& v, double yardstick) {
  if (v.empty()) return;
  fmt::print("{:<8} {:<28} {:>10.3f} {:>10.3f} {:>12}\n", run, step, bench::median(v), p90(v),
             yardstick > 0 ? fmt::format("{:.3f}", yardstick) : std::string("-"));
}

// ---- 1. the engine in this process -------------------------------------------------------------

samples run_engine(const std::vector<tensor_spec>& specs, const std::vector<placed>& where,
                   const std::vector<std::uint64_t>& sizes, int warmup, int versions, bool background, bool republish) {
  registration::engine_options o;
  o.sweep_interval = std::chrono::milliseconds(0);
  auto e = must(registration::engine::create(o), "cannot create the engine");
  std::vector<regions::region_info> regs;
  for (auto size : sizes) {
    regions::register_request r;
    r.kind = regions::memory_kind::host_shared;
    r.owner_pid = ::getpid();
    r.size_bytes = size;
    r.host_shared = regions::host_shared_spec{"", true, regions::host_shared_class::allocator};
    regs.push_back(must(e->register_region(std::move(r)), "cannot register a region"));
  }
  const auto l = make_layout(specs, where, regs);
  samples out;
  std::string previous;
  double cpu_start = 0;
  for (int n = 1; n <= warmup + versions; ++n) {
    if (n == warmup + 1) cpu_start = bench::process_cpu_seconds();
    const std::string cgid = "cgid:wsync~engine~" + std::to_string(n);
    registration::begin_request b;
    b.device_id = -1;
    b.total_size = l.total;
    b.ttl_ms = 60'000;
    b.owner_pid = ::getpid();
    b.plan = registration::lease_options{};
    b.client_artifact_id = cgid;
    registration::feed_request f;  // copied before the clock starts: the client's own work
    f.storage_entries = l.storages;
    f.tensor_aliases = l.aliases;
    f.payload = registration::lease_segments{l.segments};
    const auto t0 = clock_type::now();
    std::string registration_id;
    if (republish && !previous.empty()) {
      // One step: the new lease from the previous one's tables, the previous one ended.
      registration::republish_request r;
      r.previous_registration_id = previous;
      r.client_artifact_id = cgid;
      r.owner_pid = ::getpid();
      r.ttl_ms = 60'000;
      r.hash_in_background = background;
      r.revoke_previous = true;
      registration_id = must(e->republish(r), "cannot republish").registration_id;
      previous.clear();
    } else {
      auto begun = must(e->begin(std::move(b)), "cannot begin");
      registration_id = begun.registration_id;
      f.registration_id = registration_id;
      must(e->feed(std::move(f)), "cannot feed");
      registration::commit_options how;
      how.hash_in_background = background;
      (void)must(e->commit(registration_id, how), "cannot commit");
    }
    const auto t1 = clock_type::now();
    if (!previous.empty()) e->revoke(previous, "a newer version");
    const auto t2 = clock_type::now();
    (void)must(e->get(cgid), "cannot get");
    (void)must(e->index_of(cgid), "cannot read the index");
    const auto t3 = clock_type::now();
    if (background) (void)must(e->wait_artifact_hash(cgid, std::chrono::milliseconds(0)), "cannot wait");
    previous = registration_id;
    if (n <= warmup) continue;
    out.publish.push_back(ms_between(t0, t1));
    out.release.push_back(ms_between(t1, t2));
    out.read.push_back(ms_between(t2, t3));
  }
  out.cpu_ms_per_version = (bench::process_cpu_seconds() - cpu_start) * 1e3 / versions;
  e->revoke(previous, "done");
  return out;
}

// ---- 2. a real tensorregd ------------------------------------------------------------------------

v2::FeedRegisterArtifactStreamRequest feed_frame(const layout& l, const std::vector<v2::RegionRef>& refs,
                                                 const std::vector<placed>& where) {
  v2::FeedRegisterArtifactStreamRequest f;
  for (std::size_t k = 0; k < l.storages.size(); ++k) {
    const auto& s = l.storages[k];
    auto* e = f.add_storage_entries();
    e->set_storage_id(s.storage_id);
    e->set_device_id(-1);
    e->set_storage_length(s.storage_length);
    *e->mutable_region_ref() = refs[where[k].region];
    e->set_mapping_base_offset(s.mapping_base_offset);
    auto* seg = f.mutable_lease_segments()->add_segments();
    seg->set_storage_id(l.segments[k].storage_id);
    seg->set_artifact_offset(l.segments[k].artifact_offset);
    seg->set_length(l.segments[k].length);
  }
  for (const auto& a : l.aliases) {
    auto* out = f.add_tensor_aliases();
    out->set_name(a.name);
    out->set_storage_id(a.storage_id);
    out->set_logical_length(a.logical_length);
    for (auto d : a.shape) out->add_shape(d);
    for (auto d : a.stride) out->add_stride(d);
    out->set_dtype(a.dtype);
  }
  return f;
}

struct daemon_result {
  samples s;
  double round_trip_ms = 0;
};

daemon_result run_daemon(const std::string& binary, const std::vector<tensor_spec>& specs,
                         const std::vector<placed>& where, const std::vector<std::uint64_t>& sizes, int warmup,
                         int versions, bool background, bool republish) {
  const auto dir = fs::temp_directory_path() / fmt::format("resync_bench.{}", ::getpid());
  fs::create_directories(dir);
  fs::permissions(dir, fs::perms::owner_all);  // the daemon wants its socket's folder private
  const auto socket = (dir / "tensorregd.sock").string();
  daemon_result out;
  {
    bench::daemon_child d(binary, {"--socket", socket}, dir / "tensorregd.log");
    d.wait_ready();
    auto conn = must(client::raw::connection::connect(socket), "cannot connect");
    const std::int32_t pid = ::getpid();
    std::vector<v2::RegionRef> refs;
    std::vector<regions::region_info> infos;  // ids only, for the layout
    for (auto size : sizes) {
      wire::Request r;
      auto* rr = r.mutable_register_region();
      rr->set_memory_kind(v2::REGION_MEMORY_KIND_HOST_SHARED);
      rr->set_owner_pid(pid);
      rr->set_size_bytes(size);
      rr->mutable_host_shared()->set_daemon_managed(true);
      auto answer = must(conn->call(std::move(r)), "cannot register a region");
      refs.push_back(answer.response.register_region().region());
      regions::region_info info;
      info.id = refs.back().region_id();
      info.size_bytes = refs.back().size_bytes();
      infos.push_back(std::move(info));
    }
    const auto l = make_layout(specs, where, infos);
    const auto body = feed_frame(l, refs, where);

    // Yardstick: GetServerConfig round trips.
    std::vector<double> trips;
    for (int i = 0; i < 200; ++i) {
      wire::Request r;
      r.mutable_get_server_config();
      const auto t0 = clock_type::now();
      (void)must(conn->call(std::move(r)), "cannot get the server config");
      trips.push_back(ms_between(t0, clock_type::now()));
    }
    out.round_trip_ms = bench::median(trips);

    std::string previous, index_key;
    double cpu_start = 0;
    for (int n = 1; n <= warmup + versions; ++n) {
      if (n == warmup + 1) cpu_start = cpu_ms_of(d.pid);
      const std::string cgid = "cgid:wsync~bench~" + std::to_string(n);
      wire::Request begin;
      auto* b = begin.mutable_begin_register_artifact();
      b->set_device_id(-1);
      b->set_total_size(l.total);
      b->set_ttl_ms(60'000);
      b->set_owner_pid(pid);
      b->mutable_lease()->set_in_place(true);
      b->set_client_artifact_id(cgid);
      if (!index_key.empty()) b->set_tensor_index_key(index_key);
      std::vector<v2::FeedRegisterArtifactStreamRequest> frames{body};  // copied outside the clock
      wire::Request commit;
      commit.mutable_commit_registered_artifact()->set_hash_in_background(background);

      const double cpu0 = cpu_ms_of(d.pid);  // read outside the timed steps: this process's time
      const auto t0 = clock_type::now();
      auto s0 = t0, s1 = t0;
      std::string rid;
      if (republish && !previous.empty()) {
        // One RepublishLease: the new lease from the previous one's tables, the previous one ended.
        wire::Request again;
        auto* r = again.mutable_republish_lease();
        r->set_registration_id(previous);
        r->set_client_artifact_id(cgid);
        r->set_owner_pid(pid);
        r->set_ttl_ms(60'000);
        r->set_hash_in_background(background);
        r->set_revoke_previous(true);
        auto done = must(conn->call(std::move(again)), "cannot republish");
        rid = done.response.republish_lease().registration_id();
        previous.clear();
      } else {
        auto begun = must(conn->call(std::move(begin)), "cannot begin");
        rid = begun.response.begin_register_artifact().registration_id();
        frames[0].set_registration_id(rid);
        s0 = clock_type::now();
        std::string serialised;
        (void)frames[0].SerializeToString(&serialised);  // what feed() does once more: the client's share
        s1 = clock_type::now();
        (void)must(conn->feed(std::move(frames)), "cannot feed");
        commit.mutable_commit_registered_artifact()->set_registration_id(rid);
        (void)must(conn->call(std::move(commit)), "cannot commit");
      }
      const auto t1 = clock_type::now();
      const double cpu1 = cpu_ms_of(d.pid);
      if (!previous.empty()) {
        wire::Request revoke;
        revoke.mutable_revoke_registered_artifact()->set_registration_id(previous);
        revoke.mutable_revoke_registered_artifact()->set_reason("a newer version");
        (void)must(conn->call(std::move(revoke)), "cannot revoke");
      }
      const auto t2 = clock_type::now();
      wire::Request list;
      list.mutable_list_artifacts();
      (void)must(conn->call(std::move(list)), "cannot list");
      wire::Request get;
      get.mutable_get_artifact_index_by_id()->set_artifact_id(cgid);
      auto index = must(conn->call(std::move(get)), "cannot read the index");
      const auto t3 = clock_type::now();
      if (index_key.empty()) {
        index_key = hash::to_hex(hash::sha256(index.response.get_artifact_index_by_id().tensor_index_data()));
      }
      if (background) {
        wire::Request w;
        w.mutable_wait_artifact_hash()->set_artifact_id(cgid);
        (void)must(conn->call(std::move(w)), "cannot wait for the hash");
      }
      previous = rid;
      if (n <= warmup) continue;
      out.s.publish.push_back(ms_between(t0, t1));
      out.s.release.push_back(ms_between(t1, t2));
      out.s.read.push_back(ms_between(t2, t3));
      out.s.serialise.push_back(ms_between(s0, s1));
      out.s.publish_cpu.push_back(cpu1 - cpu0);
    }
    out.s.cpu_ms_per_version = (cpu_ms_of(d.pid) - cpu_start) / versions;
  }
  std::error_code ignored;
  fs::remove_all(dir, ignored);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::string binary = std::getenv("TENSORREGD") != nullptr ? std::getenv("TENSORREGD") : "";
  std::uint64_t mib = 1024;
  int versions = 60, warmup = 3;
  bool engine_run = true, daemon_run = true, background = false, republish = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      fmt::print("{}", kUsage);
      return 0;
    }
    if (a == "--engine-only" || a == "--daemon-only" || a == "--hash-in-background" || a == "--republish") {
      if (a == "--republish") republish = true;
      if (a == "--engine-only") daemon_run = false;
      if (a == "--daemon-only") engine_run = false;
      if (a == "--hash-in-background") background = true;
      continue;
    }
    if (a == "--mib" || a == "--versions" || a == "--warmup") {
      if (i + 1 >= argc) {
        fmt::print(stderr, "resync_bench: missing the value of {}\n{}", a, kUsage);
        return 2;
      }
      const auto v = std::stoul(argv[++i]);
      if (a == "--mib") mib = v;
      if (a == "--versions") versions = static_cast<int>(v);
      if (a == "--warmup") warmup = static_cast<int>(v);
      continue;
    }
    if (!a.empty() && a[0] == '-') {
      fmt::print(stderr, "resync_bench: unknown option {}\n{}", a, kUsage);
      return 2;
    }
    binary = a;
  }
  if (versions < 1) die("--versions must be >= 1");
  if (daemon_run && binary.empty()) die("no tensorregd: give its path or set TENSORREGD (or --engine-only)");

  auto specs = moe_shapes();
  scale(specs, mib << 20);
  std::vector<placed> where;
  const auto sizes = allocate(specs, where);
  std::uint64_t held = 0;
  for (auto s : sizes) held += s;
  fmt::print("# resync_bench: {} tensors in {} HOST_SHARED regions ({:.1f} MiB), {} versions after {} warm-up{}\n",
             specs.size(), sizes.size(), static_cast<double>(held) / (1 << 20), versions, warmup,
             background ? ", hash_in_background" : "");

  std::optional<samples> eng;
  std::optional<daemon_result> dmn;
  if (engine_run) eng = run_engine(specs, where, sizes, warmup, versions, background, republish);
  if (daemon_run) dmn = run_daemon(binary, specs, where, sizes, warmup, versions, background, republish);

  if (eng) {
    fmt::print(
        "{{\"bench\":\"resync\",\"run\":\"engine\",\"tensors\":{},\"regions\":{},\"versions\":{},"
        "\"publish_ms_median\":{:.4f},\"publish_ms_p90\":{:.4f},\"release_ms_median\":{:.4f},"
        "\"read_ms_median\":{:.4f},\"cpu_ms_per_version\":{:.4f},\"goal_ms\":2}}\n",
        specs.size(), sizes.size(), versions, bench::median(eng->publish), p90(eng->publish),
        bench::median(eng->release), bench::median(eng->read), eng->cpu_ms_per_version);
  }
  if (dmn) {
    const auto& s = dmn->s;
    const double daemon_ms = bench::median(s.publish) - 3 * dmn->round_trip_ms - bench::median(s.serialise);
    fmt::print(
        "{{\"bench\":\"resync\",\"run\":\"daemon\",\"tensors\":{},\"regions\":{},\"versions\":{},"
        "\"publish_ms_median\":{:.4f},\"publish_ms_p90\":{:.4f},\"release_ms_median\":{:.4f},"
        "\"read_ms_median\":{:.4f},\"serialise_ms_median\":{:.4f},\"round_trip_ms\":{:.4f},"
        "\"daemon_publish_ms\":{:.4f},\"daemon_cpu_ms_per_version\":{:.4f},\"daemon_publish_cpu_ms\":{:.4f},"
        "\"goal_ms\":2}}\n",
        specs.size(), sizes.size(), versions, bench::median(s.publish), p90(s.publish), bench::median(s.release),
        bench::median(s.read), bench::median(s.serialise), dmn->round_trip_ms, daemon_ms, s.cpu_ms_per_version,
        bench::median(s.publish_cpu));
  }
  fmt::print("{:<8} {:<28} {:>10} {:>10} {:>12}\n", "run", "step", "median_ms", "p90_ms", "yardstick_ms");
  if (eng) {
    print_row("engine", "publish (begin+feed+commit)", eng->publish, 0);
    print_row("engine", "release old (revoke)", eng->release, 0);
    print_row("engine", "read (get + index_of)", eng->read, 0);
    fmt::print("engine CPU per version (all steps): {:.3f} ms\n", eng->cpu_ms_per_version);
  }
  if (dmn) {
    const auto& s = dmn->s;
    const double rt = dmn->round_trip_ms;
    print_row("daemon", "publish (Begin+Feed+Commit)", s.publish, 3 * rt);
    print_row("daemon", "  client: Feed serialise", s.serialise, 0);
    print_row("daemon", "release old (Revoke)", s.release, rt);
    print_row("daemon", "read (List + GetIndex)", s.read, 2 * rt);
    fmt::print("daemon time per version (publish - 3 round trips - serialise): {:.3f} ms (goal <= 2 ms)\n",
               bench::median(s.publish) - 3 * rt - bench::median(s.serialise));
    print_row("daemon", "  its CPU in publish", s.publish_cpu, 0);
    fmt::print("daemon CPU per version (all its threads, all steps): {:.3f} ms\n", s.cpu_ms_per_version);
  }
  return 0;
}
