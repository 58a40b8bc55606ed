#include "tensorreg/cuda/device_memory_provider.hpp"

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "cuda/batched_copier.hpp"
#include "cuda/bulk_copy.hpp"
#include "cuda/cuda_check.hpp"
#include "cuda/driver_entry.hpp"
#include "cuda/pinned_double_buffer.hpp"
#include "cuda/speed_probe.hpp"
#include "cuda/vmm_import.hpp"
#include "tensorreg/cuda/gpu_tree_hash.hpp"
#include "tensorreg/devices/device_identity.hpp"

namespace tensorreg::cuda {
namespace detail {
namespace {

constexpr std::size_t ipc_handle_bytes = sizeof(cudaIpcMemHandle_t);

/// A staging buffer of visit(): two chunks, used by one visit at a time.
using staging = pinned_double_buffer;

}  // namespace

struct provider_state {
  device_memory_provider::options opts;
  int devices = 0;
  std::atomic<std::uint64_t> device_hashes{0};
  std::atomic<std::uint64_t> snapshot_kernel_copies{0};
  // Cumulative driver work, for GetStats: a client that keeps its regions makes neither grow.
  std::atomic<std::uint64_t> ipc_opens{0};
  std::atomic<std::uint64_t> vmm_imports{0};
  // Each device's stream for snapshots (snapshot_to_device), made on first use; one snapshot per
  // device at a time (the copy is bound by the device's memory bandwidth, not by its issue).
  struct snapshot_lane {
    std::mutex mutex;
    cudaStream_t stream = nullptr;
    // The next snapshot's buffer, being allocated on another thread (options::
    // snapshot_spare_bytes): spare_bytes long, null when its cudaMalloc failed. Never exported
    // before a snapshot takes it, so no reader can have seen it.
    std::future<void*> spare;
    std::uint64_t spare_bytes = 0;
    int device = 0;
    // Writes a whole snapshot in one kernel launch, its chunk tables kept for the next one;
    // made on first use (empty where it could not be made: the runs are then copied one by one).
    std::optional<batched_copier> copier;
    ~snapshot_lane() {
      copier.reset();  // waits for its last copy, which may be on `stream`
      if (spare.valid()) {
        void* p = spare.get();
        if (p != nullptr) {
          release_device_guard guard(device);
          check_release(cudaFree(p), "free a spare snapshot buffer");
        }
      }
      if (stream != nullptr) check_release(cudaStreamDestroy(stream), "destroy a snapshot stream");
    }
  };
  std::vector<std::unique_ptr<snapshot_lane>> lanes;  // by device, sized at create()
  // One GPU tree hasher per device, reused (its scratch grows once); one hash at a time on each
  // device, and devices hash concurrently (a multi-GPU host hashes every GPU's artifacts at once).
  struct device_hasher {
    std::mutex mutex;
    std::optional<gpu_tree_hasher> hasher;  // made on first use
  };
  std::vector<std::unique_ptr<device_hasher>> hashers;  // by device, sized at create()
  bulk_copier bulk;                                 // copy_to_host(): snapshot + D2H with pinned staging kept for reuse
  std::shared_ptr<devices::replica_pool> replicas;  // copy_to_host()'s replica pool; null when off
  PFN_cuMemGetAddressRange_v3020 get_address_range = nullptr;
  PFN_cuGetErrorName_v6000 get_error_name = nullptr;

  // CUDA VMM imports (vmm_import.hpp): the driver's entry points, each device's allocation
  // granularity once asked (0: not yet), and what live imports hold, for stats and tests.
  vmm_driver vmm;
  std::unique_ptr<std::atomic<std::uint64_t>[]> granularity;
  std::atomic<std::uint64_t> vmm_reserved{0};
  std::atomic<std::size_t> vmm_mappings{0};
  std::atomic<std::size_t> ipc_mappings{0};  // live IPC mappings, so stats take no lock
  // Imports and releases run one at a time. The driver serializes them anyway, and threads
  // contending for it made each import slower than one thread alone (cuda_vmm_bench,
  // benchmarks/RESULTS.md); in turn this is what open_ipc does (ipc_mutex).
  std::mutex vmm_mutex;
  // Each device's UUID, read once at create(): a client names its GPU by UUID because its
  // ordinals may differ from ours (docs/wire-format.md §12).
  std::vector<devices::gpu_uuid> uuids;

  [[nodiscard]] result<std::uint64_t> granularity_of(int device) {
    auto& slot = granularity[static_cast<std::size_t>(device)];
    if (const std::uint64_t known = slot.load(std::memory_order_relaxed); known != 0) return known;
    TENSORREG_TRY_ASSIGN(const std::uint64_t g, vmm.device_granularity(device));
    slot.store(g, std::memory_order_relaxed);
    return g;
  }

  // Staging buffers kept for reuse, per device.
  std::mutex pool_mutex;
  std::vector<std::vector<std::unique_ptr<staging>>> free_staging;

  // cudaIpcOpenMemHandle and cudaIpcCloseMemHandle run under ipc_mutex, so a key being closed
  // (its last holder just went) is closed before it can be opened again. Lock order:
  // ipc_mutex, then cache_mutex. No shared_ptr to a mapping may be released while either is
  // held (its destructor takes both).
  std::mutex ipc_mutex;
  std::condition_variable closed;  // a mapping was closed (waited on with ipc_mutex)
  mutable std::mutex cache_mutex;
  struct cache_entry {
    std::weak_ptr<const device_source> mapping;
    const void* identity = nullptr;  // the mapping object, to tell a reopened key from its predecessor
  };
  std::map<std::pair<std::int32_t, std::string>, cache_entry, std::less<>> cache;

