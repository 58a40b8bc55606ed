// tensorregd's options, end to end: the real daemon started with them (--log-level,
// --persist-dir), driven by raw frames. First include is the daemon double these cases run.
#include "support/daemon_process.hpp"
#include "support/raw_wire.hpp"

#include <catch2/catch.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <string>
#include <vector>

#include "daemon/framing.hpp"
#include "daemon/unix_socket.hpp"
#include "support/temp_dir.hpp"
#include "tensorreg/wire/v1/frame.pb.h"

namespace {

namespace wire = tensorreg::wire::v1;
using tensorreg::unique_fd;
using tensorreg::testing::daemon_process;

// Sends `request` on `fd` and returns the answer.
wire::Response exchange(int fd, const wire::Request& request) {
  auto answer = tensorreg::testing::send_and_answer(fd, tensorreg::testing::framed(request));
  REQUIRE(answer);
  return *answer;
}

// GetServerConfig (1), a Commit of a registration nobody began (2), ListArtifacts (3).
void three_rpcs(const daemon_process& d) {
  auto fd = tensorreg::daemon::connect_unix(d.socket_path()).value();
  wire::Request config;
  config.set_request_id(1);
  config.mutable_get_server_config();
  CHECK(exchange(fd.get(), config).status().code() == 0);
  wire::Request commit;
  commit.set_request_id(2);
  commit.mutable_commit_registered_artifact()->set_registration_id("reg_e2e");
  CHECK(exchange(fd.get(), commit).status().code() == static_cast<int>(tensorreg::errc::not_found));
  wire::Request list;
  list.set_request_id(3);
  list.mutable_list_artifacts();
  CHECK(exchange(fd.get(), list).status().code() == 0);
}

std::size_t lines_with(const std::string& text, const std::string& part) {
  std::size_t n = 0;
  for (std::size_t at = text.find(part); at != std::string::npos; at = text.find(part, at + part.size())) ++n;
  return n;
}

}  // namespace

TEST_CASE("tensorregd: --log-level debug writes a line per RPC to stderr", "[daemon][e2e]") {
  daemon_process d({"--log-level", "debug"}, daemon_process::stderr_to::own_file);
  three_rpcs(d);
  CHECK(d.stop() == 0);

  const auto err = d.error_output();
  const auto peer = "from pid " + std::to_string(::getpid()) + " uid " + std::to_string(::getuid());
  CHECK_THAT(err, Catch::Contains("rpc GetServerConfig request 1 " + peer + ": OK in "));
  CHECK_THAT(err, Catch::Contains("rpc CommitRegisteredArtifact request 2 " + peer +
                                  ", registration 'reg_e2e': NOT_FOUND in "));
  CHECK_THAT(err, Catch::Contains("rejected CommitRegisteredArtifact request 2 " + peer +
                                  ", registration 'reg_e2e': NOT_FOUND: cannot commit"));
  CHECK_THAT(err, Catch::Contains("rpc ListArtifacts request 3 " + peer + ": OK in "));
  CHECK(lines_with(err, "rpc ") == 3);
  CHECK_THAT(err, Catch::Contains("connection accepted " + peer));
  CHECK_THAT(err, Catch::Contains("connection " + peer + " closed"));
  CHECK_THAT(err, Catch::Contains("stopped after 1 sessions"));
  // stdout keeps only the ready line scripts wait for.
  CHECK_THAT(d.output(), Catch::StartsWith("tensorregd: ready on " + d.socket_path()));
  CHECK(lines_with(d.output(), "\n") == 1);
}

TEST_CASE("tensorregd: at the default log level only rejects are logged, not each RPC", "[daemon][e2e]") {
  daemon_process d({}, daemon_process::stderr_to::own_file);
  three_rpcs(d);
  CHECK(d.stop() == 0);
  const auto err = d.error_output();
  CHECK(lines_with(err, "rpc ") == 0);
  CHECK(lines_with(err, "rejected CommitRegisteredArtifact request 2") == 1);
  CHECK_THAT(err, !Catch::Contains("connection accepted"));
}

