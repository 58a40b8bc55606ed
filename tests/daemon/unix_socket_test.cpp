// The listening socket's safety rules (DECISIONS §4): a private directory, never removing what
// is not ours, a socket that is 0660 from the first instant.
#include "daemon/unix_socket.hpp"

#include <catch2/catch.hpp>

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "support/temp_dir.hpp"

namespace {

using tensorreg::errc;
using tensorreg::daemon::listen_unix;
using tensorreg::daemon::unlink_if_ours;
namespace fs = std::filesystem;

mode_t mode_of(const fs::path& p) {
  struct stat st {};
  REQUIRE(::lstat(p.c_str(), &st) == 0);
  return st.st_mode;
}

std::string must_be() {
  return "; it must be a directory owned by uid " + std::to_string(::geteuid()) + " with mode 0700";
}

}  // namespace

TEST_CASE("listen_unix: a missing directory is made 0700 and the socket is 0660", "[daemon][unix_socket]") {
  tensorreg::testing::temp_dir dir;
  const auto path = dir.path() / "a" / "run" / "d.sock";
  const mode_t old_mask = ::umask(0);  // a permissive umask must not widen either
  auto bound = listen_unix(path.string(), 4);
  ::umask(old_mask);
  REQUIRE(bound);
  CHECK((mode_of(path.parent_path()) & 07777) == 0700);
  CHECK(S_ISSOCK(mode_of(path)));
  CHECK((mode_of(path) & 0777) == 0660);
  CHECK(tensorreg::daemon::connect_unix(path.string()));
}

TEST_CASE("listen_unix: an unsafe existing directory is refused", "[daemon][unix_socket]") {
  tensorreg::testing::temp_dir dir;
  SECTION("group or others have access") {
    const auto run = dir.path() / "run";
    fs::create_directory(run);
    REQUIRE(::chmod(run.c_str(), 0755) == 0);
    auto bound = listen_unix((run / "d.sock").string(), 4);
    REQUIRE_FALSE(bound);
    CHECK(bound.error().code == errc::failed_precondition);
    CHECK(bound.error().message == "cannot use socket directory '" + run.string() + "': its mode is 0755" + must_be());
    CHECK_FALSE(fs::exists(run / "d.sock"));
  }
  SECTION("a symbolic link to a directory") {
    const auto real = dir.path() / "real";
    fs::create_directory(real);
    REQUIRE(::chmod(real.c_str(), 0700) == 0);
    const auto link = dir.path() / "link";
    fs::create_directory_symlink(real, link);
    auto bound = listen_unix((link / "d.sock").string(), 4);
    REQUIRE_FALSE(bound);
    CHECK(bound.error().code == errc::failed_precondition);
    CHECK(bound.error().message ==
          "cannot use socket directory '" + link.string() + "': it is a symbolic link" + must_be());
  }
  SECTION("a file where the directory should be") {
    std::ofstream(dir.path() / "file") << "x";
    auto bound = listen_unix((dir.path() / "file" / "d.sock").string(), 4);
    REQUIRE_FALSE(bound);
    CHECK(bound.error().code == errc::failed_precondition);
    CHECK(bound.error().message ==
          "cannot use socket directory '" + (dir.path() / "file").string() + "': it is not a directory" + must_be());
  }
  if (::geteuid() != 0) {
    SECTION("owned by someone else") {
      auto bound = listen_unix("/d.sock", 4);  // "/" belongs to root
      REQUIRE_FALSE(bound);
      CHECK(bound.error().code == errc::failed_precondition);
      CHECK(bound.error().message == "cannot use socket directory '/': it is owned by uid 0" + must_be());
    }
  }
}

TEST_CASE("listen_unix: a regular file at the path is refused and kept", "[daemon][unix_socket]") {
  tensorreg::testing::temp_dir dir;
  const auto path = dir.path() / "precious";
  std::ofstream(path) << "keep me";
  auto bound = listen_unix(path.string(), 4);
  REQUIRE_FALSE(bound);
  CHECK(bound.error().code == errc::failed_precondition);
  CHECK(bound.error().message == "cannot listen on '" + path.string() +
                                     "': it exists and is not a socket; refusing "
                                     "to remove it");
  std::ifstream in(path);
  std::string text;
  std::getline(in, text);
  CHECK(text == "keep me");
}

TEST_CASE("listen_unix: a live socket is refused, a stale one replaced", "[daemon][unix_socket]") {
  tensorreg::testing::temp_dir dir;
  const auto path = (dir.path() / "d.sock").string();
  auto first = listen_unix(path, 4);
  REQUIRE(first);
  auto second = listen_unix(path, 4);
  REQUIRE_FALSE(second);
  CHECK(second.error().code == errc::failed_precondition);
  CHECK(second.error().message == "cannot listen on '" + path + "': another tensorregd is already serving it");
  first->fd.reset();  // crashed: the file stays, nobody listens
  auto third = listen_unix(path, 4);
  REQUIRE(third);
  CHECK(tensorreg::daemon::connect_unix(path));
}

