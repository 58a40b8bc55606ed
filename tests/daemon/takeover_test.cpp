// tensorregd --takeover and the systemd fd store, with real daemons (docs/architecture.md §14.2,
// §14.4): what a successor or a restarted daemon serves is what its predecessor held, in the
// same memory.
#include "takeover.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "client/raw_connection.hpp"
#include "fd_store.hpp"
#include "support/daemon_process.hpp"
#include "support/safetensors_writer.hpp"
#include "support/temp_dir.hpp"
#include "tensorreg/client/connection.hpp"
#include "tensorreg/index/safetensors_bundle.hpp"
#include "tensorreg/persistence/resident_state.hpp"

namespace {

namespace fs = std::filesystem;
namespace wire = tensorreg::wire::v1;
using tensorreg::errc;
using tensorreg::unique_fd;
using tensorreg::testing::daemon_process;
using tensorreg::testing::temp_dir;

std::unique_ptr<tensorreg::index::safetensors_bundle> model(const fs::path& dir, std::uint32_t seed,
                                                            std::size_t bytes) {
  const auto path = dir / ("model-" + std::to_string(seed) + ".safetensors");
  tensorreg::testing::write_safetensors(
      path, {{"w", "F32", {static_cast<std::int64_t>(bytes / 4)}, tensorreg::testing::pattern_bytes(bytes, seed)}});
  auto b = tensorreg::index::safetensors_bundle::open({path.string()});
  REQUIRE(b);
  return std::move(*b);
}

// One tensor at offset 0: the canonical bytes are the tensor's.
std::string expected_bytes(std::uint32_t seed, std::size_t bytes) {
  return tensorreg::testing::pattern_bytes(bytes, seed);
}

std::string bytes_of(const tensorreg::client::stable_replica& r) {
  auto b = r.memory.bytes();
  return {reinterpret_cast<const char*>(b.data()), static_cast<std::size_t>(r.descriptor.total_size)};
}

// GetArtifactMemfd's fd: the inode says which memory the daemon serves.
ino_t memfd_inode(const std::string& socket, const std::string& id) {
  auto raw = tensorreg::client::raw::connection::connect(socket);
  REQUIRE(raw);
  wire::Request r;
  r.mutable_get_artifact_memfd()->set_artifact_id(id);
  auto got = (*raw)->call(r);
  REQUIRE(got);
  REQUIRE(got->fds.size() == 1);
  struct stat st {};
  REQUIRE(::fstat(got->fds[0].get(), &st) == 0);
  return st.st_ino;
}

// A field of /proc/PID/status in kB.
std::uint64_t status_kb(pid_t pid, const std::string& field) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::stoull(line.substr(field.size() + 1));
  }
  return 0;
}

// A sanitizer's shadow memory (and ASan's quarantine of freed blocks) is anonymous memory of
// its own, tens of MiB in a daemon that has served traffic, so a sanitized daemon's RssAnon is
// compared with a looser bound: still well under a copy of what it holds.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool sanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
constexpr bool sanitized = true;
#else
constexpr bool sanitized = false;
#endif
#else
constexpr bool sanitized = false;
#endif

}  // namespace

TEST_CASE("takeover: only the daemon's uid or root may take over", "[daemon][takeover]") {
  using tensorreg::daemon::check_takeover_peer;
  using tensorreg::daemon::peer_credentials;
  CHECK(check_takeover_peer(peer_credentials{10, 1000, 1000}, 1000));
  CHECK(check_takeover_peer(peer_credentials{10, 0, 0}, 1000));
  auto refused = check_takeover_peer(peer_credentials{42, 1001, 1001}, 1000);
  REQUIRE_FALSE(refused);
  CHECK(refused.error().code == errc::permission_denied);
  CHECK(refused.error().message ==
        "cannot take over tensorregd: pid 42 runs as uid 1001; only uid 1000 (the daemon's) or root may take it over");
  CHECK(tensorreg::daemon::takeover_path("/run/t/tensorregd.sock") == "/run/t/tensorregd.sock.takeover");
}

