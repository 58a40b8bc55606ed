// tensorreg/cuda/gpu_tree_hash.hpp — the data tree hash (registration.md §3.3) of device memory,
// computed on the GPU by our own SHA-256 kernel (DECISIONS §5.1, §6).
//
// Provides `gpu_tree_hasher`, which owns its device scratch (the leaf digest array and a
// level buffer, and for tree_hash_pieces a leaf table and gathered leaves) and a pinned 32-byte
// root slot, so repeated hashes of sizes and layouts it has seen do not allocate; the one-shot `tree_hash_device` / `leaf_digests_device`; and `device_count`.
// Results are bit-identical to hash::tree_hash / hash::leaf_digests on the same bytes for
// every size: fixed 4 MiB leaves (the last may be short, any length), parent =
// SHA-256(left ‖ right), an odd last node promoted unchanged, one leaf = the root. The tree is
// folded on the GPU and only the 32-byte root is copied back.
//
// This header needs no CUDA header: device pointers are `const void*`, streams a
// `stream_view` that wraps a cudaStream_t as `void*`. Work is enqueued on that stream, so it
// is ordered after whatever the caller enqueued there earlier; every call waits for its own
// work to finish (cudaStreamSynchronize) before returning. The functions make the requested
// device current for the call and restore the caller's current device before returning.
//
// Thread-safety: a `gpu_tree_hasher` is used by one thread at a time; distinct hashers are
// independent. The free functions are reentrant (each call uses its own scratch).
// Ownership: a hasher owns its device and pinned buffers (freed in the destructor) and keeps
// no reference to the memory it hashes after a call returns. It is move-only.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "tensorreg/common/error.hpp"
#include "tensorreg/hash/sha256.hpp"

namespace tensorreg::cuda {

/// A non-owning CUDA stream: a cudaStream_t passed as `void*` (converts implicitly from
/// cudaStream_t). The default, null, is CUDA's legacy default stream.
struct stream_view {
  constexpr stream_view() noexcept = default;
  constexpr stream_view(void* stream) noexcept : handle(stream) {}  // NOLINT: implicit on purpose
  void* handle = nullptr;
};

/// Number of CUDA devices this process can use: 0 when there is no GPU, no driver, or the
/// runtime cannot start. Never fails.
[[nodiscard]] std::int32_t device_count() noexcept;

/// `length` bytes at offset `at` of a canonical buffer, read from `src` (device memory of the
/// hasher's device, or memory it can read): what tree_hash_pieces() hashes instead of a
/// contiguous buffer.
struct device_piece {
  std::uint64_t at = 0;
  const void* src = nullptr;
  std::uint64_t length = 0;
};

/// Hashes device memory with the GPU tree hash. Move-only; one thread at a time.
class gpu_tree_hasher {
 public:
  /// A hasher on CUDA device `device`, with scratch reserved for buffers of up to
  /// `reserve_bytes` bytes (0: allocated on first use; larger sizes grow it later).
  /// Errors: INVALID_ARGUMENT for a negative device; FAILED_PRECONDITION when there is no
  /// CUDA device `device` (the message names it and how many are present, or why CUDA is
  /// unavailable); RESOURCE_EXHAUSTED when the scratch cannot be allocated; INTERNAL for
  /// other CUDA errors (messages carry cudaGetErrorName and cudaGetErrorString).
  [[nodiscard]] static result<gpu_tree_hasher> create(std::int32_t device, std::uint64_t reserve_bytes = 0);

  ~gpu_tree_hasher();
  gpu_tree_hasher(gpu_tree_hasher&&) noexcept;
  gpu_tree_hasher& operator=(gpu_tree_hasher&&) noexcept;
  gpu_tree_hasher(const gpu_tree_hasher&) = delete;
  gpu_tree_hasher& operator=(const gpu_tree_hasher&) = delete;

  /// The data tree hash of the `size` bytes at `device_ptr`, equal to hash::tree_hash of the
  /// same bytes. Blocks until the root is on the host.
  /// REQUIRES: not moved from; [device_ptr, device_ptr + size) is readable by this device
  /// (device memory of this device, managed memory, or mapped pinned host memory) and
  /// unchanged until the call returns.
  /// Errors: INVALID_ARGUMENT for size 0, a null pointer, a pointer CUDA does not know, or
  /// memory of another device; OUT_OF_RANGE for a size of 2^31 leaves or more;
  /// RESOURCE_EXHAUSTED when scratch cannot grow; INTERNAL for a failed kernel or other CUDA
  /// error.
  [[nodiscard]] result<hash::digest> tree_hash(const void* device_ptr, std::uint64_t size, stream_view stream = {});

  /// The data tree hash of a `size`-byte buffer made of `pieces` and zeros wherever no piece
  /// lies, equal to hash::tree_hash of those bytes assembled, without assembling them: a leaf
  /// whose piece and gap boundaries fall on its 64-byte blocks, read at 16-byte aligned
  /// addresses (a state dict's layout: PAD to 64 bytes, allocator blocks of 512), is hashed
  /// where it lies, its thread streaming blocks across pieces and zero runs; the other leaves
  /// are gathered by one kernel into scratch the hasher keeps for its next call. One upload of
  /// the leaf plan, one synchronization at the end.
  /// REQUIRES: as tree_hash() for every piece's bytes.
  /// Errors: INVALID_ARGUMENT for size 0, a piece of length 0 or null `src`, pieces out of
  /// order, overlapping or past `size`; OUT_OF_RANGE, RESOURCE_EXHAUSTED, INTERNAL as
  /// tree_hash(). The pointers are not checked with the driver (a bad one faults the kernel:
  /// INTERNAL, and the context is lost).
  [[nodiscard]] result<hash::digest> tree_hash_pieces(const std::vector<device_piece>& pieces, std::uint64_t size,
                                                      stream_view stream = {});

  /// Bytes of gather scratch the hasher keeps now (tree_hash_pieces grows it on demand).
  [[nodiscard]] std::uint64_t gather_capacity_bytes() const noexcept;

  /// Every leaf digest of the `size` bytes at `device_ptr`, in order (as hash::leaf_digests).
  /// REQUIRES and errors: as tree_hash().
  [[nodiscard]] result<std::vector<hash::digest>> leaf_digests(const void* device_ptr, std::uint64_t size,
                                                               stream_view stream = {});

  /// The device this hasher runs on.
  [[nodiscard]] std::int32_t device() const noexcept;

  /// How many leaves the scratch holds now (it grows on demand).
  [[nodiscard]] std::uint64_t capacity_leaves() const noexcept;

 private:
  struct impl;
  explicit gpu_tree_hasher(std::unique_ptr<impl> state) noexcept;
  std::unique_ptr<impl> impl_;
};

/// One-shot gpu_tree_hasher::create(device) + tree_hash(): allocates scratch on every call;
/// keep a hasher for repeated use. Errors: as create() and tree_hash().
[[nodiscard]] result<hash::digest> tree_hash_device(const void* device_ptr, std::uint64_t size, stream_view stream,
                                                    std::int32_t device);

/// One-shot gpu_tree_hasher::create(device) + leaf_digests(). Errors: as create() and
/// leaf_digests().
[[nodiscard]] result<std::vector<hash::digest>> leaf_digests_device(const void* device_ptr, std::uint64_t size,
                                                                    stream_view stream, std::int32_t device);

}  // namespace tensorreg::cuda
