// tensorreg_gpu_producer — a client process for the GPU tests and benchmark: CUDA IPC
// handles cannot be opened by the process that exported them, so the memory a test maps
// comes from here.
//
//   tensorreg_gpu_producer [--device N] [--vmm-socket-fd FD] [vmm:]SIZE:SEED ...
//
// For each SIZE:SEED argument, cudaMalloc(SIZE) on device N (default 0); for each
// vmm:SIZE:SEED, a CUDA VMM allocation (cuMemCreate, exportable as a POSIX fd; SIZE a multiple
// of the allocation granularity). Each is filled with the pseudo-random stream SEED of
// gpu_fill.hpp (byte i = fill_random_host(.., SEED)[i]). Then it prints, when there are VMM
// allocations, "granularity <G>", and one line per allocation in argument order:
// "handle <128 hex digits> <SIZE>" (cudaIpcGetMemHandle) or "vmm <SIZE>". The fds of the VMM
// allocations (cuMemExportToShareableHandle), in argument order, go over the Unix socket FD
// (inherited; SOCK_SEQPACKET or SOCK_STREAM) before "ready": messages of at most 250 fds
// (SCM_RIGHTS), each carrying a 4-byte native-endian count of its fds as data, as a client
// sends them to tensorregd (docs/wire-format.md §7, §12). Then "ready"; it waits until its
// stdin is closed (or it is killed), then frees everything and exits 0. Errors go to stderr
// with exit status 1.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/driver_entry.hpp"
#include "gpu_fill.hpp"

namespace {

bool ok(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  std::fprintf(stderr, "tensorreg_gpu_producer: cannot %s: %s: %s\n", what, cudaGetErrorName(e), cudaGetErrorString(e));
  return false;
}

// The driver's VMM entry points, through the runtime like the library (nothing links libcuda).
struct vmm_api {
  PFN_cuMemCreate_v10020 create = nullptr;
  PFN_cuMemGetAllocationGranularity_v10020 granularity = nullptr;
  PFN_cuMemAddressReserve_v10020 reserve = nullptr;
  PFN_cuMemAddressFree_v10020 address_free = nullptr;
  PFN_cuMemMap_v10020 map = nullptr;
  PFN_cuMemUnmap_v10020 unmap = nullptr;
  PFN_cuMemSetAccess_v10020 set_access = nullptr;
  PFN_cuMemExportToShareableHandle_v10020 export_handle = nullptr;
  PFN_cuMemRelease_v10020 release = nullptr;

  template <typename Fn>
  static bool find(Fn& out, const char* name) {
    if (tensorreg::cuda::detail::find_driver_entry(out, name, 10020)) return true;
    std::fprintf(stderr, "tensorreg_gpu_producer: cannot find the driver's %s\n", name);
    return false;
  }
  bool load() {
    return find(create, "cuMemCreate") && find(granularity, "cuMemGetAllocationGranularity") &&
           find(reserve, "cuMemAddressReserve") && find(address_free, "cuMemAddressFree") && find(map, "cuMemMap") &&
           find(unmap, "cuMemUnmap") && find(set_access, "cuMemSetAccess") &&
           find(export_handle, "cuMemExportToShareableHandle") && find(release, "cuMemRelease");
  }
};

bool cu_ok(CUresult r, const char* what) {
  if (r == CUDA_SUCCESS) return true;
  std::fprintf(stderr, "tensorreg_gpu_producer: cannot %s: CUresult %d\n", what, static_cast<int>(r));
  return false;
}

// Sends `fds` over `sock` in messages of at most 250 (the daemon's limit per frame; the
// kernel's is 253).
bool send_fds(int sock, const std::vector<int>& fds) {
  constexpr std::size_t per_message = 250;
  for (std::size_t at = 0; at < fds.size(); at += per_message) {
    const std::size_t n = std::min(per_message, fds.size() - at);
    std::uint32_t count = static_cast<std::uint32_t>(n);
    iovec iov{&count, sizeof count};
    std::vector<char> control(CMSG_SPACE(n * sizeof(int)), 0);
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(n * sizeof(int));
    std::memcpy(CMSG_DATA(cm), fds.data() + at, n * sizeof(int));
    if (::sendmsg(sock, &msg, MSG_NOSIGNAL) != static_cast<ssize_t>(sizeof count)) {
      std::perror("tensorreg_gpu_producer: cannot send VMM fds");
      return false;
    }
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  int device = 0;
  int vmm_socket = -1;
  struct request {
    std::uint64_t size;
    std::uint64_t seed;
    bool vmm;
  };
  std::vector<request> requests;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--device" && i + 1 < argc) {
      device = std::atoi(argv[++i]);
      continue;
    }
    if (arg == "--vmm-socket-fd" && i + 1 < argc) {
      vmm_socket = std::atoi(argv[++i]);
      continue;
    }
    const bool vmm = arg.rfind("vmm:", 0) == 0;
    if (vmm) arg = arg.substr(4);
    const auto colon = arg.find(':');
    if (colon == std::string::npos) {
      std::fprintf(stderr, "tensorreg_gpu_producer: expected [vmm:]SIZE:SEED, got '%s'\n", argv[i]);
      return 1;
    }
    requests.push_back({std::strtoull(arg.substr(0, colon).c_str(), nullptr, 10),
                        std::strtoull(arg.substr(colon + 1).c_str(), nullptr, 10), vmm});
  }
  const bool any_vmm = std::any_of(requests.begin(), requests.end(), [](const request& r) { return r.vmm; });
  if (any_vmm && vmm_socket < 0) {
    std::fprintf(stderr, "tensorreg_gpu_producer: vmm: allocations need --vmm-socket-fd\n");
    return 1;
  }
  // A thousand exported fds exceed the usual soft limit of 1024 open files.
  if (rlimit lim{}; ::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
    lim.rlim_cur = lim.rlim_max;
    static_cast<void>(::setrlimit(RLIMIT_NOFILE, &lim));
  }
  if (!ok(cudaSetDevice(device), "select the device")) return 1;
  if (!ok(cudaFree(nullptr), "start the device's context")) return 1;

