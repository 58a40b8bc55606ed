// tensorreg_gpu_tests: the engine's real device memory (tensorreg/cuda/device_memory_provider.hpp) —
// CUDA IPC mappings of a producer child process (tensorreg_gpu_producer: handles cannot be
// opened by the process that exported them), daemon-owned buffers of the coalesced plan, and
// registrations through the engine whose ids must equal the host computation.
//
// Named *_tests.cpp so the CPU suite's glob does not pick it up; runs only where a CUDA
// device is present (gpu_main.cpp exits 77 otherwise).
#include "tensorreg/cuda/device_memory_provider.hpp"

#include <catch2/catch.hpp>

#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "client/raw_connection.hpp"
#include "gpu_fill.hpp"
#include "provider_support.hpp"
#include "support/daemon_process.hpp"
#include "support/engine_helpers.hpp"
#include "tensorreg/cuda/gpu_tree_hash.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/identity/content_id.hpp"

extern char** environ;

namespace {

using namespace tensorreg;
using tensorreg::cuda::device_memory_provider;
using tensorreg::cuda::device_source;
namespace reg = tensorreg::registration;
namespace t = tensorreg::testing;

constexpr std::uint64_t mib = std::uint64_t{1} << 20;

std::string self_dir() {
  std::error_code ec;
  auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::string(".") : exe.parent_path().string();
}

std::string producer_path() {
  if (const char* env = std::getenv("TENSORREG_GPU_PRODUCER"); env != nullptr && *env != '\0') return env;
  return self_dir() + "/tensorreg_gpu_producer";
}

std::string from_hex(const std::string& hex) {
  std::string out;
  for (std::size_t i = 0; i + 1 < hex.size(); i += 2) {
    out += static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16));
  }
  return out;
}

/// A child process started with posix_spawn, its stdin and stdout on pipes.
class child_process {
 public:
  explicit child_process(const std::vector<std::string>& argv) {
    int in[2];
    int out[2];
    REQUIRE(::pipe2(in, O_CLOEXEC) == 0);
    REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, in[0], 0);
    posix_spawn_file_actions_adddup2(&actions, out[1], 1);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    const int rc = ::posix_spawn(&pid_, args[0], &actions, nullptr, args.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    ::close(in[0]);
    ::close(out[1]);
    stdin_ = in[1];
    stdout_ = ::fdopen(out[0], "r");
    INFO("posix_spawn " << argv[0]);
    REQUIRE(rc == 0);
  }
  child_process(const child_process&) = delete;
  child_process& operator=(const child_process&) = delete;
  ~child_process() {
    close_stdin();
    static_cast<void>(wait());
    if (stdout_ != nullptr) std::fclose(stdout_);
  }

  /// One line of its stdout without the newline; empty at EOF.
  std::string read_line() {
    char buf[1024];
    if (std::fgets(buf, sizeof buf, stdout_) == nullptr) return {};
    std::string line = buf;
    if (!line.empty() && line.back() == '\n') line.pop_back();
    return line;
  }
  /// Everything left on its stdout.
  std::string read_all() {
    std::string all;
    char buf[4096];
    std::size_t n = 0;
    while ((n = std::fread(buf, 1, sizeof buf, stdout_)) > 0) all.append(buf, n);
    return all;
  }
  void close_stdin() {
    if (stdin_ >= 0) ::close(stdin_);
    stdin_ = -1;
  }
  void kill(int signal) { ::kill(pid_, signal); }
  /// Its wait status (once reaped, the same again).
  int wait() {
    if (!reaped_) {
      while (::waitpid(pid_, &status_, 0) < 0 && errno == EINTR) {
      }
      reaped_ = true;
    }
    return status_;
  }
  [[nodiscard]] pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
  int stdin_ = -1;
  std::FILE* stdout_ = nullptr;
  bool reaped_ = false;
  int status_ = 0;
};

struct allocation_spec {
  std::uint64_t size;
  std::uint64_t seed;
};

/// tensorreg_gpu_producer with some allocations; their handles and host copies of their bytes.
class producer {
 public:
  explicit producer(const std::vector<allocation_spec>& specs) : specs_(specs), child_(argv(specs)) {
    for (;;) {
      const std::string line = child_.read_line();
      INFO("producer said: '" << line << "'");
      REQUIRE_FALSE(line.empty());
      if (line == "ready") break;
      REQUIRE(line.rfind("handle ", 0) == 0);
      const auto space = line.find(' ', 7);
      handles_.push_back(from_hex(line.substr(7, space - 7)));
      REQUIRE(std::stoull(line.substr(space + 1)) == specs_[handles_.size() - 1].size);
    }
    REQUIRE(handles_.size() == specs_.size());
  }

