// tp_assembly_bench — a tensor-parallel artifact assembled from its pieces (registration.md §7,
// PIECE kind): the time from the last piece's Commit to the sealed mi2 id, next to a tree hash
// of the same bytes measured in the same run.
//
// A dense-8B-shaped bfloat16 state dict (hidden 4096, MLP 14336, 8 KV heads of 128; layers and
// vocabulary chosen so that it is about --gib GiB), every tensor narrowed along --dim (0: rows,
// 1: columns; a 1-D tensor along 0) into --pieces equal pieces, one piece per tensor-parallel
// rank. Each repeat registers the pieces in a random order through the library's engine (Begin,
// every 4 MiB view_chunk fed on --threads threads, Commit): all but the last, then the last one
// alone, timed in two parts, and checks that the sealed id is the id of the whole dict.
// Rows, medians of --repeats:
//   tree hash        the yardstick: identity::content_id of the canonical bytes in memory, on
//                    the engine's hashing threads' count (one per core);
//   last feed        Begin and every chunk of the last piece;
//   last commit      its Commit, which seals the assembly: the sealed id (the goal's figure);
//   whole assembly   the first piece's Begin to the sealed id.
// The yardstick is the GPU tree hash of the same size (cuda_tree_hash_bench, run beside
// it on the GPU machine): goal last commit ≤ 1.2× that.
//
// Usage: tp_assembly_bench [--gib 16] [--pieces 8] [--dim 0|1] [--threads N] [--repeats 3]
#include <fmt/core.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "bench_support.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/identity/content_id.hpp"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/memory/byte_source.hpp"
#include "tensorreg/registration/engine.hpp"
#include "tensorreg/views/scatter.hpp"
#include "tensorreg/views/view_plan.hpp"

