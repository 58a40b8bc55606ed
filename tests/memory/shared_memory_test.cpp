// Client memory that must never crash the reader (sealed against shrinking, guarded reads) and
// replicas that no reopened fd can change (sealed read-only).
#include "tensorreg/memory/shared_memory.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <string>
#include <thread>

#include "support/temp_dir.hpp"

namespace {

using tensorreg::errc;
using tensorreg::unique_fd;
using tensorreg::memory::shared_memory;

unique_fd client_memfd(std::uint64_t size, unsigned flags, int seals) {
  unique_fd fd(::memfd_create("tensorreg-client", MFD_CLOEXEC | flags));
  REQUIRE(fd);
  REQUIRE(::ftruncate(fd.get(), static_cast<off_t>(size)) == 0);
  if (seals != 0) REQUIRE(::fcntl(fd.get(), F_ADD_SEALS, seals) == 0);
  return fd;
}

unique_fd dup_of(const unique_fd& fd) { return unique_fd(::fcntl(fd.get(), F_DUPFD_CLOEXEC, 0)); }

// Reads the whole source through visit(), as hashing does: in place, in the sink.
tensorreg::status touch_all(const shared_memory& m) {
  return m.visit(0, m.size(), [](std::span<const std::byte> piece) -> tensorreg::status {
    volatile std::byte sum{0};
    for (std::size_t i = 0; i < piece.size(); i += 4096) sum = sum ^ piece[i];
    (void)sum;
    return {};
  });
}

}  // namespace

TEST_CASE("shared_memory: adopt_sealed maps a memfd sealed against shrinking", "[memory][shared_memory]") {
  auto fd = client_memfd(8192, MFD_ALLOW_SEALING, F_SEAL_SHRINK);
  REQUIRE(::pwrite(fd.get(), "x", 1, 100) == 1);
  auto mapped = shared_memory::adopt_sealed(dup_of(fd), 8192);
  REQUIRE(mapped);
  CHECK_FALSE(mapped->writable());
  CHECK(mapped->bytes()[100] == std::byte{'x'});
  // The daemon's own memfds (create()) carry the seal, so a client may hand one back.
  auto own = shared_memory::create(4096, "tensorreg-test").value();
  CHECK(shared_memory::adopt_sealed(own.duplicate_fd().value(), 4096));
}

