// Main of tensorreg_gpu_tests: exits 77 (ctest's SKIP_RETURN_CODE) when no CUDA device is
// present, so the suite is reported as skipped on machines without a GPU; otherwise prints
// what it runs on (the probe) and runs Catch.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cuda_runtime_api.h>

#include <cstdio>

int main(int argc, char** argv) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    std::fprintf(stderr, "tensorreg_gpu_tests: no CUDA device (%s): skipped\n",
                 e != cudaSuccess ? cudaGetErrorName(e) : "0 devices");
    return 77;
  }
  for (int d = 0; d < count; ++d) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, d) == cudaSuccess) {
      std::fprintf(stderr, "tensorreg_gpu_probe: device %d: %s, sm_%d%d, %d SMs, %.1f GiB\n", d, prop.name, prop.major,
                   prop.minor, prop.multiProcessorCount,
                   static_cast<double>(prop.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0));
    }
  }
  return Catch::Session().run(argc, argv);
}
