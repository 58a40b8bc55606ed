// src/memory/system_calls.hpp — the system calls the engine's memory and file code makes, each
// behind its fault site (tensorreg/common/fault_injection.hpp).
//
// Each function asks injected_fault() first: when a test armed the site, it fails exactly as the
// real call would (-1 or MAP_FAILED, errno set) without making it, so the caller's one error
// path serves both and an injected failure answers what a real one would. Disarmed, each is the
// plain call after one relaxed atomic load.
//
// Thread-safety: as the system calls themselves. Private to the library.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "tensorreg/common/error.hpp"

namespace tensorreg::memory::sys {

[[nodiscard]] int memfd_create(const char* name, unsigned flags) noexcept;
[[nodiscard]] int ftruncate(int fd, std::uint64_t size) noexcept;
[[nodiscard]] void* mmap(std::size_t length, int prot, int flags, int fd) noexcept;
/// `mode` is used when `flags` create the file.
[[nodiscard]] int open(const char* path, int flags, mode_t mode = 0) noexcept;
/// Behind the open site too: making a directory is creating a file.
[[nodiscard]] int mkdir(const char* path, mode_t mode) noexcept;
[[nodiscard]] int fsync(int fd) noexcept;
[[nodiscard]] int rename(const char* from, const char* to) noexcept;
[[nodiscard]] ssize_t pread(int fd, void* out, std::size_t length, std::uint64_t offset) noexcept;
/// Behind the write site.
[[nodiscard]] ssize_t pwrite(int fd, const void* bytes, std::size_t length, std::uint64_t offset) noexcept;

/// The error of a failed file call: "cannot <call> '<path>': <strerror>", RESOURCE_EXHAUSTED
/// when the disk or the quota is full (space can be freed and the call retried), UNAVAILABLE
/// otherwise.
[[nodiscard]] error file_error(std::string_view call, const std::string& path, int err);

/// Writes all of `bytes` at the fd's file offset, through short writes and EINTR, each write()
/// behind fault_site::write. Errors: file_error("write", path, errno).
[[nodiscard]] status write_all(int fd, std::span<const std::byte> bytes, const std::string& path);

/// Whether a large buffer (`bytes` bytes of `what`) may be allocated: OK, or the
/// RESOURCE_EXHAUSTED a failed allocation answers ("cannot allocate <what> of N bytes: <reason>")
/// when a test injected one at fault_site::allocate.
[[nodiscard]] status check_allocation(std::string_view what, std::uint64_t bytes);

/// The error of a large allocation that threw std::bad_alloc: RESOURCE_EXHAUSTED, worded as
/// check_allocation()'s.
[[nodiscard]] error allocation_failed(std::string_view what, std::uint64_t bytes);

}  // namespace tensorreg::memory::sys
