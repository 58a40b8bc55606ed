// view_upload_bench — SERVER-placement view upload on the CPU (registration.md §7), next to a
// plain memcpy of the same bytes in the same run.
//
// A tensor set of 8 bfloat16 weights [4096, C] (C so that the view is --bytes), two views:
//   transposed  transpose(0, 1) of every weight: a CANONICAL view of the whole set;
//   narrowed    narrow(1, 0, C/2) of weights twice as wide: a PIECE (half of each row).
// Rows, each in GiB/s of view bytes, medians of --repeats, --threads feeding 4 MiB chunks:
//   memcpy            the yardstick: the view bytes copied into fresh memfd memory;
//   scatter           views::scatter of the chunks into a fresh canonical memfd;
//   scatter into resident pages
//                     the same again into that memfd, its pages now faulted in: the
//                     scatter's own cost, without the first touch that memcpy pays too;
//   engine feed       Begin, then every chunk through engine::feed (scatter for CANONICAL, a
//                     copy into the piece's staging for PIECE), until the last chunk landed;
//   engine commit     the Commit after it (hash of the canonical buffer, view hash; for a
//                     PIECE also the scatter into its assembly), in seconds.
// ratio = GiB/s ÷ memcpy's (goal ≥ 0.7 for the feed of both views).
//
// Usage: view_upload_bench [--bytes 1G] [--threads 4] [--repeats 3]
#include <fmt/core.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "bench_support.hpp"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/memory/shared_memory.hpp"
#include "tensorreg/registration/engine.hpp"
#include "tensorreg/views/scatter.hpp"

namespace {

using namespace tensorreg;
using clock_type = std::chrono::steady_clock;
constexpr std::uint64_t chunk_bytes = std::uint64_t{4} << 20;
constexpr std::int64_t rows = 4096;
constexpr int weights = 8;

struct tensor_set {
  index::canonical_index index;
  views::view_request view;
};

tensor_set make_set(std::uint64_t view_bytes, bool narrowed) {
  const auto view_cols = static_cast<std::int64_t>(view_bytes / weights / rows / 2);
  const auto cols = narrowed ? 2 * view_cols : view_cols;
  std::vector<index::tensor_desc> tensors;
  views::view_request v;
  for (int w = 0; w < weights; ++w) {
    const auto name = "layers." + std::to_string(w) + ".weight";
    tensors.push_back(
        {name, "torch.bfloat16", {rows, cols}, {cols, 1}, name, static_cast<std::uint64_t>(rows * cols * 2), 0});
    if (narrowed) {
      v.spec[name] = {identity::narrow_op{1, 0, static_cast<std::uint64_t>(view_cols)}};
    } else {
      v.spec[name] = {identity::transpose_op{0, 1}};
    }
  }
  v.place = views::placement::server;
  v.kind = narrowed ? views::registration_kind::piece : views::registration_kind::canonical;
  auto idx = index::canonical_index::build(tensors).value();
  if (narrowed) v.canonical_size_bytes = idx.total_size();
  return {std::move(idx), std::move(v)};
}

struct row {
  std::string what;
  std::vector<double> gibs;
  std::vector<double> commit_s;
};

void print(const row& r, double yardstick) {
  const double g = bench::median(r.gibs);
  fmt::print("| {} | {:.2f} | {:.2f} | {} |\n", r.what, g, g / yardstick,
             r.commit_s.empty() ? std::string("–") : fmt::format("{:.3f}", bench::median(r.commit_s)));
}

}  // namespace

