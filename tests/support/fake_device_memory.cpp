#include "support/fake_device_memory.hpp"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>

namespace tensorreg::testing {

struct fake_device_memory::allocation final : memory::byte_source {
  allocation(std::int32_t dev, std::uint64_t n) : device(dev), bytes(n) {}
  std::int32_t device;
  std::vector<std::byte> bytes;

  [[nodiscard]] std::uint64_t size() const noexcept override { return bytes.size(); }
  [[nodiscard]] status visit(std::uint64_t offset, std::uint64_t length, memory::piece_sink sink) const override {
    TENSORREG_TRY(check_range(offset, length));
    if (length == 0) return {};
    return sink(std::span<const std::byte>(bytes).subspan(offset, length));
  }
};

namespace {

// A mapping of an allocation, as cudaIpcOpenMemHandle would give: shares the allocation.
class mapping final : public memory::byte_source {
 public:
  explicit mapping(std::shared_ptr<const memory::byte_source> target) : target_(std::move(target)) {}
  [[nodiscard]] std::uint64_t size() const noexcept override { return target_->size(); }
  [[nodiscard]] status visit(std::uint64_t offset, std::uint64_t length, memory::piece_sink sink) const override {
    return target_->visit(offset, length, sink);
  }

 private:
  std::shared_ptr<const memory::byte_source> target_;
};

}  // namespace

fake_device_memory::fake_device_memory(std::int32_t device_count) : device_count_(device_count) {}

std::string fake_device_memory::new_handle_locked() {
  std::string handle(64, '\0');
  const std::uint64_t n = next_handle_++;
  std::memcpy(handle.data(), "fakeipc:", 8);
  std::memcpy(handle.data() + 8, &n, sizeof n);
  return handle;
}

std::string fake_device_memory::export_allocation(std::int32_t device_id, std::uint64_t bytes) {
  std::lock_guard lock(mutex_);
  auto handle = new_handle_locked();
  allocations_.emplace(handle, std::make_shared<allocation>(device_id, bytes));
  return handle;
}

std::span<std::byte> fake_device_memory::memory_of(const std::string& handle) {
  std::lock_guard lock(mutex_);
  auto it = allocations_.find(handle);
  if (it == allocations_.end()) return {};
  return it->second->bytes;
}

std::size_t fake_device_memory::opens_of(const std::string& handle) const {
  std::lock_guard lock(mutex_);
  auto it = opens_.find(handle);
  return it == opens_.end() ? 0 : it->second;
}

std::size_t fake_device_memory::total_opens() const {
  std::lock_guard lock(mutex_);
  std::size_t n = 0;
  for (const auto& [h, count] : opens_) n += count;
  return n;
}

std::size_t fake_device_memory::allocations() const {
  std::lock_guard lock(mutex_);
  return allocate_calls_;
}

result<std::shared_ptr<const memory::byte_source>> fake_device_memory::open_ipc(std::int32_t /*owner_pid*/,
                                                                                std::int32_t device_id,
                                                                                std::string_view ipc_handle,
                                                                                std::uint64_t min_bytes) {
  std::lock_guard lock(mutex_);
  if (device_id < 0 || device_id >= device_count_) {
    return fail(errc::failed_precondition, "cannot open CUDA IPC memory: no device " + std::to_string(device_id));
  }
  auto it = allocations_.find(ipc_handle);
  if (it == allocations_.end()) return fail(errc::invalid_argument, "cannot open CUDA IPC memory: unknown handle");
  if (it->second->device != device_id) {
    return fail(errc::failed_precondition, "cannot open CUDA IPC memory: the allocation is on device " +
                                               std::to_string(it->second->device) + ", not " +
                                               std::to_string(device_id));
  }
  if (it->second->size() < min_bytes) {
    return fail(errc::out_of_range, "cannot open CUDA IPC memory: the allocation has " +
                                        std::to_string(it->second->size()) + " bytes, " + std::to_string(min_bytes) +
                                        " needed");
  }
  ++opens_[std::string(ipc_handle)];
  std::shared_ptr<const memory::byte_source> mapped = std::make_shared<mapping>(it->second);
  std::erase_if(mappings_, [](const auto& w) { return w.expired(); });
  mappings_.push_back(mapped);
  return mapped;
}

result<registration::device_buffer> fake_device_memory::allocate(std::int32_t device_id, std::uint64_t bytes) {
  std::lock_guard lock(mutex_);
  if (device_id < 0 || device_id >= device_count_) {
    return fail(errc::failed_precondition, "cannot allocate device memory: no device " + std::to_string(device_id));
  }
  auto handle = new_handle_locked();
  auto a = std::make_shared<allocation>(device_id, bytes);
  allocations_.emplace(handle, a);
  ++allocate_calls_;
  return registration::device_buffer{a, handle};
}

result<registration::device_buffer> fake_device_memory::copy_from_host(std::int32_t device_id,
                                                                       const memory::byte_source& host) {
  TENSORREG_TRY_ASSIGN(auto buffer, allocate(device_id, host.size()));
  TENSORREG_TRY(host.read(0, memory_of(buffer.ipc_handle)));
  return buffer;
}

std::size_t fake_device_memory::open_mappings() const {
  std::lock_guard lock(mutex_);
  return static_cast<std::size_t>(
      std::count_if(mappings_.begin(), mappings_.end(), [](const auto& w) { return !w.expired(); }));
}

result<std::shared_ptr<const memory::byte_source>> fake_device_memory::import_vmm(
    std::int32_t /*owner_pid*/, std::int32_t device_id, std::span<const int> fds,
    std::span<const std::uint64_t> chunk_bytes) {
  if (device_id < 0 || device_id >= device_count_) {
    return fail(errc::failed_precondition, "cannot import CUDA VMM memory: no device " + std::to_string(device_id));
  }
  if (fds.empty() || fds.size() != chunk_bytes.size()) {
    return fail(errc::invalid_argument, "cannot import CUDA VMM memory: fds and chunk sizes differ in number");
  }
  std::uint64_t total = 0;
  for (const auto bytes : chunk_bytes) total += bytes;
  auto imported = std::make_shared<allocation>(device_id, total);
  std::uint64_t at = 0;
  for (std::size_t i = 0; i < fds.size(); ++i) {
    const auto got = ::pread(fds[i], imported->bytes.data() + at, chunk_bytes[i], 0);
    if (got != static_cast<ssize_t>(chunk_bytes[i])) {
      return fail(errc::invalid_argument, "cannot import CUDA VMM memory: chunk " + std::to_string(i) +
                                              " does not read back (" + (got < 0 ? std::strerror(errno) : "short") +
                                              ")");
    }
    at += chunk_bytes[i];
  }
  std::lock_guard lock(mutex_);
  std::shared_ptr<const memory::byte_source> mapped = std::make_shared<mapping>(imported);
  std::erase_if(vmm_imports_, [](const auto& w) { return w.expired(); });
  vmm_imports_.push_back(mapped);
  return mapped;
}

std::string fake_device_memory::uuid_for(std::int32_t device_id) {
  char text[64];
  std::snprintf(text, sizeof text, "GPU-00000000-0000-0000-0000-%012d", device_id);
  return text;
}

result<std::int32_t> fake_device_memory::device_by_uuid(std::string_view uuid) const {
  std::string lower(uuid);
  for (auto& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (lower.rfind("gpu-", 0) != 0) lower = "gpu-" + lower;
  for (std::int32_t d = 0; d < device_count_; ++d) {
    std::string known = uuid_for(d);
    for (auto& c : known) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (known == lower) return d;
  }
  return fail(errc::failed_precondition, "cannot find CUDA device " + std::string(uuid) +
                                             ": no CUDA device with that UUID is visible to the daemon");
}

std::string fake_device_memory::uuid_of(std::int32_t device_id) const {
  return device_id >= 0 && device_id < device_count_ ? uuid_for(device_id) : std::string();
}

std::uint64_t fake_device_memory::vmm_reserved_bytes() const {
  std::lock_guard lock(mutex_);
  std::uint64_t n = 0;
  for (const auto& w : vmm_imports_) {
    if (auto live = w.lock()) n += live->size();
  }
  return n;
}

}  // namespace tensorreg::testing
