#include "tensorreg/cuda/gpu_tree_hash.hpp"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>

#include "cuda/cuda_check.hpp"
#include "cuda/tree_hash_kernels.hpp"
#include "tensorreg/hash/tree_hash.hpp"

namespace tensorreg::cuda {
namespace {

// Leaves are fixed at 4 MiB on both paths (sha256_device.cuh has its own copy for kernels).
static_assert(hash::leaf_bytes == std::uint64_t{4} << 20);

constexpr std::uint64_t max_leaves = std::uint64_t{1} << 31;
constexpr std::uint64_t words_per_digest = 8;

std::string hex_address(const void* p) {
  char text[2 + 2 * sizeof(void*) + 1];
  std::snprintf(text, sizeof text, "%p", p);
  return text;
}

hash::digest digest_from_words(const std::uint32_t* words) {
  hash::digest d{};
  for (std::size_t j = 0; j < 8; ++j) {
    for (std::size_t k = 0; k < 4; ++k) {
      d[4 * j + k] = static_cast<std::byte>((words[j] >> (24 - 8 * k)) & 0xFFU);
    }
  }
  return d;
}

status check_device_index(std::int32_t device, std::string_view action) {
  if (device < 0) {
    return fail(errc::invalid_argument,
                "cannot " + std::string(action) + ": device " + std::to_string(device) + " is negative");
  }
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    static_cast<void>(cudaGetLastError());
    return fail(errc::failed_precondition, "cannot " + std::string(action) + ": no CUDA device " +
                                               std::to_string(device) + " (" + detail::describe(e) + ")");
  }
  if (device >= count) {
    return fail(errc::failed_precondition, "cannot " + std::string(action) + ": no CUDA device " +
                                               std::to_string(device) + " (" + std::to_string(count) + " present)");
  }
  return {};
}

}  // namespace

struct gpu_tree_hasher::impl {
  std::int32_t device = 0;
  int sm_count = 1;
  std::uint64_t capacity = 0;          // leaves the scratch holds
  std::uint32_t* scratch = nullptr;    // [leaf words | level words | root words]
  std::uint32_t* root_host = nullptr;  // pinned, 8 words
  // tree_hash_pieces(): the gathered leaves and the uploaded table (leaf addresses, then the
  // gather tasks), both kept and grown on demand, so a weight-sync loop allocates once.
  unsigned char* gather = nullptr;
  std::uint64_t gather_bytes = 0;
  unsigned char* table = nullptr;
  std::uint64_t table_bytes = 0;

  impl() = default;
  impl(const impl&) = delete;
  impl& operator=(const impl&) = delete;

  ~impl() {
    // Best effort: the device may already be gone at process exit (CudartUnloading).
    if (scratch == nullptr && root_host == nullptr && gather == nullptr && table == nullptr) return;
    detail::release_device_guard guard(device);
    if (scratch != nullptr) detail::check_release(cudaFree(scratch), "free gpu tree hash scratch");
    if (gather != nullptr) detail::check_release(cudaFree(gather), "free gpu tree hash gather buffer");
    if (table != nullptr) detail::check_release(cudaFree(table), "free gpu tree hash leaf table");
    if (root_host != nullptr) detail::check_release(cudaFreeHost(root_host), "free gpu tree hash root slot");
  }

  std::uint32_t* leaf_words() const noexcept { return scratch; }
  std::uint32_t* level_words() const noexcept { return scratch + words_per_digest * capacity; }
  std::uint32_t* root_words() const noexcept { return scratch + words_per_digest * (capacity + (capacity + 1) / 2); }

  // Grows the scratch to hold `leaves` leaves. The device must be current.
  status reserve(std::uint64_t leaves) {
    if (leaves <= capacity) return {};
    const std::uint64_t words = words_per_digest * (leaves + (leaves + 1) / 2 + 1);
    if (scratch != nullptr) {
      TENSORREG_CUDA_TRY(cudaFree(scratch), "free gpu tree hash scratch");
      scratch = nullptr;
      capacity = 0;
    }
    void* p = nullptr;
    TENSORREG_TRY(detail::check(cudaMalloc(&p, words * sizeof(std::uint32_t)),
                                "allocate gpu tree hash scratch for " + std::to_string(leaves) + " leaves"));
    scratch = static_cast<std::uint32_t*>(p);
    capacity = leaves;
    return {};
  }