TEST_CASE("shared_memory: adopt_sealed refuses memory that could shrink, naming the seal", "[memory][shared_memory]") {
  SECTION("a memfd without F_SEAL_SHRINK") {
    auto out = shared_memory::adopt_sealed(client_memfd(4096, MFD_ALLOW_SEALING, F_SEAL_GROW), 4096);
    REQUIRE_FALSE(out);
    CHECK(out.error().code == errc::failed_precondition);
    CHECK(out.error().message ==
          "cannot map shared memory: the memfd lacks the seal F_SEAL_SHRINK, so it could shrink under the mapping; "
          "add it with fcntl(F_ADD_SEALS, F_SEAL_SHRINK) before sending");
  }
  SECTION("a memfd made without MFD_ALLOW_SEALING") {
    auto out = shared_memory::adopt_sealed(client_memfd(4096, 0, 0), 4096);
    REQUIRE_FALSE(out);
    CHECK(out.error().code == errc::failed_precondition);
    CHECK_THAT(out.error().message, Catch::Contains("the memfd lacks the seal F_SEAL_SHRINK"));
  }
  SECTION("a regular file") {
    tensorreg::testing::temp_dir dir;
    const auto path = (dir.path() / "weights.bin").string();
    unique_fd file(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
    REQUIRE(file);
    REQUIRE(::ftruncate(file.get(), 4096) == 0);
    const int number = file.get();
    auto out = shared_memory::adopt_sealed(std::move(file), 4096);
    REQUIRE_FALSE(out);
    CHECK(out.error().code == errc::failed_precondition);
    CHECK(out.error().message == "cannot map shared memory: fd " + std::to_string(number) +
                                     " cannot be sealed (Invalid argument); send a memfd made with "
                                     "MFD_ALLOW_SEALING and sealed with F_SEAL_SHRINK");
  }
}

TEST_CASE("shared_memory: a read of pages its file lost answers DATA_LOSS instead of SIGBUS",
          "[memory][shared_memory]") {
  // adopt() does not ask for seals: the guard is what stands between a shrink and SIGBUS.
  auto fd = client_memfd(64 << 10, MFD_ALLOW_SEALING, 0);
  auto mapped = shared_memory::adopt(dup_of(fd), 64 << 10, false).value();
  REQUIRE(touch_all(mapped));

  SECTION("shrunk to half") {
    REQUIRE(::ftruncate(fd.get(), 32 << 10) == 0);
    auto out = touch_all(mapped);
    REQUIRE_FALSE(out);
    CHECK(out.error().code == errc::data_loss);
    CHECK(out.error().message ==
          "cannot read shared memory at offset 32768: its file shrank under the mapping (the "
          "page read faulted), so its bytes are lost");
  }
  SECTION("shrunk to 0, then read again") {
    REQUIRE(::ftruncate(fd.get(), 0) == 0);
    auto out = touch_all(mapped);
    REQUIRE_FALSE(out);
    CHECK(out.error().code == errc::data_loss);
    CHECK_THAT(out.error().message, Catch::StartsWith("cannot read shared memory at offset 0: its file shrank"));
    // Broken for good: later reads, even of bytes that read as zeros now, fail at once.
    std::byte one{};
    auto again = mapped.read(100, std::span<std::byte>(&one, 1));
    REQUIRE_FALSE(again);
    CHECK(again.error().code == errc::data_loss);
    CHECK(again.error().message ==
          "cannot read shared memory at offset 100: its file shrank under the mapping (a "
          "page read faulted), so its bytes are lost");
  }
}

#if defined(__SANITIZE_ADDRESS__)
constexpr bool sanitized_build = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool sanitized_build = true;
#else
constexpr bool sanitized_build = false;
#endif
#else
constexpr bool sanitized_build = false;
#endif

TEST_CASE("shared_memory: a SIGBUS outside a guarded read still ends the process", "[memory][shared_memory]") {
  auto fd = client_memfd(8192, MFD_ALLOW_SEALING, 0);
  auto mapped = shared_memory::adopt(dup_of(fd), 8192, false).value();
  REQUIRE(touch_all(mapped));  // installs the handler
  REQUIRE(::ftruncate(fd.get(), 0) == 0);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    // Whatever handler came before ours (the test framework's) may print: keep it quiet.
    const int null = ::open("/dev/null", O_WRONLY);
    ::dup2(null, 1);
    ::dup2(null, 2);
    volatile std::byte b = mapped.bytes()[10];  // unguarded
    (void)b;
    ::_exit(0);
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  CHECK(WIFSIGNALED(status));
  // The fault goes to the handler installed before ours: with none, SIGBUS ends the process;
  // under AddressSanitizer that handler is ASan's, which reports the fault and aborts.
  const int signal = WTERMSIG(status);
  INFO("the child ended by signal " << signal);
  CHECK((signal == SIGBUS || (sanitized_build && signal == SIGABRT)));
}

TEST_CASE("shared_memory: seal_read_only makes the bytes final for every fd", "[memory][shared_memory]") {
  auto m = shared_memory::create(8192, "tensorreg-replica").value();
  std::memset(m.mutable_bytes().data(), 0x5a, 8192);
  REQUIRE(m.seal_read_only());
  CHECK_FALSE(m.writable());
  CHECK(::fcntl(m.fd(), F_GET_SEALS) == (F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL));

  // A reader reopens the fd read-write through /proc and tries every way to change it.
  const std::string path = "/proc/self/fd/" + std::to_string(m.fd());
  unique_fd rw(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  REQUIRE(rw);
  errno = 0;
  CHECK(::pwrite(rw.get(), "evil", 4, 0) == -1);
  CHECK(errno == EPERM);
  CHECK(::mmap(nullptr, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, rw.get(), 0) == MAP_FAILED);
  CHECK(errno == EPERM);
  CHECK(::ftruncate(rw.get(), 0) == -1);
  CHECK(::fcntl(rw.get(), F_ADD_SEALS, 0) == -1);  // F_SEAL_SEAL: no seal can be removed or added
  // A private (copy-on-write) mapping still works: readers may scribble on their own copy.
  void* cow = ::mmap(nullptr, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE, rw.get(), 0);
  REQUIRE(cow != MAP_FAILED);
  static_cast<char*>(cow)[0] = 1;
  ::munmap(cow, 8192);

  std::string bytes(8192, '\0');
  REQUIRE(m.read(0, std::as_writable_bytes(std::span<char>(bytes))));
  CHECK(bytes == std::string(8192, '\x5a'));
}

TEST_CASE("shared_memory: seal_read_only fails while another writable mapping exists", "[memory][shared_memory]") {
  auto m = shared_memory::create(4096, "tensorreg-replica").value();
  auto writer = shared_memory::adopt(m.duplicate_fd().value(), 4096, true).value();
  auto out = m.seal_read_only(shared_memory::when_busy::fail);
  REQUIRE_FALSE(out);
  CHECK(out.error().code == errc::failed_precondition);
  CHECK(out.error().message ==
        "cannot seal shared memory of 4096 bytes: another writable shared mapping of it "
        "exists, or its pages stay referenced");
}

TEST_CASE("shared_memory: seal_read_only waits out page references that go away", "[memory][shared_memory]") {
  // A page spliced into a pipe keeps a reference beyond its mappings until the pipe is read:
  // the kernel refuses F_SEAL_WRITE (EBUSY, after its own wait) while it lasts, as it does for
  // the short-lived references it takes itself.
  const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  int ends[2];
  REQUIRE(::pipe(ends) == 0);
  unique_fd read_end(ends[0]);
  unique_fd write_end(ends[1]);
  const auto pin_first_page = [&](shared_memory& m) {
    std::memset(m.mutable_bytes().data(), 0x3c, page);
    iovec iov{m.mutable_bytes().data(), page};
    REQUIRE(::vmsplice(write_end.get(), &iov, 1, 0) == static_cast<ssize_t>(page));
  };
  const auto drain = [&] {
    std::string sink(page, '\0');
    REQUIRE(::read(read_end.get(), sink.data(), page) == static_cast<ssize_t>(page));
    CHECK(sink == std::string(page, '\x3c'));
  };

  SECTION("retry: sealed once the reference is gone") {
    auto m = shared_memory::create(page, "tensorreg-replica").value();
    pin_first_page(m);
    std::thread reader([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(400));
      drain();
    });
    const auto out = m.seal_read_only();
    reader.join();
    REQUIRE(out);
    CHECK(m.sealed_against_writes());
  }
  SECTION("fail: refused while the reference lasts, and sealable after") {
    auto m = shared_memory::create(page, "tensorreg-replica").value();
    pin_first_page(m);
    const auto out = m.seal_read_only(shared_memory::when_busy::fail);
    REQUIRE_FALSE(out);
    CHECK(out.error().code == errc::failed_precondition);
    drain();
    CHECK(m.seal_read_only(shared_memory::when_busy::fail));
  }
}

namespace {

// What a reader with `fd` can do to the memory when it reopens it read-write through /proc.
struct reopen_attempt {
  bool opened = false;
  int write_errno = 0;
  int map_errno = 0;
  int truncate_errno = 0;
};

reopen_attempt try_to_change(int fd, std::size_t size) {
  reopen_attempt out;
  unique_fd rw(::open(("/proc/self/fd/" + std::to_string(fd)).c_str(), O_RDWR | O_CLOEXEC));
  out.opened = static_cast<bool>(rw);
  if (!rw) return out;
  if (::pwrite(rw.get(), "x", 1, 0) < 0) out.write_errno = errno;
  void* w = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, rw.get(), 0);
  if (w == MAP_FAILED) {
    out.map_errno = errno;
  } else {
    ::munmap(w, size);
  }
  if (::ftruncate(rw.get(), 0) != 0) out.truncate_errno = errno;
  return out;
}

}  // namespace