namespace {

using namespace tensorreg;
using clock_type = std::chrono::steady_clock;
constexpr std::uint64_t chunk_bytes = std::uint64_t{4} << 20;

struct shape_2d {
  std::string name;
  std::vector<std::int64_t> shape;
};

// Llama-3-8B's tensors; `layers` and `vocab` scale the total.
std::vector<shape_2d> dense_shapes(int layers, std::int64_t vocab) {
  constexpr std::int64_t hidden = 4096, mlp = 14336, kv = 1024;
  std::vector<shape_2d> out{{"model.embed_tokens.weight", {vocab, hidden}},
                            {"lm_head.weight", {vocab, hidden}},
                            {"model.norm.weight", {hidden}}};
  for (int l = 0; l < layers; ++l) {
    const auto p = "model.layers." + std::to_string(l) + ".";
    out.push_back({p + "self_attn.q_proj.weight", {hidden, hidden}});
    out.push_back({p + "self_attn.k_proj.weight", {kv, hidden}});
    out.push_back({p + "self_attn.v_proj.weight", {kv, hidden}});
    out.push_back({p + "self_attn.o_proj.weight", {hidden, hidden}});
    out.push_back({p + "mlp.gate_proj.weight", {mlp, hidden}});
    out.push_back({p + "mlp.up_proj.weight", {mlp, hidden}});
    out.push_back({p + "mlp.down_proj.weight", {hidden, mlp}});
    out.push_back({p + "input_layernorm.weight", {hidden}});
    out.push_back({p + "post_attention_layernorm.weight", {hidden}});
  }
  return out;
}

std::uint64_t bytes_of(const std::vector<std::int64_t>& shape) {
  return std::accumulate(shape.begin(), shape.end(), std::uint64_t{2},
                         [](std::uint64_t a, std::int64_t d) { return a * static_cast<std::uint64_t>(d); });
}

index::canonical_index make_index(double gib) {
  const std::int64_t vocab = gib >= 8 ? 128256 : 32000;  // both divisible by 8
  const auto per_layer = [&] {
    std::uint64_t n = 0;
    for (const auto& t : dense_shapes(1, vocab))
      n += t.shape.size() == 2 && t.name.find("layers") != std::string::npos ? bytes_of(t.shape) : 0;
    return n;
  }();
  const auto fixed = 2 * bytes_of({vocab, 4096});
  const auto want = static_cast<std::uint64_t>(gib * static_cast<double>(std::uint64_t{1} << 30));
  const int layers = want > fixed ? std::max(1, static_cast<int>((want - fixed + per_layer / 2) / per_layer)) : 1;
  std::vector<index::tensor_desc> tensors;
  for (const auto& t : dense_shapes(layers, vocab)) {
    std::vector<std::int64_t> strides(t.shape.size(), 1);
    for (std::size_t d = t.shape.size() - 1; d > 0; --d) strides[d - 1] = strides[d] * t.shape[d];
    tensors.push_back({t.name, "torch.bfloat16", t.shape, strides, t.name, bytes_of(t.shape), 0});
  }
  return index::canonical_index::build(tensors).value();
}

// Rank r's piece: every tensor narrowed along `dim` (a 1-D tensor along 0) to its r-th part.
views::view_request piece_request(const index::canonical_index& idx, int pieces, int rank, std::uint32_t dim) {
  views::view_request v;
  for (const auto& t : idx.entries()) {
    const std::uint32_t d = t.shape.size() == 1 ? 0 : dim;
    const auto part = static_cast<std::uint64_t>(t.shape[d] / pieces);
    v.spec[t.name] = {identity::narrow_op{d, static_cast<std::int64_t>(part * static_cast<std::uint64_t>(rank)), part}};
  }
  v.place = views::placement::server;
  v.kind = views::registration_kind::piece;
  v.canonical_size_bytes = idx.total_size();
  return v;
}

// Begin, then the piece's view bytes (gathered from `canonical`) fed as 4 MiB chunks on
// `threads` threads. Returns the registration id.
std::string begin_and_feed(registration::engine& engine, const index::canonical_index& idx, int pieces,
                           const views::view_request& request, const std::string& cgid,
                           std::span<const std::byte> canonical, unsigned threads) {
  std::uint64_t view_size = 0;  // every narrowed tensor's bytes are a multiple of 8: no PAD
  for (const auto& e : idx.entries()) view_size += e.size / static_cast<std::uint64_t>(pieces);
  const auto plan = views::view_plan::create(request, idx, {view_size, true});
  if (!plan) {
    fmt::print(stderr, "view plan: {}\n", plan.error().message);
    std::exit(1);
  }
  registration::begin_request b;
  b.owner_pid = ::getpid();
  b.total_size = plan->view_size();
  b.tensor_index_data = registration::index_data{idx.json(), "v3", "json"};
  b.view = request;
  b.client_artifact_id = cgid;
  b.ttl_ms = 600'000;
  auto begun = engine.begin(b);
  if (!begun) {
    fmt::print(stderr, "begin failed: {}\n", begun.error().message);
    std::exit(1);
  }
  const auto size = plan->view_size();
  std::atomic<bool> failed{false};
  bench::chunked(size, chunk_bytes, threads, [&](std::uint64_t at, std::uint64_t n) {
    std::string chunk(n, '\0');
    if (!views::gather(*plan, canonical, at, std::as_writable_bytes(std::span(chunk.data(), chunk.size())))) {
      failed = true;
    }
    registration::feed_request f;
    f.registration_id = begun->registration_id;
    f.payload = registration::view_chunk{0, at, std::move(chunk)};
    if (!engine.feed(std::move(f))) failed = true;
  });
  if (failed) {
    fmt::print(stderr, "a feed failed\n");
    std::exit(1);
  }
  return begun->registration_id;
}

}  // namespace

