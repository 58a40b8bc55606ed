#include "tensorreg/memory/mapped_file.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>
#include <optional>
#include <utility>

#include "memory/buffered_reads.hpp"
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
  unique_fd owned(sys::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  const int fd = owned.get();
  if (fd < 0) {
    const int e = errno;
    return fail(errno_code(e), "cannot open '" + path + "': " + std::strerror(e));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    return fail(errno_code(e), "cannot stat '" + path + "': " + std::strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    return fail(errc::invalid_argument, "cannot map '" + path + "': not a regular file");
  }
  const auto length = static_cast<std::size_t>(st.st_size);
  if (length == 0) return mapped_file(path, std::move(owned), {});
  void* base = sys::mmap(length, PROT_READ, MAP_PRIVATE, fd);
  if (base == MAP_FAILED) {
    const int e = errno;
    return fail(errno_code(e), "cannot map '" + path + "': " + std::strerror(e));
  }
  return mapped_file(path, std::move(owned), {static_cast<const std::byte*>(base), length});
}

mapped_file::mapped_file(mapped_file&& other) noexcept
    : path_(std::move(other.path_)), fd_(std::move(other.fd_)), bytes_(std::exchange(other.bytes_, {})) {}

mapped_file& mapped_file::operator=(mapped_file&& other) noexcept {
  if (this != &other) {
    unmap();
    path_ = std::move(other.path_);
    fd_ = std::move(other.fd_);
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

static_assert(mapped_file::piece_bytes == buffered_piece_bytes);

status mapped_file::visit(std::uint64_t offset, std::uint64_t length, piece_sink sink) const {
  TENSORREG_TRY(check_range(offset, length));
  return visit_through_buffer(
      offset, length, [this](std::uint64_t at, std::span<std::byte> out) { return read_fully(at, out); }, sink);
}

status mapped_file::read_into(std::uint64_t offset, std::span<std::byte> out) const {
  TENSORREG_TRY(check_range(offset, out.size()));
  return read_fully(offset, out);
}

status mapped_file::read_fully(std::uint64_t offset, std::span<std::byte> out) const {
  const auto short_of = pread_fully(fd_.get(), out, offset);
  if (!short_of) return {};
  std::string reason;
  if (short_of->error == 0) {
    reason = "the file ends there now (it was truncated after it was opened)";
  } else if (short_of->error == EFAULT) {
    reason = "the memory to read into cannot be written (" + std::string(std::strerror(EFAULT)) + ")";
  } else {
    reason = std::strerror(short_of->error);
  }
  return fail(errc::data_loss,
              "cannot read '" + path_ + "' at offset " + std::to_string(offset + short_of->got) + ": " + reason);
}

}  // namespace tensorreg::memory
