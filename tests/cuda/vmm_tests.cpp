// tensorreg_gpu_tests: CUDA VMM imports and GPU UUIDs of the engine's real device memory
// (tensorreg/cuda/device_memory_provider.hpp: import_vmm, device_by_uuid, uuid_of,
// vmm_reserved_bytes). The VMM memory is a child's (tensorreg_gpu_producer, through
// producer_process.hpp), exported as POSIX fds and received over SCM_RIGHTS, as a client
// hands it to tensorregd.
//
// Named *_tests.cpp so the CPU suite's glob does not pick it up; runs only where a CUDA
// device is present (gpu_main.cpp exits 77 otherwise).
#include "tensorreg/cuda/device_memory_provider.hpp"

#include <catch2/catch.hpp>

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "cuda/driver_entry.hpp"
#include "producer_process.hpp"
#include "provider_support.hpp"
#include "support/engine_helpers.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/memory/segmented_view.hpp"

namespace {

using namespace tensorreg;
using tensorreg::cuda::device_memory_provider;
using tensorreg::cuda::testing::pattern;
using tensorreg::cuda::testing::producer_allocation;
using tensorreg::cuda::testing::producer_process;
using source_ptr = std::shared_ptr<const memory::byte_source>;

constexpr std::uint64_t mib = std::uint64_t{1} << 20;

using tensorreg::cuda::testing::make_provider;
using tensorreg::cuda::testing::read_all;

std::string what(const producer_process& p, int device) {
  return "cannot import CUDA VMM memory of process " + std::to_string(p.pid()) + " on device " + std::to_string(device);
}

/// The access flags the driver reports for device 0 at `ptr` (cuMemGetAccess), or -1.
long long access_flags(const void* ptr) {
  PFN_cuMemGetAccess_v10020 get = nullptr;
  if (!cuda::detail::find_driver_entry(get, "cuMemGetAccess", 10020)) return -1;
  CUmemLocation location{};
  location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  location.id = 0;
  unsigned long long flags = 0;
  if (get(&flags, &location, reinterpret_cast<CUdeviceptr>(ptr)) != CUDA_SUCCESS) return -1;
  return static_cast<long long>(flags);
}

}  // namespace

// Chunks are multiples of 2 MiB, the VMM granularity of every GPU we run on (the producer
// refuses sizes that are not multiples of its device's granularity, and the tests check).
constexpr std::uint64_t chunk = 2 * mib;