  // VMM allocations are mapped here back to back in one reservation, only to fill them.
  vmm_api api;
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
  std::size_t granularity = 0;
  std::uint64_t vmm_total = 0;
  CUdeviceptr vmm_base = 0;
  if (any_vmm) {
    if (!api.load()) return 1;
    if (!cu_ok(api.granularity(&granularity, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM), "query the granularity")) {
      return 1;
    }
    for (const auto& r : requests) {
      if (!r.vmm) continue;
      if (r.size == 0 || r.size % granularity != 0) {
        std::fprintf(stderr, "tensorreg_gpu_producer: vmm size %llu is not a multiple of the granularity %zu\n",
                     static_cast<unsigned long long>(r.size), granularity);
        return 1;
      }
      vmm_total += r.size;
    }
    if (!cu_ok(api.reserve(&vmm_base, vmm_total, 0, 0, 0), "reserve address space")) return 1;
  }

  std::vector<void*> allocations(requests.size(), nullptr);
  std::vector<CUmemGenericAllocationHandle> vmm_handles(requests.size(), 0);
  std::vector<int> vmm_fds;
  std::uint64_t vmm_offset = 0;
  for (std::size_t i = 0; i < requests.size(); ++i) {
    const auto& r = requests[i];
    void* p = nullptr;
    if (r.vmm) {
      if (!cu_ok(api.create(&vmm_handles[i], r.size, &prop, 0), "create a VMM allocation")) return 1;
      if (!cu_ok(api.map(vmm_base + vmm_offset, r.size, 0, vmm_handles[i], 0), "map a VMM allocation")) return 1;
      CUmemAccessDesc access{};
      access.location = prop.location;
      access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
      if (!cu_ok(api.set_access(vmm_base + vmm_offset, r.size, &access, 1), "grant access")) return 1;
      p = reinterpret_cast<void*>(vmm_base + vmm_offset);
      vmm_offset += r.size;
      int fd = -1;
      if (!cu_ok(api.export_handle(&fd, vmm_handles[i], CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
                 "export a VMM allocation")) {
        return 1;
      }
      vmm_fds.push_back(fd);
    } else {
      if (!ok(cudaMalloc(&p, r.size), "allocate")) return 1;
      allocations[i] = p;
    }
    if (!ok(tensorreg::cuda::testing::fill_random(p, r.size, r.seed), "fill")) return 1;
  }
  if (!ok(cudaDeviceSynchronize(), "finish filling")) return 1;
  if (any_vmm) std::printf("granularity %zu\n", granularity);
  for (std::size_t i = 0; i < requests.size(); ++i) {
    if (requests[i].vmm) {
      std::printf("vmm %llu\n", static_cast<unsigned long long>(requests[i].size));
      continue;
    }
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
  std::fflush(stdout);
  if (any_vmm) {
    if (!send_fds(vmm_socket, vmm_fds)) return 1;
    // The receiver holds its own references now; the allocations live on through our handles.
    for (const int fd : vmm_fds) ::close(fd);
    ::close(vmm_socket);
  }
  std::printf("ready\n");
  std::fflush(stdout);
  char buffer[256];
  while (std::fread(buffer, 1, sizeof buffer, stdin) > 0) {
  }
  for (void* p : allocations) {
    if (p != nullptr) static_cast<void>(cudaFree(p));
  }
  if (any_vmm) {
    static_cast<void>(api.unmap(vmm_base, vmm_total));
    static_cast<void>(api.address_free(vmm_base, vmm_total));
    for (const auto h : vmm_handles) {
      if (h != 0) static_cast<void>(api.release(h));
    }
  }
  return 0;
}