  // Grows the device buffer `p` (holding `have` bytes) to `want` bytes; its contents go. The
  // device must be current.
  static status grow(unsigned char*& p, std::uint64_t& have, std::uint64_t want, const char* what) {
    if (want <= have) return {};
    if (p != nullptr) {
      TENSORREG_CUDA_TRY(cudaFree(p), std::string("free the ") + what);
      p = nullptr;
      have = 0;
    }
    void* fresh = nullptr;
    TENSORREG_CUDA_TRY(cudaMalloc(&fresh, want), "allocate " + std::to_string(want) + " bytes of " + what);
    p = static_cast<unsigned char*>(fresh);
    have = want;
    return {};
  }

  // Validates the arguments, makes the device current and runs the leaf kernel. Returns the
  // guard (which restores the caller's device) and the leaf count.
  result<std::pair<detail::device_guard, std::uint32_t>> hash_leaves(const void* device_ptr, std::uint64_t size,
                                                                     cudaStream_t stream, std::string_view action) {
    if (size == 0) return fail(errc::invalid_argument, "cannot " + std::string(action) + ": size is 0");
    if (device_ptr == nullptr) {
      return fail(errc::invalid_argument, "cannot " + std::string(action) + ": the device pointer is null");
    }
    const std::uint64_t leaves = hash::leaf_count(size);
    if (leaves >= max_leaves) {
      return fail(errc::out_of_range, "cannot " + std::string(action) + ": size " + std::to_string(size) + " needs " +
                                          std::to_string(leaves) + " leaves, more than " +
                                          std::to_string(max_leaves - 1));
    }
    TENSORREG_TRY_ASSIGN(auto guard, detail::device_guard::create(device));

    cudaPointerAttributes attributes{};
    TENSORREG_TRY(detail::check(cudaPointerGetAttributes(&attributes, device_ptr),
                                std::string(action) + ": query pointer " + hex_address(device_ptr)));
    const void* readable = device_ptr;
    switch (attributes.type) {
      case cudaMemoryTypeDevice:
        if (attributes.device != device) {
          return fail(errc::invalid_argument, "cannot " + std::string(action) + ": pointer " + hex_address(device_ptr) +
                                                  " is memory of device " + std::to_string(attributes.device) +
                                                  ", not device " + std::to_string(device));
        }
        break;
      case cudaMemoryTypeManaged: break;
      case cudaMemoryTypeHost:
        readable = attributes.devicePointer;
        if (readable == nullptr) {
          return fail(errc::invalid_argument, "cannot " + std::string(action) + ": pinned host memory at " +
                                                  hex_address(device_ptr) + " is not mapped for device " +
                                                  std::to_string(device));
        }
        break;
      default:
        return fail(errc::invalid_argument,
                    "cannot " + std::string(action) + ": pointer " + hex_address(device_ptr) + " is not CUDA memory");
    }

    TENSORREG_TRY(reserve(leaves));
    const auto n = static_cast<std::uint32_t>(leaves);
    TENSORREG_TRY(detail::check(detail::launch_leaf_kernel(readable, size, n, leaf_words(),
                                                           detail::leaf_threads_per_block(leaves, sm_count), stream),
                                std::string(action) + ": launch the leaf kernel"));
    return std::pair<detail::device_guard, std::uint32_t>(std::move(guard), n);
  }
};

std::int32_t device_count() noexcept {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    static_cast<void>(cudaGetLastError());
    return 0;
  }
  return count;
}

gpu_tree_hasher::gpu_tree_hasher(std::unique_ptr<impl> state) noexcept : impl_(std::move(state)) {}
gpu_tree_hasher::~gpu_tree_hasher() = default;
gpu_tree_hasher::gpu_tree_hasher(gpu_tree_hasher&&) noexcept = default;
gpu_tree_hasher& gpu_tree_hasher::operator=(gpu_tree_hasher&&) noexcept = default;

result<gpu_tree_hasher> gpu_tree_hasher::create(std::int32_t device, std::uint64_t reserve_bytes) {
  TENSORREG_TRY(check_device_index(device, "create gpu tree hasher"));
  TENSORREG_TRY_ASSIGN(auto guard, detail::device_guard::create(device));
  auto state = std::make_unique<impl>();
  state->device = device;
  TENSORREG_CUDA_TRY(cudaDeviceGetAttribute(&state->sm_count, cudaDevAttrMultiProcessorCount, device),
                     "query the multiprocessor count");
  void* pinned = nullptr;
  TENSORREG_CUDA_TRY(cudaMallocHost(&pinned, words_per_digest * sizeof(std::uint32_t)),
                     "allocate the pinned root slot of a gpu tree hasher");
  state->root_host = static_cast<std::uint32_t*>(pinned);
  // A size no call can accept (OUT_OF_RANGE there) reserves nothing beyond the minimum.
  const std::uint64_t wanted = hash::leaf_count(reserve_bytes);
  TENSORREG_TRY(state->reserve(wanted > 0 && wanted < max_leaves ? wanted : 1));
  return gpu_tree_hasher(std::move(state));
}

