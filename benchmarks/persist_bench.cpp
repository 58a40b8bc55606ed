// persist_bench — persistence to a directory and restore from it, next to plain file I/O of the
// same bytes in the same directory, in the same run (issue #16).
//
// Measures, for one artifact of --bytes (default 1 GiB, one tensor, random bytes):
//   persist   durable_store::write (files under .tmp-*, chunked writes, leaf hashing, fsyncs,
//             rename) next to plain_write: write() of the same bytes in 64 MiB calls + fsync.
//   restore   durable_store::load into a fresh memfd, every leaf's XXH3-128 checked (the
//             daemon's default), next to plain_read: read() of the plain file into a fresh
//             memfd in 64 MiB calls; restore_sha256 checks every leaf's SHA-256 instead.
// Before each read the page cache is dropped: `echo 1 > /proc/sys/vm/drop_caches` where root
// allows (the output says whether it did), and always posix_fadvise(DONTNEED) on the file read,
// which evicts that file's clean pages without privileges. Goals: persist ≥ 0.8 × plain_write,
// restore ≥ 0.8 × plain_read.
//
// Usage: persist_bench [--dir DIR] [--bytes N[K|M|G]] [--repeat R] [--threads T]
//   --dir      where to write (default $TMPDIR or /tmp); a fresh subdirectory is made and removed
//   --repeat   runs of each measurement; the best is reported (default 3)
//   --threads  hashing threads of the store's pool (default: hardware threads)
// Output: one JSON object per line per measurement, then a table. GB = 1e9 bytes.
#include <fcntl.h>
#include <fmt/core.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "bench_support.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/common/unique_fd.hpp"
#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/memory/shared_memory.hpp"
#include "tensorreg/persistence/durable_store.hpp"

namespace {

using tensorreg::bench::parse_bytes;
using tensorreg::bench::process_cpu_seconds;

namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;
constexpr std::size_t kChunk = std::size_t{64} << 20;

[[noreturn]] void die(const std::string& why) {
  fmt::print(stderr, "persist_bench: {}\n", why);
  std::exit(1);
}

template <typename T>
T must(tensorreg::result<T> r, std::string_view what) {
  if (!r) die(fmt::format("{}: {}", what, r.error().message));
  return std::move(*r);
}

void must(const tensorreg::status& s, std::string_view what) {
  if (!s) die(fmt::format("{}: {}", what, s.error().message));
}

// Drops the page cache: globally where root allows, and always this file's clean pages.
bool drop_caches(const std::string& file) {
  ::sync();
  bool global = false;
  {
    std::ofstream proc("/proc/sys/vm/drop_caches");
    if (proc) {
      proc << "1\n";
      proc.flush();
      global = static_cast<bool>(proc);
    }
  }
  tensorreg::unique_fd fd(::open(file.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd) (void)::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_DONTNEED);
  return global;
}

double plain_write(const std::string& path, std::span<const std::byte> bytes) {
  const auto t = clock_type::now();
  tensorreg::unique_fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!fd) die("cannot create " + path);
  for (std::size_t off = 0; off < bytes.size(); off += kChunk) {
    const auto n = std::min(kChunk, bytes.size() - off);
    std::size_t done = 0;
    while (done < n) {
      const auto w = ::write(fd.get(), bytes.data() + off + done, n - done);
      if (w <= 0) die("cannot write " + path);
      done += static_cast<std::size_t>(w);
    }
  }
  if (::fsync(fd.get()) != 0) die("cannot fsync " + path);
  return tensorreg::bench::seconds_since(t);
}

double plain_read(const std::string& path, std::uint64_t size) {
  const auto t = clock_type::now();
  auto memory = must(tensorreg::memory::shared_memory::create(size, "bench-read"), "memfd");
  auto out = memory.mutable_bytes();
  tensorreg::unique_fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) die("cannot open " + path);
  (void)::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_SEQUENTIAL);
  for (std::size_t off = 0; off < out.size();) {
    const auto r = ::pread(fd.get(), out.data() + off, std::min(kChunk, out.size() - off), static_cast<off_t>(off));
    if (r <= 0) die("cannot read " + path);
    off += static_cast<std::size_t>(r);
  }
  return tensorreg::bench::seconds_since(t);
}

}  // namespace

