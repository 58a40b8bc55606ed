// src/cuda/tree_hash.cu — the kernels of the GPU tree hash (registration.md §3.3,
// DECISIONS §5.1, §6).
//
// A 4 MiB leaf is one sequential chain of 65 536 SHA-256 compressions, so the leaf kernel
// gives each leaf one thread and makes that thread's chain as short as it can: state and
// message schedule in registers, no local memory, rotations as single funnel shifts, Ch/Maj
// as single LOP3s, the next 64-byte block loaded (four 128-bit read-only loads) while the
// current one is compressed. One warp's instructions are what bounds the chain: on Hopper an
// ALU or FMA warp instruction occupies its pipe for 2 cycles, so the kernel moves additions
// and the σ shifts onto the otherwise idle FMA pipe (fma_steer, sha256_device.cuh). The
// default variant (rolled_steered: rounds 16..63 as a 3-turn loop, constants from constant
// memory) measured fastest once thousands of leaves share the SMs, where it stays at the
// single-leaf floor (cuda_tree_hash_bench --sweep; benchmarks/RESULTS.md).
// Blocks are sized so that each warp has a scheduler of its own (tree_hash_kernels.hpp),
// which is what makes every size up to 4 warps per SM take the time of one leaf.
//
// The tree is folded on the GPU: a launch per wide level, then one block for the last
// levels; only the root's 32 bytes go back to the host.
#include "cuda/tree_hash_kernels.hpp"

#include <algorithm>
#include <cstdint>

#include "cuda/sha256_device.cuh"

namespace tensorreg::cuda::detail {
namespace {

constexpr unsigned max_leaf_threads = 128;
constexpr unsigned tree_threads = 256;
constexpr std::uint32_t tree_single_block_nodes = 1024;

// `one` is 1 at run time; the compiler cannot know it (fma_steer in sha256_device.cuh).
template <int Align, unroll_mode Mode, bool Steer>
__global__ void __launch_bounds__(max_leaf_threads)
    leaf_kernel(const unsigned char* __restrict__ data, std::uint64_t size, std::uint32_t leaves,
                std::uint32_t* __restrict__ leaf_words, std::uint32_t one) {
  const std::uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= leaves) return;
  const std::uint64_t offset = static_cast<std::uint64_t>(i) * sha_leaf_bytes;
  const std::uint64_t remaining = size - offset;
  const std::uint64_t len = remaining < sha_leaf_bytes ? remaining : sha_leaf_bytes;
  std::uint32_t s[8];
  sha256_words<Align, Mode, Steer>(data + offset, len, s, make_fma_steer(one));
  uint4* out = reinterpret_cast<uint4*>(leaf_words + 8 * static_cast<std::uint64_t>(i));
  out[0] = make_uint4(s[0], s[1], s[2], s[3]);
  out[1] = make_uint4(s[4], s[5], s[6], s[7]);
}

// What zero segments read in the flat walk (sha256_segment_words_flat): static device memory
// is zero-initialised.
__device__ __align__(16) std::uint32_t zero_block_words[16];

// The leaf kernel over a leaf plan (launch_leaf_segments_kernel): each thread streams its
// leaf's blocks across its segments (sha256_segment_words, or its flat walk); one launch
// hashes every leaf.
static_assert(sizeof(leaf_segment) == sizeof(segment_words_input));
template <unroll_mode Mode, bool Steer, bool Flat>
__global__ void __launch_bounds__(max_leaf_threads)
    leaf_segments_kernel(const segment_words_input* __restrict__ segments, const std::uint32_t* __restrict__ first,
                         std::uint64_t size, std::uint32_t leaves, std::uint32_t* __restrict__ leaf_words,
                         std::uint32_t one) {
  const std::uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= leaves) return;
  const std::uint64_t offset = static_cast<std::uint64_t>(i) * sha_leaf_bytes;
  const std::uint64_t remaining = size - offset;
  const std::uint64_t len = remaining < sha_leaf_bytes ? remaining : sha_leaf_bytes;
  const std::uint32_t begin = first[i];
  std::uint32_t s[8];
  if constexpr (Flat) {
    sha256_segment_words_flat<Mode, Steer>(segments + begin, first[i + 1] - begin, len,
                                           reinterpret_cast<std::uint64_t>(zero_block_words), s, make_fma_steer(one));
  } else {
    sha256_segment_words<Mode, Steer>(segments + begin, first[i + 1] - begin, len, s, make_fma_steer(one));
  }
  uint4* out = reinterpret_cast<uint4*>(leaf_words + 8 * static_cast<std::uint64_t>(i));
  out[0] = make_uint4(s[0], s[1], s[2], s[3]);
  out[1] = make_uint4(s[4], s[5], s[6], s[7]);
}

