// tensorreg_gpu_producer — a client process for the GPU tests and benchmark: CUDA IPC
// handles cannot be opened by the process that exported them, so the memory a test maps
// comes from here.
//
//   tensorreg_gpu_producer [--device N] SIZE:SEED ...
//
// For each argument, cudaMalloc(SIZE) on device N (default 0) and fill it with the
// pseudo-random stream SEED of gpu_fill.hpp (byte i = fill_random_host(.., SEED)[i]). Then it
// prints one line per allocation, "handle <128 hex digits> <SIZE>", then "ready", and waits
// until its stdin is closed (or it is killed); then it frees everything and exits 0.
// Errors go to stderr with exit status 1.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "gpu_fill.hpp"

namespace {

bool ok(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  std::fprintf(stderr, "tensorreg_gpu_producer: cannot %s: %s: %s\n", what, cudaGetErrorName(e), cudaGetErrorString(e));
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  int device = 0;
  struct request {
    std::uint64_t size;
    std::uint64_t seed;
  };
  std::vector<request> requests;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--device" && i + 1 < argc) {
      device = std::atoi(argv[++i]);
      continue;
    }
    const auto colon = arg.find(':');
    if (colon == std::string::npos) {
      std::fprintf(stderr, "tensorreg_gpu_producer: expected SIZE:SEED, got '%s'\n", arg.c_str());
      return 1;
    }
    requests.push_back({std::strtoull(arg.substr(0, colon).c_str(), nullptr, 10),
                        std::strtoull(arg.substr(colon + 1).c_str(), nullptr, 10)});
  }
  if (!ok(cudaSetDevice(device), "select the device")) return 1;
  std::vector<void*> allocations;
  for (const auto& r : requests) {
    void* p = nullptr;
    if (!ok(cudaMalloc(&p, r.size), "allocate")) return 1;
    allocations.push_back(p);
    if (!ok(tensorreg::cuda::testing::fill_random(p, r.size, r.seed), "fill")) return 1;
  }
  if (!ok(cudaDeviceSynchronize(), "finish filling")) return 1;
  for (std::size_t i = 0; i < requests.size(); ++i) {
    cudaIpcMemHandle_t h{};
    if (!ok(cudaIpcGetMemHandle(&h, allocations[i]), "export a handle")) return 1;
    std::string hex;
    static constexpr char digits[] = "0123456789abcdef";
    for (std::size_t b = 0; b < sizeof h; ++b) {
      const auto byte = static_cast<unsigned char>(h.reserved[b]);
      hex += digits[byte >> 4];
      hex += digits[byte & 15];
    }
    std::printf("handle %s %llu\n", hex.c_str(), static_cast<unsigned long long>(requests[i].size));
  }
  std::printf("ready\n");
  std::fflush(stdout);
  char buffer[256];
  while (std::fread(buffer, 1, sizeof buffer, stdin) > 0) {
  }
  for (void* p : allocations) static_cast<void>(cudaFree(p));
  return 0;
}