int main(int argc, char** argv) {
  std::string base = std::getenv("TMPDIR") != nullptr ? std::getenv("TMPDIR") : "/tmp";
  std::uint64_t size = std::uint64_t{1} << 30;
  int repeat = 3;
  unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) die(a + " needs a value");
      return argv[++i];
    };
    if (a == "--help" || a == "-h") {
      fmt::print(
          "usage: persist_bench [--dir DIR] [--bytes N[K|M|G]] [--repeat R] [--threads T]\n"
          "  persist (durable_store::write) next to a plain write + fsync of the same bytes, and\n"
          "  restore (durable_store::load, every leaf checked) next to a plain read, in DIR\n"
          "  (default $TMPDIR or /tmp); the page cache is dropped before each read where root\n"
          "  allows, and the file's pages always with posix_fadvise(DONTNEED). Best of R runs\n"
          "  (default 3); T hashing threads (default: hardware threads); default 1 GiB.\n");
      return 0;
    } else if (a == "--dir") {
      base = value();
    } else if (a == "--bytes") {
      auto v = parse_bytes(value());
      if (!v || *v == 0 || *v % 4 != 0) die("--bytes needs a positive multiple of 4");
      size = *v;
    } else if (a == "--repeat") {
      repeat = std::max(1, std::atoi(value().c_str()));
    } else if (a == "--threads") {
      threads = static_cast<unsigned>(std::max(1, std::atoi(value().c_str())));
    } else {
      die("unknown option " + a + " (see --help)");
    }
  }
  const fs::path dir = fs::path(base) / ("persist_bench." + std::to_string(::getpid()));
  fs::create_directories(dir);
  fs::permissions(dir, fs::perms::owner_all);

  // The artifact: one float32 tensor of random bytes in a memfd, and its id.
  auto source = must(tensorreg::memory::shared_memory::create(size, "bench-artifact"), "memfd");
  {
    std::mt19937_64 rng(42);
    auto bytes = source.mutable_bytes();
    for (std::size_t off = 0; off + 8 <= bytes.size(); off += 8) {
      const auto v = rng();
      std::memcpy(bytes.data() + off, &v, 8);
    }
  }
  const auto json = fmt::format(R"({{"w":[0,{},[{}],[1],"torch.float32",0]}})", size, size / 4);
  auto idx = must(tensorreg::index::canonical_index::parse(json, size), "index");
  tensorreg::thread_pool pool(threads > 1 ? threads - 1 : 0);
  const auto data = must(tensorreg::hash::tree_hash(source, &pool), "tree hash");
  tensorreg::persistence::artifact_record record;
  record.index_multihash = tensorreg::hash::encode_multihash(tensorreg::hash::sha256(idx.json()));
  record.data_multihash = tensorreg::hash::encode_multihash(data);
  record.artifact_id = "mi2:" + record.index_multihash + ":" + record.data_multihash;
  record.id_kind = "MI2";
  record.total_size = size;

  tensorreg::persistence::store_options so;
  so.hash_pool = &pool;
  auto store = must(tensorreg::persistence::durable_store::open((dir / "store").string(), so), "open store");
  const std::string plain = (dir / "plain.bin").string();
  const std::string stored =
      (dir / "store" / tensorreg::persistence::durable_store::directory_name(record.artifact_id) / "data.bin").string();

  double best_plain_write = 1e30, best_persist = 1e30, best_plain_read = 1e30, best_restore = 1e30,
         best_restore_sha = 1e30;
  // CPU seconds of the last run of each (for the table: the cost apart from waiting).
  double cpu_plain_write = 0, cpu_persist = 0, cpu_plain_read = 0, cpu_restore = 0, cpu_restore_sha = 0;
  auto cpu_of = [](double& slot, double before) { slot = process_cpu_seconds() - before; };
  bool global_drop = false;
  for (int r = 0; r < repeat; ++r) {
    // Writes: plain and persist alternate, each into a directory that no longer holds the last.
    fs::remove(plain);
    double cpu = process_cpu_seconds();
    best_plain_write = std::min(best_plain_write, plain_write(plain, source.bytes()));
    cpu_of(cpu_plain_write, cpu);
    if (store->contains(record.artifact_id)) must(store->remove(record.artifact_id), "remove");
    ::sync();
    auto t = clock_type::now();
    cpu = process_cpu_seconds();
    must(store->write(record, idx, source), "persist");
    best_persist = std::min(best_persist, tensorreg::bench::seconds_since(t));
    cpu_of(cpu_persist, cpu);
    // Reads, each from a cold page cache.
    global_drop = drop_caches(plain);
    cpu = process_cpu_seconds();
    best_plain_read = std::min(best_plain_read, plain_read(plain, size));
    cpu_of(cpu_plain_read, cpu);
    global_drop = drop_caches(stored) && global_drop;
    t = clock_type::now();
    cpu = process_cpu_seconds();
    auto target = must(tensorreg::memory::shared_memory::create(size, "bench-restore"), "memfd");
    must(store->load(record.artifact_id, target.mutable_bytes()), "restore");
    best_restore = std::min(best_restore, tensorreg::bench::seconds_since(t));
    cpu_of(cpu_restore, cpu);
    {
      auto sha_options = so;
      sha_options.load_check = tensorreg::persistence::leaf_check_kind::sha256;
      auto sha_store =
          must(tensorreg::persistence::durable_store::open((dir / "store").string(), sha_options), "open store");
      global_drop = drop_caches(stored) && global_drop;
      t = clock_type::now();
      cpu = process_cpu_seconds();
      auto sha_target = must(tensorreg::memory::shared_memory::create(size, "bench-restore"), "memfd");
      must(sha_store->load(record.artifact_id, sha_target.mutable_bytes()), "restore (SHA-256)");
      best_restore_sha = std::min(best_restore_sha, tensorreg::bench::seconds_since(t));
      cpu_of(cpu_restore_sha, cpu);
    }
  }
  const double gb = static_cast<double>(size) / 1e9;
  struct row {
    const char* name;
    double seconds;
    double yardstick;
    double cpu;
  };
  const row rows[] = {{"plain_write", best_plain_write, best_plain_write, cpu_plain_write},
                      {"persist", best_persist, best_plain_write, cpu_persist},
                      {"plain_read", best_plain_read, best_plain_read, cpu_plain_read},
                      {"restore", best_restore, best_plain_read, cpu_restore},
                      {"restore_sha256", best_restore_sha, best_plain_read, cpu_restore_sha}};
  for (const auto& x : rows) {
    fmt::print(
        R"({{"bench":"persist","what":"{}","bytes":{},"seconds":{:.4f},"gb_per_s":{:.3f},"ratio":{:.3f},"cpu_seconds":{:.3f},)"
        R"("threads":{},"repeat":{},"global_drop_caches":{}}})"
        "\n",
        x.name, size, x.seconds, gb / x.seconds, x.yardstick / x.seconds, x.cpu, threads, repeat, global_drop);
  }
  fmt::print("\n{:<15} {:>10} {:>10} {:>22} {:>12}\n", "what", "seconds", "GB/s", "ratio to yardstick", "cpu s (last)");
  for (const auto& x : rows) {
    fmt::print("{:<15} {:>10.4f} {:>10.3f} {:>22.3f} {:>12.3f}\n", x.name, x.seconds, gb / x.seconds,
               x.yardstick / x.seconds, x.cpu);
  }
  fmt::print("page cache: {}\n", global_drop ? "dropped globally (drop_caches) and per file"
                                             : "dropped per file only (posix_fadvise DONTNEED; drop_caches refused)");
  std::error_code ec;
  fs::remove_all(dir, ec);
  return 0;
}
