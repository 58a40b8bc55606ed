#include "cuda/bulk_copy.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>

#include "cuda/cuda_check.hpp"
#include "memory/page_populator.hpp"
#include "tensorreg/memory/shared_memory.hpp"

namespace tensorreg::cuda::detail {

namespace {

// Faults the memfd's pages in ahead of the write. Done by the worker while its DMA is in flight:
// a fresh memfd page costs a fault and a zeroing, which in a memcpy would stall that worker's
// copy. Where the kernel cannot, the write faults them itself.
void populate(std::byte* p, std::uint64_t length) noexcept { (void)memory::populate_for_write(p, length); }

// The CUDA host registrations of a pooled arena, one per chunk (null where registering failed),
// undone when the arena is freed: before its memory is unmapped (replica_pool::arena releases
// its pin first).
struct host_pin {
  std::vector<void*> registered;
  host_pin() = default;
  host_pin(const host_pin&) = delete;
  host_pin& operator=(const host_pin&) = delete;
  ~host_pin() {
    for (void* p : registered) {
      if (p != nullptr) check_release(cudaHostUnregister(p), "unregister a pooled replica chunk");
    }
  }
};

constexpr std::uint64_t page_bytes = 4096;

/// Frees a cudaMalloc'ed scratch buffer with its device current, even on error paths.
struct scratch_buffer {
  int device = 0;
  void* ptr = nullptr;
  scratch_buffer() = default;
  scratch_buffer(const scratch_buffer&) = delete;
  scratch_buffer& operator=(const scratch_buffer&) = delete;
  ~scratch_buffer() {
    if (ptr == nullptr) return;
    release_device_guard guard(device);
    check_release(cudaFree(ptr), "free a snapshot buffer");
  }
};

}  // namespace

bulk_copier::bulk_copier() = default;
bulk_copier::~bulk_copier() = default;

result<std::unique_ptr<bulk_copier::slot>> bulk_copier::acquire(int device, std::uint64_t bytes) {
  {
    std::lock_guard lock(mutex_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if ((*it)->device == device && (*it)->half_bytes == bytes) {
        auto s = std::move(*it);
        free_.erase(it);
        return s;
      }
    }
  }
  return slot::create(device, bytes);
}

void bulk_copier::give_back(std::unique_ptr<slot> s) noexcept {
  std::lock_guard lock(mutex_);
  free_.push_back(std::move(s));  // at most `workers` per (device, size) ever exist at once
}

result<registration::host_copy> bulk_copier::copy(int device, std::span<const device_range> ranges, std::uint64_t size,
                                                  const snapshot_hasher* hash, thread_pool& pool,
                                                  const bulk_copy_options& opts) {
  TENSORREG_ASSERT(size > 0 && opts.chunk_bytes > 0 && opts.chunk_bytes % 4096 == 0 && opts.workers > 0);
  TENSORREG_TRY_ASSIGN(auto guard, device_guard::create(device));
  (void)guard;

  // 1. The snapshot: DATA runs copied on the device, gaps zeroed.
  scratch_buffer scratch;
  scratch.device = device;
  TENSORREG_CUDA_TRY(cudaMalloc(&scratch.ptr, size), "allocate a " + std::to_string(size) +
                                                         "-byte snapshot buffer on device " + std::to_string(device));
  auto* snap = static_cast<std::byte*>(scratch.ptr);
  TENSORREG_TRY_ASSIGN(auto control, acquire(device, 0));
  {
    std::uint64_t at = 0;
    for (const auto& r : ranges) {
      TENSORREG_ASSERT(r.dst >= at && r.dst + r.length <= size);
      if (r.dst > at)
        TENSORREG_CUDA_TRY(cudaMemsetAsync(snap + at, 0, r.dst - at, control->stream), "zero a snapshot gap");
      TENSORREG_CUDA_TRY(cudaMemcpyAsync(snap + r.dst, r.src, r.length, cudaMemcpyDeviceToDevice, control->stream),
                         "snapshot device memory");
      at = r.dst + r.length;
    }
    if (at < size) TENSORREG_CUDA_TRY(cudaMemsetAsync(snap + at, 0, size - at, control->stream), "zero a snapshot gap");
    TENSORREG_CUDA_TRY(cudaStreamSynchronize(control->stream), "snapshot device memory");
  }

  // The replica: an idle pooled arena of this size (resident, registered), else a new memfd.
  devices::replica_pool* const replicas = opts.replicas;
  std::optional<devices::replica_pool::arena> target;
  if (replicas != nullptr) target = replicas->take(size);
  const bool recycled = target.has_value();
  if (!recycled) {
    TENSORREG_TRY_ASSIGN(auto fresh, memory::shared_memory::create(size, "tensorreg-stable"));
    target.emplace(devices::replica_pool::arena{std::move(fresh), nullptr, 0});
    // Huge pages would cut the first-touch cost where the kernel's shmem THP setting allows
    // them ("advise"); a no-op under "never" (benchmarks/RESULTS.md: no gain measured there).
    static_cast<void>(::madvise(target->memory.mutable_bytes().data(), size, MADV_HUGEPAGE));
  }
  const auto dst = target->memory.mutable_bytes();

  // 2. The GPU hash of the snapshot, on its own thread and stream, while the copy runs.
  std::optional<result<hash::digest>> digest;
  std::jthread hasher;
  if (hash != nullptr) {
    hasher = std::jthread([&, stream = control->stream] {
      auto inner = device_guard::create(device);
      if (!inner) {
        digest = tl::unexpected(std::move(inner).error());
        return;
      }
      digest = (*hash)(snap, size, stream);
    });
  }

  // 3. The D2H of the snapshot, in stripes of chunks: worker w takes chunks w, w + n, w + 2n...
  // As many stripes as can run at once: a stripe more would only wait for a free worker.
  const std::uint64_t chunk = opts.chunk_bytes;
  const std::uint64_t chunks = (size + chunk - 1) / chunk;
  const auto workers = static_cast<std::size_t>(std::min<std::uint64_t>({opts.workers, pool.concurrency(), chunks}));
  const auto length_of = [&](std::uint64_t i) { return std::min(chunk, size - i * chunk); };
  // A worker's slot goes back for reuse only once no DMA into it is in flight; `out` is the
  // worker's result so far, and a failure to go idle is reported when nothing failed before.
  const auto retire = [&](std::unique_ptr<slot> s, status out, std::string_view what) -> status {
    if (const cudaError_t idle = cudaStreamSynchronize(s->stream); idle == cudaSuccess) {
      give_back(std::move(s));
    } else if (out) {
      out = check(idle, what);
    }
    return out;
  };

  const auto staged_stripe = [&](std::size_t w) -> status {
    TENSORREG_TRY_ASSIGN(auto g, device_guard::create(device));
    (void)g;
    TENSORREG_TRY_ASSIGN(auto s, acquire(device, chunk));
    const auto half = [&](std::uint64_t i) { return static_cast<std::size_t>((i / workers) % 2); };
    const auto issue = [&](std::uint64_t i) -> status {
      TENSORREG_CUDA_TRY(
          cudaMemcpyAsync(s->host + half(i) * chunk, snap + i * chunk, length_of(i), cudaMemcpyDeviceToHost, s->stream),
          "copy a snapshot to the host");
      TENSORREG_CUDA_TRY(cudaEventRecord(s->done[half(i)], s->stream), "record a bulk copy event");
      return {};
    };
    status out = issue(w);
    for (std::uint64_t i = w; out && i < chunks; i += workers) {
      // The other half was emptied by the memcpy of the previous step: refill it now, so the
      // copy engine always has this worker's next chunk queued.
      if (i + workers < chunks) out = issue(i + workers);
      if (!out) break;
      populate(dst.data() + i * chunk, length_of(i));
      out = check(cudaEventSynchronize(s->done[half(i)]), "copy a snapshot to the host");
      if (!out) break;
      std::memcpy(dst.data() + i * chunk, s->host + half(i) * chunk, length_of(i));
    }
    return retire(std::move(s), std::move(out), "finish copying a snapshot to the host");
  };

  // A fresh memfd that will join the pool: each chunk is populated, registered and DMAed into
  // directly; the registrations stay (pin), so the replica is ready when it comes back.
  std::shared_ptr<host_pin> pin;
  if (replicas != nullptr && !recycled) {
    pin = std::make_shared<host_pin>();
    pin->registered.assign(static_cast<std::size_t>(chunks), nullptr);
  }
  const auto registered_stripe = [&](std::size_t w) -> status {
    TENSORREG_TRY_ASSIGN(auto g, device_guard::create(device));
    (void)g;
    TENSORREG_TRY_ASSIGN(auto s, acquire(device, 0));
    status out;
    for (std::uint64_t i = w; out && i < chunks; i += workers) {
      std::byte* at = dst.data() + i * chunk;
      // The fault-in and registration of this chunk overlap the DMA of the previous one.
      populate(at, length_of(i));
      const std::uint64_t pinned = (length_of(i) + page_bytes - 1) / page_bytes * page_bytes;  // mapped to the page end
      if (cudaHostRegister(at, pinned, cudaHostRegisterPortable) == cudaSuccess) {
        pin->registered[static_cast<std::size_t>(i)] = at;
      } else {
        // Out of pinnable memory, say: the driver stages this chunk itself (slower), and the
        // replica is not pooled (not every chunk is registered).
        static_cast<void>(cudaGetLastError());
      }
      out = check(cudaMemcpyAsync(at, snap + i * chunk, length_of(i), cudaMemcpyDeviceToHost, s->stream),
                  "copy a snapshot into a new replica");
    }
    return retire(std::move(s), std::move(out), "finish copying a snapshot into a new replica");
  };

  // A recycled arena: DMA straight from the snapshot, all of it (gaps included: the snapshot's
  // are zero, the arena's are an old replica's bytes), never across a registration's end.
  const auto recycled_copy = [&]() -> status {
    TENSORREG_TRY_ASSIGN(auto s, acquire(device, 0));
    const std::uint64_t unit = target->pin_unit != 0 ? target->pin_unit : size;
    status out;
    for (std::uint64_t at = 0; out && at < size; at += unit) {
      out = check(
          cudaMemcpyAsync(dst.data() + at, snap + at, std::min(unit, size - at), cudaMemcpyDeviceToHost, s->stream),
          "copy a snapshot into a pooled replica");
    }
    return retire(std::move(s), std::move(out), "finish copying a snapshot into a pooled replica");
  };

  status copied = recycled ? recycled_copy()
                  : pin    ? pool.parallel_for(workers, registered_stripe)
                           : pool.parallel_for(workers, staged_stripe);
  if (hasher.joinable()) hasher.join();
  // The hash stream is the snapshot's: idle again once the hasher returned.
  give_back(std::move(control));
  if (!copied) return tl::unexpected(std::move(copied).error());

  registration::host_copy out;
  if (digest) {
    if (!*digest) return tl::unexpected(std::move(*digest).error());
    out.data_digest = **digest;
  }
  if (pin) {
    target->pin = pin;
    target->pin_unit = chunk;
  }
  // The replica is final: no fd of it that a reader gets (GetArtifactMemfd) may change it. Its
  // own mapping stays writable (and pinned) for the pool's next taker; sealing it read-only
  // (shared_memory::seal_read_only) would unmap what CUDA has registered.
  TENSORREG_TRY(target->memory.seal_against_writes());
  const bool poolable =
      recycled || (pin && std::ranges::none_of(pin->registered, [](void* p) { return p == nullptr; }));
  if (poolable) {
    out.replica = replicas->lend(std::move(*target));
  } else {
    // Not pooled: the replica is freed with its last holder (its registrations undone first).
    auto holder = std::make_shared<devices::replica_pool::arena>(std::move(*target));
    out.replica = std::shared_ptr<const memory::shared_memory>(holder, &holder->memory);
  }
  return out;
}

}  // namespace tensorreg::cuda::detail