  [[nodiscard]] std::string cu_error(CUresult r) const {
    const char* name = nullptr;
    if (get_error_name != nullptr && get_error_name(r, &name) == CUDA_SUCCESS && name != nullptr) return name;
    return "CUresult " + std::to_string(static_cast<int>(r));
  }

  /// A staging buffer of `device`, from the pool or new.
  [[nodiscard]] result<std::unique_ptr<staging>> acquire(int device) {
    {
      std::lock_guard lock(pool_mutex);
      auto& pool = free_staging[static_cast<std::size_t>(device)];
      if (!pool.empty()) {
        auto s = std::move(pool.back());
        pool.pop_back();
        return s;
      }
    }
    return pinned_double_buffer::create(device, opts.staging_chunk_bytes);
  }

  void give_back(std::unique_ptr<staging> s) noexcept {
    std::unique_ptr<staging> extra;  // freed outside the lock
    std::lock_guard lock(pool_mutex);
    auto& pool = free_staging[static_cast<std::size_t>(s->device)];
    if (pool.size() < opts.staging_buffers_kept) {
      pool.push_back(std::move(s));
    } else {
      extra = std::move(s);
    }
  }
};

namespace {

/// Copies [offset, offset + length) of device memory at `base` on `device` to the host in
/// chunks, double-buffered: chunk i+1 is copying while the sink reads chunk i.
status visit_device(provider_state& state, int device, const std::byte* base, std::uint64_t offset,
                    std::uint64_t length, memory::piece_sink sink) {
  if (length == 0) return {};
  TENSORREG_TRY_ASSIGN(auto guard, device_guard::create(device));
  TENSORREG_TRY_ASSIGN(auto slot, state.acquire(device));
  const std::uint64_t chunk = slot->half_bytes;
  const std::uint64_t chunks = (length + chunk - 1) / chunk;
  const auto piece_length = [&](std::uint64_t i) { return std::min(chunk, length - i * chunk); };
  const auto issue = [&](std::uint64_t i) -> status {
    std::byte* to = slot->host + (i % 2) * chunk;
    const std::byte* from = base + offset + i * chunk;
    TENSORREG_CUDA_TRY(cudaMemcpyAsync(to, from, piece_length(i), cudaMemcpyDeviceToHost, slot->stream),
                       "copy device memory to the host");
    TENSORREG_CUDA_TRY(cudaEventRecord(slot->done[i % 2], slot->stream), "record a staging event");
    return {};
  };

  status out = issue(0);
  for (std::uint64_t i = 0; out && i < chunks; ++i) {
    if (i + 1 < chunks) {
      out = issue(i + 1);  // overwrites the half the sink finished with in step i - 1
      if (!out) break;
    }
    out = check(cudaEventSynchronize(slot->done[i % 2]), "copy device memory to the host");
    if (!out) break;
    out = sink(std::span<const std::byte>(slot->host + (i % 2) * chunk, piece_length(i)));
  }
  // The buffer may be reused only once no copy into it is in flight.
  const cudaError_t idle = cudaStreamSynchronize(slot->stream);
  if (idle == cudaSuccess) {
    state.give_back(std::move(slot));
  } else {
    auto failed = check(idle, "finish copying device memory to the host");
    if (out) out = std::move(failed);
  }
  return out;
}

// What every device memory source of this provider shares: where the bytes are, and visit()
// through the provider's pinned staging. Subclasses say how the memory is released.
class provider_source : public device_source {
 public:
  provider_source(std::shared_ptr<provider_state> state, void* ptr, std::uint64_t size, int device) noexcept
      : state_(std::move(state)), ptr_(ptr), size_(size), device_(device) {}
  provider_source(const provider_source&) = delete;
  provider_source& operator=(const provider_source&) = delete;

  [[nodiscard]] std::uint64_t size() const noexcept override { return size_; }
  [[nodiscard]] status visit(std::uint64_t offset, std::uint64_t length, memory::piece_sink sink) const override {
    TENSORREG_TRY(check_range(offset, length));
    return visit_device(*state_, device_, static_cast<const std::byte*>(ptr_), offset, length, sink);
  }
  [[nodiscard]] const void* device_pointer() const noexcept override { return ptr_; }
  [[nodiscard]] std::int32_t device() const noexcept override { return device_; }

 protected:
  std::shared_ptr<provider_state> state_;
  void* ptr_;
  std::uint64_t size_;
  int device_;
};

// An IPC mapping: leaves the cache and closes the handle with its last holder.
class ipc_mapping final : public provider_source {
 public:
  ipc_mapping(std::shared_ptr<provider_state> state, std::pair<std::int32_t, std::string> key, void* ptr,
              std::uint64_t size, int device) noexcept
      : provider_source(std::move(state), ptr, size, device), key_(std::move(key)) {
    state_->ipc_mappings.fetch_add(1, std::memory_order_relaxed);
  }

  ~ipc_mapping() override {
    state_->ipc_mappings.fetch_sub(1, std::memory_order_relaxed);
    std::lock_guard open_lock(state_->ipc_mutex);
    {
      std::lock_guard lock(state_->cache_mutex);
      auto it = state_->cache.find(key_);
      if (it != state_->cache.end() && it->second.identity == this) state_->cache.erase(it);
    }
    {
      release_device_guard guard(device_);
      check_release(cudaIpcCloseMemHandle(ptr_), "close a CUDA IPC mapping");
    }
    state_->closed.notify_all();
  }

 private:
  std::pair<std::int32_t, std::string> key_;
};

// A daemon-owned device buffer (coalesced plan): freed with its last holder.
class owned_device_buffer final : public provider_source {
 public:
  using provider_source::provider_source;

