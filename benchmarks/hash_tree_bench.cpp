// hash_tree_bench — throughput of the 4 MiB-leaf SHA-256 tree hash over host memory.
//
// For each buffer size (256 MiB, 1 GiB, 4 GiB by default; sizes that do not fit in available
// memory are skipped) and each thread count (1..hardware threads by default), prints GB/s of
// hash::tree_hash next to the single-core SHA-256 rate of `openssl speed -evp sha256 -bytes
// 16384 -seconds 1` (run and parsed in the same run; if the binary is missing or its output
// cannot be parsed, a 16 KiB in-process EVP measurement is used, and the output says which),
// and the goal 0.9 × threads × single-core.
//
// Usage: hash_tree_bench [--max-bytes N[K|M|G]] [--threads-list 1,2,4] [--sizes 256M,1G]
//                        [--repeat R] [--no-huge-pages]
// Output: one JSON object per line per measurement, then a table. GB = 1e9 bytes. Each
// measurement is the best of --repeat runs (default 3); cpu_gb_per_s is bytes per second of
// process CPU time, which tells hashing cost apart from waiting for a core on a busy machine.
// The buffer is an anonymous mapping with MADV_HUGEPAGE (transparent huge pages) unless
// --no-huge-pages; "huge_pages" in the output says whether the advice was accepted.
#include <openssl/evp.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <fmt/core.h>
#include <sys/mman.h>
#include <sys/sysinfo.h>
#include <time.h>

#include "bench_support.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/memory/byte_source.hpp"

namespace {

using tensorreg::bench::parse_bytes;
using tensorreg::bench::process_cpu_seconds;

using clock_type = std::chrono::steady_clock;

std::vector<std::string_view> split_commas(std::string_view text) {
  std::vector<std::string_view> out;
  while (!text.empty()) {
    const auto at = text.find(',');
    out.push_back(text.substr(0, at));
    if (at == std::string_view::npos) break;
    text.remove_prefix(at + 1);
  }
  return out;
}

std::string human_bytes(std::uint64_t n) {
  if (n % (1ULL << 30) == 0) return fmt::format("{} GiB", n >> 30);
  if (n % (1ULL << 20) == 0) return fmt::format("{} MiB", n >> 20);
  return fmt::format("{} B", n);
}

std::uint64_t available_memory() {
  // MemAvailable from /proc/meminfo; sysinfo's freeram as a fallback.
  if (std::FILE* f = std::fopen("/proc/meminfo", "r")) {
    char line[256];
    while (std::fgets(line, sizeof line, f) != nullptr) {
      unsigned long long kb = 0;
      if (std::sscanf(line, "MemAvailable: %llu kB", &kb) == 1) {
        std::fclose(f);
        return kb * 1024ULL;
      }
    }
    std::fclose(f);
  }
  struct sysinfo info {};
  if (sysinfo(&info) == 0) return static_cast<std::uint64_t>(info.freeram) * info.mem_unit;
  return 0;
}

struct single_core_rate {
  double gb_per_s = 0;
  std::string source;  // "openssl speed" or "in-process EVP"
};

// Runs `openssl speed -evp sha256 -bytes 16384 -seconds 1` and parses its last line:
// "sha256  <rate>k" where <rate> is in 1000s of bytes per second.
std::optional<double> openssl_speed_gb_per_s() {
  std::FILE* pipe = ::popen("openssl speed -evp sha256 -bytes 16384 -seconds 1 2>/dev/null", "r");
  if (pipe == nullptr) return std::nullopt;
  std::string output;
  std::array<char, 512> buffer{};
  while (std::fgets(buffer.data(), static_cast<int>(buffer.size()), pipe) != nullptr) {
    output += buffer.data();
  }
  const int rc = ::pclose(pipe);
  if (rc != 0) return std::nullopt;
  std::optional<double> rate;
  std::size_t start = 0;
  while (start < output.size()) {
    auto end = output.find('\n', start);
    if (end == std::string::npos) end = output.size();
    const std::string line = output.substr(start, end - start);
    start = end + 1;
    char name[64] = {};
    double kbytes = 0;
    if (std::sscanf(line.c_str(), "%63s %lfk", name, &kbytes) == 2 &&
        std::string_view(name).find("sha256") != std::string_view::npos && kbytes > 0) {
      rate = kbytes * 1e3 / 1e9;
    }
  }
  return rate;
}

double in_process_gb_per_s() {
  EVP_MD* md = EVP_MD_fetch(nullptr, "SHA256", nullptr);
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  std::vector<unsigned char> block(16384, 0x5a);
  std::array<unsigned char, EVP_MAX_MD_SIZE> out{};
  std::uint64_t bytes = 0;
  const auto start = clock_type::now();
  const auto deadline = start + std::chrono::seconds(1);
  while (clock_type::now() < deadline) {
    for (int i = 0; i < 64; ++i) {
      EVP_DigestInit_ex2(ctx, md, nullptr);
      EVP_DigestUpdate(ctx, block.data(), block.size());
      EVP_DigestFinal_ex(ctx, out.data(), nullptr);
      bytes += block.size();
    }
  }
  const double seconds = std::chrono::duration<double>(clock_type::now() - start).count();
  EVP_MD_CTX_free(ctx);
  EVP_MD_free(md);
  return static_cast<double>(bytes) / seconds / 1e9;
}

single_core_rate measure_single_core() {
  if (const auto rate = openssl_speed_gb_per_s()) return {*rate, "openssl speed"};
  return {in_process_gb_per_s(), "in-process EVP (openssl binary missing or unparsable)"};
}

// An anonymous private mapping, with transparent huge pages requested unless told otherwise
// (weights are large and long-lived; 4 KiB pages cost ~30 % of the hash rate in TLB misses).
class host_buffer {
 public:
  host_buffer(std::uint64_t size, bool huge_pages) : size_(static_cast<std::size_t>(size)) {
    void* p = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("cannot map " + std::to_string(size) + " bytes");
    data_ = static_cast<std::byte*>(p);
    if (huge_pages) huge_ = ::madvise(p, size_, MADV_HUGEPAGE) == 0;
  }
  host_buffer(const host_buffer&) = delete;
  host_buffer& operator=(const host_buffer&) = delete;
  ~host_buffer() { ::munmap(data_, size_); }
  [[nodiscard]] std::byte* data() const noexcept { return data_; }
  [[nodiscard]] bool huge_pages() const noexcept { return huge_; }

