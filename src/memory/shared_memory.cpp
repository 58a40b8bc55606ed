#include "tensorreg/memory/shared_memory.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <utility>

namespace tensorreg::memory {
namespace {

std::string os_reason() { return std::strerror(errno); }

}  // namespace

result<shared_memory> shared_memory::create(std::uint64_t size, const std::string& name) {
  if (size == 0) return fail(errc::invalid_argument, "cannot create shared memory '" + name + "': size is 0");
  unique_fd fd(::memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd) {
    return fail(errc::resource_exhausted, "cannot create shared memory '" + name + "': " + os_reason());
  }
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) {
    return fail(errc::resource_exhausted, "cannot size shared memory '" + name + "' to " +
                                              std::to_string(size) + " bytes: " + os_reason());
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
    return fail(errc::invalid_argument, "cannot map shared memory: fd " + std::to_string(fd.get()) +
                                            " is not usable: " + os_reason());
  }
  if (static_cast<std::uint64_t>(st.st_size) < size) {
    return fail(errc::invalid_argument, "cannot map shared memory: the file holds " +
                                            std::to_string(st.st_size) + " bytes, fewer than " +
                                            std::to_string(size));
  }
  const int prot = writable ? PROT_READ | PROT_WRITE : PROT_READ;
  void* base = ::mmap(nullptr, size, prot, MAP_SHARED, fd.get(), 0);
  if (base == MAP_FAILED) {
    const errc code = (errno == EACCES || errno == EPERM) ? errc::permission_denied : errc::resource_exhausted;
    return fail(code, "cannot map shared memory of " + std::to_string(size) + " bytes: " + os_reason());
  }
  return shared_memory(std::move(fd), {static_cast<std::byte*>(base), static_cast<std::size_t>(size)}, writable);
}

shared_memory::shared_memory(shared_memory&& other) noexcept
    : fd_(std::move(other.fd_)),
      bytes_(std::exchange(other.bytes_, {})),
      writable_(std::exchange(other.writable_, false)),
      exported_(other.exported_.load(std::memory_order_acquire)) {}

shared_memory& shared_memory::operator=(shared_memory&& other) noexcept {
  if (this != &other) {
    unmap();
    fd_ = std::move(other.fd_);
    bytes_ = std::exchange(other.bytes_, {});
    writable_ = std::exchange(other.writable_, false);
    exported_.store(other.exported_.load(std::memory_order_acquire), std::memory_order_release);
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

status shared_memory::visit(std::uint64_t offset, std::uint64_t length, piece_sink sink) const {
  TENSORREG_TRY(check_range(offset, length));
  if (length == 0) return {};
  return sink(std::span<const std::byte>(bytes_).subspan(offset, length));
}

result<unique_fd> shared_memory::duplicate_fd() const {
  mark_exported();
  unique_fd copy(::fcntl(fd_.get(), F_DUPFD_CLOEXEC, 0));
  if (!copy) return fail(errc_of_errno(errno, errc::internal), "cannot duplicate shared memory fd: " + os_reason());
  return copy;
}

}  // namespace tensorreg::memory