result<hash::digest> gpu_tree_hasher::tree_hash(const void* device_ptr, std::uint64_t size, stream_view stream) {
  TENSORREG_ASSERT(impl_ != nullptr);
  constexpr std::string_view action = "hash device memory";
  auto* s = static_cast<cudaStream_t>(stream.handle);
  TENSORREG_TRY_ASSIGN(auto launched, impl_->hash_leaves(device_ptr, size, s, action));
  const std::uint32_t leaves = launched.second;
  TENSORREG_CUDA_TRY(
      detail::launch_tree_kernels(impl_->leaf_words(), impl_->level_words(), leaves, impl_->root_words(), s),
      "hash device memory: launch the tree kernels");
  TENSORREG_CUDA_TRY(cudaMemcpyAsync(impl_->root_host, impl_->root_words(), words_per_digest * sizeof(std::uint32_t),
                                     cudaMemcpyDeviceToHost, s),
                     "hash device memory: copy the root to the host");
  TENSORREG_CUDA_TRY(cudaStreamSynchronize(s), "hash device memory: wait for the tree hash");
  return digest_from_words(impl_->root_host);
}

result<hash::digest> gpu_tree_hasher::tree_hash_pieces(const std::vector<device_piece>& pieces, std::uint64_t size,
                                                       stream_view stream) {
  TENSORREG_ASSERT(impl_ != nullptr);
  const std::string what = "cannot hash device memory pieces";
  if (size == 0) return fail(errc::invalid_argument, what + ": size is 0");
  std::uint64_t end = 0;
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    const auto& p = pieces[i];
    const std::string which = ": piece " + std::to_string(i) + " at " + std::to_string(p.at);
    if (p.length == 0 || p.src == nullptr) {
      return fail(errc::invalid_argument, what + which + " is empty or has a null address");
    }
    if (p.at < end) {
      return fail(errc::invalid_argument,
                  what + which + " starts before the end of the piece before it, " + std::to_string(end));
    }
    if (p.at > size || p.length > size - p.at) {
      return fail(errc::invalid_argument,
                  what + which + " of " + std::to_string(p.length) + " bytes ends past size " + std::to_string(size));
    }
    end = p.at + p.length;
  }
  const std::uint64_t leaves = hash::leaf_count(size);
  if (leaves >= max_leaves) {
    return fail(errc::out_of_range, what + ": size " + std::to_string(size) + " needs " + std::to_string(leaves) +
                                        " leaves, more than " + std::to_string(max_leaves - 1));
  }
  auto plan = detail::plan_leaves(pieces, size, leaves);
  if (plan.tasks.size() >= max_leaves || plan.segments.size() >= max_leaves) {
    return fail(errc::out_of_range, what + ": " + std::to_string(plan.segments.size()) + " leaf segments and " +
                                        std::to_string(plan.tasks.size()) + " gather tasks");
  }
  TENSORREG_TRY_ASSIGN(auto guard, detail::device_guard::create(impl_->device));
  (void)guard;
  auto* s = static_cast<cudaStream_t>(stream.handle);
  TENSORREG_TRY(impl_->reserve(leaves));
  TENSORREG_TRY(impl::grow(impl_->gather, impl_->gather_bytes, plan.gather_bytes, "gpu tree hash gather buffer"));
  plan.rebase(reinterpret_cast<std::uintptr_t>(impl_->gather));
  // One upload: the segments, each leaf's first segment, then the gather tasks.
  const std::uint64_t segment_bytes = plan.segments.size() * sizeof(detail::leaf_segment);
  const std::uint64_t first_bytes = plan.first.size() * sizeof(std::uint32_t);
  const std::uint64_t tasks_at = (segment_bytes + first_bytes + 15) / 16 * 16;
  const std::uint64_t task_bytes = plan.tasks.size() * sizeof(detail::gather_task);
  std::vector<unsigned char> host(tasks_at + task_bytes);
  std::memcpy(host.data(), plan.segments.data(), segment_bytes);
  std::memcpy(host.data() + segment_bytes, plan.first.data(), first_bytes);
  if (task_bytes > 0) std::memcpy(host.data() + tasks_at, plan.tasks.data(), task_bytes);
  TENSORREG_TRY(impl::grow(impl_->table, impl_->table_bytes, host.size(), "gpu tree hash leaf table"));
  TENSORREG_CUDA_TRY(cudaMemcpyAsync(impl_->table, host.data(), host.size(), cudaMemcpyHostToDevice, s),
                     "hash device memory pieces: upload the leaf table");
  if (!plan.tasks.empty()) {
    TENSORREG_CUDA_TRY(
        detail::launch_gather_kernel(reinterpret_cast<const detail::gather_task*>(impl_->table + tasks_at),
                                     static_cast<std::uint32_t>(plan.tasks.size()), impl_->gather, s),
        "hash device memory pieces: launch the gather kernel");
  }
  const auto n = static_cast<std::uint32_t>(leaves);
  TENSORREG_CUDA_TRY(detail::launch_leaf_segments_kernel(
                         reinterpret_cast<const detail::leaf_segment*>(impl_->table),
                         reinterpret_cast<const std::uint32_t*>(impl_->table + segment_bytes), size, n,
                         impl_->leaf_words(), detail::leaf_threads_per_block(leaves, impl_->sm_count), s),
                     "hash device memory pieces: launch the leaf kernel");
  TENSORREG_CUDA_TRY(detail::launch_tree_kernels(impl_->leaf_words(), impl_->level_words(), n, impl_->root_words(), s),
                     "hash device memory pieces: launch the tree kernels");
  TENSORREG_CUDA_TRY(cudaMemcpyAsync(impl_->root_host, impl_->root_words(), words_per_digest * sizeof(std::uint32_t),
                                     cudaMemcpyDeviceToHost, s),
                     "hash device memory pieces: copy the root to the host");
  TENSORREG_CUDA_TRY(cudaStreamSynchronize(s), "hash device memory pieces: wait for the tree hash");
  return digest_from_words(impl_->root_host);
}

