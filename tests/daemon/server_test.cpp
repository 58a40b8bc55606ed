// The server's scheduling against a real tensorregd (issue #15): requests of one connection are
// worked on concurrently, control requests never wait behind commits, and commits of different
// clients share the hashing workers. The assertions are about which answer comes first, never
// about how long anything took.
#include "daemon/server.hpp"

#include <catch2/catch.hpp>

#include <fmt/core.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "client/raw_connection.hpp"
#include "client/wire_convert.hpp"
#include "daemon/framing.hpp"
#include "daemon/unix_socket.hpp"
#include "support/daemon_process.hpp"
#include "support/raw_wire.hpp"
#include "tensorreg/wire/v1/frame.pb.h"

extern char** environ;

namespace {

namespace wire = tensorreg::wire::v1;
namespace wc = tensorreg::client::wire_convert;
namespace reg = tensorreg::registration;
using tensorreg::errc;
using tensorreg::unique_fd;
using tensorreg::daemon::connect_unix;
using tensorreg::daemon::send_all;
using tensorreg::testing::daemon_process;
using tensorreg::testing::framed;
using tensorreg::testing::next_answer;
using raw_client = tensorreg::client::raw::connection;

constexpr std::uint64_t kData = 4096;
constexpr std::uint64_t kGiB = std::uint64_t{1} << 30;

// A process that only lives, so that a commit can have an owner other than this test's pid
// (the daemon trusts our uid's owner_pid with --trust-client-pids).
class stand_in_owner {
 public:
  stand_in_owner() {
    char sleep[] = "sleep";
    char seconds[] = "120";
    char* argv[] = {sleep, seconds, nullptr};
    REQUIRE(::posix_spawnp(&pid_, "sleep", nullptr, nullptr, argv, environ) == 0);
  }
  ~stand_in_owner() {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  stand_in_owner(const stand_in_owner&) = delete;
  stand_in_owner& operator=(const stand_in_owner&) = delete;
  [[nodiscard]] pid_t pid() const noexcept { return pid_; }

 private:
  pid_t pid_ = -1;
};

// Begins and feeds a lease of 4 KiB of data followed by `padding` bytes of PAD (hashed as
// zeros, held in no memory), owned by `owner`; returns its registration id, ready to commit.
std::string padded_lease(raw_client& c, pid_t owner, std::uint64_t padding) {
  wc::region_args region_args;
  region_args.host_shared = true;
  region_args.owner_pid = owner;
  region_args.size_bytes = kData;
  auto region_reply = c.call(wc::register_region_request(region_args));
  REQUIRE(region_reply);
  const auto region = wc::region_of(region_reply->response);

  wc::begin_args begin;
  begin.plan = wc::begin_plan::lease_in_place;
  begin.device_id = -1;
  begin.total_size = kData + padding;
  begin.ttl_ms = 0;
  begin.owner_pid = owner;
  auto begun = c.call(wc::begin_request(begin));
  REQUIRE(begun);
  const std::string id = wc::registration_id_of(begun->response);

  reg::feed_request feed;
  feed.registration_id = id;
  feed.storage_entries.push_back({"s0", -1, kData, region, 0});
  feed.tensor_aliases.push_back({"w", "s0", 0, kData, {kData / 4}, {1}, "F32"});
  feed.payload = reg::lease_segments{{{"s0", 0, 0, kData}}};
  std::vector<wc::v2::FeedRegisterArtifactStreamRequest> frames;
  frames.push_back(wc::feed_frame(feed));
  REQUIRE(c.feed(std::move(frames)));
  return id;
}

wire::Request with_id(wire::Request r, std::uint64_t id) {
  r.set_request_id(id);
  return r;
}

void send_request(int fd, const wire::Request& r) {
  const auto bytes = framed(r);
  REQUIRE(send_all(fd, std::as_bytes(std::span(bytes.data(), bytes.size())), {}));
}

// Answers read in turn from one connection. Unlike next_answer(), it keeps the bytes of the
// answers after the first when one read holds several (pipelined requests are answered so).
class answer_reader {
 public:
  explicit answer_reader(int fd) : fd_(fd) {}
  std::optional<wire::Response> next() {
    std::vector<std::byte> buffer(4096);
    for (;;) {
      if (auto f = decoder_.next()) {
        wire::Response r;
        REQUIRE(r.ParseFromString(f->payload));
        return r;
      }
      auto got = tensorreg::daemon::receive_some(fd_, buffer);
      if (!got || got->bytes == 0) return std::nullopt;
      REQUIRE(decoder_.feed(std::span<const std::byte>(buffer.data(), got->bytes)));
    }
  }