TEST_CASE("cuda vmm: an imported chain reads the producer's bytes, across chunks and at offsets", "[cuda][vmm]") {
  auto provider = make_provider();
  // Three allocations of 2, 4 and 2 MiB, mapped back to back.
  producer_process p({{chunk, 11, true}, {2 * chunk, 12, true}, {chunk, 13, true}});
  REQUIRE(p.vmm_fds().size() == 3);
  REQUIRE(chunk % p.granularity() == 0);
  const std::vector<std::uint64_t> chunks{chunk, 2 * chunk, chunk};
  const std::string expected = pattern(11, 0, chunk) + pattern(12, 0, 2 * chunk) + pattern(13, 0, chunk);
  {
    auto imported = provider->import_vmm(p.pid(), 0, p.vmm_fds(), chunks);
    REQUIRE_OK(imported);
    const source_ptr& source = *imported;
    REQUIRE(source->size() == 4 * chunk);
    const auto* dev = cuda::as_device_source(*source);
    REQUIRE(dev != nullptr);
    CHECK(dev->device() == 0);
    CHECK(provider->vmm_reserved_bytes() == 4 * chunk);
    CHECK(provider->open_mappings() == 1);

    CHECK(read_all(*source, 0, 4 * chunk) == expected);
    // Across the first and second chunk boundaries, and a ragged piece inside the last chunk.
    CHECK(read_all(*source, chunk - 100, chunk + 200) == expected.substr(chunk - 100, chunk + 200));
    CHECK(read_all(*source, 3 * chunk + 4097, 12345) == expected.substr(3 * chunk + 4097, 12345));
    CHECK_CODE(source->visit(4 * chunk - 1, 2, [](std::span<const std::byte>) -> status { return {}; }),
               errc::out_of_range);

    // What the driver granted: read-only where it accepts PROT_READ, else read-write (the
    // import asks for read first).
    const long long flags = access_flags(dev->device_pointer());
    WARN("VMM import access flags on device 0: " << flags << " (1 = PROT_READ, 3 = PROT_READWRITE)");
    CHECK((flags == CU_MEM_ACCESS_FLAGS_PROT_READ || flags == CU_MEM_ACCESS_FLAGS_PROT_READWRITE));

    // The caller keeps its fds: they stay open, and import again while the first import lives,
    // into a reservation and mapping of its own.
    for (const int fd : p.vmm_fds()) CHECK(::fcntl(fd, F_GETFD) != -1);
    {
      auto again = provider->import_vmm(p.pid(), 0, p.vmm_fds(), chunks);
      REQUIRE_OK(again);
      CHECK(cuda::as_device_source(**again)->device_pointer() != dev->device_pointer());
      CHECK(provider->vmm_reserved_bytes() == 8 * chunk);
      CHECK(provider->open_mappings() == 2);
      CHECK(read_all(**again, 2 * chunk, 2 * chunk) == expected.substr(2 * chunk, 2 * chunk));
    }
    CHECK(read_all(*source, chunk, 100) == expected.substr(chunk, 100));
  }
  CHECK(provider->vmm_reserved_bytes() == 0);
  CHECK(provider->open_mappings() == 0);

  // Released, the same fds import again (a region registered anew).
  {
    auto all = provider->import_vmm(p.pid(), 0, p.vmm_fds(), chunks);
    REQUIRE_OK(all);
    CHECK(read_all(**all, 0, 4 * chunk) == expected);
  }
  CHECK(provider->vmm_reserved_bytes() == 0);
  CHECK(provider->open_mappings() == 0);
}

TEST_CASE("cuda vmm: a source outlives its provider and is released with its last holder", "[cuda][vmm]") {
  producer_process p({{chunk, 21, true}});
  source_ptr kept;
  {
    auto provider = make_provider();
    auto imported = provider->import_vmm(p.pid(), 0, p.vmm_fds(), std::vector<std::uint64_t>{chunk});
    REQUIRE_OK(imported);
    kept = *imported;
  }
  CHECK(read_all(*kept, 100, 1000) == pattern(21, 100, 1000));
}

TEST_CASE("cuda vmm: 1000 imports of 2 MiB reserve only the imported bytes, and release them all",
          "[cuda][vmm][concurrency]") {
  constexpr std::size_t imports = 1000;
  std::vector<producer_allocation> specs;
  for (std::size_t i = 0; i < imports; ++i) specs.push_back({chunk, 1000 + i, true});
  producer_process p(specs);
  REQUIRE(p.vmm_fds().size() == imports);
  const std::uint64_t g = p.granularity();
  REQUIRE(g > 0);
  const std::uint64_t per_import = (chunk + g - 1) / g * g;
  cudaDeviceProp prop{};
  REQUIRE(cudaGetDeviceProperties(&prop, 0) == cudaSuccess);
  auto provider = make_provider();
  const std::vector<std::uint64_t> one{chunk};

  SECTION("one after another") {
    std::vector<source_ptr> held;
    for (std::size_t i = 0; i < imports; ++i) {
      auto imported = provider->import_vmm(p.pid(), 0, std::span<const int>(&p.vmm_fds()[i], 1), one);
      if (!imported) FAIL_CHECK("import " << i << ": " << imported.error().message);
      REQUIRE(imported);
      held.push_back(*imported);
    }
    // PyTorch's import would hold ~9/8 of the GPU per import here: 1000 x ~90 GB.
    CHECK(provider->vmm_reserved_bytes() == imports * per_import);
    CHECK(provider->vmm_reserved_bytes() < prop.totalGlobalMem);
    CHECK(provider->open_mappings() == imports);
    for (const std::size_t i : {std::size_t{0}, std::size_t{499}, imports - 1}) {
      INFO("import " << i);
      CHECK(read_all(*held[i], chunk - 4096, 4096) == pattern(1000 + i, chunk - 4096, 4096));
    }
    held.clear();
  }
  SECTION("on 8 threads at once") {
    std::vector<source_ptr> held(imports);
    std::atomic<std::size_t> next{0};
    std::atomic<int> failures{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t) {
      threads.emplace_back([&] {
        for (std::size_t i = next++; i < imports; i = next++) {
          auto imported = provider->import_vmm(p.pid(), 0, std::span<const int>(&p.vmm_fds()[i], 1), one);
          if (!imported) {
            std::fprintf(stderr, "import %zu: %s\n", i, imported.error().message.c_str());
            ++failures;
            continue;
          }
          held[i] = *imported;
        }
      });
    }
    for (auto& th : threads) th.join();
    REQUIRE(failures == 0);
    CHECK(provider->vmm_reserved_bytes() == imports * per_import);
    CHECK(provider->open_mappings() == imports);
    CHECK(read_all(*held[777], 0, 4096) == pattern(1777, 0, 4096));
    // Released from several threads too.
    threads.clear();
    for (int t = 0; t < 8; ++t) {
      threads.emplace_back([&, t] {
        for (std::size_t i = static_cast<std::size_t>(t); i < imports; i += 8) held[i].reset();
      });
    }
    for (auto& th : threads) th.join();
  }
  CHECK(provider->vmm_reserved_bytes() == 0);
  CHECK(provider->open_mappings() == 0);
}