  [[nodiscard]] const std::string& handle(std::size_t i) const { return handles_.at(i); }
  [[nodiscard]] std::uint64_t size(std::size_t i) const { return specs_.at(i).size; }
  /// Bytes [offset, offset + length) of allocation i, computed on the host.
  [[nodiscard]] std::string bytes(std::size_t i, std::uint64_t offset, std::uint64_t length) const {
    std::string all(offset + length, '\0');
    cuda::testing::fill_random_host(reinterpret_cast<std::byte*>(all.data()), all.size(), specs_.at(i).seed);
    return all.substr(offset);
  }
  [[nodiscard]] std::int32_t pid() const { return static_cast<std::int32_t>(child_.pid()); }
  child_process& process() { return child_; }

 private:
  static std::vector<std::string> argv(const std::vector<allocation_spec>& specs) {
    std::vector<std::string> out{producer_path()};
    for (const auto& s : specs) out.push_back(std::to_string(s.size) + ":" + std::to_string(s.seed));
    return out;
  }
  std::vector<allocation_spec> specs_;
  child_process child_;
  std::vector<std::string> handles_;
};

using tensorreg::cuda::testing::make_provider;
using tensorreg::cuda::testing::read_all;

/// Forwards to the real provider and remembers the buffers it allocated, so a test can write
/// a coalesced buffer through its device pointer as a client would through its mapping.
class recording_devices final : public reg::device_memory {
 public:
  explicit recording_devices(std::shared_ptr<device_memory_provider> real) : real_(std::move(real)) {}
  result<std::shared_ptr<const memory::byte_source>> open_ipc(std::int32_t owner_pid, std::int32_t device_id,
                                                              std::string_view ipc_handle,
                                                              std::uint64_t min_bytes) override {
    return real_->open_ipc(owner_pid, device_id, ipc_handle, min_bytes);
  }
  result<reg::device_buffer> allocate(std::int32_t device_id, std::uint64_t bytes) override {
    auto out = real_->allocate(device_id, bytes);
    if (out) {
      std::lock_guard lock(mutex_);
      allocated_.push_back(out->bytes);
    }
    return out;
  }
  [[nodiscard]] std::size_t open_mappings() const override { return real_->open_mappings(); }
  [[nodiscard]] std::optional<result<hash::digest>> tree_hash_on_device(
      const memory::segmented_view& canonical) override {
    return real_->tree_hash_on_device(canonical);
  }
  [[nodiscard]] std::optional<result<reg::host_copy>> copy_to_host(const memory::byte_source& source, bool want_digest,
                                                                   thread_pool& pool) override {
    return real_->copy_to_host(source, want_digest, pool);
  }
  std::shared_ptr<const memory::byte_source> last() {
    std::lock_guard lock(mutex_);
    return allocated_.empty() ? nullptr : allocated_.back();
  }

 private:
  std::shared_ptr<device_memory_provider> real_;
  std::mutex mutex_;
  std::vector<std::shared_ptr<const memory::byte_source>> allocated_;
};

reg::storage_entry ipc_entry(const std::string& id, const std::string& handle, std::uint64_t base,
                             std::uint64_t length) {
  reg::storage_entry e;
  e.storage_id = id;
  e.device_id = 0;
  e.storage_length = length;
  e.source = reg::cuda_ipc_source{handle};
  e.mapping_base_offset = base;
  return e;
}

/// A model over two producer allocations: a slab (0) with three storages at offsets, and a
/// separate allocation (1) with one; plus the storage entries that point into them.
struct slab_model {
  t::model m;
  std::map<std::string, reg::storage_entry> entries;
};

constexpr std::uint64_t slab_bytes = 3 * mib;
constexpr std::uint64_t other_bytes = mib + 100;

slab_model make_slab_model(const producer& p) {
  struct placed {
    std::string id;
    std::size_t allocation;
    std::uint64_t base;
    std::uint64_t length;
  };
  const std::vector<placed> storages = {
      {"slab.a", 0, 0, mib},
      {"slab.b", 0, mib + 512, 256 * 1024 + 8},
      {"slab.c", 0, 2 * mib, mib - 64},
      {"other", 1, 0, other_bytes},
  };
  slab_model out;
  for (const auto& s : storages) {
    out.m.storages.push_back({s.id, p.bytes(s.allocation, s.base, s.length)});
    out.entries.emplace(s.id, ipc_entry(s.id, p.handle(s.allocation), s.base, s.length));
  }
  out.m.tensors = {
      {"w.a", "slab.a", {262144}, {1}, "torch.float32", 0, mib},
      {"w.a.head", "slab.a", {1024}, {1}, "torch.float32", 1024, 4096},
      {"w.b", "slab.b", {65538}, {1}, "torch.float32", 0, 256 * 1024 + 8},
      {"w.c", "slab.c", {2, 131064}, {131064, 1}, "torch.float32", 0, mib - 64},
      {"x", "other", {static_cast<std::int64_t>(other_bytes)}, {1}, "torch.uint8", 0, other_bytes},
  };
  return out;
}

}  // namespace

