// tensorreg/memory/mapped_file.hpp — a read-only memory mapping of a whole file.
//
// `mapped_file` owns the mapping (move-only; unmapped on destruction) and is a
// `byte_source`, so files are hashed in place. A zero-length file maps to an empty source.
//
// Thread-safety: immutable after create(); concurrent visits are safe. The file must not be
// truncated while mapped (the kernel would then raise SIGBUS on access).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "tensorreg/memory/byte_source.hpp"

namespace tensorreg::memory {

class mapped_file final : public byte_source {
 public:
  /// Opens and maps `path` read-only.
  /// Errors: NOT_FOUND (no such file), PERMISSION_DENIED, INVALID_ARGUMENT (not a regular
  /// file), INTERNAL (mmap failed); the message names the path and the OS reason.
  [[nodiscard]] static result<mapped_file> open(const std::string& path);

  mapped_file(mapped_file&& other) noexcept;
  mapped_file& operator=(mapped_file&& other) noexcept;
  mapped_file(const mapped_file&) = delete;
  mapped_file& operator=(const mapped_file&) = delete;
  ~mapped_file() override;

  [[nodiscard]] std::uint64_t size() const noexcept override { return bytes_.size(); }
  [[nodiscard]] status visit(std::uint64_t offset, std::uint64_t length, piece_sink sink) const override;

  [[nodiscard]] std::span<const std::byte> bytes() const noexcept { return bytes_; }
  [[nodiscard]] const std::string& path() const noexcept { return path_; }

 private:
  mapped_file(std::string path, std::span<const std::byte> bytes) noexcept : path_(std::move(path)), bytes_(bytes) {}
  void unmap() noexcept;

  std::string path_;
  std::span<const std::byte> bytes_;
};

}  // namespace tensorreg::memory