TEST_CASE("cuda vmm: bad imports fail with the documented codes and leave nothing behind", "[cuda][vmm]") {
  auto provider = make_provider();
  producer_process p({{chunk, 31, true}, {chunk, 32, true}});
  REQUIRE(chunk % p.granularity() == 0);
  const std::uint64_t g = p.granularity();
  const std::vector<std::uint64_t> two{chunk, chunk};
  const std::string prefix = what(p, 0);

  SECTION("no such device") {
    const int count = provider->device_count();
    CHECK_ERROR(provider->import_vmm(p.pid(), count, p.vmm_fds(), two), errc::failed_precondition,
                what(p, count) + ": no such CUDA device (" + std::to_string(count) + " present)");
    CHECK_CODE(provider->import_vmm(p.pid(), -1, p.vmm_fds(), two), errc::failed_precondition);
  }
  SECTION("chunk lists that do not fit the fds or the granularity") {
    CHECK_ERROR(provider->import_vmm(p.pid(), 0, {}, {}), errc::invalid_argument, prefix + ": no chunks");
    const std::vector<std::uint64_t> one{chunk};
    CHECK_ERROR(provider->import_vmm(p.pid(), 0, p.vmm_fds(), one), errc::invalid_argument,
                prefix + ": 2 fds for 1 chunk sizes");
    const std::vector<std::uint64_t> zero{chunk, 0};
    CHECK_ERROR(provider->import_vmm(p.pid(), 0, p.vmm_fds(), zero), errc::invalid_argument,
                prefix + ": chunk 1 has 0 bytes");
    const std::vector<std::uint64_t> ragged{chunk, chunk - 4096};
    CHECK_ERROR(provider->import_vmm(p.pid(), 0, p.vmm_fds(), ragged), errc::invalid_argument,
                prefix + ": chunk 1 has " + std::to_string(chunk - 4096) +
                    " bytes, not a multiple of the device's allocation granularity " + std::to_string(g));
  }
  SECTION("a chunk larger than its allocation: imported, reserved, then undone") {
    const std::vector<std::uint64_t> too_big{chunk, 2 * chunk};
    auto failed = provider->import_vmm(p.pid(), 0, p.vmm_fds(), too_big);
    REQUIRE_FALSE(failed);
    CHECK(failed.error().code == errc::invalid_argument);
    CHECK_THAT(failed.error().message, Catch::StartsWith(prefix + ": cannot map chunk 1 (" + std::to_string(2 * chunk) +
                                                         " bytes) at offset " + std::to_string(chunk) + ": "));
  }
  SECTION("a chunk smaller than its allocation: the driver maps whole allocations only") {
    producer_process big({{2 * chunk, 33, true}});
    const std::vector<std::uint64_t> half{chunk};
    auto failed = provider->import_vmm(big.pid(), 0, big.vmm_fds(), half);
    REQUIRE_FALSE(failed);
    CHECK(failed.error().code == errc::invalid_argument);
    CHECK_THAT(failed.error().message, Catch::StartsWith(what(big, 0) + ": cannot map chunk 0 (" +
                                                         std::to_string(chunk) + " bytes) at offset 0: "));
  }
  SECTION("an fd that is not a CUDA export (a memfd), after one that is") {
    const int memfd = ::memfd_create("tensorreg-not-cuda", MFD_CLOEXEC);
    REQUIRE(memfd >= 0);
    REQUIRE(::ftruncate(memfd, static_cast<off_t>(chunk)) == 0);
    const std::vector<int> fds{p.vmm_fds()[0], memfd};
    auto failed = provider->import_vmm(p.pid(), 0, fds, two);
    ::close(memfd);
    REQUIRE_FALSE(failed);
    CHECK(failed.error().code == errc::invalid_argument);
    CHECK_THAT(failed.error().message,
               Catch::StartsWith(prefix + ": cannot import chunk 1 (fd " + std::to_string(memfd) + "): "));
    // A closed fd number too.
    const std::vector<int> closed{memfd};
    const std::vector<std::uint64_t> one{chunk};
    CHECK_CODE(provider->import_vmm(p.pid(), 0, closed, one), errc::invalid_argument);
  }
  SECTION("memory of another device") {
    if (provider->device_count() < 2) {
      WARN("one CUDA device: the device-mismatch case needs two (not run)");
    } else {
      producer_process other({{chunk, 41, true}}, 1);
      const std::vector<std::uint64_t> one{chunk};
      CHECK_ERROR(
          provider->import_vmm(other.pid(), 0, other.vmm_fds(), one), errc::failed_precondition,
          what(other, 0) + ": the memory of chunk 0 (fd " + std::to_string(other.vmm_fds()[0]) + ") lives on device 1");
    }
  }
  // Every failure undid its imports, reservation and mappings; the fds still import.
  CHECK(provider->vmm_reserved_bytes() == 0);
  CHECK(provider->open_mappings() == 0);
  auto good = provider->import_vmm(p.pid(), 0, p.vmm_fds(), two);
  REQUIRE_OK(good);
  CHECK(read_all(**good, chunk, 64) == pattern(32, 0, 64));
}