  ~owned_device_buffer() override {
    release_device_guard guard(device_);
    check_release(cudaFree(ptr_), "free a device buffer");
  }
};

// A CUDA VMM import: unmapped, its address space freed and its handles released with its last
// holder. Counted in provider_state::vmm_reserved / vmm_mappings while it lives.
class vmm_mapping final : public provider_source {
 public:
  vmm_mapping(std::shared_ptr<provider_state> state, vmm_import imported, int device) noexcept
      : provider_source(std::move(state), imported.pointer(), imported.size(), device),
        reserved_(imported.reserved_bytes()),
        import_(std::move(imported)) {
    state_->vmm_reserved.fetch_add(reserved_, std::memory_order_relaxed);
    state_->vmm_mappings.fetch_add(1, std::memory_order_relaxed);
  }

  ~vmm_mapping() override {
    {
      release_device_guard guard(device_);
      // The guard sets nothing when device_ is already current, and the driver unmaps in the
      // primary context, which cudaSetDevice makes current on this thread.
      check_release(cudaSetDevice(device_), "make a CUDA device current to unmap a VMM import");
      std::lock_guard lock(state_->vmm_mutex);
      import_.reset();
    }
    // Only once the address space is really free, so a reader that sees 0 may rely on it.
    state_->vmm_reserved.fetch_sub(reserved_, std::memory_order_relaxed);
    state_->vmm_mappings.fetch_sub(1, std::memory_order_relaxed);
  }

 private:
  std::uint64_t reserved_;
  std::optional<vmm_import> import_;
};

/// The code for a failed cudaIpcOpenMemHandle: a handle that opens nothing (stale, of a
/// process that exited, malformed) is the caller's argument; running out of memory or
/// losing the device is not.
errc open_error_code(cudaError_t e) noexcept {
  switch (code_of(e)) {
    case errc::resource_exhausted: return errc::resource_exhausted;
    case errc::failed_precondition: return errc::failed_precondition;
    default: return errc::invalid_argument;
  }
}

}  // namespace
}  // namespace detail

const device_source* as_device_source(const memory::byte_source& source) noexcept {
  return dynamic_cast<const device_source*>(&source);
}

result<std::shared_ptr<device_memory_provider>> device_memory_provider::create() { return create(options{}); }

result<std::shared_ptr<device_memory_provider>> device_memory_provider::create(options opts) {
  if (opts.staging_chunk_bytes == 0) {
    return fail(errc::invalid_argument, "cannot create the CUDA device memory provider: staging_chunk_bytes is 0");
  }
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    static_cast<void>(cudaGetLastError());
    return fail(errc::failed_precondition,
                "cannot use CUDA device memory: no CUDA device (" + detail::describe(e) + ")");
  }
  if (count <= 0) return fail(errc::failed_precondition, "cannot use CUDA device memory: no CUDA device (0 present)");

  auto state = std::make_shared<detail::provider_state>();
  state->opts = opts;
  if (opts.replica_pool_bytes == options::replica_pool_auto) {
    const long pages = ::sysconf(_SC_PHYS_PAGES);
    const long page = ::sysconf(_SC_PAGESIZE);
    const std::uint64_t physical =
        pages > 0 && page > 0 ? static_cast<std::uint64_t>(pages) * static_cast<std::uint64_t>(page) : 0;
    state->opts.replica_pool_bytes = std::min(std::uint64_t{16} << 30, physical / 8);
  }
  if (state->opts.replica_pool_bytes > 0)
    state->replicas = devices::replica_pool::create(state->opts.replica_pool_bytes);
  state->devices = count;
  state->free_staging.resize(static_cast<std::size_t>(count));
  for (int d = 0; d < count; ++d) {
    state->hashers.push_back(std::make_unique<detail::provider_state::device_hasher>());
    state->lanes.push_back(std::make_unique<detail::provider_state::snapshot_lane>());
    state->lanes.back()->device = d;
  }
  // Driver entry points through the runtime, so nothing links libcuda.so: a binary built with
  // CUDA still starts on a machine without the driver (and then runs with no GPU).
  if (!detail::find_driver_entry(state->get_address_range, "cuMemGetAddressRange", 3020)) {
    return fail(errc::failed_precondition, "cannot use CUDA device memory: the driver has no cuMemGetAddressRange");
  }
  for (int d = 0; d < count; ++d) {
    cudaDeviceProp prop{};
    TENSORREG_CUDA_TRY(cudaGetDeviceProperties(&prop, d), "read the UUID of CUDA device " + std::to_string(d));
    devices::gpu_uuid uuid;
    static_assert(sizeof prop.uuid.bytes == sizeof uuid.bytes);
    std::memcpy(uuid.bytes.data(), prop.uuid.bytes, sizeof uuid.bytes);
    state->uuids.push_back(uuid);
  }
  // A driver without the VMM API still serves CUDA IPC: import_vmm() then says what is missing.
  state->vmm = detail::vmm_driver::load();
  state->granularity = std::make_unique<std::atomic<std::uint64_t>[]>(static_cast<std::size_t>(count));
  // Optional: error names in messages.
  static_cast<void>(detail::find_driver_entry(state->get_error_name, "cuGetErrorName", 6000));
  return std::shared_ptr<device_memory_provider>(new device_memory_provider(std::move(state)));
}

device_memory_provider::device_memory_provider(std::shared_ptr<detail::provider_state> state) noexcept
    : state_(std::move(state)) {}

device_memory_provider::~device_memory_provider() = default;

std::int32_t device_memory_provider::device_count() const noexcept { return state_->devices; }