TEST_CASE("tensorregd: a bad --log-level exits 2 with the parse error", "[daemon][e2e]") {
  tensorreg::testing::temp_dir dir;
  daemon_process d((dir.path() / "d.sock").string(), {"--log-level", "bogus"}, false);
  const auto code = d.wait_exit();
  REQUIRE(code);
  CHECK(*code == 2);
  CHECK_THAT(d.output(), Catch::Contains("tensorregd: cannot parse log level 'bogus': expected trace, debug, info, "
                                         "warn, error or off"));
  CHECK_FALSE(std::filesystem::exists(dir.path() / "d.sock"));
}

TEST_CASE("tensorregd: --persist-dir that is a symbolic link is refused with exit 1", "[daemon][e2e]") {
  tensorreg::testing::temp_dir dir;
  std::filesystem::create_directory(dir.path() / "real");
  std::filesystem::create_directory_symlink(dir.path() / "real", dir.path() / "store");
  const auto persist = (dir.path() / "store").string();
  daemon_process d((dir.path() / "d.sock").string(), {"--persist-dir", persist}, false);
  const auto code = d.wait_exit();
  REQUIRE(code);
  CHECK(*code == 1);
  CHECK_THAT(d.output(), Catch::Contains("cannot use persist directory '" + persist + "': it is a symbolic link"));
  CHECK_FALSE(std::filesystem::exists(dir.path() / "d.sock"));
}

TEST_CASE("tensorregd: an --io-rt-priority past 99 exits 2 naming the value", "[daemon][e2e]") {
  tensorreg::testing::temp_dir dir;
  daemon_process d((dir.path() / "d.sock").string(), {"--io-rt-priority", "100"}, false);
  const auto code = d.wait_exit();
  REQUIRE(code);
  CHECK(*code == 2);
  CHECK_THAT(d.output(), Catch::Contains("tensorregd: --io-rt-priority needs a number from 0 to 99, got '100'"));
  CHECK_FALSE(std::filesystem::exists(dir.path() / "d.sock"));
}

TEST_CASE("tensorregd: --stable-bytes as a share of memory, and a bad share exits 2", "[daemon][e2e]") {
  {
    daemon_process d({"--stable-bytes", "1%"});
    auto fd = tensorreg::daemon::connect_unix(d.socket_path()).value();
    wire::Request config;
    config.set_request_id(1);
    config.mutable_get_server_config();
    const auto answer = exchange(fd.get(), config);
    CHECK(answer.status().code() == 0);
    // 1% of any machine this runs on is more than a page and less than 100 GiB.
    CHECK(answer.get_server_config().mem_pool_size() > 4096);
    CHECK(answer.get_server_config().mem_pool_size() < (std::int64_t{100} << 30));
  }
  tensorreg::testing::temp_dir dir;
  daemon_process d((dir.path() / "d.sock").string(), {"--stable-bytes", "150%"}, false);
  const auto code = d.wait_exit();
  REQUIRE(code);
  CHECK(*code == 2);
  CHECK_THAT(
      d.output(),
      Catch::Contains("tensorregd: cannot use --stable-bytes '150%': a percentage of memory must be 1% to 100%"));
}

TEST_CASE("tensorregd: --socket-group opens the socket's directory to that group only", "[daemon][e2e]") {
  tensorreg::testing::temp_dir dir;
  const auto sock = dir.path() / "shared" / "d.sock";
  daemon_process d(sock.string(), {"--socket-group", std::to_string(::getegid())}, true);
  struct stat st {};
  REQUIRE(::stat(sock.parent_path().c_str(), &st) == 0);
  CHECK((st.st_mode & 07777) == 0750);
  CHECK(st.st_gid == ::getegid());
  CHECK(tensorreg::daemon::connect_unix(sock.string()));
  CHECK(d.stop() == 0);

  daemon_process unknown((dir.path() / "x.sock").string(), {"--socket-group", "no-such-group-tensorreg"}, false);
  const auto code = unknown.wait_exit();
  REQUIRE(code);
  CHECK(*code == 2);
  CHECK_THAT(unknown.output(), Catch::Contains("tensorregd: cannot find group 'no-such-group-tensorreg'"));
}
