// register_cuda_tensors — an inference server registering its CUDA weights in place through
// tensorreg::client: no copy, the daemon maps the server's own GPU memory.
//
// Allocates a few tensors with cudaMalloc (two sharing one allocation, so the client sends
// that allocation once as a VRAM region; one alone, sent with its own IPC handle), registers
// them as a tensor dict, prints the artifact id, asks the daemon where the artifact's bytes
// lie (open_device: what a CUDA reader in another process maps), and revokes the lease.
// Exits 77 ("skipped: ...") when the client or this example was built without CUDA, or no
// device is visible; the daemon needs a GPU too.
//
// Usage: register_cuda_tensors SOCKET
#include <cstdio>
#include <string>
#include <vector>

#include "tensorreg/client/connection.hpp"

#if TENSORREG_EXAMPLE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace {

using namespace tensorreg;

constexpr int skipped = 77;

int failed(const char* what, const error& e) {
  std::fprintf(stderr, "register_cuda_tensors: %s: %s (%s)\n", what, e.message.c_str(),
               std::string(errc_name(e.code)).c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: register_cuda_tensors SOCKET\n");
    return 2;
  }
  if (!client::connection::cuda_supported()) {
    std::printf("skipped: this tensorreg client was built without CUDA\n");
    return skipped;
  }
#if !TENSORREG_EXAMPLE_CUDA
  std::printf("skipped: this example was built without the CUDA runtime\n");
  return skipped;
#else
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("skipped: no CUDA device\n");
    return skipped;
  }
  auto conn = client::connection::connect(argv[1]);
  if (!conn) return failed("connect", conn.error());

  // Two allocations: one backs "embed" and "norm" (a region), one backs "head" alone.
  constexpr std::uint64_t shared_bytes = 1 << 20;
  constexpr std::uint64_t head_bytes = 64 << 10;
  void* shared = nullptr;
  void* head = nullptr;
  if (cudaMalloc(&shared, shared_bytes) != cudaSuccess || cudaMalloc(&head, head_bytes) != cudaSuccess ||
      cudaMemset(shared, 1, shared_bytes) != cudaSuccess || cudaMemset(head, 2, head_bytes) != cudaSuccess ||
      cudaDeviceSynchronize() != cudaSuccess) {
    std::fprintf(stderr, "register_cuda_tensors: cannot allocate the tensors: %s\n",
                 cudaGetErrorString(cudaGetLastError()));
    return 1;
  }
  const auto base = reinterpret_cast<std::uint64_t>(shared);
  const std::vector<client::cuda_tensor> tensors = {
      // name, storage address, storage bytes, dtype, shape, stride, storage offset (elements)
      {"model.embed.weight", base, 512 << 10, "torch.float32", {256, 512}, {512, 1}, 0},
      {"model.norm.weight", base + (512 << 10), 4096, "torch.bfloat16", {2048}, {1}, 0},
      {"lm_head.weight", reinterpret_cast<std::uint64_t>(head), head_bytes, "torch.float16", {64, 512}, {512, 1}, 0},
  };
  client::cuda_register_report report;
  auto held = conn->register_cuda(tensors, {client::default_ttl_ms, -1, &report});
  int rc = 0;
  if (!held) {
    rc = failed("register", held.error());
  } else {
    const auto& id = held->info().descriptor.artifact_id;
    std::printf("registered %s\n  %zu storages in %zu allocations: %zu VRAM regions, %zu IPC handles\n", id.c_str(),
                report.storages, report.allocations, report.regions, report.lone_handles);
    auto layout = conn->open_device(id);
    if (!layout) {
      rc = failed("open", layout.error());
    } else {
      std::printf("open: %zu allocations, %zu segments over %llu canonical bytes\n", layout->allocations.size(),
                  layout->segments.size(), static_cast<unsigned long long>(layout->total_size));
      for (const auto& a : layout->allocations) {
        std::printf("  %s: %llu bytes (%s)\n", a.device_uuid.c_str(), static_cast<unsigned long long>(a.size_bytes),
                    a.cuda_ipc_handle.empty() ? "VMM chunks" : "IPC handle");
      }
    }
    if (auto released = held->release(); !released)
      rc = failed("revoke", released.error());
    else
      std::printf("revoked\n");
  }
  static_cast<void>(cudaFree(shared));
  static_cast<void>(cudaFree(head));
  return rc;
#endif
}