result<std::shared_ptr<const memory::byte_source>> device_memory_provider::open_ipc(std::int32_t owner_pid,
                                                                                    std::int32_t device_id,
                                                                                    std::string_view ipc_handle,
                                                                                    std::uint64_t min_bytes) {
  auto& st = *state_;
  const auto what = [&] {
    return "cannot open CUDA IPC handle of process " + std::to_string(owner_pid) + " on device " +
           std::to_string(device_id);
  };
  if (ipc_handle.size() != detail::ipc_handle_bytes) {
    return fail(errc::invalid_argument, what() + ": a handle has " + std::to_string(detail::ipc_handle_bytes) +
                                            " bytes, got " + std::to_string(ipc_handle.size()));
  }
  if (device_id < 0 || device_id >= st.devices) {
    return fail(errc::failed_precondition,
                what() + ": no such CUDA device (" + std::to_string(st.devices) + " present)");
  }
  const auto usable =
      [&](const std::shared_ptr<const device_source>& m) -> result<std::shared_ptr<const memory::byte_source>> {
    if (m->device() != device_id) {
      return fail(errc::failed_precondition,
                  what() + ": the memory is mapped on device " + std::to_string(m->device()));
    }
    if (m->size() < min_bytes) {
      return fail(errc::out_of_range, what() + ": the allocation holds " + std::to_string(m->size()) +
                                          " bytes, fewer than the " + std::to_string(min_bytes) + " needed");
    }
    return std::shared_ptr<const memory::byte_source>(m);
  };
  auto key = std::make_pair(owner_pid, std::string(ipc_handle));

  // Declared before the locks, so a mapping found and then dropped is released after them.
  std::shared_ptr<const device_source> live;
  {
    std::lock_guard lock(st.cache_mutex);
    if (auto it = st.cache.find(key); it != st.cache.end()) live = it->second.mapping.lock();
  }
  if (live) return usable(live);

  std::unique_lock open_lock(st.ipc_mutex);
  for (;;) {
    bool closing = false;
    {
      std::lock_guard lock(st.cache_mutex);
      if (auto it = st.cache.find(key); it != st.cache.end()) {
        live = it->second.mapping.lock();
        closing = !live;
      }
    }
    if (live) {
      open_lock.unlock();
      return usable(live);
    }
    if (!closing) break;
    // Its last holder just went and its destructor waits for ipc_mutex to close it: let it,
    // then open afresh (a handle is never opened while its previous mapping is open).
    st.closed.wait(open_lock);
  }

  TENSORREG_TRY_ASSIGN(auto guard, detail::device_guard::create(device_id));
  cudaIpcMemHandle_t handle{};
  std::memcpy(&handle, ipc_handle.data(), sizeof handle);
  void* ptr = nullptr;
  if (const cudaError_t e = cudaIpcOpenMemHandle(&ptr, handle, cudaIpcMemLazyEnablePeerAccess); e != cudaSuccess) {
    static_cast<void>(cudaGetLastError());
    return fail(detail::open_error_code(e), what() + ": " + detail::describe(e));
  }
  // Until the mapping object exists, failures close the handle here (never through a
  // shared_ptr: its destructor takes ipc_mutex, held now).
  const auto close_and_fail = [&](errc code, std::string message) {
    detail::check_release(cudaIpcCloseMemHandle(ptr), "close a CUDA IPC mapping");
    return fail(code, std::move(message));
  };
  cudaPointerAttributes attributes{};
  if (const cudaError_t e = cudaPointerGetAttributes(&attributes, ptr); e != cudaSuccess) {
    static_cast<void>(cudaGetLastError());
    return close_and_fail(errc::internal, what() + ": cannot query the mapped pointer: " + detail::describe(e));
  }
  if (attributes.type != cudaMemoryTypeDevice || attributes.device != device_id) {
    return close_and_fail(errc::failed_precondition,
                          what() + ": the memory lives on device " + std::to_string(attributes.device));
  }
  CUdeviceptr base = 0;
  std::size_t range = 0;
  const auto at = reinterpret_cast<CUdeviceptr>(ptr);
  if (const CUresult r = st.get_address_range(&base, &range, at); r != CUDA_SUCCESS) {
    return close_and_fail(errc::internal, what() + ": cannot query the allocation's size: " + st.cu_error(r));
  }
  const std::uint64_t size = static_cast<std::uint64_t>(base + range - at);
  if (size < min_bytes) {
    return close_and_fail(errc::out_of_range, what() + ": the allocation holds " + std::to_string(size) +
                                                  " bytes, fewer than the " + std::to_string(min_bytes) + " needed");
  }
  st.ipc_opens.fetch_add(1, std::memory_order_relaxed);
  auto mapping = std::make_shared<const detail::ipc_mapping>(state_, key, ptr, size, device_id);
  {
    std::lock_guard lock(st.cache_mutex);
    st.cache[std::move(key)] = {mapping, mapping.get()};
  }
  return std::shared_ptr<const memory::byte_source>(std::move(mapping));
}

result<registration::device_buffer> device_memory_provider::allocate(std::int32_t device_id, std::uint64_t bytes) {
  const auto what = [&] {
    return "cannot allocate " + std::to_string(bytes) + " bytes of device memory on device " +
           std::to_string(device_id);
  };
  if (bytes == 0) return fail(errc::invalid_argument, what() + ": the size is 0");
  if (device_id < 0 || device_id >= state_->devices) {
    return fail(errc::failed_precondition,
                what() + ": no such CUDA device (" + std::to_string(state_->devices) + " present)");
  }
  TENSORREG_TRY_ASSIGN(auto guard, detail::device_guard::create(device_id));
  void* ptr = nullptr;
  TENSORREG_CUDA_TRY(cudaMalloc(&ptr, bytes), what().substr(std::string_view("cannot ").size()));
  auto owned = std::make_shared<const detail::owned_device_buffer>(state_, ptr, bytes, device_id);
  // Clients map this buffer: never show them what an earlier allocation left there.
  TENSORREG_CUDA_TRY(cudaMemsetAsync(ptr, 0, bytes, nullptr), "clear a new device buffer");
  TENSORREG_CUDA_TRY(cudaStreamSynchronize(nullptr), "clear a new device buffer");
  cudaIpcMemHandle_t handle{};
  TENSORREG_CUDA_TRY(cudaIpcGetMemHandle(&handle, ptr), "export a device buffer as a CUDA IPC handle");
  registration::device_buffer out;
  out.bytes = std::move(owned);
  out.ipc_handle.assign(reinterpret_cast<const char*>(&handle), sizeof handle);
  out.device_id = device_id;
  return out;
}