 private:
  int fd_;
  tensorreg::daemon::frame_decoder decoder_{1u << 30};
};

// Whether an answer (or the close) is waiting to be read on `fd`, without reading it.
bool readable(int fd) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, 0) == 1;
}

}  // namespace

TEST_CASE("server: a GetStats sent after a commit on one connection is answered first", "[daemon][server]") {
  daemon_process d;
  auto setup = raw_client::connect(d.socket_path());
  REQUIRE(setup);
  const auto big = padded_lease(**setup, ::getpid(), 2 * kGiB);
  auto fd = connect_unix(d.socket_path());
  REQUIRE(fd);
  // Pipelined: the commit (2 GiB to hash), then a GetStats and a KeepAlive of an unknown
  // registration, without waiting for any answer.
  send_request(fd->get(), with_id(wc::commit_request(big), 1));
  send_request(fd->get(), with_id(wc::stats_request(), 2));
  reg::keep_alive_request unknown{"reg_unknown", 1000, 1, ::getpid()};
  send_request(fd->get(), with_id(wc::keep_alive_request(unknown), 3));
  std::vector<std::uint64_t> order;
  std::string seen;  // the answers in the order they came, for a failure's message
  std::optional<wire::Response> stats, keep_alive, commit;
  answer_reader answers(fd->get());
  for (int i = 0; i < 3; ++i) {
    auto answer = answers.next();
    REQUIRE(answer);
    order.push_back(answer->request_id());
    seen += std::to_string(answer->request_id()) + ": " + answer->status().message() + "; ";
    if (answer->request_id() == 1) commit = answer;
    if (answer->request_id() == 2) stats = answer;
    if (answer->request_id() == 3) keep_alive = answer;
  }
  INFO("answers: " << seen);
  REQUIRE(order.size() == 3);
  CHECK(order.back() == 1);  // the commit's answer comes last
  REQUIRE((stats && keep_alive && commit));
  CHECK(stats->status().code() == 0);
  CHECK(stats->get_stats().pending_registrations() == 1);  // the commit was still running
  CHECK(keep_alive->status().code() == static_cast<int>(errc::not_found));
  CHECK(keep_alive->status().message() ==
        "cannot keep registration 'reg_unknown' alive: no such registration or lease");
  CHECK(commit->status().code() == 0);
  CHECK(commit->commit_registered_artifact().artifact_descriptor().total_size() == kData + 2 * kGiB);
}

TEST_CASE("server: another client's small commit and GetStats finish while a 2 GiB commit hashes", "[daemon][server]") {
  daemon_process d({"--trust-client-pids"});
  stand_in_owner other;
  auto setup = raw_client::connect(d.socket_path());
  REQUIRE(setup);
  // The big commit belongs to the stand-in process, the small one to us: two owners.
  const auto big = padded_lease(**setup, other.pid(), 2 * kGiB);
  const auto small = padded_lease(**setup, ::getpid(), 4u << 20);

  auto big_fd = connect_unix(d.socket_path());
  auto small_fd = connect_unix(d.socket_path());
  REQUIRE((big_fd && small_fd));
  send_request(big_fd->get(), with_id(wc::commit_request(big), 1));
  // Wait until the big commit is under way: the daemon answers GetStats meanwhile.
  send_request(small_fd->get(), with_id(wc::stats_request(), 1));
  auto stats = next_answer(small_fd->get());
  REQUIRE(stats);
  CHECK(stats->status().code() == 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));

  send_request(small_fd->get(), with_id(wc::commit_request(small), 2));
  auto small_done = next_answer(small_fd->get());
  REQUIRE(small_done);
  CHECK(small_done->request_id() == 2);
  CHECK(small_done->status().code() == 0);
  CHECK(small_done->commit_registered_artifact().artifact_descriptor().total_size() == kData + (4u << 20));
  send_request(small_fd->get(), with_id(wc::stats_request(), 3));
  auto stats_after = next_answer(small_fd->get());
  REQUIRE(stats_after);
  CHECK(stats_after->status().code() == 0);
  // Both answered before the big commit's: it is still hashing, its answer not yet sent.
  CHECK_FALSE(readable(big_fd->get()));
  CHECK(stats_after->get_stats().pending_registrations() == 1);

  auto big_done = next_answer(big_fd->get());
  REQUIRE(big_done);
  CHECK(big_done->request_id() == 1);
  CHECK(big_done->status().code() == 0);
}