constexpr unsigned gather_threads = 256;

// One task per block: bytes up to a 16-byte boundary of the destination, then 16-byte stores
// (16-byte loads when the source is aligned too, else byte loads), then the tail bytes.
__global__ void __launch_bounds__(gather_threads)
    gather_kernel(const gather_task* __restrict__ tasks, unsigned char* __restrict__ base) {
  const gather_task t = tasks[blockIdx.x];
  unsigned char* d = base + t.dst_offset;
  const unsigned char* src = t.src;
  std::uint64_t n = t.length;
  const std::uint64_t misaligned = reinterpret_cast<std::uintptr_t>(d) & 15U;
  const std::uint64_t head = misaligned == 0 ? 0 : (16 - misaligned < n ? 16 - misaligned : n);
  for (std::uint64_t k = threadIdx.x; k < head; k += blockDim.x) d[k] = src != nullptr ? src[k] : 0;
  d += head;
  if (src != nullptr) src += head;
  n -= head;
  const std::uint64_t vectors = n / 16;
  auto* dv = reinterpret_cast<uint4*>(d);
  if (src == nullptr) {
    for (std::uint64_t k = threadIdx.x; k < vectors; k += blockDim.x) dv[k] = make_uint4(0, 0, 0, 0);
  } else if ((reinterpret_cast<std::uintptr_t>(src) & 15U) == 0) {
    const auto* sv = reinterpret_cast<const uint4*>(src);
    for (std::uint64_t k = threadIdx.x; k < vectors; k += blockDim.x) dv[k] = sv[k];
  } else {
    for (std::uint64_t k = threadIdx.x; k < vectors * 16; k += blockDim.x) d[k] = src[k];
  }
  for (std::uint64_t k = vectors * 16 + threadIdx.x; k < n; k += blockDim.x) d[k] = src != nullptr ? src[k] : 0;
}

// One level of n nodes at `in` → (n+1)/2 nodes at `out`, one thread per node.
__global__ void __launch_bounds__(tree_threads)
    tree_level_kernel(const std::uint32_t* __restrict__ in, std::uint32_t n, std::uint32_t* __restrict__ out) {
  const std::uint32_t j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j < (n + 1) / 2) tree_level_node(in, n, j, out);
}

// The remaining levels (n ≤ tree_single_block_nodes) in one block; the buffers alternate,
// and __syncthreads() makes a level's global writes visible to the block before the next.
__global__ void __launch_bounds__(tree_threads)
    tree_tail_kernel(std::uint32_t* in, std::uint32_t* other, std::uint32_t n, std::uint32_t* root_words) {
  while (n > 1) {
    const std::uint32_t parents = (n + 1) / 2;
    for (std::uint32_t j = threadIdx.x; j < parents; j += blockDim.x) tree_level_node(in, n, j, other);
    __syncthreads();
    std::uint32_t* t = in;
    in = other;
    other = t;
    n = parents;
  }
  if (threadIdx.x < 8) root_words[threadIdx.x] = in[threadIdx.x];
}

template <unroll_mode Mode, bool Steer>
void launch_leaf(const void* data, std::uint64_t size, std::uint32_t leaves, std::uint32_t* leaf_words,
                 unsigned threads, unsigned blocks, cudaStream_t stream) {
  const auto address = reinterpret_cast<std::uintptr_t>(data);
  const auto* bytes = static_cast<const unsigned char*>(data);
  const std::uint32_t one = 1;
  if (address % 16 == 0) {
    leaf_kernel<16, Mode, Steer><<<blocks, threads, 0, stream>>>(bytes, size, leaves, leaf_words, one);
  } else if (address % 4 == 0) {
    leaf_kernel<4, unroll_mode::rolled, true><<<blocks, threads, 0, stream>>>(bytes, size, leaves, leaf_words, one);
  } else {
    leaf_kernel<1, unroll_mode::rolled, true><<<blocks, threads, 0, stream>>>(bytes, size, leaves, leaf_words, one);
  }
}