result<registration::device_buffer> device_memory_provider::copy_from_host(std::int32_t device_id,
                                                                           const memory::byte_source& host) {
  TENSORREG_TRY_ASSIGN(auto buffer, allocate(device_id, host.size()));
  const auto* device_bytes = dynamic_cast<const device_source*>(buffer.bytes.get());
  if (device_bytes == nullptr) return fail(errc::internal, "cannot copy to device: the new buffer is not ours");
  auto* base = static_cast<std::byte*>(const_cast<void*>(device_bytes->device_pointer()));
  TENSORREG_TRY_ASSIGN(auto guard, detail::device_guard::create(device_id));
  std::uint64_t at = 0;
  TENSORREG_TRY(host.visit(0, host.size(), [&](std::span<const std::byte> piece) -> status {
    TENSORREG_CUDA_TRY(cudaMemcpy(base + at, piece.data(), piece.size(), cudaMemcpyHostToDevice),
                       "copy an artifact's bytes to device " + std::to_string(device_id));
    at += piece.size();
    return {};
  }));
  return buffer;
}

std::size_t device_memory_provider::open_mappings() const {
  return state_->vmm_mappings.load(std::memory_order_relaxed) + state_->ipc_mappings.load(std::memory_order_relaxed);
}

result<std::shared_ptr<const memory::byte_source>> device_memory_provider::import_vmm(
    std::int32_t owner_pid, std::int32_t device_id, std::span<const int> fds,
    std::span<const std::uint64_t> chunk_bytes) {
  auto& st = *state_;
  const std::string what = "cannot import CUDA VMM memory of process " + std::to_string(owner_pid) + " on device " +
                           std::to_string(device_id);
  if (device_id < 0 || device_id >= st.devices) {
    return fail(errc::failed_precondition, what + ": no such CUDA device (" + std::to_string(st.devices) + " present)");
  }
  if (!st.vmm.missing.empty()) {
    return fail(errc::failed_precondition, what + ": the CUDA driver has no " + st.vmm.missing);
  }
  TENSORREG_TRY_ASSIGN(auto guard, detail::device_guard::create(device_id));
  // The driver maps in the current context: make the device's primary context current on this
  // thread even when device_id already was (the guard then sets nothing, and a thread that has
  // made no runtime call yet has no context bound).
  TENSORREG_CUDA_TRY(cudaSetDevice(device_id), "make CUDA device " + std::to_string(device_id) + " current");
  TENSORREG_TRY_ASSIGN(const std::uint64_t granularity, st.granularity_of(device_id));
  std::unique_lock lock(st.vmm_mutex);
  TENSORREG_TRY_ASSIGN(auto imported,
                       detail::vmm_import::create(st.vmm, device_id, fds, chunk_bytes, granularity, what));
  lock.unlock();
  st.vmm_imports.fetch_add(1, std::memory_order_relaxed);
  return std::shared_ptr<const memory::byte_source>(
      std::make_shared<const detail::vmm_mapping>(state_, std::move(imported), device_id));
}

result<std::int32_t> device_memory_provider::device_by_uuid(std::string_view uuid) const {
  return devices::find_device(state_->uuids, uuid);
}

std::string device_memory_provider::uuid_of(std::int32_t device_id) const {
  if (device_id < 0 || static_cast<std::size_t>(device_id) >= state_->uuids.size()) return {};
  return devices::format_gpu_uuid(state_->uuids[static_cast<std::size_t>(device_id)]);
}

std::uint64_t device_memory_provider::vmm_reserved_bytes() const {
  return state_->vmm_reserved.load(std::memory_order_relaxed);
}

namespace {

// The device memory `source` reads, as runs by canonical offset (through nested segmented views;
// gaps stay zero), when every byte is device memory of one device; nullopt otherwise (and for
// an empty source).
struct device_runs {
  int device = -1;
  std::vector<detail::device_range> ranges;
};
std::optional<device_runs> gather(const memory::byte_source& source) {
  if (source.size() == 0) return std::nullopt;
  device_runs out;
  const bool all_device = memory::for_each_leaf(
      source, 0, source.size(), 0,
      [&](const memory::byte_source& leaf, std::uint64_t offset, std::uint64_t length, std::uint64_t at) {
        const auto* dev = as_device_source(leaf);
        if (dev == nullptr) return false;
        if (out.device < 0) out.device = dev->device();
        if (dev->device() != out.device) return false;
        out.ranges.push_back({at, static_cast<const std::byte*>(dev->device_pointer()) + offset, length, &leaf});
        return true;
      });
  if (!all_device || out.device < 0) return std::nullopt;
  return out;
}

// Runs that continue each other in both the canonical buffer and device memory of one allocation
// are one copy: a caching allocator's neighbours often are, and every copy issued costs the
// driver time. Runs of two allocations stay apart even when the allocations are neighbours in
// the address space: a copy that spans them is cudaErrorInvalidValue.
std::vector<detail::device_range> merged(std::vector<detail::device_range> runs) {
  std::vector<detail::device_range> out;
  out.reserve(runs.size());
  for (const auto& r : runs) {
    if (!out.empty() && out.back().allocation == r.allocation && out.back().dst + out.back().length == r.dst &&
        out.back().src + out.back().length == r.src) {
      out.back().length += r.length;
      continue;
    }
    out.push_back(r);
  }
  return out;
}

// Runs `hash` with the provider's GPU tree hasher of `device` (made on first use), the device
// current. One hash per device at a time.
template <typename Hash>
result<hash::digest> with_device_hasher(detail::provider_state& st, int device, Hash&& hash) {
  TENSORREG_TRY_ASSIGN(auto guard, detail::device_guard::create(device));
  (void)guard;
  auto& slot = *st.hashers.at(static_cast<std::size_t>(device));
  std::lock_guard lock(slot.mutex);
  if (!slot.hasher) {
    TENSORREG_TRY_ASSIGN(auto hasher, gpu_tree_hasher::create(device));
    slot.hasher.emplace(std::move(hasher));
  }
  return std::forward<Hash>(hash)(*slot.hasher);
}

// The GPU tree hash of `size` bytes at `ptr` on `device`, on `stream`.
result<hash::digest> hash_on_device(detail::provider_state& st, int device, const void* ptr, std::uint64_t size,
                                    stream_view stream) {
  return with_device_hasher(st, device, [&](gpu_tree_hasher& h) { return h.tree_hash(ptr, size, stream); });
}

// As hash_on_device, for a canonical buffer of `size` bytes made of `pieces` (gpu_tree_hasher::
// tree_hash_pieces: no canonical copy is assembled; the hasher keeps its gather scratch).
result<hash::digest> hash_pieces_on_device(detail::provider_state& st, int device,
                                           const std::vector<device_piece>& pieces, std::uint64_t size) {
  return with_device_hasher(st, device, [&](gpu_tree_hasher& h) { return h.tree_hash_pieces(pieces, size, {}); });
}

std::optional<devices::hash_site> forced_site(device_memory_provider::options::hash_placement p) {
  using placement = device_memory_provider::options::hash_placement;
  if (p == placement::host) return devices::hash_site::host;
  if (p == placement::gpu) return devices::hash_site::gpu;
  return std::nullopt;
}

}  // namespace