TEST_CASE("cuda device_memory: create finds this machine's devices", "[cuda][device_memory]") {
  auto provider = make_provider();
  CHECK(provider->device_count() >= 1);
  CHECK(provider->open_mappings() == 0);
  auto zero_chunk = device_memory_provider::create({0, 1});
  CHECK_ERROR(zero_chunk, errc::invalid_argument,
              "cannot create the CUDA device memory provider: staging_chunk_bytes is 0");
}

TEST_CASE("cuda device_memory: open_ipc maps a producer's allocation and visit reads its bytes",
          "[cuda][device_memory]") {
  const std::uint64_t size = 5 * mib + 123;
  producer p({{size, 7}});
  // 1 MiB chunks: the read crosses several double-buffered chunks and ends in a short one.
  auto provider = make_provider({mib, 4});
  auto opened = provider->open_ipc(p.pid(), 0, p.handle(0), size);
  REQUIRE_OK(opened);
  const auto& source = **opened;
  CHECK(source.size() >= size);  // the allocation may be rounded up by the allocator
  const std::string expected = p.bytes(0, 0, size);
  CHECK(read_all(source, 0, size) == expected);
  CHECK(read_all(source, 1000, 3 * mib + 5) == expected.substr(1000, 3 * mib + 5));
  CHECK(read_all(source, size - 1, 1) == expected.substr(size - 1));

  // Pieces come in staging-chunk sizes, consecutive.
  std::vector<std::size_t> pieces;
  auto visited = source.visit(10, 2 * mib + 10, [&](std::span<const std::byte> piece) -> status {
    pieces.push_back(piece.size());
    return {};
  });
  REQUIRE_OK(visited);
  CHECK(pieces == std::vector<std::size_t>{mib, mib, 10});

  // A failing sink stops the visit and its error comes back.
  int calls = 0;
  auto stopped = source.visit(0, 3 * mib, [&](std::span<const std::byte>) -> status {
    ++calls;
    return fail(errc::data_loss, "sink says no");
  });
  CHECK_ERROR(stopped, errc::data_loss, "sink says no");
  CHECK(calls == 1);
  CHECK_CODE(source.visit(size - 10, source.size(), [](std::span<const std::byte>) -> status { return {}; }),
             errc::out_of_range);

  // Many threads at once, overlapping ranges (Catch is not thread-safe: collect, then check).
  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&, i] {
      const std::uint64_t offset = static_cast<std::uint64_t>(i) * 300'000;
      const std::uint64_t length = 2 * mib + static_cast<std::uint64_t>(i) * 77;
      for (int round = 0; round < 4; ++round) {
        std::string got(length, '\0');
        auto done = source.read(offset, std::as_writable_bytes(std::span<char>(got)));
        if (!done || got != expected.substr(offset, length)) ++mismatches;
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(mismatches == 0);

  // A device source: the GPU tree hash reads it in place and agrees with the host.
  const auto* device = cuda::as_device_source(source);
  REQUIRE(device != nullptr);
  CHECK(device->device() == 0);
  CHECK(device->device_pointer() != nullptr);
  auto on_gpu = cuda::tree_hash_device(device->device_pointer(), size, {}, 0);
  REQUIRE_OK(on_gpu);
  t::owned_bytes host(expected);
  auto on_host = hash::tree_hash(host);
  REQUIRE_OK(on_host);
  CHECK(*on_gpu == *on_host);
  CHECK(cuda::as_device_source(host) == nullptr);
}

TEST_CASE("cuda device_memory: the same handle is mapped once and closed with its last holder",
          "[cuda][device_memory]") {
  producer p({{2 * mib, 3}, {mib, 4}});
  auto provider = make_provider();
  auto first = provider->open_ipc(p.pid(), 0, p.handle(0), mib);
  REQUIRE_OK(first);
  auto second = provider->open_ipc(p.pid(), 0, p.handle(0), 2 * mib);
  REQUIRE_OK(second);
  CHECK(first->get() == second->get());
  CHECK(provider->open_mappings() == 1);
  // Another process's handle with the same bytes would be another key; another allocation is.
  auto other = provider->open_ipc(p.pid(), 0, p.handle(1), 1);
  REQUIRE_OK(other);
  CHECK(provider->open_mappings() == 2);
  other->reset();
  CHECK(provider->open_mappings() == 1);
  first->reset();
  CHECK(provider->open_mappings() == 1);
  CHECK(read_all(**second, 0, 16) == p.bytes(0, 0, 16));
  second->reset();
  CHECK(provider->open_mappings() == 0);
  // Closed for real: it opens again.
  auto again = provider->open_ipc(p.pid(), 0, p.handle(0), 2 * mib);
  REQUIRE_OK(again);
  CHECK(provider->open_mappings() == 1);
  CHECK(read_all(**again, 2 * mib - 16, 16) == p.bytes(0, 2 * mib - 16, 16));
  // Sources outlive their provider.
  provider.reset();
  CHECK(read_all(**again, 0, 16) == p.bytes(0, 0, 16));
}

TEST_CASE("cuda device_memory: open_ipc errors carry the spec's codes", "[cuda][device_memory]") {
  producer p({{mib, 5}});
  auto provider = make_provider();
  const std::string where = "cannot open CUDA IPC handle of process " + std::to_string(p.pid()) + " on device ";

  SECTION("an allocation smaller than min_bytes is OUT_OF_RANGE, first open or cached") {
    auto too_big = provider->open_ipc(p.pid(), 0, p.handle(0), 64 * mib);
    REQUIRE_FALSE(too_big);
    CHECK(too_big.error().code == errc::out_of_range);
    CHECK_THAT(too_big.error().message, Catch::StartsWith(where + "0: the allocation holds ") &&
                                            Catch::EndsWith("bytes, fewer than the 67108864 needed"));
    CHECK(provider->open_mappings() == 0);
    auto held = provider->open_ipc(p.pid(), 0, p.handle(0), mib);
    REQUIRE_OK(held);
    CHECK_CODE(provider->open_ipc(p.pid(), 0, p.handle(0), 64 * mib), errc::out_of_range);
    CHECK(provider->open_mappings() == 1);
  }
  SECTION("a device this process does not have is FAILED_PRECONDITION") {
    const auto missing = provider->device_count();
    CHECK_ERROR(provider->open_ipc(p.pid(), missing, p.handle(0), 1), errc::failed_precondition,
                where + std::to_string(missing) + ": no such CUDA device (" + std::to_string(missing) + " present)");
    CHECK_CODE(provider->open_ipc(p.pid(), -1, p.handle(0), 1), errc::failed_precondition);
  }
  SECTION("a handle of the wrong size is INVALID_ARGUMENT") {
    CHECK_ERROR(provider->open_ipc(p.pid(), 0, p.handle(0).substr(0, 63), 1), errc::invalid_argument,
                where + "0: a handle has 64 bytes, got 63");
    CHECK_CODE(provider->open_ipc(p.pid(), 0, "", 1), errc::invalid_argument);
  }
  SECTION("garbage handle bytes are INVALID_ARGUMENT with the CUDA error") {
    std::string garbage = p.handle(0);
    for (std::size_t i = 0; i < garbage.size(); ++i) garbage[i] = static_cast<char>(garbage[i] ^ 0x5a ^ i);
    auto opened = provider->open_ipc(p.pid(), 0, garbage, 1);
    REQUIRE_FALSE(opened);
    CHECK(opened.error().code == errc::invalid_argument);
    CHECK_THAT(opened.error().message, Catch::StartsWith(where + "0: cudaError"));
    WARN("garbage handle: " << opened.error().message);
    auto zeros = provider->open_ipc(p.pid(), 0, std::string(64, '\0'), 1);
    REQUIRE_FALSE(zeros);
    CHECK(zeros.error().code == errc::invalid_argument);
    WARN("zero handle: " << zeros.error().message);
    CHECK(provider->open_mappings() == 0);
    // The context is still good: a real handle opens afterwards.
    auto real = provider->open_ipc(p.pid(), 0, p.handle(0), mib);
    REQUIRE_OK(real);
    CHECK(read_all(**real, 0, 64) == p.bytes(0, 0, 64));
  }
  SECTION("a handle whose exporter exited is INVALID_ARGUMENT") {
    std::string stale;
    std::int32_t stale_pid = 0;
    {
      producer gone({{mib, 6}});
      stale = gone.handle(0);
      stale_pid = gone.pid();
    }  // stdin closed: it freed its memory and exited
    auto opened = provider->open_ipc(stale_pid, 0, stale, 1);
    REQUIRE_FALSE(opened);
    CHECK(opened.error().code == errc::invalid_argument);
    WARN("stale handle: " << opened.error().message);
  }
}

TEST_CASE("cuda device_memory: allocate gives a zeroed, exported device buffer", "[cuda][device_memory]") {
  auto provider = make_provider();
  auto buffer = provider->allocate(0, 3 * mib + 5);
  REQUIRE_OK(buffer);
  CHECK(buffer->ipc_handle.size() == 64);
  REQUIRE(buffer->bytes->size() == 3 * mib + 5);
  CHECK(read_all(*buffer->bytes, 0, 3 * mib + 5) == std::string(3 * mib + 5, '\0'));
  const auto* device = cuda::as_device_source(*buffer->bytes);
  REQUIRE(device != nullptr);
  const std::string text = "written through the device pointer";
  REQUIRE(cudaMemcpy(const_cast<void*>(device->device_pointer()), text.data(), text.size(), cudaMemcpyHostToDevice) ==
          cudaSuccess);
  CHECK(read_all(*buffer->bytes, 0, text.size()) == text);

  CHECK_ERROR(provider->allocate(0, 0), errc::invalid_argument,
              "cannot allocate 0 bytes of device memory on device 0: the size is 0");
  CHECK_CODE(provider->allocate(provider->device_count(), 16), errc::failed_precondition);
  auto huge = provider->allocate(0, std::uint64_t{1} << 50);
  REQUIRE_FALSE(huge);
  CHECK(huge.error().code == errc::resource_exhausted);
  CHECK_THAT(huge.error().message,
             Catch::StartsWith("cannot allocate 1125899906842624 bytes of device memory on device 0: cudaError"));
}

TEST_CASE("cuda device_memory: a LIP registration over producer handles gets the host-computed id",
          "[cuda][device_memory][engine]") {
  producer p({{slab_bytes, 21}, {other_bytes, 22}});
  // Both hashing paths must give the host-computed id: all host cores, and the GPU gather +
  // tree hash (forced here either way).
  const bool on_gpu = GENERATE(false, true);
  device_memory_provider::options opts;
  opts.placement = on_gpu ? device_memory_provider::options::hash_placement::gpu
                          : device_memory_provider::options::hash_placement::host;
  auto provider = make_provider(opts);
  t::fake_clock clock;
  auto options = t::deterministic_options(clock);
  options.devices = provider;
  auto e = t::make_engine(options);
  const auto sm = make_slab_model(p);

  auto begun = e->begin(t::lip_begin(sm.m.total_size(), p.pid()));
  REQUIRE_OK(begun);
  REQUIRE_OK(e->feed(t::lip_feed(begun->registration_id, sm.m, sm.entries)));
  auto committed = e->commit(begun->registration_id);
  REQUIRE_OK(committed);
  CHECK(committed->descriptor.artifact_id == t::expected_mi2(sm.m.index().json(), sm.m.canonical()));
  CHECK(provider->device_hashes() == (on_gpu ? 1u : 0u));
  // Four storages, two allocations: two opens, held by the lease.
  CHECK(provider->open_mappings() == 2);
  CHECK(e->stats().open_mappings == 2);
  CHECK(e->stats().leases == 1);

  auto bytes = e->open_bytes(committed->descriptor.artifact_id);
  REQUIRE_OK(bytes);
  CHECK(read_all(**bytes, 0, (*bytes)->size()) == sm.m.canonical());
  bytes->reset();

  // A second registration of the same memory reuses the open mappings.
  auto again = e->begin(t::lip_begin(sm.m.total_size(), p.pid()));
  REQUIRE_OK(again);
  REQUIRE_OK(e->feed(t::lip_feed(again->registration_id, sm.m, sm.entries)));
  CHECK_CODE(e->commit(again->registration_id), errc::already_exists);
  CHECK(provider->open_mappings() == 2);

  e->revoke(begun->registration_id, "test done");
  CHECK(provider->open_mappings() == 0);
  CHECK(e->stats().open_mappings == 0);
}

TEST_CASE("cuda device_memory: a coalesced registration written through the device pointer gets the host-computed id",
          "[cuda][device_memory][engine]") {
  // Both hashing paths must give the host-computed id: all host cores, and the GPU gather +
  // tree hash (forced here either way).
  const bool on_gpu = GENERATE(false, true);
  device_memory_provider::options opts;
  opts.placement = on_gpu ? device_memory_provider::options::hash_placement::gpu
                          : device_memory_provider::options::hash_placement::host;
  auto provider = make_provider(opts);
  auto devices = std::make_shared<recording_devices>(provider);
  t::fake_clock clock;
  auto options = t::deterministic_options(clock);
  options.devices = devices;
  auto e = t::make_engine(options);

  t::model m = t::small_model();
  m.storages.push_back({"big", t::pattern(5 * mib + 12, 9)});  // crosses a 4 MiB leaf
  m.tensors.push_back(
      {"big", "big", {static_cast<std::int64_t>((5 * mib + 12) / 4)}, {1}, "torch.float32", 0, 5 * mib + 12});
  auto begin = t::stable_begin(m, static_cast<std::int32_t>(::getpid()));
  begin.plan = reg::coalesced_options{};
  auto begun = e->begin(begin);
  REQUIRE_OK(begun);
  const auto& hs = std::get<reg::coalesced_handshake>(begun->handshake);
  CHECK(hs.daemon_ipc_handle.size() == 64);
  auto buffer = devices->last();
  REQUIRE(buffer != nullptr);
  REQUIRE(buffer->size() == m.total_size());
  const auto* device = cuda::as_device_source(*buffer);
  REQUIRE(device != nullptr);
  const std::string uploaded = m.canonical_with_pad('\xab');
  REQUIRE(cudaMemcpy(const_cast<void*>(device->device_pointer()), uploaded.data(), uploaded.size(),
                     cudaMemcpyHostToDevice) == cudaSuccess);
  buffer.reset();

  auto committed = e->commit(begun->registration_id);
  REQUIRE_OK(committed);
  CHECK(committed->descriptor.artifact_id == t::expected_mi2(m.index().json(), m.canonical()));
  CHECK(provider->device_hashes() == (on_gpu ? 1u : 0u));  // PAD (0xab here) gathered as zero
  auto bytes = e->open_bytes(committed->descriptor.artifact_id);
  REQUIRE_OK(bytes);
  CHECK(read_all(**bytes, 0, (*bytes)->size()) == m.canonical());
}

// Run in a child process by the next test: reading memory whose exporter died may leave this
// process's CUDA context unusable, which must not take the rest of the suite with it.
TEST_CASE("cuda device_memory: (child) a lease on a SIGKILLed producer's memory", "[.][sigkill_child]") {
  producer p({{slab_bytes, 21}, {other_bytes, 22}});
  auto provider = make_provider();
  t::fake_clock clock;
  auto options = t::deterministic_options(clock);
  options.devices = provider;
  auto e = t::make_engine(options);
  const auto sm = make_slab_model(p);
  auto begun = e->begin(t::lip_begin(sm.m.total_size(), p.pid()));
  REQUIRE_OK(begun);
  REQUIRE_OK(e->feed(t::lip_feed(begun->registration_id, sm.m, sm.entries)));
  auto committed = e->commit(begun->registration_id);
  REQUIRE_OK(committed);
  REQUIRE(provider->open_mappings() == 2);

  p.process().kill(SIGKILL);
  const int status = p.process().wait();
  REQUIRE(WIFSIGNALED(status));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));

  auto bytes = e->open_bytes(committed->descriptor.artifact_id);
  REQUIRE_OK(bytes);
  std::string seen((*bytes)->size(), '\0');
  auto read = (*bytes)->read(0, std::as_writable_bytes(std::span<char>(seen)));
  if (read) {
    std::printf("sigkill: lease read after SIGKILL: ok, bytes %s\n", seen == sm.m.canonical() ? "intact" : "CHANGED");
  } else {
    std::printf("sigkill: lease read after SIGKILL failed cleanly: %s: %s\n",
                std::string(errc_name(read.error().code)).c_str(), read.error().message.c_str());
  }
  bytes->reset();
  e->revoke(begun->registration_id, "producer killed");
  std::printf("sigkill: open mappings after revoke: %zu\n", provider->open_mappings());
  std::fflush(stdout);
  CHECK(provider->open_mappings() == 0);
}