TEST_CASE("server: a request id reused while its request is in flight closes the connection", "[daemon][server]") {
  daemon_process d;
  auto setup = raw_client::connect(d.socket_path());
  REQUIRE(setup);
  const auto big = padded_lease(**setup, ::getpid(), kGiB);
  auto fd = connect_unix(d.socket_path());
  REQUIRE(fd);
  send_request(fd->get(), with_id(wc::commit_request(big), 7));
  send_request(fd->get(), with_id(wc::stats_request(), 7));
  answer_reader answers(fd->get());
  auto answer = answers.next();
  REQUIRE(answer);
  CHECK(answer->request_id() == 0);
  CHECK(answer->status().code() == static_cast<int>(errc::invalid_argument));
  CHECK(answer->status().message() == "cannot handle request 7: request_id 7 is in use by a request still in flight");
  // The commit read before the bad frame still completes; the connection then closes.
  auto setup_stats = (*setup)->call(wc::stats_request());
  REQUIRE(setup_stats);
  CHECK(setup_stats->response.status().code() == 0);
}

TEST_CASE("server: past --max-in-flight a connection is read no further until an answer goes out", "[daemon][server]") {
  daemon_process d({"--max-in-flight", "1"});
  auto setup = raw_client::connect(d.socket_path());
  REQUIRE(setup);
  const auto big = padded_lease(**setup, ::getpid(), kGiB);
  auto fd = connect_unix(d.socket_path());
  REQUIRE(fd);
  // With one request in flight allowed, the GetStats behind the commit waits for it: the
  // answers come in the order sent, and neither is an error.
  send_request(fd->get(), with_id(wc::commit_request(big), 1));
  send_request(fd->get(), with_id(wc::stats_request(), 2));
  answer_reader answers(fd->get());
  auto first = answers.next();
  auto second = answers.next();
  REQUIRE((first && second));
  CHECK(first->request_id() == 1);
  CHECK(first->status().code() == 0);
  CHECK(second->request_id() == 2);
  CHECK(second->status().code() == 0);
  CHECK(second->get_stats().pending_registrations() == 0);
}

namespace {

// Whether this process may make a thread SCHED_FIFO: a daemon started by it may then too (the
// same credentials and limits). Tried on a thread of its own, which ends at once.
bool may_run_fifo() {
  bool allowed = false;
  std::thread([&] {
    sched_param param{};
    param.sched_priority = 1;
    allowed = ::sched_setscheduler(0, SCHED_FIFO, &param) == 0;
  }).join();
  return allowed;
}

// The scheduling policy of each thread of `pid`, by thread id (SCHED_RESET_ON_FORK included).
std::map<pid_t, int> policies_of(pid_t pid) {
  std::map<pid_t, int> out;
  for (const auto& task : std::filesystem::directory_iterator(fmt::format("/proc/{}/task", pid))) {
    const auto tid = static_cast<pid_t>(std::stol(task.path().filename().string()));
    out[tid] = ::sched_getscheduler(tid);
  }
  return out;
}

// One GetStats round trip: once it is answered, the I/O thread has set its own scheduling.
void one_stats(const daemon_process& d) {
  auto c = raw_client::connect(d.socket_path());
  REQUIRE(c);
  auto stats = (*c)->call(wc::stats_request());
  REQUIRE(stats);
  CHECK(stats->response.status().code() == 0);
}

}  // namespace

