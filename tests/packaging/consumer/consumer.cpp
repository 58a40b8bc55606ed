// The installed package's libraries, used as a consumer would: a SHA-256 from tensorreg::tensorreg,
// a connection attempt through tensorreg::client (to a socket nobody serves: UNAVAILABLE), and,
// when installed, tensorreg::cuda::device_count() (0 without a GPU or driver).
// Usage: consumer SOCKET_PATH. Prints one line per check; exits 0 when all behave.
#include <cstdio>
#include <string>

#include "tensorreg/client/connection.hpp"
#include "tensorreg/hash/sha256.hpp"
#if defined(CONSUMER_HAS_CUDA)
#include "tensorreg/cuda/gpu_tree_hash.hpp"
#endif

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: consumer SOCKET_PATH\n");
    return 2;
  }
  const auto hex = tensorreg::hash::to_hex(tensorreg::hash::sha256(std::string_view("abc")));
  std::printf("sha256(abc) %s\n", hex.c_str());
  if (hex != "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad") return 1;
  auto c = tensorreg::client::connection::connect(argv[1]);
  if (c || c.error().code != tensorreg::errc::unavailable) return 1;
  std::printf("connect: %s\n", c.error().message.c_str());
#if defined(CONSUMER_HAS_CUDA)
  std::printf("cuda devices %d\n", static_cast<int>(tensorreg::cuda::device_count()));
#endif
  return 0;
}
