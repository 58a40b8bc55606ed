#include "cuda/batched_copier.hpp"

#include <string>
#include <utility>

#include "cuda/batched_copy_kernel.hpp"
#include "cuda/cuda_check.hpp"

namespace tensorreg::cuda::detail {
namespace {

// Tables grow in steps this large, so that a layout gaining a few runs from one step of a
// weight-sync loop to the next does not reallocate them each time.
constexpr std::uint64_t table_step_bytes = std::uint64_t{64} << 10;

// Grows the table `p` (holding `have` bytes) to hold `want`; its contents go. Pinned host
// memory or device memory; the device must be current and no work may still read it.
status grow(copy_chunk*& p, std::uint64_t& have, std::uint64_t want, bool pinned) {
  if (want <= have) return {};
  const char* what = pinned ? "pinned batched copy table" : "device batched copy table";
  if (p != nullptr) {
    TENSORREG_CUDA_TRY(pinned ? cudaFreeHost(p) : cudaFree(p), std::string("free the ") + what);
    p = nullptr;
    have = 0;
  }
  const std::uint64_t bytes = (want + table_step_bytes - 1) / table_step_bytes * table_step_bytes;
  void* fresh = nullptr;
  TENSORREG_CUDA_TRY(pinned ? cudaMallocHost(&fresh, bytes) : cudaMalloc(&fresh, bytes),
                     "allocate " + std::to_string(bytes) + " bytes of " + what);
  p = static_cast<copy_chunk*>(fresh);
  have = bytes;
  return {};
}

}  // namespace

result<batched_copier> batched_copier::create(int device, batched_copy_options opts) {
  if (opts.chunk_bytes < 16 || opts.chunk_bytes % 16 != 0 || opts.chunk_bytes > (std::uint64_t{1} << 31)) {
    return fail(errc::invalid_argument, "cannot create a batched copier: chunk_bytes " +
                                            std::to_string(opts.chunk_bytes) +
                                            " is not a multiple of 16 in [16, 2^31]");
  }
  int sm_count = 0;
  TENSORREG_CUDA_TRY(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device),
                     "read the multiprocessor count of CUDA device " + std::to_string(device));
  cudaEvent_t done = nullptr;
  TENSORREG_CUDA_TRY(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "create a batched copy event");
  return batched_copier(device, opts, sm_count, done);
}

batched_copier::batched_copier(batched_copier&& other) noexcept
    : device_(other.device_),
      opts_(other.opts_),
      sm_count_(other.sm_count_),
      done_(std::exchange(other.done_, nullptr)),
      host_table_(std::exchange(other.host_table_, nullptr)),
      host_table_bytes_(std::exchange(other.host_table_bytes_, 0)),
      device_table_(std::exchange(other.device_table_, nullptr)),
      device_table_bytes_(std::exchange(other.device_table_bytes_, 0)),
      last_chunks_(other.last_chunks_) {}

batched_copier::~batched_copier() {
  if (done_ == nullptr && host_table_ == nullptr && device_table_ == nullptr) return;
  release_device_guard guard(device_);
  // The tables may be freed only once no upload or kernel reads them.
  if (done_ != nullptr) {
    check_release(cudaEventSynchronize(done_), "wait for a batched copy");
    check_release(cudaEventDestroy(done_), "destroy a batched copy event");
  }
  if (device_table_ != nullptr) check_release(cudaFree(device_table_), "free a device batched copy table");
  if (host_table_ != nullptr) check_release(cudaFreeHost(host_table_), "free a pinned batched copy table");
}

status batched_copier::enqueue(void* to, std::uint64_t size, std::span<const device_piece> runs, cudaStream_t stream) {
  const std::uint64_t chunks = count_copy_chunks(runs, size, opts_.chunk_bytes);
  last_chunks_ = chunks;
  if (chunks == 0) return {};
  const std::uint64_t bytes = chunks * sizeof(copy_chunk);
  // The previous enqueue's upload may still read the host table, its kernel the device table.
  TENSORREG_CUDA_TRY(cudaEventSynchronize(done_), "wait for the previous batched copy");
  TENSORREG_TRY(grow(host_table_, host_table_bytes_, bytes, true));
  TENSORREG_TRY(grow(device_table_, device_table_bytes_, bytes, false));
  std::uint64_t i = 0;
  for_each_copy_chunk(runs, size, opts_.chunk_bytes, [&](const copy_chunk& c) { host_table_[i++] = c; });
  const std::string what = " of " + std::to_string(chunks) + " chunks (" + std::to_string(size) + " bytes)";
  TENSORREG_CUDA_TRY(cudaMemcpyAsync(device_table_, host_table_, bytes, cudaMemcpyHostToDevice, stream),
                     "upload the table of a batched copy" + what);
  const cudaError_t launched =
      launch_batched_copy_kernel(device_table_, chunks, static_cast<unsigned char*>(to),
                                 copy_grid_blocks(chunks, sm_count_, opts_.blocks_per_sm), stream);
  // Recorded whether the launch was taken or not: the upload reads the host table either way.
  const cudaError_t recorded = cudaEventRecord(done_, stream);
  TENSORREG_CUDA_TRY(launched, "launch the batched copy" + what);
  TENSORREG_CUDA_TRY(recorded, "record the end of a batched copy");
  return {};
}

}  // namespace tensorreg::cuda::detail