TEST_CASE("cuda vmm: devices are found by UUID in nvidia-smi's form and the bare form", "[cuda][vmm][uuid]") {
  auto provider = make_provider();
  const std::string uuid = provider->uuid_of(0);
  INFO("device 0 is " << uuid);
  REQUIRE(uuid.size() == 40);
  CHECK(uuid.rfind("GPU-", 0) == 0);
  CHECK(std::none_of(uuid.begin() + 4, uuid.end(), [](char c) { return std::isupper(static_cast<unsigned char>(c)); }));
  // Independent of our formatting: the runtime's bytes.
  cudaDeviceProp prop{};
  REQUIRE(cudaGetDeviceProperties(&prop, 0) == cudaSuccess);
  char first[3];
  std::snprintf(first, sizeof first, "%02x", static_cast<unsigned>(static_cast<unsigned char>(prop.uuid.bytes[0])));
  CHECK(uuid.substr(4, 2) == first);

  CHECK(provider->device_by_uuid(uuid).value() == 0);
  CHECK(provider->device_by_uuid(uuid.substr(4)).value() == 0);
  std::string upper = uuid;
  std::transform(upper.begin(), upper.end(), upper.begin(), [](char c) { return static_cast<char>(std::toupper(c)); });
  CHECK(provider->device_by_uuid(upper).value() == 0);
  for (int d = 0; d < provider->device_count(); ++d) CHECK(provider->device_by_uuid(provider->uuid_of(d)).value() == d);

  CHECK(provider->uuid_of(-1).empty());
  CHECK(provider->uuid_of(provider->device_count()).empty());
  const std::string unknown = "GPU-00000000-0000-0000-0000-000000000000";
  CHECK_ERROR(provider->device_by_uuid(unknown), errc::failed_precondition,
              "cannot find CUDA device " + unknown + ": no CUDA device " + unknown + " is visible to the daemon (" +
                  std::to_string(provider->device_count()) + " present)");
  CHECK_CODE(provider->device_by_uuid("GPU-0"), errc::invalid_argument);

  // nvidia-smi, where present, prints the same UUID for some GPU.
  if (std::FILE* smi = ::popen("nvidia-smi -L 2>/dev/null", "r"); smi != nullptr) {
    std::string listing;
    char buf[512];
    while (std::fgets(buf, sizeof buf, smi) != nullptr) listing += buf;
    ::pclose(smi);
    if (listing.empty()) {
      WARN("nvidia-smi printed nothing: the UUID is not cross-checked");
    } else {
      CHECK(listing.find(uuid) != std::string::npos);
    }
  }
}