TEST_CASE("cuda device_memory: a producer killed while a lease holds its mapping crashes nothing",
          "[cuda][device_memory][engine]") {
  child_process self({self_dir() + "/tensorreg_gpu_tests", "[sigkill_child]"});
  self.close_stdin();
  const std::string output = self.read_all();
  const int status = self.wait();
  WARN(output);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK_THAT(output, Catch::Contains("sigkill: lease read after SIGKILL"));
  CHECK_THAT(output, Catch::Contains("sigkill: open mappings after revoke: 0"));
}

TEST_CASE("cuda device_memory: a VRAM region is opened once for all the storages taken from it",
          "[cuda][device_memory][engine]") {
  producer p({{slab_bytes, 31}, {other_bytes, 32}});
  auto provider = make_provider();
  t::fake_clock clock;
  auto options = t::deterministic_options(clock);
  options.devices = provider;
  auto e = t::make_engine(options);
  auto sm = make_slab_model(p);

  regions::register_request r;
  r.kind = regions::memory_kind::vram;
  r.owner_pid = p.pid();
  r.size_bytes = slab_bytes;
  r.device_id = 0;
  r.cuda_ipc_handle = p.handle(0);
  auto region = e->register_region(std::move(r));
  REQUIRE_OK(region);
  // The slab's three storages come from the region (by vram_region_id and by region_ref); the
  // other allocation stays a plain handle.
  sm.entries.at("slab.a").source = reg::vram_region_source{region->id};
  sm.entries.at("slab.b").source = reg::vram_region_source{region->id};
  sm.entries.at("slab.c").source = reg::region_ref_source{region->id, regions::memory_kind::vram, 0, slab_bytes};

  auto begun = e->begin(t::lip_begin(sm.m.total_size(), p.pid()));
  REQUIRE_OK(begun);
  REQUIRE_OK(e->feed(t::lip_feed(begun->registration_id, sm.m, sm.entries)));
  auto committed = e->commit(begun->registration_id);
  REQUIRE_OK(committed);
  CHECK(committed->descriptor.artifact_id == t::expected_mi2(sm.m.index().json(), sm.m.canonical()));
  CHECK(provider->open_mappings() == 2);  // the region once, the other allocation once

  e->revoke(begun->registration_id, "test done");
  // The plain handle's mapping closed with the lease; the region keeps its own until it goes
  // (registration.md §5.2).
  CHECK(provider->open_mappings() == 1);
  CHECK(e->unregister_region(region->id, p.pid(), false).value());  // no reference left
  CHECK(provider->open_mappings() == 0);
}

