// Attacks of one hostile local client on a real tensorregd (issue #15, denial of service): each
// is answered with its code and message, and the daemon serves on afterwards. Raw frames only,
// so that every byte and fd the daemon sees is the test's.
#include "daemon/server.hpp"

#include <catch2/catch.hpp>

#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "daemon/framing.hpp"
#include "daemon/unix_socket.hpp"
#include "support/daemon_process.hpp"
#include "support/raw_wire.hpp"
#include "tensorreg/wire/v1/frame.pb.h"

namespace {

namespace wire = tensorreg::wire::v1;
using tensorreg::errc;
using tensorreg::unique_fd;
using tensorreg::daemon::connect_unix;
using tensorreg::daemon::encode_frame;
using tensorreg::daemon::frame_decoder;
using tensorreg::daemon::receive_some;
using tensorreg::daemon::send_all;
using tensorreg::testing::daemon_process;

using tensorreg::testing::framed;
using tensorreg::testing::next_answer;

std::optional<wire::Response> call(int fd, const wire::Request& r) {
  const auto bytes = framed(r);
  REQUIRE(send_all(fd, std::as_bytes(std::span(bytes.data(), bytes.size())), {}));
  return next_answer(fd);
}

wire::Request stats_request(std::uint64_t id) {
  wire::Request r;
  r.set_request_id(id);
  r.mutable_get_stats();
  return r;
}

// The daemon answers GetStats on a fresh connection.
bool serves(const daemon_process& d) {
  auto fd = connect_unix(d.socket_path());
  if (!fd) return false;
  auto answer = call(fd->get(), stats_request(1));
  return answer && answer->request_id() == 1 && answer->status().code() == 0;
}

}  // namespace

TEST_CASE("tensorregd limits: more than 250 fds with one frame are answered INVALID_ARGUMENT before closing",
          "[daemon][e2e][limits]") {
  daemon_process d;
  auto fd = connect_unix(d.socket_path());
  REQUIRE(fd);
  // 253 fds (Linux's SCM_MAX_FD) on the sendmsg of one frame; the daemon has room for 250.
  std::vector<int> fds;
  for (int i = 0; i < 253; ++i) fds.push_back(STDERR_FILENO);
  REQUIRE(tensorreg::testing::send_unchecked(fd->get(), framed(stats_request(7)), fds));
  auto answer = next_answer(fd->get());
  REQUIRE(answer);
  CHECK(answer->request_id() == 0);
  CHECK(answer->status().code() == static_cast<int>(errc::invalid_argument));
  CHECK(answer->status().message() ==
        "cannot read frame: more than 250 file descriptors arrived with one message (at most 250 per frame)");
  CHECK_FALSE(next_answer(fd->get()));  // then the connection closes
  CHECK(serves(d));
}

