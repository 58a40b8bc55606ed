#include "tensorreg/memory/shared_memory.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>
#include <utility>

#include "memory/sigbus_guard.hpp"
#include "memory/system_calls.hpp"

namespace tensorreg::memory {
namespace {

std::string os_reason() { return std::strerror(errno); }
std::string os_reason(int e) { return std::strerror(e); }

constexpr unsigned final_seals = F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL;

}  // namespace

result<shared_memory> shared_memory::create(std::uint64_t size, const std::string& name) {
  if (size == 0) return fail(errc::invalid_argument, "cannot create shared memory '" + name + "': size is 0");
  TENSORREG_TRY(sys::check_allocation("shared memory '" + name + "'", size));
  unique_fd fd(sys::memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd) {
    const int e = errno;
    return fail(errc_of_errno(e, errc::resource_exhausted),
                "cannot create shared memory '" + name + "': " + os_reason(e));
  }
  if (sys::ftruncate(fd.get(), size) != 0) {
    const int e = errno;
    return fail(errc_of_errno(e, errc::resource_exhausted),
                "cannot size shared memory '" + name + "' to " + std::to_string(size) + " bytes: " + os_reason(e));
  }
  // Growing or shrinking would invalidate other processes' mappings (SIGBUS): forbid it.
  ::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK);
  return adopt(std::move(fd), size, /*writable=*/true);
}

result<shared_memory> shared_memory::adopt(unique_fd fd, std::uint64_t size, bool writable) {
  if (!fd) return fail(errc::invalid_argument, "cannot map shared memory: no file descriptor");
  if (size == 0) return fail(errc::invalid_argument, "cannot map shared memory: size is 0");
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) {
    return fail(errc::invalid_argument,
                "cannot map shared memory: fd " + std::to_string(fd.get()) + " is not usable: " + os_reason());
  }
  if (static_cast<std::uint64_t>(st.st_size) < size) {
    return fail(errc::invalid_argument, "cannot map shared memory: the file holds " + std::to_string(st.st_size) +
                                            " bytes, fewer than " + std::to_string(size));
  }
  detail::ensure_sigbus_handler();  // before any read of the mapping (visit() guards them)
  const int prot = writable ? PROT_READ | PROT_WRITE : PROT_READ;
  void* base = sys::mmap(static_cast<std::size_t>(size), prot, MAP_SHARED, fd.get());
  if (base == MAP_FAILED) {
    const int e = errno;
    const errc code = (e == EACCES || e == EPERM) ? errc::permission_denied : errc::resource_exhausted;
    return fail(code, "cannot map shared memory of " + std::to_string(size) + " bytes: " + os_reason(e));
  }
  return shared_memory(std::move(fd), {static_cast<std::byte*>(base), static_cast<std::size_t>(size)}, writable);
}

shared_memory shared_memory::adopt_mapping(unique_fd fd, std::span<std::byte> mapping) noexcept {
  TENSORREG_ASSERT(fd && !mapping.empty());
  detail::ensure_sigbus_handler();  // before any read of the mapping (visit() guards them)
  return shared_memory(std::move(fd), mapping, /*writable=*/true);
}

result<shared_memory> shared_memory::adopt_sealed(unique_fd fd, std::uint64_t size) {
  if (!fd) return fail(errc::invalid_argument, "cannot map shared memory: no file descriptor");
  const int seals = ::fcntl(fd.get(), F_GET_SEALS);
  if (seals < 0) {
    return fail(errc::failed_precondition, "cannot map shared memory: fd " + std::to_string(fd.get()) +
                                               " cannot be sealed (" + os_reason() +
                                               "); send a memfd made with MFD_ALLOW_SEALING and sealed with "
                                               "F_SEAL_SHRINK");
  }
  if ((seals & F_SEAL_SHRINK) == 0) {
    return fail(errc::failed_precondition,
                "cannot map shared memory: the memfd lacks the seal F_SEAL_SHRINK, so "
                "it could shrink under the mapping; add it with "
                "fcntl(F_ADD_SEALS, F_SEAL_SHRINK) before sending");
  }
  return adopt(std::move(fd), size, /*writable=*/false);
}

