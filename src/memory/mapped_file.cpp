#include "tensorreg/memory/mapped_file.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "memory/system_calls.hpp"

namespace tensorreg::memory {
namespace {

errc errno_code(int e) {
  switch (e) {
    case ENOENT:
    case ENOTDIR: return errc::not_found;
    case EACCES:
    case EPERM: return errc::permission_denied;
    default: return errc_of_errno(e, errc::internal);
  }
}

}  // namespace

result<mapped_file> mapped_file::open(const std::string& path) {
  const int fd = sys::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int e = errno;
    return fail(errno_code(e), "cannot open '" + path + "': " + std::strerror(e));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    return fail(errno_code(e), "cannot stat '" + path + "': " + std::strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return fail(errc::invalid_argument, "cannot map '" + path + "': not a regular file");
  }
  const auto length = static_cast<std::size_t>(st.st_size);
  if (length == 0) {
    ::close(fd);
    return mapped_file(path, {});
  }
  void* base = sys::mmap(length, PROT_READ, MAP_PRIVATE, fd);
  const int e = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (base == MAP_FAILED) {
    return fail(errno_code(e), "cannot map '" + path + "': " + std::strerror(e));
  }
  // Hashing reads each leaf once, front to back.
  ::madvise(base, length, MADV_SEQUENTIAL);
  return mapped_file(path, {static_cast<const std::byte*>(base), length});
}

mapped_file::mapped_file(mapped_file&& other) noexcept
    : path_(std::move(other.path_)), bytes_(std::exchange(other.bytes_, {})) {}

mapped_file& mapped_file::operator=(mapped_file&& other) noexcept {
  if (this != &other) {
    unmap();
    path_ = std::move(other.path_);
    bytes_ = std::exchange(other.bytes_, {});
  }
  return *this;
}

mapped_file::~mapped_file() { unmap(); }

void mapped_file::unmap() noexcept {
  if (!bytes_.empty()) {
    ::munmap(const_cast<std::byte*>(bytes_.data()), bytes_.size());
    bytes_ = {};
  }
}

status mapped_file::visit(std::uint64_t offset, std::uint64_t length, piece_sink sink) const {
  TENSORREG_TRY(check_range(offset, length));
  if (length == 0) return {};
  return sink(bytes_.subspan(offset, length));
}

}  // namespace tensorreg::memory
