#include "tensorreg/common/random.hpp"

#include <sys/random.h>

#include <cerrno>
#include <vector>

#include "tensorreg/common/error.hpp"

namespace tensorreg {
namespace {

void fill_random(void* out, std::size_t n) {
  auto* p = static_cast<unsigned char*>(out);
  while (n > 0) {
    const ssize_t got = ::getrandom(p, n, 0);
    if (got < 0) {
      // EINTR is the only failure getrandom(2) can give once the pool is initialised.
      TENSORREG_ASSERT(errno == EINTR);
      continue;
    }
    p += got;
    n -= static_cast<std::size_t>(got);
  }
}

}  // namespace

std::string random_hex(std::size_t n_bytes) {
  static constexpr char digits[] = "0123456789abcdef";
  std::vector<unsigned char> raw(n_bytes);
  fill_random(raw.data(), raw.size());
  std::string out;
  out.reserve(2 * n_bytes);
  for (unsigned char b : raw) {
    out.push_back(digits[b >> 4]);
    out.push_back(digits[b & 0xf]);
  }
  return out;
}

std::uint64_t random_u64() {
  std::uint64_t v = 0;
  fill_random(&v, sizeof v);
  return v;
}

}  // namespace tensorreg