 private:
  std::byte* data_ = nullptr;
  std::size_t size_;
  bool huge_ = false;
};

void usage(std::FILE* to = stderr) {
  std::fprintf(to,
               "usage: hash_tree_bench [--max-bytes N[K|M|G]] [--threads-list 1,2,4]\n"
               "                       [--sizes 256M,1G,4G] [--repeat R] [--no-huge-pages]\n");
}

}  // namespace

int main(int argc, char** argv) try {
  const unsigned hw = std::max(1U, std::thread::hardware_concurrency());
  std::vector<std::uint64_t> sizes = {256ULL << 20, 1ULL << 30, 4ULL << 30};
  std::vector<unsigned> threads_list;
  std::uint64_t max_bytes = 0;  // 0: only the available-memory limit
  int repeat = 3;
  bool huge_pages = true;

  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    const auto value = [&]() -> std::string_view {
      if (i + 1 >= argc) {
        usage();
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "--help" || arg == "-h") {
      usage(stdout);
      return 0;
    } else if (arg == "--max-bytes") {
      const auto v = parse_bytes(value());
      if (!v) return usage(), 2;
      max_bytes = *v;
    } else if (arg == "--threads-list") {
      for (const auto part : split_commas(value())) {
        const auto v = parse_bytes(part);
        if (!v || *v == 0 || *v > 1024) return usage(), 2;
        threads_list.push_back(static_cast<unsigned>(*v));
      }
    } else if (arg == "--sizes") {
      sizes.clear();
      for (const auto part : split_commas(value())) {
        const auto v = parse_bytes(part);
        if (!v || *v == 0) return usage(), 2;
        sizes.push_back(*v);
      }
    } else if (arg == "--no-huge-pages") {
      huge_pages = false;
    } else if (arg == "--repeat") {
      const auto v = parse_bytes(value());
      if (!v || *v == 0) return usage(), 2;
      repeat = static_cast<int>(*v);
    } else {
      usage();
      return 2;
    }
  }
  if (threads_list.empty()) {
    for (unsigned t = 1; t <= hw; ++t) threads_list.push_back(t);
  }

  const single_core_rate single = measure_single_core();
  fmt::print(
      "{{\"bench\":\"hash_tree\",\"kind\":\"single_core_sha256\",\"gb_per_s\":{:.3f},"
      "\"source\":\"{}\",\"hardware_threads\":{}}}\n",
      single.gb_per_s, single.source, hw);

  struct row {
    std::uint64_t bytes;
    unsigned threads;
    double gb_per_s;
    double goal;
    double cpu_gb_per_s;
  };
  std::vector<row> rows;

  for (const std::uint64_t size : sizes) {
    const std::uint64_t available = available_memory();
    // Leave headroom: the buffer plus 25 % of what is available for everything else.
    if ((max_bytes != 0 && size > max_bytes) || size > available / 4 * 3) {
      fmt::print("{{\"bench\":\"hash_tree\",\"kind\":\"skipped\",\"bytes\":{},\"reason\":\"{}\"}}\n", size,
                 max_bytes != 0 && size > max_bytes ? "above --max-bytes" : "does not fit in available memory");
      continue;
    }
    const host_buffer buffer(size, huge_pages);
    // Touch and fill every page with a cheap pattern, so the timing sees no page faults.
    for (std::uint64_t i = 0; i < size; i += 8) {
      const std::uint64_t v = i * 0x9E3779B97F4A7C15ULL;
      std::memcpy(buffer.data() + i, &v, std::min<std::uint64_t>(8, size - i));
    }
    const tensorreg::memory::host_bytes_view source(
        std::span<const std::byte>(buffer.data(), static_cast<std::size_t>(size)));

    std::optional<tensorreg::hash::digest> reference;
    for (const unsigned threads : threads_list) {
      // The caller takes part in parallel_for, so threads - 1 workers give `threads` hashers.
      tensorreg::thread_pool pool(threads - 1);
      double best = 0;
      double best_cpu = 0;
      for (int r = 0; r < repeat; ++r) {
        const double cpu_start = process_cpu_seconds();
        const auto start = clock_type::now();
        auto root = tensorreg::hash::tree_hash(source, &pool);
        const double seconds = std::chrono::duration<double>(clock_type::now() - start).count();
        const double cpu_seconds = process_cpu_seconds() - cpu_start;
        if (!root) {
          std::fprintf(stderr, "tree_hash failed: %s\n", root.error().message.c_str());
          return 1;
        }
        if (!reference) reference = *root;
        if (*root != *reference) {
          std::fprintf(stderr, "tree_hash differs between thread counts\n");
          return 1;
        }
        best = std::max(best, static_cast<double>(size) / seconds / 1e9);
        best_cpu = std::max(best_cpu, static_cast<double>(size) / cpu_seconds / 1e9);
      }
      const double goal = 0.9 * threads * single.gb_per_s;
      rows.push_back({size, threads, best, goal, best_cpu});
      fmt::print(
          "{{\"bench\":\"hash_tree\",\"kind\":\"tree_hash\",\"bytes\":{},\"threads\":{},"
          "\"gb_per_s\":{:.3f},\"single_core_gb_per_s\":{:.3f},\"goal_gb_per_s\":{:.3f},"
          "\"ratio_to_goal\":{:.3f},\"cpu_gb_per_s\":{:.3f},\"huge_pages\":{},\"repeat\":{},"
          "\"root\":\"{}\"}}\n",
          size, threads, best, single.gb_per_s, goal, best / goal, best_cpu, buffer.huge_pages(), repeat,
          tensorreg::hash::encode_multihash(*reference));
    }
  }

  fmt::print("\nsingle-core SHA-256 ({}): {:.3f} GB/s; hardware threads: {}\n", single.source, single.gb_per_s, hw);
  fmt::print("{:>10} {:>8} {:>10} {:>10} {:>9} {:>14}\n", "size", "threads", "GB/s", "goal GB/s", "vs goal",
             "GB/CPU-second");
  for (const auto& r : rows) {
    fmt::print("{:>10} {:>8} {:>10.3f} {:>10.3f} {:>8.0f}% {:>14.3f}\n", human_bytes(r.bytes), r.threads, r.gb_per_s,
               r.goal, 100.0 * r.gb_per_s / r.goal, r.cpu_gb_per_s);
  }
  fmt::print(
      "GB/CPU-second: bytes per second of process CPU time; near the single-core rate when\n"
      "hashing is efficient even if other load makes the wall-clock rate lower.\n");
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "hash_tree_bench: %s\n", e.what());
  return 1;
}
