// tensorregd's socket path rules end to end (DECISIONS §4): refusals exit 1 with the reason,
// and a stopping daemon removes only its own socket.
#include "support/daemon_process.hpp"

#include <catch2/catch.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "daemon/unix_socket.hpp"
#include "support/temp_dir.hpp"

namespace {

using tensorreg::testing::daemon_process;
namespace fs = std::filesystem;

std::string first_line(const fs::path& p) {
  std::ifstream in(p);
  std::string text;
  std::getline(in, text);
  return text;
}

}  // namespace

TEST_CASE("tensorregd: --socket at a regular file exits 1 and leaves the file", "[daemon][e2e]") {
  tensorreg::testing::temp_dir dir;
  const auto path = dir.path() / "notes.txt";
  std::ofstream(path) << "keep me";
  daemon_process d(path.string(), {}, false);
  const auto code = d.wait_exit();
  REQUIRE(code);
  CHECK(*code == 1);
  CHECK_THAT(d.output(), Catch::Contains("cannot listen on '" + path.string() +
                                         "': it exists and is not a socket; refusing to remove it"));
  CHECK(first_line(path) == "keep me");
}

TEST_CASE("tensorregd: a socket directory others can enter exits 1", "[daemon][e2e]") {
  tensorreg::testing::temp_dir dir;
  const auto run = dir.path() / "run";
  fs::create_directory(run);
  REQUIRE(::chmod(run.c_str(), 0770) == 0);
  daemon_process d((run / "d.sock").string(), {}, false);
  const auto code = d.wait_exit();
  REQUIRE(code);
  CHECK(*code == 1);
  CHECK_THAT(d.output(), Catch::Contains("cannot use socket directory '" + run.string() + "': its mode is 0770"));
  CHECK_FALSE(fs::exists(run / "d.sock"));
}

TEST_CASE("tensorregd: stopping leaves a newer daemon's socket on the same path", "[daemon][e2e]") {
  daemon_process old_daemon;
  const auto path = old_daemon.socket_path();
  // The path is taken over while the old daemon still runs (an operator removed its socket).
  REQUIRE(::unlink(path.c_str()) == 0);
  daemon_process new_daemon(path, {}, true);
  CHECK(old_daemon.stop() == 0);
  CHECK(fs::exists(path));
  CHECK(tensorreg::daemon::connect_unix(path));
}
