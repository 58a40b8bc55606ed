// tests/support/fake_device_memory.hpp — a `device_memory` backed by host memory.
//
// Lets the coalesced plan and the CUDA-handle paths of the lease-in-place plan run on a
// machine without a GPU. "Device allocations" are host buffers keyed by fake IPC handle bytes
// (64 bytes, as cudaIpcMemHandle_t); a test exports client memory with `export_allocation()`
// and writes it through `memory_of()`. Every open_ipc() is counted per handle, so tests can
// check that each distinct handle is opened once per commit (registration.md §5.2).
// CUDA VMM "allocations" are memfds: import_vmm() copies each chunk's bytes out of its fd into
// one contiguous host buffer (as mapping the chunks back to back would show them). Device N
// has the UUID GPU-00000000-0000-0000-0000-00000000000N (uuid_for(N)).
//
// Thread-safety: every member function may be called concurrently (one internal mutex).
// Ownership: the fake owns its allocations; opened mappings share them, so a mapping stays
// readable after the test drops the allocation.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "tensorreg/registration/device_memory.hpp"

namespace tensorreg::testing {

class fake_device_memory final : public registration::device_memory {
 public:
  /// A fake machine with devices 0 .. device_count-1.
  explicit fake_device_memory(std::int32_t device_count = 1);

  /// Creates a zero-filled "device allocation" of `bytes` on `device_id` (as a client's
  /// cudaMalloc + cudaIpcGetMemHandle would) and returns its handle bytes.
  [[nodiscard]] std::string export_allocation(std::int32_t device_id, std::uint64_t bytes);

  /// The writable memory behind `handle` (empty if unknown).
  [[nodiscard]] std::span<std::byte> memory_of(const std::string& handle);

  /// How many times open_ipc() succeeded for `handle`, and in total.
  [[nodiscard]] std::size_t opens_of(const std::string& handle) const;
  [[nodiscard]] std::size_t total_opens() const;
  /// How many allocate() calls succeeded.
  [[nodiscard]] std::size_t allocations() const;

  // device_memory
  [[nodiscard]] result<std::shared_ptr<const memory::byte_source>> open_ipc(std::int32_t owner_pid,
                                                                            std::int32_t device_id,
                                                                            std::string_view ipc_handle,
                                                                            std::uint64_t min_bytes) override;
  [[nodiscard]] result<registration::device_buffer> allocate(std::int32_t device_id, std::uint64_t bytes) override;
  [[nodiscard]] result<registration::device_buffer> copy_from_host(std::int32_t device_id,
                                                                   const memory::byte_source& host) override;
  /// Mappings returned by open_ipc() that are still held by someone.
  [[nodiscard]] std::size_t open_mappings() const override;
  [[nodiscard]] result<std::shared_ptr<const memory::byte_source>> import_vmm(
      std::int32_t owner_pid, std::int32_t device_id, std::span<const int> fds,
      std::span<const std::uint64_t> chunk_bytes) override;
  [[nodiscard]] result<std::int32_t> device_by_uuid(std::string_view uuid) const override;
  [[nodiscard]] std::string uuid_of(std::int32_t device_id) const override;
  /// Bytes of VMM imports still held by someone.
  [[nodiscard]] std::uint64_t vmm_reserved_bytes() const override;

  /// The UUID of fake device `device_id`.
  [[nodiscard]] static std::string uuid_for(std::int32_t device_id);

 private:
  struct allocation;
  [[nodiscard]] std::string new_handle_locked();

  const std::int32_t device_count_;
  mutable std::mutex mutex_;
  std::uint64_t next_handle_ = 1;
  std::map<std::string, std::shared_ptr<allocation>, std::less<>> allocations_;
  std::map<std::string, std::size_t, std::less<>> opens_;
  std::vector<std::weak_ptr<const memory::byte_source>> mappings_;
  std::size_t allocate_calls_ = 0;
  std::vector<std::weak_ptr<const memory::byte_source>> vmm_imports_;
};

}  // namespace tensorreg::testing
