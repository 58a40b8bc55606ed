#include "memory/system_calls.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#include "tensorreg/common/fault_injection.hpp"

namespace tensorreg::memory::sys {
namespace {

// True when a test armed `site` for this call; errno then holds the injected error.
bool injected(fault_site site) noexcept {
  const int e = injected_fault(site);
  if (e == 0) return false;
  errno = e;
  return true;
}

}  // namespace

int memfd_create(const char* name, unsigned flags) noexcept {
  if (injected(fault_site::memfd_create)) return -1;
  return ::memfd_create(name, flags);
}

int ftruncate(int fd, std::uint64_t size) noexcept {
  if (injected(fault_site::ftruncate)) return -1;
  return ::ftruncate(fd, static_cast<off_t>(size));
}

void* mmap(std::size_t length, int prot, int flags, int fd) noexcept {
  if (injected(fault_site::mmap)) return MAP_FAILED;
  return ::mmap(nullptr, length, prot, flags, fd, 0);
}

int open(const char* path, int flags, mode_t mode) noexcept {
  if (injected(fault_site::open)) return -1;
  return ::open(path, flags, mode);
}

int mkdir(const char* path, mode_t mode) noexcept {
  if (injected(fault_site::open)) return -1;
  return ::mkdir(path, mode);
}

int fsync(int fd) noexcept {
  if (injected(fault_site::fsync)) return -1;
  return ::fsync(fd);
}

int rename(const char* from, const char* to) noexcept {
  if (injected(fault_site::rename)) return -1;
  return std::rename(from, to);
}

ssize_t pread(int fd, void* out, std::size_t length, std::uint64_t offset) noexcept {
  if (injected(fault_site::read)) return -1;
  return ::pread(fd, out, length, static_cast<off_t>(offset));
}

ssize_t pwrite(int fd, const void* bytes, std::size_t length, std::uint64_t offset) noexcept {
  if (injected(fault_site::write)) return -1;
  return ::pwrite(fd, bytes, length, static_cast<off_t>(offset));
}

error file_error(std::string_view call, const std::string& path, int err) {
  const auto code = (err == ENOSPC || err == EDQUOT) ? errc::resource_exhausted : errc::unavailable;
  return error{code, "cannot " + std::string(call) + " '" + path + "': " + std::strerror(err)};
}

status write_all(int fd, std::span<const std::byte> bytes, const std::string& path) {
  while (!bytes.empty()) {
    if (int e = injected_fault(fault_site::write); e != 0) return tl::unexpected(file_error("write", path, e));
    const auto n = ::write(fd, bytes.data(), bytes.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return tl::unexpected(file_error("write", path, errno));
    }
    bytes = bytes.subspan(static_cast<std::size_t>(n));
  }
  return {};
}

error allocation_failed(std::string_view what, std::uint64_t bytes) {
  return error{errc::resource_exhausted, "cannot allocate " + std::string(what) + " of " + std::to_string(bytes) +
                                             " bytes: " + std::strerror(ENOMEM)};
}

status check_allocation(std::string_view what, std::uint64_t bytes) {
  const int e = injected_fault(fault_site::allocate);
  if (e == 0) return {};
  // Whatever errno the test named, a failed allocation is out of memory, as bad_alloc says.
  return tl::unexpected(allocation_failed(what, bytes));
}

}  // namespace tensorreg::memory::sys