TEST_CASE("cuda vmm: the GPU tree hash of an imported region equals the host hash of its bytes", "[cuda][vmm]") {
  device_memory_provider::options opts;
  opts.placement = device_memory_provider::options::hash_placement::gpu;
  auto provider = make_provider(opts);
  // 10 MiB: two full 4 MiB leaves and a partial one, across three allocations.
  producer_process p({{2 * chunk, 51, true}, {chunk, 52, true}, {2 * chunk, 53, true}});
  const std::vector<std::uint64_t> chunks{2 * chunk, chunk, 2 * chunk};
  auto imported = provider->import_vmm(p.pid(), 0, p.vmm_fds(), chunks);
  REQUIRE_OK(imported);
  const std::string bytes = pattern(51, 0, 2 * chunk) + pattern(52, 0, chunk) + pattern(53, 0, 2 * chunk);
  memory::host_bytes_view host(std::as_bytes(std::span<const char>(bytes)));

  // The whole import, hashed where it lies.
  auto whole = memory::segmented_view::create(bytes.size(), {{0, bytes.size(), imported->get(), 0}});
  REQUIRE_OK(whole);
  auto on_gpu = provider->tree_hash_on_device(*whole);
  REQUIRE(on_gpu.has_value());
  REQUIRE_OK(*on_gpu);
  auto on_host = hash::tree_hash(host);
  REQUIRE_OK(on_host);
  CHECK(**on_gpu == *on_host);

  // A piece from inside it, with a zero gap before it (gathered on the GPU).
  const std::uint64_t at = chunk + 12345;
  const std::uint64_t length = 3 * chunk;
  auto piece = memory::segmented_view::create(100 + length, {{100, length, imported->get(), at}});
  REQUIRE_OK(piece);
  std::string expected_piece(100, '\0');
  expected_piece += bytes.substr(at, length);
  memory::host_bytes_view host_piece(std::as_bytes(std::span<const char>(expected_piece)));
  auto piece_gpu = provider->tree_hash_on_device(*piece);
  REQUIRE(piece_gpu.has_value());
  REQUIRE_OK(*piece_gpu);
  CHECK(**piece_gpu == hash::tree_hash(host_piece).value());
  CHECK(provider->device_hashes() == 2);
}

// Whether GPU replicas can outlive the daemon that made them (restarts that keep resident
// memory, docs/architecture.md): a VMM allocation stays alive while any process holds its
// exported fd, even after its exporter freed its handle and exited, or was killed.
TEST_CASE("cuda vmm: an allocation outlives its exporter while another process holds its fd", "[cuda][vmm]") {
  auto provider = make_provider();
  for (const bool killed : {false, true}) {
    CAPTURE(killed);
    producer_process p({{chunk, 31, true}});
    const pid_t exporter = p.pid();
    const int status = p.end(killed);
    if (killed) {
      CHECK((WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL));
    } else {
      CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 0));
    }
    REQUIRE(::kill(exporter, 0) == -1);  // gone, not a zombie we still hold
    auto imported = provider->import_vmm(exporter, 0, p.vmm_fds(), std::vector<std::uint64_t>{chunk});
    REQUIRE_OK(imported);
    CHECK(read_all(**imported, 0, chunk) == pattern(31, 0, chunk));
  }
}