void launch_variant(leaf_kernel_variant variant, const void* data, std::uint64_t size, std::uint32_t leaves,
                    std::uint32_t* leaf_words, unsigned threads, unsigned blocks, cudaStream_t stream) {
  switch (variant) {
    case leaf_kernel_variant::full_unroll:
      launch_leaf<unroll_mode::full, false>(data, size, leaves, leaf_words, threads, blocks, stream);
      break;
    case leaf_kernel_variant::rolled:
      launch_leaf<unroll_mode::rolled, false>(data, size, leaves, leaf_words, threads, blocks, stream);
      break;
    case leaf_kernel_variant::full_unroll_steered:
      launch_leaf<unroll_mode::full, true>(data, size, leaves, leaf_words, threads, blocks, stream);
      break;
    case leaf_kernel_variant::rolled_steered:
      launch_leaf<unroll_mode::rolled, true>(data, size, leaves, leaf_words, threads, blocks, stream);
      break;
  }
}

}  // namespace

const char* variant_name(leaf_kernel_variant v) noexcept {
  switch (v) {
    case leaf_kernel_variant::full_unroll: return "full_unroll";
    case leaf_kernel_variant::rolled: return "rolled";
    case leaf_kernel_variant::full_unroll_steered: return "full_unroll_steered";
    case leaf_kernel_variant::rolled_steered: return "rolled_steered";
  }
  return "?";
}

unsigned leaf_threads_per_block(std::uint64_t leaves, int sm_count) noexcept {
  const std::uint64_t warps = (leaves + 31) / 32;
  const std::uint64_t sms = sm_count > 0 ? static_cast<std::uint64_t>(sm_count) : 1;
  const std::uint64_t per_block = std::clamp<std::uint64_t>((warps + sms - 1) / sms, 1, max_leaf_threads / 32);
  return static_cast<unsigned>(32 * per_block);
}

cudaError_t launch_leaf_kernel(const void* data, std::uint64_t size, std::uint32_t leaves, std::uint32_t* leaf_words,
                               unsigned threads_per_block, cudaStream_t stream, leaf_kernel_variant variant) {
  const unsigned threads = std::clamp(threads_per_block / 32 * 32, 32U, max_leaf_threads);
  launch_variant(variant, data, size, leaves, leaf_words, threads, (leaves + threads - 1) / threads, stream);
  return cudaGetLastError();
}

cudaError_t launch_leaf_segments_kernel(const leaf_segment* segments, const std::uint32_t* first, std::uint64_t size,
                                        std::uint32_t leaves, std::uint32_t* leaf_words, unsigned threads_per_block,
                                        cudaStream_t stream, segment_walk walk) {
  const unsigned threads = std::clamp(threads_per_block / 32 * 32, 32U, max_leaf_threads);
  const std::uint32_t one = 1;
  const unsigned blocks = (leaves + threads - 1) / threads;
  const auto* table = reinterpret_cast<const segment_words_input*>(segments);
  if (walk == segment_walk::flat) {
    leaf_segments_kernel<unroll_mode::rolled, true, true>
        <<<blocks, threads, 0, stream>>>(table, first, size, leaves, leaf_words, one);
  } else {
    leaf_segments_kernel<unroll_mode::rolled, true, false>
        <<<blocks, threads, 0, stream>>>(table, first, size, leaves, leaf_words, one);
  }
  return cudaGetLastError();
}

cudaError_t launch_gather_kernel(const gather_task* tasks, std::uint32_t count, unsigned char* base,
                                 cudaStream_t stream) {
  gather_kernel<<<count, gather_threads, 0, stream>>>(tasks, base);
  return cudaGetLastError();
}

cudaError_t launch_tree_kernels(std::uint32_t* level_a, std::uint32_t* level_b, std::uint32_t leaves,
                                std::uint32_t* root_words, cudaStream_t stream) {
  std::uint32_t* in = level_a;
  std::uint32_t* out = level_b;
  std::uint32_t n = leaves;
  while (n > tree_single_block_nodes) {
    const std::uint32_t parents = (n + 1) / 2;
    const unsigned blocks = (parents + tree_threads - 1) / tree_threads;
    tree_level_kernel<<<blocks, tree_threads, 0, stream>>>(in, n, out);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    std::swap(in, out);
    n = parents;
  }
  tree_tail_kernel<<<1, tree_threads, 0, stream>>>(in, out, n, root_words);
  return cudaGetLastError();
}

cudaError_t launch_single_leaf_floor(const void* data, std::uint64_t size, std::uint32_t* out_words,
                                     cudaStream_t stream, leaf_kernel_variant variant) {
  const std::uint64_t len = std::min(size, sha_leaf_bytes);
  if (reinterpret_cast<std::uintptr_t>(data) % 16 != 0) return cudaErrorMisalignedAddress;
  launch_variant(variant, data, len, 1, out_words, 1, 1, stream);
  return cudaGetLastError();
}

}  // namespace tensorreg::cuda::detail