TEST_CASE("tensorregd limits: one uid cannot take more than its share of the sessions", "[daemon][e2e][limits]") {
  daemon_process d({"--max-sessions-per-uid", "2"});
  auto first = connect_unix(d.socket_path());
  auto second = connect_unix(d.socket_path());
  REQUIRE((first && second));
  REQUIRE(call(first->get(), stats_request(1)));
  REQUIRE(call(second->get(), stats_request(1)));
  auto third = connect_unix(d.socket_path());
  REQUIRE(third);
  auto refused = next_answer(third->get());
  REQUIRE(refused);
  CHECK(refused->request_id() == 0);
  CHECK(refused->status().code() == static_cast<int>(errc::resource_exhausted));
  CHECK(refused->status().message() ==
        "cannot accept connection: uid " + std::to_string(::getuid()) + " already has its maximum of 2 sessions");
  // A session that ends gives its place back.
  first->reset();
  bool served = false;
  for (int attempt = 0; attempt < 50 && !served; ++attempt) {
    served = serves(d);
    if (!served) ::usleep(20'000);
  }
  CHECK(served);
}

TEST_CASE("tensorregd limits: an idle connection is closed with DEADLINE_EXCEEDED, a busy one is not",
          "[daemon][e2e][limits]") {
  daemon_process d({"--idle-timeout-ms", "300"});
  auto idle = connect_unix(d.socket_path());
  auto active = connect_unix(d.socket_path());
  REQUIRE((idle && active));
  // The active one asks something every 100 ms, for longer than the idle timeout.
  for (std::uint64_t i = 1; i <= 8; ++i) {
    auto answer = call(active->get(), stats_request(i));
    REQUIRE(answer);
    CHECK(answer->status().code() == 0);
    ::usleep(100'000);
  }
  auto closed = next_answer(idle->get());
  REQUIRE(closed);
  CHECK(closed->request_id() == 0);
  CHECK(closed->status().code() == static_cast<int>(errc::deadline_exceeded));
  CHECK(closed->status().message() == "closing the connection: no request for 300 ms (idle timeout)");
  CHECK_FALSE(next_answer(idle->get()));
  CHECK(serves(d));
}

TEST_CASE("tensorregd limits: a frame that stalls half-sent is dropped with its connection", "[daemon][e2e][limits]") {
  daemon_process d({"--frame-timeout-ms", "300"});
  auto fd = connect_unix(d.socket_path());
  REQUIRE(fd);
  // A header that promises 1 MiB, and 10 bytes of it; then nothing more, byte by byte.
  std::string stalled = encode_frame(std::string(1 << 20, 'x')).value().substr(0, 14);
  REQUIRE(send_all(fd->get(), std::as_bytes(std::span(stalled.data(), stalled.size())), {}));
  const auto started = std::chrono::steady_clock::now();
  for (int i = 0; i < 3; ++i) {
    ::usleep(50'000);  // trickling bytes do not restart the frame's clock
    REQUIRE(send_all(fd->get(), std::as_bytes(std::span("x", 1)), {}));
  }
  auto closed = next_answer(fd->get());
  REQUIRE(closed);
  CHECK(std::chrono::steady_clock::now() - started < std::chrono::seconds(5));
  CHECK(closed->request_id() == 0);
  CHECK(closed->status().code() == static_cast<int>(errc::deadline_exceeded));
  CHECK(closed->status().message() ==
        "cannot read frame: the frame at stream offset 0 did not arrive whole within 300 ms of its first byte");
  CHECK_FALSE(next_answer(fd->get()));
  CHECK(serves(d));
}

TEST_CASE("tensorregd limits: a lease of 1 EiB is refused at Begin, naming the size", "[daemon][e2e][limits]") {
  daemon_process d;
  auto fd = connect_unix(d.socket_path());
  REQUIRE(fd);
  wire::Request begin;
  begin.set_request_id(3);
  auto* b = begin.mutable_begin_register_artifact();
  b->set_owner_pid(::getpid());
  b->set_total_size(std::uint64_t{1} << 60);
  b->mutable_lease()->set_in_place(true);
  auto answer = call(fd->get(), begin);
  REQUIRE(answer);
  CHECK(answer->request_id() == 3);
  CHECK(answer->status().code() == static_cast<int>(errc::resource_exhausted));
  CHECK(answer->status().message() ==
        "cannot begin registration: total_size 1152921504606846976 exceeds this "
        "engine's limit of 1099511627776 bytes");
  CHECK(serves(d));
}

TEST_CASE("tensorregd limits: one uid's regions stay within --max-regions-per-uid", "[daemon][e2e][limits]") {
  daemon_process d({"--max-regions-per-uid", "1"});
  auto fd = connect_unix(d.socket_path());
  REQUIRE(fd);
  auto region = [](std::uint64_t id) {
    wire::Request r;
    r.set_request_id(id);
    auto* g = r.mutable_register_region();
    g->set_memory_kind(tensorcast::daemon::v2::REGION_MEMORY_KIND_HOST_SHARED);
    g->set_owner_pid(::getpid());
    g->set_size_bytes(4096);
    g->mutable_host_shared()->set_daemon_managed(true);
    g->mutable_host_shared()->set_region_class(tensorcast::daemon::v2::HOST_SHARED_REGION_CLASS_SCRATCH);
    return r;
  };
  auto first = call(fd->get(), region(1));
  REQUIRE(first);
  CHECK(first->status().code() == 0);
  auto second = call(fd->get(), region(2));
  REQUIRE(second);
  CHECK(second->status().code() == static_cast<int>(errc::resource_exhausted));
  CHECK(second->status().message() == "cannot register region: uid " + std::to_string(::getuid()) +
                                          " holds its share of 1 of the registry's 4096 regions");
  CHECK(serves(d));
}
