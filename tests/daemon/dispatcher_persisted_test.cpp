// The dispatcher's OpenPersistedArtifact (docs/wire-format.md §17): a read-only fd of an
// artifact's persisted bytes, its leaf fingerprints, and every refusal with its code and message.
#include "daemon/dispatcher.hpp"

#include <fcntl.h>
#include <grp.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cerrno>
#include <chrono>
#include <filesystem>
#include <string>
#include <vector>

#include "support/fake_clock.hpp"
#include "support/temp_dir.hpp"
#include "support/two_tensor_artifact.hpp"
#include "tensorreg/hash/fingerprint.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/persistence/durable_store.hpp"
#include "tensorreg/registration/engine.hpp"
#include "tensorreg/wire/v1/frame.pb.h"

namespace {

namespace fs = std::filesystem;
namespace wire = tensorreg::wire::v1;

using tensorreg::errc;
using tensorreg::unique_fd;
using tensorreg::daemon::dispatcher;
using tensorreg::daemon::dispatcher_options;
using tensorreg::daemon::frame_in;
using tensorreg::daemon::peer_credentials;
using tensorreg::daemon::request_lane;
using tensorreg::testing::temp_dir;
using namespace std::chrono_literals;

// The artifact every registration here uses.
namespace two_tensors = tensorreg::testing::two_tensors;
using tensorreg::testing::two_tensors::index_json;
using tensorreg::testing::two_tensors::total;

peer_credentials self() { return {getpid(), getuid(), getgid()}; }

struct answer {
  wire::Response response;
  std::vector<unique_fd> fds;
};

// A dispatcher over an engine whose persist directory is `persist` ("" = none), and one
// connection from `peer`.
struct harness {
  explicit harness(const std::string& persist, peer_credentials peer = self()) {
    tensorreg::registration::engine_options options;
    options.time = &clock;
    options.hash_threads = 2;
    options.sweep_interval = 0ms;
    options.watch_owners = false;
    options.verify_persisted_at_start = false;  // nothing in the background moves files under the cases
    if (!persist.empty()) {
      auto store = tensorreg::persistence::durable_store::open(persist);
      REQUIRE(store);
      options.durable = std::move(*store);
    }
    auto e = tensorreg::registration::engine::create(std::move(options));
    REQUIRE(e);
    engine = std::move(*e);
    dispatcher_options d;
    d.daemon_uid = getuid();
    dispatch = std::make_unique<dispatcher>(*engine, d);
    conn = dispatch->open_connection(peer);
  }

  answer call(wire::Request r, std::vector<unique_fd> fds = {}) {
    r.set_request_id(next_id++);
    auto out = dispatch->handle(*conn, frame_in{r.SerializeAsString(), std::move(fds)});
    REQUIRE(out);
    answer a;
    REQUIRE(a.response.ParseFromString(out->payload));
    a.fds = std::move(out->fds);
    REQUIRE(a.response.has_status());
    return a;
  }

  answer ok(wire::Request r) {
    auto a = call(std::move(r));
    INFO(a.response.status().message());
    REQUIRE(a.response.status().code() == 0);
    return a;
  }