TEST_CASE("shared_memory: memory sealed against writes keeps its own mapping writable but no fd can change it",
          "[memory][shared_memory]") {
  auto m = shared_memory::create(4096, "tensorreg-replica").value();
  std::memset(m.mutable_bytes().data(), 0x11, 4096);
  CHECK_FALSE(m.sealed_against_writes());
  REQUIRE(m.seal_against_writes());
  REQUIRE(m.seal_against_writes());  // idempotent
  CHECK(m.sealed_against_writes());
  auto fd = m.export_read_only();
  REQUIRE(fd);
  CHECK(m.exported());
  const auto attempt = try_to_change(fd->get(), 4096);
  CHECK(attempt.write_errno == EPERM);
  CHECK(attempt.map_errno == EPERM);
  CHECK(attempt.truncate_errno == EPERM);
  CHECK(m.bytes()[0] == std::byte{0x11});
  // The owner refills it through the mapping it already has (a pool recycling it would).
  std::memset(m.mutable_bytes().data(), 0x22, 4096);
  CHECK(m.bytes()[4095] == std::byte{0x22});
}

TEST_CASE("shared_memory: only memory sealed against writes is handed out", "[memory][shared_memory]") {
  auto unsealed = shared_memory::create(4096, "tensorreg-replica").value();
  auto refused = unsealed.export_read_only();
  REQUIRE_FALSE(refused);
  CHECK(refused.error().code == errc::failed_precondition);
  CHECK(refused.error().message ==
        "cannot hand out shared memory of 4096 bytes: it is not sealed against writes, growing and shrinking, so a "
        "reader could change it");
  CHECK_FALSE(unsealed.exported());

  auto sealed = shared_memory::create(4096, "tensorreg-replica").value();
  REQUIRE(sealed.seal_read_only());
  CHECK(sealed.sealed_against_writes());
  auto fd = sealed.export_read_only();
  REQUIRE(fd);
  CHECK((::fcntl(fd->get(), F_GETFL) & O_ACCMODE) == O_RDONLY);
}