TEST_CASE("cuda device_memory: when the owner process dies its lease and mappings go within 1 s",
          "[cuda][device_memory][engine]") {
  producer p({{slab_bytes, 41}, {other_bytes, 42}});
  auto provider = make_provider();
  reg::engine_options options;  // real clock, pidfd owner watch on
  options.devices = provider;
  options.sweep_interval = std::chrono::milliseconds(0);
  auto e = t::make_engine(options);
  const auto sm = make_slab_model(p);
  auto begun = e->begin(t::lip_begin(sm.m.total_size(), p.pid(), 600'000));
  REQUIRE_OK(begun);
  REQUIRE_OK(e->feed(t::lip_feed(begun->registration_id, sm.m, sm.entries)));
  REQUIRE_OK(e->commit(begun->registration_id));
  REQUIRE(provider->open_mappings() == 2);
  REQUIRE(e->stats().leases == 1);

  const auto killed = std::chrono::steady_clock::now();
  p.process().kill(SIGKILL);
  while ((provider->open_mappings() != 0 || e->stats().leases != 0) &&
         std::chrono::steady_clock::now() - killed < std::chrono::seconds(1)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  const auto took = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - killed).count();
  INFO("released after " << took << " ms");
  CHECK(provider->open_mappings() == 0);
  CHECK(e->stats().leases == 0);
  CHECK(e->stats().open_mappings == 0);
  CHECK(took < 1000.0);
}

TEST_CASE(
    "cuda device_memory: through tensorregd, a producer's handles are leased under the digest id and its SIGKILL "
    "closes them within 1 s",
    "[cuda][device_memory][daemon]") {
  producer p({{slab_bytes, 61}, {other_bytes, 62}});
  // The producer owns the lease; this process speaks for it (same uid, trusted).
  testing::daemon_process d({"--trust-client-pids"});
  auto connected = tensorreg::client::raw::connection::connect(d.socket_path());
  REQUIRE_OK(connected);
  auto& c = **connected;

  struct piece {
    std::string name;
    std::size_t allocation;
    std::uint64_t base, length;
  };
  const std::vector<piece> pieces = {{"a", 0, 0, mib}, {"b", 0, mib + 512, 256 * 1024 + 8}, {"x", 1, 0, other_bytes}};
  std::vector<index::tensor_desc> descs;
  for (const auto& pc : pieces) {
    descs.push_back({pc.name, "torch.uint8", {static_cast<std::int64_t>(pc.length)}, {1}, pc.name, pc.length, 0});
  }
  auto idx = index::canonical_index::build(descs);
  REQUIRE_OK(idx);
  std::string canonical(idx->total_size(), '\0');
  for (const auto& pc : pieces) {
    const auto bytes = p.bytes(pc.allocation, pc.base, pc.length);
    std::memcpy(canonical.data() + idx->find(pc.name)->offset, bytes.data(), bytes.size());
  }
  memory::host_bytes_view canonical_view(std::as_bytes(std::span<const char>(canonical)));
  auto expected = identity::content_id(idx->json(), canonical_view, nullptr);
  REQUIRE_OK(expected);

  tensorreg::wire::v1::Request begin;
  auto* b = begin.mutable_begin_register_artifact();
  b->set_device_id(0);
  b->set_total_size(idx->total_size());
  b->set_ttl_ms(600'000);
  b->set_owner_pid(p.pid());
  b->mutable_lease()->set_in_place(true);
  auto begun = c.call(begin);
  REQUIRE_OK(begun);
  const auto reg_id = begun->response.begin_register_artifact().registration_id();

  tensorcast::daemon::v2::FeedRegisterArtifactStreamRequest feed;
  feed.set_registration_id(reg_id);
  for (const auto& pc : pieces) {
    auto* s = feed.add_storage_entries();
    s->set_storage_id(pc.name);
    s->set_device_id(0);
    s->set_storage_length(pc.length);
    s->set_cuda_ipc_handle(p.handle(pc.allocation));
    s->set_mapping_base_offset(pc.base);
    auto* seg = feed.mutable_lease_segments()->add_segments();
    seg->set_storage_id(pc.name);
    seg->set_artifact_offset(idx->find(pc.name)->offset);
    seg->set_length(pc.length);
    auto* a = feed.add_tensor_aliases();
    a->set_name(pc.name);
    a->set_storage_id(pc.name);
    a->set_logical_length(pc.length);
    a->add_shape(static_cast<std::int64_t>(pc.length));
    a->add_stride(1);
    a->set_dtype("torch.uint8");
  }
  REQUIRE_OK(c.feed({feed}));
  tensorreg::wire::v1::Request commit;
  commit.mutable_commit_registered_artifact()->set_registration_id(reg_id);
  auto committed = c.call(commit);
  REQUIRE_OK(committed);
  CHECK(committed->response.commit_registered_artifact().artifact_descriptor().artifact_id() == expected->to_string());

  tensorreg::wire::v1::Request stats;
  stats.mutable_get_stats();
  auto before = c.call(stats);
  REQUIRE_OK(before);
  CHECK(before->response.get_stats().open_mappings() == 2);  // one per allocation, not per storage
  CHECK(before->response.get_stats().leases() == 1);

  const auto killed = std::chrono::steady_clock::now();
  p.process().kill(SIGKILL);
  std::uint64_t mappings = 1, leases = 1;
  while ((mappings != 0 || leases != 0) && std::chrono::steady_clock::now() - killed < std::chrono::seconds(1)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    auto now = c.call(stats);
    REQUIRE_OK(now);
    mappings = now->response.get_stats().open_mappings();
    leases = now->response.get_stats().leases();
  }
  const double took_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - killed).count();
  INFO("released after " << took_ms << " ms");
  CHECK(mappings == 0);
  CHECK(leases == 0);
  CHECK(d.stop() == 0);
}

TEST_CASE("cuda device_memory: stable_dram staged on the GPU becomes a host replica with the host-computed id",
          "[cuda][device_memory][engine]") {
  // Copied and hashed on the host (staged leaves), or snapshotted on the GPU and hashed there
  // while the snapshot goes to the host (copy_to_host, src/cuda/bulk_copy.hpp).
  const bool on_gpu = GENERATE(false, true);
  device_memory_provider::options opts;
  opts.placement = on_gpu ? device_memory_provider::options::hash_placement::gpu
                          : device_memory_provider::options::hash_placement::host;
  auto provider = make_provider(opts);
  auto devices = std::make_shared<recording_devices>(provider);
  t::fake_clock clock;
  auto options = t::deterministic_options(clock);
  options.devices = devices;
  auto e = t::make_engine(options);

  t::model m = t::small_model();
  m.storages.push_back({"big", t::pattern(9 * mib + 12, 19)});  // three 4 MiB leaves
  m.tensors.push_back(
      {"big", "big", {static_cast<std::int64_t>((9 * mib + 12) / 4)}, {1}, "torch.float32", 0, 9 * mib + 12});
  auto begin = t::stable_begin(m, static_cast<std::int32_t>(::getpid()));
  begin.plan = reg::stable_dram_options{.stage_on_gpu = true};
  auto begun = e->begin(begin);
  REQUIRE_OK(begun);
  CHECK(std::get<reg::stable_dram_handshake>(begun->handshake).staging_cuda_ipc_handle.size() == 64);
  auto buffer = devices->last();
  REQUIRE(buffer != nullptr);
  const auto* device = cuda::as_device_source(*buffer);
  REQUIRE(device != nullptr);
  const std::string uploaded = m.canonical_with_pad('\xcd');
  REQUIRE(cudaMemcpy(const_cast<void*>(device->device_pointer()), uploaded.data(), uploaded.size(),
                     cudaMemcpyHostToDevice) == cudaSuccess);
  buffer.reset();

  auto committed = e->commit(begun->registration_id);
  REQUIRE_OK(committed);
  CHECK(committed->descriptor.artifact_id == t::expected_mi2(m.index().json(), m.canonical()));
  CHECK(e->get(committed->descriptor.artifact_id)->stable_replica);
  auto bytes = e->open_bytes(committed->descriptor.artifact_id);
  REQUIRE_OK(bytes);
  CHECK(read_all(**bytes, 0, (*bytes)->size()) == m.canonical());  // PAD zeroed in the replica
  CHECK(provider->device_hashes() == (on_gpu ? 1u : 0u));
}
