// tensorreg_hostile_peer — a second client process for the adversarial suite and the soak.
//
// It is a process of its own so that it has its own pid (the daemon's ownership checks key on
// the peer's pid) and so that a test can SIGKILL it at a moment it announces on stdout:
//
//   cross-pid SOCKET PENDING_REG LEASE_REG LEASE_ARTIFACT REGION
//       acts on another process's registration, lease, artifact and region; prints one line
//       "<op> <code> <message>" per call
//   half-frame SOCKET
//       sends a frame header and part of its payload, prints "sent", then waits to be killed
//   mid-commit SOCKET BYTES SEED
//       leases BYTES pattern bytes in place: region, Begin, Feed; prints "committing", sends
//       Commit and prints "committed <code>" when it is answered; then waits to be killed
//   lease SOCKET BYTES SEED
//       the whole lease, then prints "leased <code> <artifact id>" and waits to be killed
//   put SOCKET SAFETENSORS_FILE
//       a stable_dram put of the file; prints "put <code> <artifact id>"
//
// Exit status: 0 when the mode ran (the calls' codes are printed, not judged), 2 on bad usage.
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "client/raw_connection.hpp"
#include "daemon/framing.hpp"
#include "daemon/unix_socket.hpp"
#include "support/lip_requests.hpp"
#include "tensorreg/client/connection.hpp"
#include "tensorreg/index/safetensors_bundle.hpp"

namespace {

namespace lip = tensorreg::testing::lip;
using raw_connection = tensorreg::client::raw::connection;

template <typename T>
void report(const char* op, const tensorreg::result<T>& r, const std::string& detail = {}) {
  if (r) {
    std::printf("%s 0 %s\n", op, detail.c_str());
  } else {
    std::printf("%s %d %s\n", op, static_cast<int>(r.error().code), r.error().message.c_str());
  }
  std::fflush(stdout);
}

[[noreturn]] void wait_to_be_killed() {
  for (;;) ::pause();
}

int cross_pid(raw_connection& c, const std::vector<std::string>& a) {
  const pid_t self = ::getpid();
  const auto& pending = a[0];
  const auto& lease_reg = a[1];
  const auto& lease_artifact = a[2];
  const auto& region = a[3];
  auto feed = lip::one_storage(pending, region, 4096);
  report("feed", c.feed({feed}));
  report("commit", c.call(lip::commit(pending)));
  report("abort", c.call(lip::abort(pending)));
  report("revoke-pending", c.call(lip::revoke(pending)));
  report("revoke-lease", c.call(lip::revoke(lease_reg)));
  report("keep-alive", c.call(lip::keep_alive(self, pending, 60'000)));
  report("deregister", c.call(lip::deregister(lease_artifact)));
  report("unregister-region", c.call(lip::unregister_region(self, region)));
  return 0;
}

int half_frame(const std::string& socket) {
  auto fd = tensorreg::daemon::connect_unix(socket);
  if (!fd) return 1;
  const auto frame = tensorreg::daemon::encode_frame(std::string(1 << 20, 'x')).value();
  const std::string half = frame.substr(0, frame.size() / 2);
  if (!tensorreg::daemon::send_all(fd->get(), std::as_bytes(std::span(half.data(), half.size())), {})) return 1;
  std::printf("sent\n");
  std::fflush(stdout);
  wait_to_be_killed();
}

int mid_commit(raw_connection& c, std::uint64_t bytes, std::uint32_t seed, bool announce) {
  const pid_t self = ::getpid();
  const auto data = lip::pattern(bytes, seed);
  if (!announce) {
    auto leased = lip::lease_bytes(c, data, 0);
    report("leased", leased, leased ? leased->artifact_id : std::string());
    wait_to_be_killed();
  }
  auto region = c.call(lip::managed_region(self, bytes));
  if (!region || region->fds.size() != 1) return report("region", region), 1;
  auto slab = tensorreg::memory::shared_memory::adopt(std::move(region->fds[0]), bytes, true);
  if (!slab) return report("map", slab), 1;
  std::memcpy(slab->mutable_bytes().data(), data.data(), bytes);
  const auto region_id = region->response.register_region().region().region_id();
  auto begun = c.call(lip::begin(self, bytes, 0));
  if (!begun) return report("begin", begun), 1;
  const auto reg = begun->response.begin_register_artifact().registration_id();
  auto fed = c.feed({lip::one_storage(reg, region_id, bytes)});
  if (!fed) return report("feed", fed), 1;
  std::printf("committing\n");
  std::fflush(stdout);
  report("committed", c.call(lip::commit(reg)));
  wait_to_be_killed();
}

int put(const std::string& socket, const std::string& file) {
  auto bundle = tensorreg::index::safetensors_bundle::open({file});
  if (!bundle) return report("open", bundle), 1;
  auto c = tensorreg::client::connection::connect(socket);
  if (!c) return report("connect", c), 1;
  auto r = c->put(**bundle, {"cache", {}});
  report("put", r, r ? r->descriptor.artifact_id : std::string());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.size() < 2) {
    std::fprintf(stderr, "usage: tensorreg_hostile_peer MODE SOCKET ARGS... (see the source's header)\n");
    return 2;
  }
  const std::string mode = args[0];
  const std::string socket = args[1];
  const std::vector<std::string> rest(args.begin() + 2, args.end());
  if (mode == "half-frame") return half_frame(socket);
  if (mode == "put" && rest.size() == 1) return put(socket, rest[0]);
  auto c = raw_connection::connect(socket);
  if (!c) return report("connect", c), 1;
  if (mode == "cross-pid" && rest.size() == 4) return cross_pid(**c, rest);
  if ((mode == "mid-commit" || mode == "lease") && rest.size() == 2) {
    return mid_commit(**c, std::stoull(rest[0]), static_cast<std::uint32_t>(std::stoul(rest[1])), mode == "mid-commit");
  }
  std::fprintf(stderr, "tensorreg_hostile_peer: unknown mode or arguments: %s\n", mode.c_str());
  return 2;
}
