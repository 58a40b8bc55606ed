// A real tensorregd started with TENSORREG_FAULTS (daemon/main.cpp): its system calls fail as
// armed, its clients get the clear error, and it serves on; text that does not parse refuses the
// start.
#include "tensorreg/client/connection.hpp"

#include <catch2/catch.hpp>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

#include "support/daemon_process.hpp"
#include "support/safetensors_writer.hpp"
#include "support/temp_dir.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/identity/content_id.hpp"
#include "tensorreg/index/safetensors_bundle.hpp"

namespace {

namespace t = tensorreg::testing;
using tensorreg::errc;
using tensorreg::client::connection;
using tensorreg::testing::daemon_process;

// TENSORREG_FAULTS for the daemons started while it lives (they inherit the environment).
class scoped_faults_env {
 public:
  explicit scoped_faults_env(const std::string& spec) { ::setenv("TENSORREG_FAULTS", spec.c_str(), 1); }
  ~scoped_faults_env() { ::unsetenv("TENSORREG_FAULTS"); }
  scoped_faults_env(const scoped_faults_env&) = delete;
  scoped_faults_env& operator=(const scoped_faults_env&) = delete;
};

}  // namespace

TEST_CASE("tensorregd faults: the first put fails as the armed memfd_create does, the second works",
          "[faults][daemon_faults][daemon]") {
  std::optional<daemon_process> d;
  {
    scoped_faults_env env("memfd_create:EMFILE:0:1");
    d.emplace(std::vector<std::string>{}, daemon_process::stderr_to::own_file);
  }
  CHECK_THAT(d->error_output(),
             Catch::Matchers::Contains("fault injection armed from TENSORREG_FAULTS: memfd_create:EMFILE:0:1"));
  t::temp_dir dir;
  const auto path = (dir.path() / "model.safetensors").string();
  t::write_safetensors(path,
                       {{"w", "F32", {64}, t::pattern_bytes(256, 3)}, {"b", "F32", {3}, t::pattern_bytes(12, 4)}});
  auto bundle = tensorreg::index::safetensors_bundle::open({path}).value();
  auto c = connection::connect(d->socket_path());
  REQUIRE(c);

  auto first = c->put(*bundle);
  REQUIRE_FALSE(first);
  CHECK(first.error().code == errc::resource_exhausted);
  CHECK_THAT(first.error().message, Catch::Matchers::Contains("cannot create shared memory 'tensorreg-publish': " +
                                                              std::string(std::strerror(EMFILE))));
  auto stats = c->stats();
  REQUIRE(stats);
  CHECK(stats->pending_registrations == 0);
  CHECK(stats->artifacts == 0);

  auto second = c->put(*bundle);
  REQUIRE(second);
  tensorreg::thread_pool pool(1);
  CHECK(second->descriptor.artifact_id ==
        tensorreg::identity::content_id(bundle->index().json(), bundle->canonical(), &pool).value().to_string());
  CHECK(d->stop() == 0);
}

TEST_CASE("tensorregd faults: a TENSORREG_FAULTS that does not parse refuses the start with exit 2",
          "[faults][daemon_faults][daemon]") {
  t::temp_dir dir;
  std::optional<daemon_process> d;
  {
    scoped_faults_env env("bogus:EIO");
    d.emplace((dir.path() / "tensorregd.sock").string(), std::vector<std::string>{}, false);
  }
  const auto code = d->wait_exit();
  REQUIRE(code);
  CHECK(*code == 2);
  CHECK_THAT(d->output(), Catch::Matchers::Contains("tensorregd: cannot start: TENSORREG_FAULTS: cannot arm fault "
                                                    "'bogus:EIO': unknown site 'bogus'"));
}

TEST_CASE("tensorregd faults: a put from files whose copy into the daemon's memory fails keeps nothing",
          "[faults][daemon_faults][daemon]") {
  std::optional<daemon_process> d;
  {
    scoped_faults_env env("write:ENOSPC:0:1");
    d.emplace(std::vector<std::string>{}, daemon_process::stderr_to::own_file);
  }
  t::temp_dir dir;
  const auto path = (dir.path() / "model.safetensors").string();
  t::write_safetensors(
      path, {{"w", "F32", {(5 << 20) / 4}, t::pattern_bytes(5 << 20, 5)}, {"b", "F32", {3}, t::pattern_bytes(12, 6)}});
  auto bundle = tensorreg::index::safetensors_bundle::open({path}).value();
  auto c = connection::connect(d->socket_path());
  REQUIRE(c);

  auto first = c->put(*bundle);  // the daemon reads the file it is handed (wire-format.md §18)
  REQUIRE_FALSE(first);
  CHECK(first.error().code == errc::resource_exhausted);
  CHECK_THAT(first.error().message, Catch::Matchers::Contains("cannot copy the put's bytes into the daemon's memory") &&
                                        Catch::Matchers::Contains(std::strerror(ENOSPC)));
  auto stats = c->stats();
  REQUIRE(stats);
  CHECK(stats->pending_registrations == 0);
  CHECK(stats->artifacts == 0);
  CHECK(stats->stable_reserved_bytes == 0);

  auto second = c->put(*bundle);
  REQUIRE(second);
  CHECK_FALSE(second->existed);
  tensorreg::thread_pool pool(1);
  CHECK(second->descriptor.artifact_id ==
        tensorreg::identity::content_id(bundle->index().json(), bundle->canonical(), &pool).value().to_string());
  CHECK(d->stop() == 0);
}