status shared_memory::seal_read_only(when_busy busy) {
  const auto reason = [&](std::string_view why) {
    return "cannot seal shared memory of " + std::to_string(bytes_.size()) + " bytes: " + std::string(why);
  };
  // A read-only mapping through a read-only open file description: it does not count as a
  // writable mapping, which F_SEAL_WRITE refuses (EBUSY) while one exists.
  const std::string path = "/proc/self/fd/" + std::to_string(fd_.get());
  unique_fd reader(sys::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!reader) {
    const int e = errno;
    return fail(errc_of_errno(e, errc::resource_exhausted), reason("cannot reopen it read-only: " + os_reason(e)));
  }
  void* base = sys::mmap(bytes_.size(), PROT_READ, MAP_SHARED, reader.get());
  if (base == MAP_FAILED) {
    const int e = errno;
    return fail(errc_of_errno(e, errc::resource_exhausted), reason("cannot map it read-only: " + os_reason(e)));
  }
  const std::size_t size = bytes_.size();
  unmap();
  bytes_ = {static_cast<std::byte*>(base), size};
  writable_ = false;
  // Each refused attempt with pinned pages has already waited ~150 ms in the kernel.
  constexpr int busy_retries = 8;
  for (int attempt = 0;; ++attempt) {
    if (::fcntl(fd_.get(), F_ADD_SEALS, final_seals) == 0) return {};
    const int e = errno;
    if (e != EBUSY) return fail(errc::failed_precondition, reason("it cannot carry seals: " + os_reason(e)));
    if (busy == when_busy::fail || attempt == busy_retries) {
      return fail(errc::failed_precondition,
                  reason("another writable shared mapping of it exists, or its pages stay referenced"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

void shared_memory::discard(std::uint64_t offset, std::uint64_t length) const noexcept {
  static const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  if (offset >= bytes_.size()) return;
  const std::uint64_t end = offset + std::min(length, bytes_.size() - offset);
  const std::uint64_t first = (offset + page - 1) / page * page;
  const std::uint64_t last = end / page * page;
  if (first >= last) return;
  static_cast<void>(::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(first),
                                static_cast<off_t>(last - first)));
}

status shared_memory::seal_against_writes() {
  // F_SEAL_FUTURE_WRITE, unlike F_SEAL_WRITE, leaves the mappings that exist writable: this
  // object's own, through which a pool that recycles the memory refills it (and which a device
  // may have pinned), keeps working; every fd of it, reopened through /proc or not, is refused
  // write(), writable shared mappings and hole punching from now on.
  if (::fcntl(fd_.get(), F_ADD_SEALS, F_SEAL_FUTURE_WRITE | F_SEAL_GROW | F_SEAL_SHRINK) != 0) {
    const int e = errno;
    return fail(errc::failed_precondition, "cannot seal shared memory of " + std::to_string(bytes_.size()) +
                                               " bytes against writes: " + os_reason(e));
  }
  return {};
}

bool shared_memory::sealed_against_writes() const noexcept {
  const int seals = ::fcntl(fd_.get(), F_GET_SEALS);
  if (seals < 0) return false;
  const auto need = static_cast<unsigned>(F_SEAL_GROW | F_SEAL_SHRINK);
  const auto s = static_cast<unsigned>(seals);
  return (s & need) == need && (s & static_cast<unsigned>(F_SEAL_WRITE | F_SEAL_FUTURE_WRITE)) != 0;
}

result<unique_fd> shared_memory::export_read_only() const {
  const std::string size = std::to_string(bytes_.size());
  // A reader given an fd can reopen it read-write through /proc/self/fd: only seals, not the
  // fd's mode, keep it from changing the bytes (or shrinking them under other readers).
  if (!sealed_against_writes()) {
    return fail(errc::failed_precondition, "cannot hand out shared memory of " + size +
                                               " bytes: it is not sealed against writes, growing and shrinking, "
                                               "so a reader could change it");
  }
  // The reader may map it for as long as it likes: it must never be recycled for other bytes
  // (src/devices/replica_pool.hpp checks this mark).
  mark_exported();
  // A fresh read-only open file description, so the reader can map it but never write to it.
  const std::string path = "/proc/self/fd/" + std::to_string(fd_.get());
  unique_fd fd(sys::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) {
    const int e = errno;
    return fail(errc_of_errno(e, errc::internal),
                "cannot reopen shared memory of " + size + " bytes read-only: " + os_reason(e));
  }
  return fd;
}

shared_memory::shared_memory(shared_memory&& other) noexcept
    : fd_(std::move(other.fd_)),
      bytes_(std::exchange(other.bytes_, {})),
      writable_(std::exchange(other.writable_, false)),
      exported_(other.exported_.load(std::memory_order_acquire)),
      broken_(other.broken_.load(std::memory_order_acquire)) {}

shared_memory& shared_memory::operator=(shared_memory&& other) noexcept {
  if (this != &other) {
    unmap();
    fd_ = std::move(other.fd_);
    bytes_ = std::exchange(other.bytes_, {});
    writable_ = std::exchange(other.writable_, false);
    exported_.store(other.exported_.load(std::memory_order_acquire), std::memory_order_release);
    broken_.store(other.broken_.load(std::memory_order_acquire), std::memory_order_release);
  }
  return *this;
}

shared_memory::~shared_memory() { unmap(); }

void shared_memory::unmap() noexcept {
  if (!bytes_.empty()) ::munmap(bytes_.data(), bytes_.size());
  bytes_ = {};
}

std::span<std::byte> shared_memory::mutable_bytes() const noexcept {
  TENSORREG_ASSERT(writable_);
  return bytes_;
}

status shared_memory::check_intact(std::uint64_t offset) const {
  if (!broken_.load(std::memory_order_acquire)) return {};
  return fail(errc::data_loss, "cannot read shared memory at offset " + std::to_string(offset) +
                                   ": its file shrank under the mapping (a page read faulted), so its bytes are lost");
}

status shared_memory::visit(std::uint64_t offset, std::uint64_t length, piece_sink sink) const {
  TENSORREG_TRY(check_range(offset, length));
  if (length == 0) return {};
  TENSORREG_TRY(check_intact(offset));
  const auto piece = std::span<const std::byte>(bytes_).subspan(offset, length);
  // One guard per visit: the whole piece is read under it (by the sink), so nothing per byte.
  detail::sigbus_guard guard(piece, &broken_);
  auto out = sink(piece);
  if (guard.faulted()) {
    return fail(errc::data_loss,
                "cannot read shared memory at offset " + std::to_string(offset + guard.fault_offset()) +
                    ": its file shrank under the mapping (the page read faulted), so its bytes are lost");
  }
  // Another reader's fault may have put zero pages under this read without a fault here.
  TENSORREG_TRY(check_intact(offset));
  return out;
}

result<unique_fd> shared_memory::duplicate_fd() const {
  mark_exported();
  unique_fd copy(::fcntl(fd_.get(), F_DUPFD_CLOEXEC, 0));
  if (!copy) return fail(errc_of_errno(errno, errc::internal), "cannot duplicate shared memory fd: " + os_reason());
  return copy;
}

}  // namespace tensorreg::memory