TEST_CASE("server: the I/O thread runs SCHED_FIFO when the daemon may set it, its other threads do not",
          "[daemon][server]") {
  daemon_process d({"--log-level", "debug"});
  one_stats(d);
  const auto policies = policies_of(d.pid());
  REQUIRE(policies.size() > 2);
  // The I/O thread is the daemon's main thread: server::run() is called from main().
  const int io = policies.at(d.pid());
  if (may_run_fifo()) {
    CHECK(io == (SCHED_FIFO | SCHED_RESET_ON_FORK));
    CHECK_THAT(d.output(), Catch::Contains("the I/O thread runs SCHED_FIFO at priority 1"));
  } else {
    CHECK(io == SCHED_OTHER);
    CHECK_THAT(d.output(), Catch::Contains("the I/O thread cannot run SCHED_FIFO at priority 1"));
  }
  for (const auto& [tid, policy] : policies) {
    if (tid == d.pid()) continue;
    INFO("thread " << tid);
    CHECK(policy == SCHED_OTHER);
  }
}

TEST_CASE("server: with --io-rt-priority 0 the I/O thread stays fair-share, at nice -10 when allowed",
          "[daemon][server]") {
  daemon_process d({"--io-rt-priority", "0", "--log-level", "debug"});
  one_stats(d);
  const auto policies = policies_of(d.pid());
  for (const auto& [tid, policy] : policies) {
    INFO("thread " << tid);
    CHECK(policy == SCHED_OTHER);
  }
  CHECK_THAT(d.output(), !Catch::Contains("SCHED_FIFO"));
  errno = 0;
  const int nice = ::getpriority(PRIO_PROCESS, static_cast<id_t>(d.pid()));
  REQUIRE(errno == 0);
  if (may_run_fifo()) {  // CAP_SYS_NICE: a lower nice value is allowed too
    CHECK(nice == -10);
  } else {
    CHECK(nice == ::getpriority(PRIO_PROCESS, 0));
    CHECK_THAT(d.output(), Catch::Contains("the I/O thread keeps its nice value (asked -10)"));
  }
}

TEST_CASE("server: answers finished on the pools together all reach their connections", "[daemon][server]") {
  // Work (Commit) and control (List) requests of four connections, pipelined up to the in-flight
  // limit, finish on the pools at about the same time: each answer must come back to its own
  // connection once, with its own id and status.
  daemon_process d;
  constexpr int kConnections = 4;
  constexpr std::uint64_t kPerConnection = 64;
  std::vector<unique_fd> fds;
  for (int c = 0; c < kConnections; ++c) {
    auto fd = connect_unix(d.socket_path());
    REQUIRE(fd);
    fds.push_back(std::move(*fd));
  }
  for (std::uint64_t id = 1; id <= kPerConnection; ++id) {
    for (auto& fd : fds) {
      send_request(fd.get(),
                   id % 2 == 0 ? with_id(wc::commit_request("reg_nobody_began"), id) : with_id(wc::list_request(), id));
    }
  }
  for (auto& fd : fds) {
    answer_reader answers(fd.get());
    std::vector<int> seen(kPerConnection + 1, 0);
    for (std::uint64_t n = 0; n < kPerConnection; ++n) {
      auto a = answers.next();
      REQUIRE(a);
      const auto id = a->request_id();
      REQUIRE((id >= 1 && id <= kPerConnection));
      ++seen[id];
      if (id % 2 == 0) {
        CHECK(a->status().code() == static_cast<int>(errc::not_found));
        CHECK_THAT(a->status().message(), Catch::Contains("reg_nobody_began"));
      } else {
        CHECK(a->status().code() == 0);
        CHECK(a->has_list_artifacts());
      }
    }
    CHECK(std::count(seen.begin() + 1, seen.end(), 1) == static_cast<long>(kPerConnection));
    CHECK_FALSE(readable(fd.get()));  // nothing more: no answer came twice
  }
}