std::optional<result<hash::digest>> device_memory_provider::tree_hash_on_device(
    const memory::segmented_view& canonical) {
  const std::uint64_t size = canonical.size();
  auto runs = gather(canonical);
  if (!runs) return std::nullopt;
  const int device = runs->device;
  // Neighbours in both the canonical buffer and device memory are one piece, so a leaf across
  // them is hashed where it lies.
  const auto pieces = merged(std::move(runs->ranges));
  // One piece that is already the whole buffer is hashed as one contiguous buffer.
  const bool whole = pieces.size() == 1 && pieces[0].dst == 0 && pieces[0].length == size;
  const unsigned threads = state_->opts.host_hash_threads != 0 ? state_->opts.host_hash_threads
                                                               : std::max(1u, std::thread::hardware_concurrency());
  const auto site = devices::choose_site(
      forced_site(state_->opts.placement), threads, [device] { return detail::measured_speeds(device); },
      [&](const devices::hash_speeds& s) { return devices::plan_hash(s, size, !whole); });
  if (site != devices::hash_site::gpu) return std::nullopt;

  auto run = [&]() -> result<hash::digest> {
    if (whole) return hash_on_device(*state_, device, pieces[0].src, size, {});
    // Leaves are hashed where they lie in the mapped allocations; only those across runs or
    // gaps are gathered (no canonical copy: its cudaMalloc, zeroing, copies and cudaFree took
    // a large share of the kernel's own time for a big dict).
    std::vector<device_piece> table;
    table.reserve(pieces.size());
    for (const auto& piece : pieces) table.push_back({piece.dst, piece.src, piece.length});
    return hash_pieces_on_device(*state_, device, table, size);
  };
  auto digest = run();
  if (!digest && digest.error().code == errc::resource_exhausted) return std::nullopt;  // host fallback
  if (digest) state_->device_hashes.fetch_add(1, std::memory_order_relaxed);
  return digest;
}

std::optional<result<registration::host_copy>> device_memory_provider::copy_to_host(const memory::byte_source& source,
                                                                                    bool want_digest,
                                                                                    thread_pool& pool) {
  const std::uint64_t size = source.size();
  auto runs = gather(source);
  if (!runs) return std::nullopt;
  const int device = runs->device;
  const auto site = devices::choose_site(
      forced_site(state_->opts.placement), pool.size() + 1, [device] { return detail::measured_speeds(device); },
      [&](const devices::hash_speeds& s) {
        const bool ready = state_->replicas && state_->replicas->holds(size);
        return devices::plan_copy(s, size, want_digest, ready);
      });
  if (site != devices::hash_site::gpu) return std::nullopt;
  const detail::snapshot_hasher hasher = [this, device](const void* ptr, std::uint64_t bytes, stream_view stream) {
    return hash_on_device(*state_, device, ptr, bytes, stream);
  };
  detail::bulk_copy_options copy_opts;
  copy_opts.replicas = state_->replicas.get();
  auto copy = state_->bulk.copy(device, runs->ranges, size, want_digest ? &hasher : nullptr, pool, copy_opts);
  if (!copy && copy.error().code == errc::resource_exhausted) return std::nullopt;  // host fallback
  if (copy && want_digest) state_->device_hashes.fetch_add(1, std::memory_order_relaxed);
  return copy;
}