std::uint64_t gpu_tree_hasher::gather_capacity_bytes() const noexcept {
  return impl_ != nullptr ? impl_->gather_bytes : 0;
}

result<std::vector<hash::digest>> gpu_tree_hasher::leaf_digests(const void* device_ptr, std::uint64_t size,
                                                                stream_view stream) {
  TENSORREG_ASSERT(impl_ != nullptr);
  constexpr std::string_view action = "hash device memory leaves";
  auto* s = static_cast<cudaStream_t>(stream.handle);
  TENSORREG_TRY_ASSIGN(auto launched, impl_->hash_leaves(device_ptr, size, s, action));
  const std::uint32_t leaves = launched.second;
  std::vector<std::uint32_t> words(words_per_digest * leaves);
  TENSORREG_CUDA_TRY(cudaMemcpyAsync(words.data(), impl_->leaf_words(), words.size() * sizeof(std::uint32_t),
                                     cudaMemcpyDeviceToHost, s),
                     "hash device memory leaves: copy the leaf digests to the host");
  TENSORREG_CUDA_TRY(cudaStreamSynchronize(s), "hash device memory leaves: wait for the leaf kernel");
  std::vector<hash::digest> out;
  out.reserve(leaves);
  for (std::uint32_t i = 0; i < leaves; ++i) out.push_back(digest_from_words(words.data() + words_per_digest * i));
  return out;
}

std::int32_t gpu_tree_hasher::device() const noexcept { return impl_ != nullptr ? impl_->device : -1; }

std::uint64_t gpu_tree_hasher::capacity_leaves() const noexcept { return impl_ != nullptr ? impl_->capacity : 0; }

result<hash::digest> tree_hash_device(const void* device_ptr, std::uint64_t size, stream_view stream,
                                      std::int32_t device) {
  if (size == 0) return fail(errc::invalid_argument, "cannot hash device memory: size is 0");
  TENSORREG_TRY_ASSIGN(auto hasher, gpu_tree_hasher::create(device, size));
  return hasher.tree_hash(device_ptr, size, stream);
}

result<std::vector<hash::digest>> leaf_digests_device(const void* device_ptr, std::uint64_t size, stream_view stream,
                                                      std::int32_t device) {
  if (size == 0) return fail(errc::invalid_argument, "cannot hash device memory leaves: size is 0");
  TENSORREG_TRY_ASSIGN(auto hasher, gpu_tree_hasher::create(device, size));
  return hasher.leaf_digests(device_ptr, size, stream);
}

}  // namespace tensorreg::cuda