int main(int argc, char** argv) {
  double gib = 16;
  int pieces = 8;
  std::uint32_t dim = 0;
  unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  int repeats = 3;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--gib") gib = std::stod(argv[i + 1]);
    if (flag == "--pieces") pieces = std::stoi(argv[i + 1]);
    if (flag == "--dim") dim = static_cast<std::uint32_t>(std::stoul(argv[i + 1]));
    if (flag == "--threads") threads = static_cast<unsigned>(std::stoul(argv[i + 1]));
    if (flag == "--repeats") repeats = std::stoi(argv[i + 1]);
  }
  const auto idx = make_index(gib);
  const auto total = idx.total_size();
  std::vector<std::byte> canonical(total);
  {
    thread_pool fill(threads);
    const std::uint64_t parts = (total + chunk_bytes - 1) / chunk_bytes;
    (void)fill.parallel_for(parts, [&](std::size_t p) -> status {
      const std::uint64_t begin = p * chunk_bytes, end = std::min(total, begin + chunk_bytes);
      std::uint64_t x = 0x9E3779B97F4A7C15ull ^ p;
      for (std::uint64_t i = begin; i < end; i += 8) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        std::memcpy(canonical.data() + i, &x, std::min<std::uint64_t>(8, end - i));
      }
      return {};
    });
  }

  bench::jump_clock time;
  auto engine = bench::swept_by_hand_engine(time);

  fmt::print(
      "tp_assembly_bench: {} tensors, {:.2f} GiB, {} pieces narrowed along dim {}, {} feeding threads, {} "
      "repeats, {} cores\n",
      idx.entries().size(), static_cast<double>(total) / (1 << 30), pieces, dim, threads, repeats,
      std::thread::hardware_concurrency());

  std::vector<double> hash_s, feed_s, commit_s, whole_s;
  std::string whole_id;
  {
    thread_pool pool(std::max(1u, std::thread::hardware_concurrency()));
    const memory::host_bytes_view bytes(canonical);
    for (int r = 0; r < repeats; ++r) {
      const auto t0 = clock_type::now();
      whole_id = identity::content_id(idx.json(), bytes, &pool).value().to_string();
      hash_s.push_back(bench::seconds_since(t0));
    }
  }
  std::mt19937 rng(7);
  for (int r = 0; r < repeats; ++r) {
    std::vector<int> order(static_cast<std::size_t>(pieces));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    const std::string cgid = "cgid:bench.tp-" + std::to_string(r);
    const auto t0 = clock_type::now();
    for (std::size_t k = 0; k + 1 < order.size(); ++k) {
      const auto id =
          begin_and_feed(*engine, idx, pieces, piece_request(idx, pieces, order[k], dim), cgid, canonical, threads);
      if (auto done = engine->commit(id); !done) {
        fmt::print(stderr, "commit of piece {} failed: {}\n", order[k], done.error().message);
        return 1;
      }
    }
    const auto t1 = clock_type::now();
    const auto last =
        begin_and_feed(*engine, idx, pieces, piece_request(idx, pieces, order.back(), dim), cgid, canonical, threads);
    feed_s.push_back(bench::seconds_since(t1));
    const auto t2 = clock_type::now();
    auto done = engine->commit(last);
    commit_s.push_back(bench::seconds_since(t2));
    whole_s.push_back(bench::seconds_since(t0));
    if (!done || !done->assembly || !done->assembly->sealed || done->descriptor.artifact_id != whole_id) {
      fmt::print(stderr, "the last piece did not seal the assembly as {}: {}\n", whole_id,
                 done ? done->descriptor.artifact_id : done.error().message);
      return 1;
    }
    (void)engine->deregister(registration::deregister_request{whole_id});
    time.skip(std::chrono::minutes(20));
    engine->sweep();
  }
  const double hash = bench::median(hash_s), commit = bench::median(commit_s);
  fmt::print("| what | seconds (median) | × tree hash |\n|---|---|---|\n");
  fmt::print("| tree hash of the {:.2f} GiB (yardstick, {} threads) | {:.3f} | 1.00 |\n",
             static_cast<double>(total) / (1 << 30), std::thread::hardware_concurrency(), hash);
  fmt::print("| last piece: Begin + feed | {:.3f} | {:.2f} |\n", bench::median(feed_s), bench::median(feed_s) / hash);
  fmt::print("| last piece: Commit → sealed id | {:.3f} | {:.2f} |\n", commit, commit / hash);
  fmt::print("| whole assembly: first Begin → sealed id | {:.3f} | {:.2f} |\n", bench::median(whole_s),
             bench::median(whole_s) / hash);
  fmt::print("sealed id {} (the whole dict's)\n", whole_id);
  fmt::print(
      "{{\"bench\":\"tp_assembly\",\"gib\":{:.3f},\"pieces\":{},\"dim\":{},\"tree_hash_s\":{:.4f},"
      "\"last_feed_s\":{:.4f},\"last_commit_s\":{:.4f},\"whole_s\":{:.4f}}}\n",
      static_cast<double>(total) / (1 << 30), pieces, dim, hash, bench::median(feed_s), commit, bench::median(whole_s));
  return 0;
}