namespace {

// One cudaMemcpyAsync per run; the message names the run that failed.
status copy_runs_one_by_one(std::byte* to, const std::vector<detail::device_range>& runs, cudaStream_t stream) {
  for (std::size_t i = 0; i < runs.size(); ++i) {
    const auto& r = runs[i];
    TENSORREG_CUDA_TRY(cudaMemcpyAsync(to + r.dst, r.src, r.length, cudaMemcpyDeviceToDevice, stream),
                       "copy run " + std::to_string(i) + " of a snapshot (" + std::to_string(r.length) +
                           " bytes to offset " + std::to_string(r.dst) + ")");
  }
  return {};
}

// Whether cudaMemcpyBatchAsync is given these runs: only when every run starts and ends on a
// 16-byte boundary on both sides, the layout state dicts have. The one layout whose snapshot
// failed on an H200 (cudaErrorInvalidValue, batch path) had a 3-byte run at an odd address and
// runs at 4-byte aligned offsets; one cudaMemcpyAsync per run copies any alignment
// (bulk_copy.cpp does only that, and its test of such runs passes there).
bool batchable(const std::vector<detail::device_range>& runs) {
  return runs.size() > 1 && std::all_of(runs.begin(), runs.end(), [](const detail::device_range& r) {
           return r.dst % 16 == 0 && r.length % 16 == 0 && reinterpret_cast<std::uintptr_t>(r.src) % 16 == 0;
         });
}

// Where the batched copy kernel cannot be launched (enqueue_in_one_launch): issues the copies of
// `runs` into `to` on `stream`, as one batch where the runtime and driver have cudaMemcpyBatchAsync
// (CUDA 12.8+) and the runs are batchable(), else one cudaMemcpyAsync each; the gaps are zeroed.
// Sets *batched when the batch was enqueued.
status issue_snapshot(std::byte* to, std::uint64_t size, const std::vector<detail::device_range>& runs, int device,
                      cudaStream_t stream, bool* batched) {
  (void)device;
  *batched = false;
  std::uint64_t at = 0;
  for (const auto& r : runs) {
    if (r.dst > at) TENSORREG_CUDA_TRY(cudaMemsetAsync(to + at, 0, r.dst - at, stream), "zero a snapshot gap");
    at = r.dst + r.length;
  }
  if (at < size) TENSORREG_CUDA_TRY(cudaMemsetAsync(to + at, 0, size - at, stream), "zero a snapshot gap");
  if (runs.empty()) return {};
#if CUDART_VERSION >= 12080
  if (batchable(runs)) {
    std::vector<void*> dsts;
    std::vector<const void*> srcs;
    std::vector<std::size_t> sizes;
    dsts.reserve(runs.size());
    srcs.reserve(runs.size());
    sizes.reserve(runs.size());
    for (const auto& r : runs) {
      dsts.push_back(to + r.dst);
      srcs.push_back(r.src);
      sizes.push_back(static_cast<std::size_t>(r.length));
    }
    cudaMemcpyAttributes attrs{};
    attrs.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    // No location hints: they are for managed and pageable memory only.
    std::size_t first = 0;
#if CUDART_VERSION >= 13000
    const cudaError_t e =
        cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), runs.size(), &attrs, &first, 1, stream);
#else
    std::size_t failed_at = 0;
    const cudaError_t e = cudaMemcpyBatchAsync(dsts.data(), const_cast<void**>(srcs.data()), sizes.data(), runs.size(),
                                               &attrs, &first, 1, &failed_at, stream);
#endif
    if (e == cudaSuccess) {
      *batched = true;
      return {};
    }
    // A driver without batches: copy one run at a time below. They rewrite every run, in
    // stream order after whatever part of the batch may have been enqueued.
    static_cast<void>(cudaGetLastError());
  }
#endif
  return copy_runs_one_by_one(to, runs, stream);
}

// Enqueues all of a snapshot, runs and gaps, as one launch of the lane's batched copier (made on
// first use): a launch per run left the GPU idle between launches for a third of the copy's
// time (issue #17). False where that cannot be done (no memory for its tables, no code for the
// kernel on this device); the caller then issues the snapshot another way on the same stream,
// which writes every byte again.
bool enqueue_in_one_launch(detail::provider_state::snapshot_lane& lane, void* to, std::uint64_t size,
                           const std::vector<detail::device_range>& runs) {
  if (!lane.copier) {
    auto made = detail::batched_copier::create(lane.device);
    if (!made) return false;
    lane.copier.emplace(std::move(*made));
  }
  std::vector<device_piece> pieces;
  pieces.reserve(runs.size());
  for (const auto& r : runs) pieces.push_back({r.dst, r.src, r.length});
  return lane.copier->enqueue(to, size, pieces, lane.stream).has_value();
}

}  // namespace

