// tests/cuda/producer_process.hpp — tensorreg_gpu_producer as a child process, for the VMM
// tests and benchmark: it makes cudaMalloc allocations (IPC handles, read from its stdout) and
// CUDA VMM allocations (POSIX fds, received over a socketpair with SCM_RIGHTS), all filled with
// gpu_fill.hpp's pattern. Memory must come from another process: IPC handles cannot be opened
// by their exporter, and a daemon imports VMM fds of its clients.
//
// Thread-safety: one thread at a time. Ownership: the object owns the child (stdin closed and
// the child reaped on destruction, which frees its memory) and the fds it received.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace tensorreg::cuda::testing {

struct producer_allocation {
  std::uint64_t size = 0;
  std::uint64_t seed = 0;
  bool vmm = false;  ///< a cuMemCreate allocation exported as a POSIX fd, else cudaMalloc + IPC
};

class producer_process {
 public:
  /// Starts `path` (producer_path() by default) on `device` and waits until every allocation
  /// is made and every VMM fd received. Raises this process's soft RLIMIT_NOFILE to its hard
  /// limit (a thousand fds do not fit in 1024). Throws std::runtime_error on any failure.
  explicit producer_process(const std::vector<producer_allocation>& allocations, int device = 0,
                            const std::string& path = producer_path());
  ~producer_process();
  producer_process(const producer_process&) = delete;
  producer_process& operator=(const producer_process&) = delete;

  [[nodiscard]] pid_t pid() const noexcept { return pid_; }
  /// The producer's VMM allocation granularity (0 when it made no VMM allocation).
  [[nodiscard]] std::uint64_t granularity() const noexcept { return granularity_; }
  /// The fds of the VMM allocations, in the order they were asked for.
  [[nodiscard]] const std::vector<int>& vmm_fds() const noexcept { return vmm_fds_; }
  /// The cudaIpcMemHandle_t bytes of the cudaMalloc allocations, in the order asked for.
  [[nodiscard]] const std::vector<std::string>& ipc_handles() const noexcept { return ipc_handles_; }

  /// Ends the producer — stdin closed, so it frees its memory and exits, or SIGKILLed when
  /// `kill` — and reaps it; the VMM fds stay open here. Returns its wait status.
  int end(bool kill);

  /// $TENSORREG_GPU_PRODUCER, else tensorreg_gpu_producer next to this executable.
  [[nodiscard]] static std::string producer_path();

 private:
  [[nodiscard]] std::string read_line();
  void release() noexcept;

  pid_t pid_ = -1;
  int stdin_ = -1;
  std::FILE* stdout_ = nullptr;
  int socket_ = -1;
  std::uint64_t granularity_ = 0;
  std::vector<int> vmm_fds_;
  std::vector<std::string> ipc_handles_;
};

/// Bytes [offset, offset + length) of gpu_fill.hpp's stream `seed`, as a string.
[[nodiscard]] std::string pattern(std::uint64_t seed, std::uint64_t offset, std::uint64_t length);

}  // namespace tensorreg::cuda::testing
