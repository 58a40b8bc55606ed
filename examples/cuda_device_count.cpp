// cuda_device_count — links tensorreg::cuda (the CUDA data plane) from the installed package
// and prints how many CUDA devices this process sees; 0 on a machine without a GPU or driver.
#include <cstdio>

#include "tensorreg/cuda/gpu_tree_hash.hpp"

int main() {
  std::printf("%d CUDA device(s)\n", static_cast<int>(tensorreg::cuda::device_count()));
  return 0;
}