std::optional<result<registration::device_buffer>> device_memory_provider::snapshot_to_device(
    const memory::byte_source& source) {
  auto runs = gather(source);
  if (!runs) return std::nullopt;
  const int device = runs->device;
  const std::uint64_t size = source.size();
  auto& st = *state_;
  auto run = [&]() -> result<registration::device_buffer> {
    TENSORREG_TRY_ASSIGN(auto guard, detail::device_guard::create(device));
    (void)guard;
    auto& lane = *st.lanes.at(static_cast<std::size_t>(device));
    std::lock_guard lock(lane.mutex);
    void* ptr = nullptr;
    if (lane.spare.valid()) {
      void* spare = lane.spare.get();  // waits for it when it is still being made
      if (lane.spare_bytes == size) {
        ptr = spare;
      } else if (spare != nullptr) {
        detail::check_release(cudaFree(spare), "free a spare snapshot buffer of another size");
      }
    }
    if (ptr == nullptr) {
      TENSORREG_CUDA_TRY(cudaMalloc(&ptr, size), "allocate a " + std::to_string(size) +
                                                     "-byte snapshot buffer on device " + std::to_string(device));
    }
    // Owned from here: an error below frees it.
    auto owned = std::make_shared<const detail::owned_device_buffer>(state_, ptr, size, device);
    if (lane.stream == nullptr) {
      TENSORREG_CUDA_TRY(cudaStreamCreateWithFlags(&lane.stream, cudaStreamNonBlocking), "create a snapshot stream");
    }
    const auto copies = merged(std::move(runs->ranges));
    bool batched = false;
    const bool one_launch = enqueue_in_one_launch(lane, ptr, size, copies);
    if (!one_launch) {
      TENSORREG_TRY(issue_snapshot(static_cast<std::byte*>(ptr), size, copies, device, lane.stream, &batched));
    }
    // The next snapshot of this size (the next step of a weight-sync loop) should not wait for
    // cudaMalloc, which for large buffers costs about what the copy does: allocate its buffer
    // now, on another thread, while this copy runs.
    if (size <= st.opts.snapshot_spare_bytes) {
      lane.spare_bytes = size;
      lane.spare = std::async(std::launch::async, [device, size]() -> void* {
        if (cudaSetDevice(device) != cudaSuccess) return nullptr;
        void* p = nullptr;
        if (cudaMalloc(&p, size) != cudaSuccess) {
          static_cast<void>(cudaGetLastError());
          return nullptr;
        }
        return p;
      });
    }
    if (const cudaError_t e = cudaStreamSynchronize(lane.stream); e == cudaErrorInvalidValue && batched) {
      // A batch the driver took and then refused: every run again, one copy each (the buffer
      // is ours alone; the error is not sticky).
      static_cast<void>(cudaGetLastError());
      TENSORREG_TRY(copy_runs_one_by_one(static_cast<std::byte*>(ptr), copies, lane.stream));
      TENSORREG_CUDA_TRY(cudaStreamSynchronize(lane.stream), "wait for the copies of a snapshot");
    } else {
      TENSORREG_CUDA_TRY(e, "wait for the copies of a snapshot");
      if (one_launch) st.snapshot_kernel_copies.fetch_add(1, std::memory_order_relaxed);
    }
    cudaIpcMemHandle_t handle{};
    TENSORREG_CUDA_TRY(cudaIpcGetMemHandle(&handle, ptr), "export a snapshot buffer as a CUDA IPC handle");
    registration::device_buffer out;
    out.bytes = std::move(owned);
    out.ipc_handle.assign(reinterpret_cast<const char*>(&handle), sizeof handle);
    out.device_id = device;
    return out;
  };
  return run();
}

std::uint64_t device_memory_provider::ipc_opens() const { return state_->ipc_opens.load(std::memory_order_relaxed); }

std::uint64_t device_memory_provider::vmm_imports() const {
  return state_->vmm_imports.load(std::memory_order_relaxed);
}

status device_memory_provider::warm_up() {
  auto& st = *state_;
  for (int device = 0; device < st.devices; ++device) {
    TENSORREG_TRY_ASSIGN(auto guard, detail::device_guard::create(device));
    (void)guard;
    // The context (cudaFree(0) creates the primary context without allocating).
    TENSORREG_CUDA_TRY(cudaFree(nullptr), "start CUDA on device " + std::to_string(device));
    // The placement's speeds, measured now rather than in the first commit that asks.
    if (!forced_site(st.opts.placement)) TENSORREG_TRY(detail::measured_speeds(device));
    // The hasher (kernels loaded, first scratch) with a small hash, as a commit would run it.
    constexpr std::uint64_t probe_bytes = std::uint64_t{1} << 20;
    void* probe = nullptr;
    TENSORREG_CUDA_TRY(cudaMalloc(&probe, probe_bytes), "allocate a warm-up buffer");
    struct freer {
      void* p;
      ~freer() { detail::check_release(cudaFree(p), "free a warm-up buffer"); }
    } free_probe{probe};
    TENSORREG_CUDA_TRY(cudaMemset(probe, 0, probe_bytes), "clear a warm-up buffer");
    TENSORREG_TRY(hash_on_device(st, device, probe, probe_bytes, {}));
    // And a canonical buffer of pieces, as a leased dict is hashed: a boundary inside a block
    // gathers its leaf, so the segment and gather kernels are both loaded (lazy module loading
    // would otherwise charge the first verified commit) and the leaf table is allocated.
    auto* at = static_cast<const std::byte*>(probe);
    const std::vector<device_piece> pieces = {{0, at, probe_bytes / 2}, {probe_bytes / 2 + 3, at, 100}};
    TENSORREG_TRY(hash_pieces_on_device(st, device, pieces, probe_bytes));
    // A pinned staging buffer for visit() (pinned memory is slow to allocate) and the snapshot stream.
    TENSORREG_TRY_ASSIGN(auto staging, st.acquire(device));
    st.give_back(std::move(staging));
    auto& lane = *st.lanes.at(static_cast<std::size_t>(device));
    std::lock_guard lock(lane.mutex);
    if (lane.stream == nullptr) {
      TENSORREG_CUDA_TRY(cudaStreamCreateWithFlags(&lane.stream, cudaStreamNonBlocking), "create a snapshot stream");
    }
    // And the batched copy kernel, with a small snapshot of the probe into its second half, run
    // and zero gap both: lazy module loading would otherwise charge the first snapshot lease.
    const std::vector<detail::device_range> probe_runs = {{64, at, 4096, probe}};
    if (enqueue_in_one_launch(lane, static_cast<std::byte*>(probe) + probe_bytes / 2, 8192, probe_runs)) {
      TENSORREG_CUDA_TRY(cudaStreamSynchronize(lane.stream), "warm up the batched copy of snapshots");
    }
  }
  return {};
}

std::uint64_t device_memory_provider::device_hashes() const noexcept {
  return state_->device_hashes.load(std::memory_order_relaxed);
}

std::uint64_t device_memory_provider::snapshot_kernel_copies() const noexcept {
  return state_->snapshot_kernel_copies.load(std::memory_order_relaxed);
}

std::uint64_t device_memory_provider::replica_pool_idle_bytes() const {
  return state_->replicas ? state_->replicas->idle_bytes() : 0;
}

std::uint64_t device_memory_provider::replica_pool_max_bytes() const noexcept {
  return state_->replicas ? state_->replicas->max_idle_bytes() : 0;
}

}  // namespace tensorreg::cuda