TEST_CASE("tensorregd --takeover: 200 artifacts change daemons while 8 clients read and put, no byte copied",
          "[daemon][takeover][e2e][concurrency]") {
  constexpr std::uint32_t kHeld = 200;
  constexpr std::size_t kHeldBytes = std::size_t{1} << 20;  // 200 MiB held in all
  constexpr std::size_t kPutBytes = 64 << 10;
  temp_dir dir;
  auto old_daemon = std::make_unique<daemon_process>();
  const auto socket = old_daemon->socket_path();
  std::mutex mutex;
  std::map<std::string, std::pair<std::uint32_t, std::size_t>> committed;  // id -> (seed, bytes)
  {
    auto c = tensorreg::client::connection::connect(socket);
    REQUIRE(c);
    for (std::uint32_t i = 0; i < kHeld; ++i) {
      const auto size = kHeldBytes + 4 * i;
      auto put = c->put(*model(dir.path(), i, size));
      REQUIRE(put);
      committed[put->descriptor.artifact_id] = {i, size};
    }
  }
  const auto first_id = committed.begin()->first;
  const auto inode_before = memfd_inode(socket, first_id);

  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> reads{0}, puts{0}, wrong_bytes{0}, lost{0}, failed_reads{0}, failed_puts{0};
  std::vector<std::string> failures;  // collected by the workers, checked here
  std::vector<std::thread> clients;
  for (int k = 0; k < 4; ++k) {
    clients.emplace_back([&, k] {
      std::mt19937 rng(static_cast<unsigned>(k));
      auto c = tensorreg::client::connection::connect(socket);
      if (!c) return;
      while (!stop) {
        std::pair<std::string, std::pair<std::uint32_t, std::size_t>> pick;
        {
          std::lock_guard lock(mutex);
          auto it = committed.begin();
          std::advance(it, static_cast<long>(rng() % committed.size()));
          pick = *it;
        }
        auto got = c->get(pick.first);
        if (!got) {
          ++(got.error().code == errc::not_found ? lost : failed_reads);
          std::lock_guard lock(mutex);
          failures.push_back("get " + pick.first + ": " + got.error().message);
          continue;
        }
        if (bytes_of(*got) != expected_bytes(pick.second.first, pick.second.second)) ++wrong_bytes;
        ++reads;
      }
    });
  }
  std::vector<std::unique_ptr<tensorreg::index::safetensors_bundle>> to_put;
  for (std::uint32_t i = 0; i < 400; ++i) to_put.push_back(model(dir.path(), 10'000 + i, kPutBytes + 4 * i));
  std::atomic<std::uint32_t> next_put{0};
  for (int k = 0; k < 4; ++k) {
    clients.emplace_back([&] {
      auto c = tensorreg::client::connection::connect(socket);
      if (!c) return;
      for (auto i = next_put++; !stop && i < to_put.size(); i = next_put++) {
        for (int attempt = 0; attempt < 3; ++attempt) {
          auto put = c->put(*to_put[i]);
          if (!put) {
            ++failed_puts;  // cut off by the handoff: not idempotent, so not retried for us
            continue;
          }
          std::lock_guard lock(mutex);
          committed[put->descriptor.artifact_id] = {10'000 + i, kPutBytes + 4 * i};
          ++puts;
          break;
        }
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const auto started = std::chrono::steady_clock::now();
  // The clients stop and are joined before anything can throw out of this scope: a client
  // still putting would read a bundle that unwinding destroys.
  std::unique_ptr<daemon_process> new_daemon;
  std::string start_failure;
  try {
    new_daemon = std::make_unique<daemon_process>(socket, std::vector<std::string>{"--takeover"}, true);
  } catch (const std::exception& e) {
    start_failure = e.what();
  }
  const auto took = std::chrono::steady_clock::now() - started;
  const auto old_exit = old_daemon->wait_exit();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  stop = true;
  for (auto& t : clients) t.join();
  INFO("successor start: " << start_failure);
  INFO("old daemon, exit " << (old_exit ? std::to_string(*old_exit) : std::string("none")) << ": "
                           << (start_failure.empty() ? std::string() : old_daemon->output()));
  REQUIRE(new_daemon);

  INFO("failures: " << failures.size() << (failures.empty() ? std::string() : ", first: " + failures.front()));
  INFO("puts cut off by the takeover and sent again: " << failed_puts.load());
  INFO("takeover took " << std::chrono::duration_cast<std::chrono::milliseconds>(took).count() << " ms");
  REQUIRE(old_exit);
  CHECK(*old_exit == 0);
  CHECK(wrong_bytes.load() == 0);
  CHECK(lost.load() == 0);
  CHECK(failed_reads.load() == 0);  // reads are retried once on the new connection
  CHECK(reads.load() > 0);
  CHECK(puts.load() > 0);
  CHECK_THAT(new_daemon->output(),
             Catch::Contains("stable DRAM entries") && Catch::Contains("without a copy; refused 0"));
  // Every committed artifact is served by the successor, byte for byte.
  auto c = tensorreg::client::connection::connect(socket);
  REQUIRE(c);
  auto listed = c->list();
  REQUIRE(listed);
  std::set<std::string> ids;
  for (const auto& a : *listed) ids.insert(a.descriptor.artifact_id);
  std::size_t missing = 0, differ = 0;
  for (const auto& [id, what] : committed) {
    if (ids.count(id) == 0) ++missing;
    auto got = c->get(id);
    if (!got || bytes_of(*got) != expected_bytes(what.first, what.second)) ++differ;
  }
  CHECK(missing == 0);
  CHECK(differ == 0);
  // The same memory, not a copy: the memfd's inode, and the successor holds no private copy.
  CHECK(memfd_inode(socket, first_id) == inode_before);
  const auto anon_kb = status_kb(new_daemon->pid(), "RssAnon");
  INFO("successor RssAnon " << anon_kb << " kB, RssShmem " << status_kb(new_daemon->pid(), "RssShmem") << " kB");
  const std::size_t held_kb = kHeld * kHeldBytes / 1024;
  CHECK(anon_kb < (sanitized ? held_kb * 3 / 4 : held_kb / 4));
  CHECK(new_daemon->stop() == 0);
}

TEST_CASE("tensorregd --takeover: a lease of client memory is handed on under its registration id",
          "[daemon][takeover][e2e]") {
  temp_dir dir;
  auto old_daemon = std::make_unique<daemon_process>();
  const auto socket = old_daemon->socket_path();
  auto c = tensorreg::client::connection::connect(socket);
  REQUIRE(c);
  auto bundle = model(dir.path(), 700, (std::size_t{5} << 20) + 16);
  auto lease = c->register_lease(*bundle, 0);
  REQUIRE(lease);
  const auto id = lease->info().descriptor.artifact_id;
  const auto registration = lease->info().registration_id;
  // The successor persists what it adopted: the write checks that the leased bytes are the id's.
  daemon_process successor(socket, {"--takeover", "--persist-dir", (dir.path() / "persist").string()}, true);
  const auto old_exit = old_daemon->wait_exit();
  REQUIRE(old_exit);
  CHECK(*old_exit == 0);
  CHECK_THAT(successor.output(), Catch::Contains("and 1 leases without a copy; refused 0"));
  const auto lease_count = [&]() -> std::optional<std::uint32_t> {
    auto listed = c->list();
    REQUIRE(listed);
    for (const auto& a : *listed) {
      if (a.descriptor.artifact_id == id) return a.lease_count;
    }
    return std::nullopt;
  };
  CHECK(lease_count() == std::optional<std::uint32_t>(1));
  auto raw = tensorreg::client::raw::connection::connect(socket);
  REQUIRE(raw);
  wire::Request start;
  start.mutable_start_persistence()->set_artifact_id(id);
  auto started = (*raw)->call(start);
  REQUIRE(started);
  wire::Request wait;
  wait.mutable_wait_persistence_status()->set_task_id(started->response.start_persistence().task_id());
  auto waited = (*raw)->call(wait);
  REQUIRE(waited);
  CHECK(waited->response.wait_persistence_status().status().state() ==
        tensorcast::common::v1::PERSISTENCE_STATE_SUCCESS);
  // Its holder still ends it by its registration id.
  auto revoked = c->revoke_if_held(registration);
  REQUIRE(revoked);
  CHECK(*revoked);
  CHECK(lease_count() != std::optional<std::uint32_t>(1));
}

TEST_CASE("tensorregd --takeover: a successor that fails hands nothing over and the old daemon serves on",
          "[daemon][takeover][e2e]") {
  temp_dir dir;
  auto old_daemon = std::make_unique<daemon_process>();
  const auto socket = old_daemon->socket_path();
  auto c = tensorreg::client::connection::connect(socket);
  REQUIRE(c);
  auto put = c->put(*model(dir.path(), 900, 4096));
  REQUIRE(put);
  const auto& id = put->descriptor.artifact_id;
  {
    // It is handed everything, then cannot open its persist directory (a regular file): it
    // exits 1 without acknowledging.
    std::ofstream(dir.path() / "not-a-directory") << "x";
    daemon_process failing(socket, {"--takeover", "--persist-dir", (dir.path() / "not-a-directory").string()}, false);
    const auto code = failing.wait_exit();
    REQUIRE(code);
    CHECK(*code == 1);
  }
  for (int i = 0; i < 200 && old_daemon->output().find("serving on") == std::string::npos; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  CHECK_THAT(old_daemon->output(), Catch::Contains("the takeover failed (") && Catch::Contains("); serving on"));
  auto again = c->get(id);  // its connection was closed: the read reconnects to the same daemon
  REQUIRE(again);
  CHECK(bytes_of(*again) == expected_bytes(900, 4096));
  // It can still be taken over, through the control socket it kept.
  daemon_process successor(socket, {"--takeover"}, true);
  const auto old_exit = old_daemon->wait_exit();
  REQUIRE(old_exit);
  CHECK(*old_exit == 0);
  auto moved = c->get(id);
  REQUIRE(moved);
  CHECK(bytes_of(*moved) == expected_bytes(900, 4096));
}

TEST_CASE("tensorregd --takeover from another uid is refused and the daemon serves on", "[daemon][takeover][e2e]") {
  if (::geteuid() != 0) {
    WARN("not run: it needs root to start a process of another uid");
    return;
  }
  daemon_process d;
  const auto socket = d.socket_path();
  // Let uid 65534 reach the control socket (0660, group root, which the child keeps), so that
  // the daemon's own check, not the directory's mode, is what refuses it.
  const auto run_dir = fs::path(socket).parent_path();
  fs::permissions(run_dir, fs::perms::owner_all | fs::perms::group_exec | fs::perms::others_exec);
  fs::permissions(run_dir.parent_path(), fs::perms::owner_all | fs::perms::group_exec | fs::perms::others_exec);
  temp_dir out_dir;
  fs::permissions(out_dir.path(), fs::perms::all);
  const auto out = (out_dir.path() / "forged.log").string();
  const char* daemon_path = std::getenv("TENSORREGD");
  std::string binary = daemon_path != nullptr && *daemon_path != '\0' ? daemon_path : TENSORREG_DAEMON_PATH;
  // Everything the child needs is made before fork(): after it, only async-signal-safe calls.
  std::string a0 = binary, a1 = "--takeover", a2 = "--socket", a3 = socket;
  char* argv[] = {a0.data(), a1.data(), a2.data(), a3.data(), nullptr};
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    const int fd = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0666);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    if (::setuid(65534) != 0) ::_exit(126);
    ::execv(argv[0], argv);
    ::_exit(127);
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 1);
  std::ifstream in(out);
  std::stringstream text;
  text << in.rdbuf();
  CHECK_THAT(text.str(),
             Catch::Contains("cannot take over the daemon on " + socket + ": cannot take over tensorregd: pid ") &&
                 Catch::Contains("runs as uid 65534; only uid 0 (the daemon's) or root may take it over"));
  CHECK_THAT(d.output(), Catch::Contains("refused a takeover"));
  auto c = tensorreg::client::connection::connect(socket);
  REQUIRE(c);
  CHECK(c->stats());  // still serving
}

namespace {

// A fake service manager's notify socket: keeps what FDSTORE=1 stores, drops FDSTOREREMOVE=1.
class fake_notify_socket {
 public:
  explicit fake_notify_socket(const fs::path& path) : path_(path.string()) {
    fd_ = unique_fd(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    REQUIRE(fd_);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path_.c_str(), sizeof addr.sun_path - 1);
    REQUIRE(::bind(fd_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    int on = 1;
    ::setsockopt(fd_.get(), SOL_SOCKET, SO_PASSCRED, &on, sizeof on);
  }
  [[nodiscard]] const std::string& path() const { return path_; }

  // Reads every datagram waiting.
  void drain() {
    for (;;) {
      char data[4096];
      alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 16) + CMSG_SPACE(sizeof(ucred))];
      iovec iov{data, sizeof data};
      msghdr msg{};
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      msg.msg_control = control;
      msg.msg_controllen = sizeof control;
      const ssize_t n = ::recvmsg(fd_.get(), &msg, MSG_CMSG_CLOEXEC);
      if (n < 0) return;
      std::vector<unique_fd> fds;
      for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (std::size_t i = 0; i < count; ++i) {
          int f = -1;
          std::memcpy(&f, CMSG_DATA(c) + i * sizeof(int), sizeof f);
          fds.emplace_back(f);
        }
      }
      std::map<std::string, std::string> fields;
      std::istringstream lines(std::string(data, static_cast<std::size_t>(n)));
      for (std::string line; std::getline(lines, line);) {
        const auto eq = line.find('=');
        if (eq != std::string::npos) fields[line.substr(0, eq)] = line.substr(eq + 1);
      }
      if (fields.count("READY") != 0) ready = true;
      if (fields.count("STATUS") != 0) status = fields["STATUS"];
      if (fields["FDSTORE"] == "1" && fds.size() == 1) stored[fields["FDNAME"]] = std::move(fds[0]);
      if (fields["FDSTOREREMOVE"] == "1") stored.erase(fields["FDNAME"]);
    }
  }

  bool ready = false;
  std::string status;
  std::map<std::string, unique_fd> stored;

 private:
  std::string path_;
  unique_fd fd_;
};

}  // namespace

TEST_CASE("tensorregd under a service manager: memfds in the fd store survive SIGKILL, same ids and bytes",
          "[daemon][fd_store][e2e]") {
  if (!tensorreg::daemon::systemd_support()) {
    WARN("not run: tensorregd is built without libsystemd");
    return;
  }
  temp_dir dir;
  fake_notify_socket manager(dir.path() / "notify.sock");
  ::setenv("NOTIFY_SOCKET", manager.path().c_str(), 1);
  auto first = std::make_unique<daemon_process>();
  ::unsetenv("NOTIFY_SOCKET");
  const auto socket = first->socket_path();
  std::map<std::string, std::pair<std::uint32_t, std::size_t>> held;
  std::string gone;
  std::optional<tensorreg::client::lease> leased;  // a lease of this process's memfd travels too
  {
    auto c = tensorreg::client::connection::connect(socket);
    REQUIRE(c);
    auto lease = c->register_lease(*model(dir.path(), 600, 4096), 0);
    REQUIRE(lease);
    leased.emplace(std::move(*lease));
    for (std::uint32_t i = 0; i < 4; ++i) {
      const auto size = (std::size_t{1} << 20) + 4 * i;
      auto put = c->put(*model(dir.path(), 500 + i, size));
      REQUIRE(put);
      held[put->descriptor.artifact_id] = {500 + i, size};
    }
    gone = held.begin()->first;
    REQUIRE(c->deregister(gone));  // its memfd leaves the store again
    held.erase(gone);
  }
  std::set<std::string> want;
  for (const auto& [id, what] : held) want.insert(tensorreg::persistence::fd_name_of(id));
  const auto stored_memfds = [&] {
    std::set<std::string> names;
    for (const auto& [name, fd] : manager.stored) {
      if (name.rfind("m-", 0) == 0) names.insert(name);
    }
    return names;
  };
  const auto stored_lease_memfds = [&] {
    std::size_t n = 0;
    for (const auto& [name, fd] : manager.stored) n += name.rfind("l-", 0) == 0 ? 1 : 0;
    return n;
  };
  for (int i = 0; i < 500 && !(manager.ready && stored_memfds() == want && stored_lease_memfds() == 1); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    manager.drain();
  }
  CHECK(manager.ready);
  CHECK_THAT(manager.status, Catch::Contains("serving on " + socket));
  REQUIRE(stored_memfds() == want);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the catalogue follows the memfds
  manager.drain();
  std::size_t catalogues = 0;
  for (const auto& [name, fd] : manager.stored) catalogues += name.rfind("tr-state-", 0) == 0 ? 1 : 0;
  CHECK(catalogues == 1);  // each new one replaces the one before
  CHECK(first->stop(SIGKILL) == 128 + SIGKILL);

  // The restart: what the store kept, passed as systemd passes it.
  daemon_process::listen_fds passed;
  for (const auto& [name, fd] : manager.stored) {
    passed.fds.push_back(fd.get());
    passed.names.push_back(name);
  }
  daemon_process second(socket, {}, passed);
  CHECK(stored_lease_memfds() == 1);
  CHECK_THAT(second.output(), Catch::Contains("adopted 3 stable DRAM entries") &&
                                  Catch::Contains("and 1 leases without a copy; refused 0"));
  auto c = tensorreg::client::connection::connect(socket);
  REQUIRE(c);
  for (const auto& [id, what] : held) {
    auto got = c->get(id);
    REQUIRE(got);
    CHECK(got->descriptor.artifact_id == id);
    CHECK(bytes_of(*got) == expected_bytes(what.first, what.second));
  }
  auto deregistered = c->get(gone);
  REQUIRE_FALSE(deregistered);
  CHECK(deregistered.error().code == errc::not_found);
}