TEST_CASE("unlink_if_ours: removes our socket but not a newer daemon's on the same path", "[daemon][unix_socket]") {
  tensorreg::testing::temp_dir dir;
  const auto path = (dir.path() / "d.sock").string();
  auto old_daemon = listen_unix(path, 4);
  REQUIRE(old_daemon);
  // The old daemon hangs; a newer one finds the path dead? Simulate its takeover directly.
  REQUIRE(::unlink(path.c_str()) == 0);
  auto new_daemon = listen_unix(path, 4);
  REQUIRE(new_daemon);
  unlink_if_ours(path, *old_daemon);  // the old one stops
  CHECK(fs::exists(path));
  CHECK(tensorreg::daemon::connect_unix(path));
  unlink_if_ours(path, *new_daemon);
  CHECK_FALSE(fs::exists(path));
}

TEST_CASE("default_socket_path: XDG_RUNTIME_DIR is preferred over /tmp", "[daemon][unix_socket]") {
  const char* saved = std::getenv("XDG_RUNTIME_DIR");
  const std::string kept = saved != nullptr ? saved : "";
  ::setenv("XDG_RUNTIME_DIR", "/run/user/4242", 1);
  CHECK(tensorreg::daemon::default_socket_path() == "/run/user/4242/tensorreg/tensorregd.sock");
  ::unsetenv("XDG_RUNTIME_DIR");
  CHECK(tensorreg::daemon::default_socket_path() ==
        "/tmp/tensorreg-" + std::to_string(::getuid()) + "/tensorregd.sock");
  if (saved != nullptr) ::setenv("XDG_RUNTIME_DIR", kept.c_str(), 1);
}

TEST_CASE("listen_unix: with a socket group the directory is 0750 with it and the socket is its",
          "[daemon][unix_socket]") {
  tensorreg::testing::temp_dir dir;
  // Our own group is one we may always give files to; root may give any (gid 1 where it exists).
  const gid_t group = ::geteuid() == 0 ? 1 : ::getegid();
  const tensorreg::daemon::socket_access access{group};
  auto gid_of = [](const fs::path& p) {
    struct stat st {};
    REQUIRE(::lstat(p.c_str(), &st) == 0);
    return st.st_gid;
  };
  SECTION("a missing directory is made 0750 with the group") {
    const auto path = dir.path() / "run" / "d.sock";
    auto bound = listen_unix(path.string(), 4, access);
    REQUIRE(bound);
    CHECK((mode_of(path.parent_path()) & 07777) == 0750);
    CHECK(gid_of(path.parent_path()) == group);
    CHECK((mode_of(path) & 0777) == 0660);
    CHECK(gid_of(path) == group);
    CHECK(tensorreg::daemon::connect_unix(path.string()));
  }
  SECTION("an existing 0750 directory of the group is used as it is") {
    const auto run = dir.path() / "run";
    fs::create_directory(run);
    REQUIRE(::chown(run.c_str(), static_cast<uid_t>(-1), group) == 0);
    REQUIRE(::chmod(run.c_str(), 0750) == 0);
    auto bound = listen_unix((run / "d.sock").string(), 4, access);
    REQUIRE(bound);
    CHECK((mode_of(run) & 07777) == 0750);
  }
  if (::geteuid() == 0) {  // only root may give a directory to a group it is not in
    SECTION("a 0750 directory of another group is refused") {
      const auto run = dir.path() / "run";
      fs::create_directory(run);
      const gid_t other = group + 1;
      REQUIRE(::chown(run.c_str(), static_cast<uid_t>(-1), other) == 0);
      REQUIRE(::chmod(run.c_str(), 0750) == 0);
      auto bound = listen_unix((run / "d.sock").string(), 4, access);
      REQUIRE_FALSE(bound);
      CHECK(bound.error().code == errc::failed_precondition);
      CHECK(bound.error().message == "cannot use socket directory '" + run.string() + "': its group is " +
                                         std::to_string(other) + "; it must be a directory owned by uid " +
                                         std::to_string(::geteuid()) + " with mode 0700, or 0750 with group " +
                                         std::to_string(group));
    }
  }
  SECTION("a directory the group may write into, or others may enter, is refused") {
    for (const mode_t mode : {mode_t{0770}, mode_t{0755}}) {
      const auto run = dir.path() / ("run" + std::to_string(mode));
      fs::create_directory(run);
      REQUIRE(::chown(run.c_str(), static_cast<uid_t>(-1), group) == 0);
      REQUIRE(::chmod(run.c_str(), mode) == 0);
      auto bound = listen_unix((run / "d.sock").string(), 4, access);
      REQUIRE_FALSE(bound);
      CHECK(bound.error().code == errc::failed_precondition);
      CHECK(bound.error().message == "cannot use socket directory '" + run.string() + "': its mode is " +
                                         (mode == 0770 ? "0770" : "0755") + "; it must be a directory owned by uid " +
                                         std::to_string(::geteuid()) + " with mode 0700, or 0750 with group " +
                                         std::to_string(group));
      CHECK_FALSE(fs::exists(run / "d.sock"));
    }
  }
}

TEST_CASE("find_group: a name or a number, NOT_FOUND naming what is unknown", "[daemon][unix_socket]") {
  auto root = tensorreg::daemon::find_group("root");
  REQUIRE(root);
  CHECK(*root == 0);
  auto number = tensorreg::daemon::find_group("4242");
  REQUIRE(number);
  CHECK(*number == 4242);
  auto none = tensorreg::daemon::find_group("no-such-group-tensorreg");
  REQUIRE_FALSE(none);
  CHECK(none.error().code == errc::not_found);
  CHECK(none.error().message == "cannot find group 'no-such-group-tensorreg'");
}