int main(int argc, char** argv) {
  std::uint64_t bytes = std::uint64_t{1} << 30;
  unsigned threads = 4;
  int repeats = 3;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--bytes") bytes = bench::parse_bytes(argv[i + 1]).value_or(bytes);
    if (flag == "--threads") threads = static_cast<unsigned>(std::stoul(argv[i + 1]));
    if (flag == "--repeats") repeats = std::stoi(argv[i + 1]);
  }
  bench::jump_clock time;
  auto engine = bench::swept_by_hand_engine(time);

  fmt::print("view_upload_bench: {} GiB of view bytes, {} feeding threads, 4 MiB chunks, {} repeats, {} cores\n",
             static_cast<double>(bytes) / (1 << 30), threads, repeats, std::thread::hardware_concurrency());
  fmt::print("| what | GiB/s | × memcpy | commit s |\n|---|---|---|---|\n");
  row copy{"memcpy (yardstick)", {}, {}};
  std::vector<row> out;
  std::uint64_t piece = 0;
  for (bool narrowed : {false, true}) {
    const auto set = make_set(bytes, narrowed);
    auto probe = views::view_plan::create(set.view, set.index, views::registration_facts{bytes, narrowed});
    if (!probe) {
      fmt::print(stderr, "{}\n", probe.error().message);
      return 1;
    }
    const auto& plan = *probe;
    std::vector<std::byte> view(plan.view_size());
    for (std::uint64_t i = 0; i < view.size(); i += 8) {
      const std::uint64_t v = i * 0x9E3779B97F4A7C15ull;
      std::memcpy(view.data() + i, &v, std::min<std::uint64_t>(8, view.size() - i));
    }
    const double gib = static_cast<double>(view.size()) / (1 << 30);
    const std::string name = narrowed ? "narrowed (PIECE)" : "transposed (CANONICAL)";
    row scatter_row{"views::scatter, " + name, {}, {}};
    row touched_row{"views::scatter into resident pages, " + name, {}, {}};
    row feed_row{"engine feed, " + name, {}, {}};
    for (int r = 0; r < repeats; ++r) {
      {
        auto dst = memory::shared_memory::create(view.size(), "bench-memcpy").value();
        const auto t0 = clock_type::now();
        bench::chunked(view.size(), chunk_bytes, threads, [&](std::uint64_t at, std::uint64_t n) {
          std::memcpy(dst.mutable_bytes().data() + at, view.data() + at, n);
        });
        copy.gibs.push_back(gib / bench::seconds_since(t0));
      }
      {
        auto dst = memory::shared_memory::create(set.index.total_size(), "bench-scatter").value();
        const auto t0 = clock_type::now();
        bench::chunked(view.size(), chunk_bytes, threads, [&](std::uint64_t at, std::uint64_t n) {
          (void)views::scatter(plan, at, std::span(view).subspan(at, n), dst.mutable_bytes());
        });
        scatter_row.gibs.push_back(gib / bench::seconds_since(t0));
        // Again into the same, now resident, pages: the scatter without first-touch faults.
        const auto t1 = clock_type::now();
        bench::chunked(view.size(), chunk_bytes, threads, [&](std::uint64_t at, std::uint64_t n) {
          (void)views::scatter(plan, at, std::span(view).subspan(at, n), dst.mutable_bytes());
        });
        touched_row.gibs.push_back(gib / bench::seconds_since(t1));
      }
      {
        registration::begin_request b;
        b.owner_pid = ::getpid();
        b.total_size = narrowed ? plan.view_size() : set.index.total_size();
        b.tensor_index_data = registration::index_data{set.index.json(), "v3", "json"};
        b.view = set.view;
        if (narrowed) b.client_artifact_id = "cgid:bench.piece-" + std::to_string(piece++);
        b.ttl_ms = 60'000;  // a piece's assembly goes with the sweep below
        // The chunks as the daemon holds them once parsed (outside the timer).
        std::vector<std::string> chunks;
        for (std::uint64_t at = 0; at < view.size(); at += chunk_bytes) {
          chunks.emplace_back(reinterpret_cast<const char*>(view.data() + at), std::min(chunk_bytes, view.size() - at));
        }
        const auto t0 = clock_type::now();
        auto begun = engine->begin(b).value();
        std::atomic<bool> failed{false};
        bench::chunked(view.size(), chunk_bytes, threads, [&](std::uint64_t at, std::uint64_t) {
          registration::feed_request f;
          f.registration_id = begun.registration_id;
          f.payload = registration::view_chunk{0, at, std::move(chunks[at / chunk_bytes])};
          if (!engine->feed(std::move(f))) failed = true;
        });
        feed_row.gibs.push_back(gib / bench::seconds_since(t0));
        const auto t1 = clock_type::now();
        auto done = engine->commit(begun.registration_id);
        feed_row.commit_s.push_back(bench::seconds_since(t1));
        if (failed || !done) {
          fmt::print(stderr, "engine path failed: {}\n", done ? "a feed" : done.error().message);
          return 1;
        }
        (void)engine->deregister(registration::deregister_request{done->descriptor.artifact_id});
        time.skip(std::chrono::minutes(2));
        engine->sweep();
      }
    }
    out.push_back(std::move(scatter_row));
    out.push_back(std::move(touched_row));
    out.push_back(std::move(feed_row));
  }
  const double yardstick = bench::median(copy.gibs);
  print(copy, yardstick);
  for (const auto& r : out) print(r, yardstick);
  return 0;
}
