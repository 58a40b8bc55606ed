// tree_hash_file — prints the data multihash (4 MiB-leaf SHA-256 tree hash) of a file.
//
// Usage: tree_hash_file [--threads N] FILE
// N is the total number of hashing threads (the caller plus N - 1 pool workers); default 1.
// An empty file prints the multihash of the 32-zero-byte root (the documented zero-leaf
// sentinel; the engine itself never hashes size 0). Used by tests/hash/tree_hash_reference.py.
// Exit status: 0 on success, 1 on an I/O or hashing error, 2 on bad usage.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <span>
#include <string>
#include <string_view>

#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/memory/byte_source.hpp"

namespace {

int usage() {
  std::fprintf(stderr, "usage: tree_hash_file [--threads N] FILE\n");
  return 2;
}

// A read-only private mapping of a whole file; unmapped on destruction.
class file_mapping {
 public:
  file_mapping() = default;
  file_mapping(const file_mapping&) = delete;
  file_mapping& operator=(const file_mapping&) = delete;
  ~file_mapping() {
    if (data_ != nullptr) ::munmap(data_, size_);
  }

  bool open(const char* path) {
    const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return report(path, "open");
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      return report(path, "stat");
    }
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        ::close(fd);
        return report(path, "mmap");
      }
      data_ = p;
      ::madvise(data_, size_, MADV_SEQUENTIAL);
    }
    ::close(fd);
    return true;
  }

  [[nodiscard]] std::span<const std::byte> bytes() const noexcept {
    return {static_cast<const std::byte*>(data_), size_};
  }

 private:
  static bool report(const char* path, const char* what) {
    std::fprintf(stderr, "tree_hash_file: cannot %s '%s': %s\n", what, path, std::strerror(errno));
    return false;
  }

  void* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace

int main(int argc, char** argv) try {
  unsigned threads = 1;
  const char* path = nullptr;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--threads") {
      if (i + 1 >= argc) return usage();
      char* end = nullptr;
      const unsigned long n = std::strtoul(argv[++i], &end, 10);
      if (end == argv[i] || *end != '\0' || n == 0 || n > 1024) return usage();
      threads = static_cast<unsigned>(n);
    } else if (path == nullptr && !arg.starts_with("--")) {
      path = argv[i];
    } else {
      return usage();
    }
  }
  if (path == nullptr) return usage();

  file_mapping file;
  if (!file.open(path)) return 1;
  const tensorreg::memory::host_bytes_view source(file.bytes());
  tensorreg::thread_pool pool(threads - 1);
  const auto root = tensorreg::hash::tree_hash(source, &pool);
  if (!root) {
    std::fprintf(stderr, "tree_hash_file: %s\n", root.error().message.c_str());
    return 1;
  }
  std::printf("%s\n", tensorreg::hash::encode_multihash(*root).c_str());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "tree_hash_file: %s\n", e.what());
  return 1;
}