  // A stable_dram put of the 24-byte artifact; returns its id.
  std::string put(char salt) {
    wire::Request begin;
    auto* b = begin.mutable_begin_register_artifact();
    b->set_total_size(total);
    b->set_ttl_ms(60'000);
    b->set_owner_pid(getpid());
    b->mutable_tensor_index_data()->set_data(index_json());
    b->mutable_tensor_index_data()->set_schema_version("v3");
    b->mutable_tensor_index_data()->set_encoding("json");
    b->mutable_stable_dram();
    const auto reg = ok(begin).response.begin_register_artifact().registration_id();
    const auto stream = next_id++;
    wire::Request feed;
    feed.set_request_id(stream);
    feed.mutable_feed_register_artifact_stream()->set_registration_id(reg);
    feed.mutable_feed_register_artifact_stream()->mutable_view_chunk()->set_data(two_tensors::bytes(salt));
    REQUIRE_FALSE(dispatch->handle(*conn, frame_in{feed.SerializeAsString(), {}}));
    wire::Request end;
    end.set_request_id(stream);
    end.set_end_of_stream(true);
    auto ended = dispatch->handle(*conn, frame_in{end.SerializeAsString(), {}});
    REQUIRE(ended);
    wire::Request commit;
    commit.mutable_commit_registered_artifact()->set_registration_id(reg);
    return ok(commit).response.commit_registered_artifact().artifact_descriptor().artifact_id();
  }

  void persist(const std::string& id) {
    auto started = engine->start_persistence(id);
    REQUIRE(started);
    auto waited = engine->wait_persistence(started->task_id, 0ms);
    REQUIRE(waited);
    REQUIRE(waited->state == tensorreg::persistence::task_state::success);
  }

  tensorreg::testing::fake_clock clock;
  std::unique_ptr<tensorreg::registration::engine> engine;
  std::unique_ptr<dispatcher> dispatch;
  dispatcher::connection_ptr conn;
  std::uint64_t next_id = 1;
};

wire::Request open_persisted(const std::string& id, bool unless_in_memory = true) {
  wire::Request r;
  r.mutable_open_persisted_artifact()->set_artifact_id(id);
  r.mutable_open_persisted_artifact()->set_unless_in_memory(unless_in_memory);
  return r;
}

void check_status(const answer& a, errc expected, const std::string& message) {
  CHECK(a.response.status().code() == static_cast<int>(expected));
  CHECK(a.response.status().message() == message);
  CHECK(a.response.body_case() == wire::Response::BODY_NOT_SET);
  CHECK(a.fds.empty());
}

// Puts one artifact, persists it, and drops the engine: the directory then holds it alone.
std::string persisted_artifact(const std::string& persist, char salt) {
  harness first(persist);
  const auto id = first.put(salt);
  first.persist(id);
  return id;
}

// XXH3's canonical form of a fingerprint: high64 then low64, big-endian.
std::string canonical(const tensorreg::hash::fingerprint128& f) {
  std::string out(16, '\0');
  for (int b = 0; b < 8; ++b) {
    out[static_cast<std::size_t>(b)] = static_cast<char>(f.high >> (56 - 8 * b));
    out[8 + static_cast<std::size_t>(b)] = static_cast<char>(f.low >> (56 - 8 * b));
  }
  return out;
}

}  // namespace

TEST_CASE("dispatcher: OpenPersistedArtifact hands over a read-only fd of the persisted bytes and their fingerprints",
          "[daemon][dispatcher][persistence]") {
  temp_dir dir;
  const auto persist = (dir.path() / "persist").string();
  const auto id = persisted_artifact(persist, 3);
  harness h(persist);  // a restart: on disk only
  auto a = h.ok(open_persisted(id));
  const auto& out = a.response.open_persisted_artifact();
  CHECK(out.artifact_descriptor().artifact_id() == id);
  CHECK(out.artifact_descriptor().total_size() == total);
  CHECK(out.size_bytes() == total);
  CHECK(out.leaf_bytes() == tensorreg::hash::leaf_bytes);
  CHECK(out.tensor_index_data() == index_json());
  const auto bytes = two_tensors::bytes(3);
  CHECK(out.leaf_xxh3() == canonical(tensorreg::hash::xxh3_128(std::as_bytes(std::span(bytes.data(), bytes.size())))));
  REQUIRE(a.fds.size() == 1);
  const int fd = a.fds[0].get();
  CHECK((::fcntl(fd, F_GETFL) & O_ACCMODE) == O_RDONLY);
  std::string back(total, '\0');
  CHECK(::pread(fd, back.data(), back.size(), 0) == static_cast<ssize_t>(total));
  CHECK(back == bytes);
  CHECK(::write(fd, "x", 1) == -1);
  CHECK(errno == EBADF);
  // Nothing was loaded into the daemon's memory; the read counts as a hit.
  CHECK(h.engine->stats().stable_bytes == 0);
  wire::Request stats;
  stats.mutable_get_stats();
  CHECK(h.ok(stats).response.get_stats().hits() == 1);
  // Without unless_in_memory, and after a GetArtifactMemfd restored it, the copy is still handed out.
  wire::Request memfd;
  memfd.mutable_get_artifact_memfd()->set_artifact_id(id);
  h.ok(memfd);
  CHECK(h.engine->stats().stable_bytes == total);
  auto both = h.ok(open_persisted(id, false));
  CHECK(both.fds.size() == 1);
  check_status(
      h.call(open_persisted(id)), errc::failed_precondition,
      "cannot open the persisted copy of " + id + ": it has a stable DRAM replica (read it with GetArtifactMemfd)");
}

TEST_CASE("dispatcher: OpenPersistedArtifact refuses what it cannot hand over, with the reason",
          "[daemon][dispatcher][persistence]") {
  temp_dir dir;
  const auto persist = (dir.path() / "persist").string();
  SECTION("an unknown artifact is NOT_FOUND") {
    harness h(persist);
    check_status(h.call(open_persisted("mi2:unknown")), errc::not_found,
                 "cannot open the persisted copy of mi2:unknown: not held here");
    wire::Request stats;
    stats.mutable_get_stats();
    CHECK(h.ok(stats).response.get_stats().misses() == 1);
  }
  SECTION("an artifact held in memory only is FAILED_PRECONDITION") {
    harness h(persist);
    const auto id = h.put(5);
    check_status(h.call(open_persisted(id, false)), errc::failed_precondition,
                 "cannot open the persisted copy of " + id +
                     ": it is not on the shared disk (held in memory only: read it with GetArtifactMemfd or "
                     "OpenArtifactDevice)");
  }
  SECTION("without a persist directory: FAILED_PRECONDITION for a held artifact, NOT_FOUND otherwise") {
    harness h("");
    const auto id = h.put(6);
    check_status(
        h.call(open_persisted(id, false)), errc::failed_precondition,
        "cannot open the persisted copy of " + id + ": the daemon has no persist directory (tensorregd --persist-dir)");
    check_status(h.call(open_persisted("mi2:unknown")), errc::not_found,
                 "cannot open the persisted copy of mi2:unknown: not held here");
  }
  SECTION("a peer of another uid is PERMISSION_DENIED, as for GetArtifactMemfd") {
    const auto id = persisted_artifact(persist, 7);
    const uid_t stranger = getuid() + 1;
    harness h(persist, peer_credentials{getpid(), stranger, getgid()});
    check_status(h.call(open_persisted(id)), errc::permission_denied,
                 "cannot open the persisted copy of " + id + ": uid " + std::to_string(stranger) +
                     " is neither root nor the daemon's uid " + std::to_string(getuid()));
  }
  SECTION("a damaged copy is DATA_LOSS, and stays so once quarantined") {
    const auto id = persisted_artifact(persist, 8);
    harness h(persist);
    const auto data = fs::path(persist) / tensorreg::persistence::durable_store::directory_name(id) / "data.bin";
    fs::resize_file(data, 10);
    const std::string reason = "bad data '" + data.string() + "': 10 bytes, the manifest says 24";
    check_status(h.call(open_persisted(id)), errc::data_loss,
                 "cannot open " + id + " in the persist directory: " + reason);
    check_status(h.call(open_persisted(id)), errc::data_loss,
                 "cannot open " + id + " in the persist directory: it was quarantined: " + reason);
  }
}

TEST_CASE("dispatcher: another uid cannot reopen the persisted fd for writing (or at all)",
          "[daemon][dispatcher][persistence]") {
  temp_dir dir;
  const auto persist = (dir.path() / "persist").string();
  const auto id = persisted_artifact(persist, 9);
  harness h(persist);
  auto a = h.ok(open_persisted(id));
  REQUIRE(a.fds.size() == 1);
  const int fd = a.fds[0].get();
  const auto data = fs::path(persist) / tensorreg::persistence::durable_store::directory_name(id) / "data.bin";
  // The file is the daemon uid's alone, in a directory only that uid may enter.
  CHECK(fs::status(data).permissions() == (fs::perms::owner_read | fs::perms::owner_write));
  CHECK(fs::status(data.parent_path()).permissions() == fs::perms::owner_all);
  if (::geteuid() != 0) {
    WARN("not root: reopening as another uid is not tried; the mode bits above are what refuses it");
    return;
  }
  // A child that becomes nobody keeps the fd: it can read through it, but /proc/self/fd/N
  // (which skips the directory's permission) still checks the file's mode.
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    constexpr uid_t nobody = 65534;
    if (::setgroups(0, nullptr) != 0 || ::setresgid(nobody, nobody, nobody) != 0 ||
        ::setresuid(nobody, nobody, nobody) != 0) {
      ::_exit(10);
    }
    (void)::prctl(PR_SET_DUMPABLE, 1);  // /proc/self stays ours after the uid change
    char first = 0;
    if (::pread(fd, &first, 1, 0) != 1) ::_exit(11);
    const std::string path = "/proc/self/fd/" + std::to_string(fd);
    if (::open(path.c_str(), O_RDWR) != -1 || errno != EACCES) ::_exit(12);
    if (::open(path.c_str(), O_WRONLY) != -1 || errno != EACCES) ::_exit(13);
    if (::write(fd, "x", 1) != -1 || errno != EBADF) ::_exit(14);
    ::_exit(0);
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);  // 10 setuid, 11 read, 12/13 a reopen was allowed, 14 a write
}

TEST_CASE("dispatcher: OpenPersistedArtifact runs on the worker pool, never the I/O thread",
          "[daemon][dispatcher][persistence]") {
  auto r = open_persisted("mi2:x");
  r.set_request_id(7);
  const auto [lane, id] = dispatcher::lane_of(frame_in{r.SerializeAsString(), {}});
  CHECK(lane == request_lane::work);
  CHECK(id == 7);
}
