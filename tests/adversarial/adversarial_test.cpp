// The adversarial-client suite (issue #15): every attack of a hostile local client, and the
// bad-input rows of registration.md's tables, against one real tensorregd over its socket.
// Each attack checks the code and message it gets; then the suite checks what matters more:
// the daemon still serves (a new put and get), every artifact committed before the attacks
// still hashes to its id, and the daemon's fds, pending registrations, leases, regions,
// mappings and stable bytes are back at their baseline.
//
// The daemon runs with short timeouts and small per-client shares so that idle connections,
// stalled frames and the caps settle within the suite's time.
#include "support/daemon_probe.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "client/access.hpp"
#include "client/raw_connection.hpp"
#include "daemon/framing.hpp"
#include "daemon/unix_socket.hpp"
#include "support/child_process.hpp"
#include "support/daemon_process.hpp"
#include "support/lip_requests.hpp"
#include "support/raw_wire.hpp"
#include "support/safetensors_writer.hpp"
#include "support/temp_dir.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/identity/content_id.hpp"
#include "tensorreg/index/safetensors_bundle.hpp"
#include "tensorreg/memory/shared_memory.hpp"

#ifndef TENSORREG_HOSTILE_PEER_PATH
#error "TENSORREG_HOSTILE_PEER_PATH must name the tensorreg_hostile_peer binary"
#endif

namespace {

namespace wire = tensorreg::wire::v1;
namespace v2 = tensorcast::daemon::v2;
namespace common = tensorcast::common::v1;
namespace lip = tensorreg::testing::lip;
namespace testing = tensorreg::testing;
using tensorreg::errc;
using tensorreg::unique_fd;
using tensorreg::client::connection;
using tensorreg::daemon::connect_unix;
using tensorreg::daemon::encode_frame;
using tensorreg::daemon::send_all;
using raw_connection = tensorreg::client::raw::connection;
using Catch::Matchers::Contains;
using namespace std::chrono_literals;

constexpr int max_pending_per_pid = 16;
constexpr int max_regions_per_uid = 12;
constexpr int max_stable_per_uid = 16;
constexpr int max_sessions_per_uid = 24;
constexpr int idle_timeout_ms = 1500;
constexpr int frame_timeout_ms = 300;

int code_of(const wire::Response& r) { return r.status().code(); }
int code(errc e) { return static_cast<int>(e); }
std::string me() { return std::to_string(::getpid()); }

std::span<const std::byte> as_bytes(const std::string& s) { return std::as_bytes(std::span(s.data(), s.size())); }

// One daemon, a well-behaved client's committed artifacts, and the baseline to come back to.
class harness {
 public:
  harness()
      : daemon_({"--idle-timeout-ms", std::to_string(idle_timeout_ms), "--frame-timeout-ms",
                 std::to_string(frame_timeout_ms), "--max-pending-per-pid", std::to_string(max_pending_per_pid),
                 "--max-regions-per-uid", std::to_string(max_regions_per_uid), "--max-stable-entries-per-uid",
                 std::to_string(max_stable_per_uid), "--max-sessions-per-uid", std::to_string(max_sessions_per_uid)}),
        raw_(connect_raw()),
        good_(tensorreg::client::connection_access::wrap(raw_)) {
    for (std::uint32_t seed = 1; seed <= 3; ++seed) {
      auto bundle = open_model(seed, seed == 1 ? (9u << 20) : 64u << 10);  // one over two 4 MiB leaves
      auto put = good_.put(*bundle, {"cache", {}});
      REQUIRE(put);
      REQUIRE(put->descriptor.artifact_id == offline_id(*bundle));
      puts_.push_back(put->descriptor.artifact_id);
    }
    for (std::uint32_t seed = 11; seed <= 12; ++seed) {
      auto bundle = open_model(seed, 32u << 10);
      auto held = good_.register_lease(*bundle, 0);  // no expiry: no keep-alive thread
      REQUIRE(held);
      REQUIRE(held->info().descriptor.artifact_id == offline_id(*bundle));
      leases_.push_back(std::move(*held));
    }
    REQUIRE(testing::eventually([&] { return take_snapshot(baseline_); }, 2s));
  }

  [[nodiscard]] const testing::daemon_process& daemon() const { return daemon_; }
  [[nodiscard]] const std::string& socket() const { return daemon_.socket_path(); }
  [[nodiscard]] raw_connection& raw() { return *raw_; }
  [[nodiscard]] connection& good() { return good_; }
  [[nodiscard]] const std::vector<tensorreg::client::lease>& leases() const { return leases_; }
  [[nodiscard]] const std::vector<std::string>& puts() const { return puts_; }
  [[nodiscard]] const testing::daemon_snapshot& baseline() const { return baseline_; }

  std::shared_ptr<raw_connection> connect_raw() const {
    auto c = raw_connection::connect(daemon_.socket_path());
    REQUIRE(c);
    return std::shared_ptr<raw_connection>(std::move(*c));
  }

  std::unique_ptr<tensorreg::index::safetensors_bundle> open_model(std::uint32_t seed, std::size_t bytes) {
    const auto path = dir_.path() / ("model-" + std::to_string(seed) + ".safetensors");
    if (!std::filesystem::exists(path)) {
      testing::write_safetensors(
          path, {{"w", "F32", {static_cast<std::int64_t>(bytes / 4)}, testing::pattern_bytes(bytes, seed)},
                 {"b", "BF16", {3}, testing::pattern_bytes(6, seed + 1)}});
    }
    auto bundle = tensorreg::index::safetensors_bundle::open({path.string()});
    REQUIRE(bundle);
    return std::move(*bundle);
  }

  static std::string offline_id(const tensorreg::index::safetensors_bundle& bundle) {
    tensorreg::thread_pool pool(1);
    return tensorreg::identity::content_id(bundle.index().json(), bundle.canonical(), &pool).value().to_string();
  }

  // The invariants every attack must leave standing.
  void check_after(const std::string& attack) {
    INFO("after the attack: " << attack);
    // It still serves: a new put, its bytes read back, then removed again.
    auto bundle = open_model(next_seed_++, 16u << 10);
    auto put = good_.put(*bundle, {"cache", {}});
    REQUIRE(put);
    CHECK(put->descriptor.artifact_id == offline_id(*bundle));
    auto back = testing::rehash(good_, put->descriptor.artifact_id);
    REQUIRE(back);
    CHECK(*back == put->descriptor.artifact_id);
    auto removed = good_.deregister(put->descriptor.artifact_id);
    REQUIRE(removed);
    CHECK(removed->removed);
    // Nothing committed before changed.
    for (const auto& id : puts_) {
      auto now = testing::rehash(good_, id);
      REQUIRE(now);
      CHECK(*now == id);
    }
    auto listed = good_.list();
    REQUIRE(listed);
    for (const auto& l : leases_) {
      const auto& id = l.info().descriptor.artifact_id;
      const auto it =
          std::find_if(listed->begin(), listed->end(), [&](const auto& a) { return a.descriptor.artifact_id == id; });
      REQUIRE(it != listed->end());
      CHECK(it->lease_count == 1);
      auto index = good_.index(id);
      REQUIRE(index);
      CHECK(index->descriptor.artifact_id == id);
    }
    // And what the attack made is gone again (idle connections and timeouts settle first).
    std::string left;
    testing::eventually(
        [&] {
          testing::daemon_snapshot now;
          if (!take_snapshot(now)) return false;
          left = testing::leaks(baseline_, now);
          last_ = now;
          return left.empty();
        },
        std::chrono::milliseconds(2 * idle_timeout_ms + 2000));
    CHECK(left == "");
    INFO("baseline: " << baseline_.describe() << "\nnow: " << last_.describe());
    CHECK(last_.rss_bytes < baseline_.rss_bytes + (256u << 20));
  }

  [[nodiscard]] const testing::daemon_snapshot& last() const { return last_; }

 private:
  bool take_snapshot(testing::daemon_snapshot& out) {
    auto s = testing::snapshot(daemon_.pid(), good_);
    if (!s) return false;
    out = *s;
    return true;
  }

  testing::daemon_process daemon_;
  testing::temp_dir dir_;
  std::shared_ptr<raw_connection> raw_;
  connection good_;
  std::vector<std::string> puts_;
  std::vector<tensorreg::client::lease> leases_;
  testing::daemon_snapshot baseline_;
  testing::daemon_snapshot last_;
  std::uint32_t next_seed_ = 1000;
};

// ---- client memory that could shrink, or be changed -------------------------------------------

void unsealed_memory(harness& h) {
  unique_fd unsealed(::memfd_create("unsealed", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  REQUIRE(::ftruncate(unsealed.get(), 8192) == 0);
  const int fd = unsealed.get();
  auto refused = h.raw().call(lip::client_region(::getpid(), 8192, "unsealed"), std::span<const int>(&fd, 1));
  REQUIRE_FALSE(refused);
  CHECK(refused.error().code == errc::failed_precondition);
  CHECK_THAT(refused.error().message, Contains("the memfd lacks the seal F_SEAL_SHRINK"));
  // Shrunk to half before it is sent: still refused for the seal, never mapped short.
  REQUIRE(::ftruncate(unsealed.get(), 4096) == 0);
  auto half = h.raw().call(lip::client_region(::getpid(), 8192, "unsealed-half"), std::span<const int>(&fd, 1));
  REQUIRE_FALSE(half);
  CHECK(half.error().code == errc::failed_precondition);

  testing::temp_dir dir;
  const auto path = dir.path() / "regular";
  std::ofstream(path) << std::string(4096, 'r');
  unique_fd file(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  const int file_fd = file.get();
  auto regular = h.raw().call(lip::client_region(::getpid(), 4096, "regular"), std::span<const int>(&file_fd, 1));
  REQUIRE_FALSE(regular);
  CHECK(regular.error().code == errc::failed_precondition);
  CHECK_THAT(regular.error().message, Contains("cannot be sealed"));
}

// A sealed memfd cannot shrink, before or after the commit; a WARM commit copies from it and
// another client's lease of the same bytes is refused after hashing.
void shrink_sealed_memory(harness& h) {
  const std::uint64_t size = 1u << 20;
  const auto bytes = lip::pattern(size, 77);
  auto mem = tensorreg::memory::shared_memory::create(size, "client-region").value();
  std::memcpy(mem.mutable_bytes().data(), bytes.data(), size);
  const int fd = mem.fd();
  auto region = h.raw().call(lip::client_region(::getpid(), size, "sealed"), std::span<const int>(&fd, 1));
  REQUIRE(region);
  const auto region_id = region->response.register_region().region().region_id();
  auto begun = h.raw().call(lip::begin(::getpid(), size, 60'000, common::POLICY_PROFILE_WARM));
  REQUIRE(begun);
  const auto reg = begun->response.begin_register_artifact().registration_id();
  REQUIRE(h.raw().feed({lip::one_storage(reg, region_id, size)}));
  CHECK(::ftruncate(fd, 0) == -1);
  CHECK(errno == EPERM);
  CHECK(::ftruncate(fd, size / 2) == -1);
  CHECK(errno == EPERM);
  auto committed = h.raw().call(lip::commit(reg));
  REQUIRE(committed);
  const auto id = committed->response.commit_registered_artifact().artifact_descriptor().artifact_id();
  CHECK(::ftruncate(fd, 0) == -1);
  CHECK(errno == EPERM);

  // The WARM copy was taken from the lease's memory and hashes to the lease's id.
  auto copy = testing::rehash(h.good(), id);
  REQUIRE(copy);
  CHECK(*copy == id);

  // Another process leases the same bytes: refused once hashed, and our lease is untouched.
  testing::child_process peer({TENSORREG_HOSTILE_PEER_PATH, "lease", h.socket(), std::to_string(size), "77"});
  auto line = peer.read_line(20s);
  REQUIRE(line);
  CHECK(*line == "leased " + std::to_string(code(errc::already_exists)) + " cannot commit lease of " + id +
                     ": lease already exists for artifact on device 0");
  peer.kill(SIGKILL);
  CHECK(peer.wait() == 128 + SIGKILL);

  REQUIRE(h.raw().call(lip::revoke(reg)));
  REQUIRE(h.raw().call(lip::unregister_region(::getpid(), region_id)));
  auto again = testing::rehash(h.good(), id);  // the stable copy outlives the lease
  REQUIRE(again);
  CHECK(*again == id);
  auto gone = h.good().deregister(id);
  REQUIRE(gone);
  CHECK(gone->removed);
}

void replica_reopened_writable(harness& h) {
  auto answer = h.raw().call(lip::get_memfd(h.puts()[0]));
  REQUIRE(answer);
  REQUIRE(answer->fds.size() == 1);
  const auto path = "/proc/self/fd/" + std::to_string(answer->fds[0].get());
  unique_fd rw(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (!rw) {
    CHECK((errno == EACCES || errno == EPERM));
    return;
  }
  CHECK(::pwrite(rw.get(), "x", 1, 0) == -1);
  CHECK(errno == EPERM);
  CHECK(::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, rw.get(), 0) == MAP_FAILED);
  CHECK(errno == EPERM);
  CHECK(::ftruncate(rw.get(), 0) == -1);
  CHECK(errno == EPERM);
  CHECK(::fcntl(rw.get(), F_ADD_SEALS, F_SEAL_SEAL) == -1);  // sealed for good
}

// ---- acting for another process ---------------------------------------------------------------

void cross_pid(harness& h) {
  auto begun = h.raw().call(lip::begin(::getpid(), 4096, 60'000));
  REQUIRE(begun);
  const auto pending = begun->response.begin_register_artifact().registration_id();
  const auto& lease = h.leases()[0];
  testing::child_process peer({TENSORREG_HOSTILE_PEER_PATH, "cross-pid", h.socket(), pending,
                               lease.info().registration_id, lease.info().descriptor.artifact_id,
                               lease.region_ids()[0]});
  const auto them = std::to_string(peer.pid());
  std::vector<std::string> lines;
  while (auto line = peer.read_line(20s)) lines.push_back(*line);
  CHECK(peer.wait() == 0);
  REQUIRE(lines.size() == 8);
  const auto denied = [&](const std::string& verb, const std::string& id) {
    return " cannot " + verb + " registration '" + id + "': it belongs to pid " + me() +
           ", not to the calling process " + them;
  };
  const auto pd = std::to_string(code(errc::permission_denied));
  CHECK(lines[0] == "feed " + pd + denied("feed", pending));
  CHECK(lines[1] == "commit " + pd + denied("commit", pending));
  CHECK(lines[2] == "abort " + pd + denied("abort", pending));
  CHECK(lines[3] == "revoke-pending " + pd + denied("revoke", pending));
  CHECK(lines[4] == "revoke-lease " + pd + denied("revoke", lease.info().registration_id));
  CHECK(lines[5] == "keep-alive " + pd + " cannot keep registration '" + pending + "' alive: owner_pid " + them +
                        " is not the registration's owner " + me());
  CHECK_THAT(lines[6], Contains("deregister " + pd + " cannot deregister " + lease.info().descriptor.artifact_id));
  CHECK_THAT(lines[6], Contains("by pid " + me() + ", not only by the calling process " + them));
  CHECK(lines[7] == "unregister-region " + pd + " cannot unregister region '" + lease.region_ids()[0] +
                        "': owned by pid " + me() + ", not " + them);
  REQUIRE(h.raw().call(lip::abort(pending)));
}

// ---- the socket path ----------------------------------------------------------------------------

void socket_at_regular_file(harness&) {
  testing::temp_dir dir;
  const auto path = dir.path() / "notes.txt";
  std::ofstream(path) << "keep me";
  testing::daemon_process d(path.string(), {}, false);
  CHECK(d.wait_exit() == std::optional<int>(1));
  CHECK_THAT(d.output(), Contains("it exists and is not a socket; refusing to remove it"));
  std::ifstream in(path);
  std::string text;
  std::getline(in, text);
  CHECK(text == "keep me");
}

// ---- sizes and shares ---------------------------------------------------------------------------

void huge_and_overflowing_sizes(harness& h) {
  auto eib = h.raw().call(lip::begin(::getpid(), std::uint64_t{1} << 60, 0));
  REQUIRE_FALSE(eib);
  CHECK(eib.error().code == errc::resource_exhausted);
  CHECK(eib.error().message ==
        "cannot begin registration: total_size 1152921504606846976 exceeds this engine's limit of 1099511627776 bytes");
  auto max = h.raw().call(lip::begin(::getpid(), UINT64_MAX, 0));
  REQUIRE_FALSE(max);
  CHECK(max.error().code == errc::resource_exhausted);
  CHECK(
      max.error().message ==
      "cannot begin registration: total_size 18446744073709551615 exceeds this engine's limit of 1099511627776 bytes");

  // A storage window whose end overflows 64 bits, over a real region.
  auto region = h.raw().call(lip::managed_region(::getpid(), 4096));
  REQUIRE(region);
  const auto region_id = region->response.register_region().region().region_id();
  auto begun = h.raw().call(lip::begin(::getpid(), 4096, 60'000));
  REQUIRE(begun);
  const auto reg = begun->response.begin_register_artifact().registration_id();
  auto wrapping = lip::one_storage(reg, region_id, 4096);
  wrapping.mutable_storage_entries(0)->set_mapping_base_offset(UINT64_MAX - 100);
  auto fed = h.raw().feed({wrapping});
  REQUIRE_FALSE(fed);
  CHECK(fed.error().code == errc::failed_precondition);
  CHECK(fed.error().message ==
        "cannot add storage 's0': cannot use region '" + region_id +
            "' for storage 's0': bytes [18446744073709551515, +4096) exceed the region's 4096 bytes");
  // A segment whose end overflows: refused at Commit before any memory is read.
  auto segment = lip::one_storage(reg, region_id, 4096);
  segment.mutable_lease_segments()->mutable_segments(0)->set_artifact_offset(UINT64_MAX - 8);
  REQUIRE(h.raw().feed({segment}));
  auto commit = h.raw().call(lip::commit(reg));
  REQUIRE_FALSE(commit);
  CHECK(commit.error().code == errc::invalid_argument);
  CHECK(commit.error().message ==
        "cannot build byte range map: tensor 'weights' at offset 18446744073709551607 with size "
        "4096 ends past 2^64");
  // Aliases whose end wraps past 2^64: byte offsets near it, and an element offset whose
  // product with the element size is 2^64 (0 if it wrapped).
  struct overflowing_alias {
    std::uint64_t storage_offset;
    const char* dtype;
    errc expected;
    std::string message;
  };
  const std::vector<overflowing_alias> aliases = {
      {UINT64_MAX / 2, "torch.uint8", errc::out_of_range,
       "cannot rebuild index: alias 'weights' ends at byte 9223372036854779903, past storage_length 4096 of storage "
       "'s0'"},
      {UINT64_MAX - 10, "torch.uint8", errc::invalid_argument,
       "cannot rebuild index: alias 'weights': storage_offset 18446744073709551605 does not fit a signed 64-bit "
       "integer"},
      {std::uint64_t{1} << 61, "torch.float64", errc::out_of_range,
       "cannot rebuild index: alias 'weights': storage_offset 2305843009213693952 elements overflows 64 bits"},
  };
  for (const auto& a : aliases) {
    INFO("alias storage_offset " << a.storage_offset << " of " << a.dtype);
    auto begun2 = h.raw().call(lip::begin(::getpid(), 4096, 60'000));
    REQUIRE(begun2);
    const auto reg2 = begun2->response.begin_register_artifact().registration_id();
    auto alias = lip::one_storage(reg2, region_id, 4096);
    alias.mutable_tensor_aliases(0)->set_storage_offset(a.storage_offset);
    alias.mutable_tensor_aliases(0)->set_dtype(a.dtype);
    alias.mutable_tensor_aliases(0)->set_shape(0, std::string(a.dtype) == "torch.uint8" ? 4096 : 512);
    REQUIRE(h.raw().feed({alias}));
    auto past = h.raw().call(lip::commit(reg2));
    REQUIRE_FALSE(past);
    CHECK(past.error().code == a.expected);
    CHECK(past.error().message == a.message);
    (void)h.raw().call(lip::abort(reg2));
  }
  REQUIRE(h.raw().call(lip::unregister_region(::getpid(), region_id)));
}

void pending_share(harness& h) {
  std::vector<std::string> begun;
  for (int i = 0; i < max_pending_per_pid; ++i) {
    auto b = h.raw().call(lip::begin(::getpid(), 4096, 60'000));
    REQUIRE(b);
    begun.push_back(b->response.begin_register_artifact().registration_id());
  }
  auto over = h.raw().call(lip::begin(::getpid(), 4096, 60'000));
  REQUIRE_FALSE(over);
  CHECK(over.error().code == errc::resource_exhausted);
  CHECK(over.error().message == "cannot begin registration: owner_pid " + me() + " already has its maximum of " +
                                    std::to_string(max_pending_per_pid) + " pending registrations");
  for (const auto& id : begun) REQUIRE(h.raw().call(lip::abort(id)));
}

void many_tiny_puts(harness& h) {
  std::vector<std::string> ids;
  std::optional<tensorreg::error> refused;
  for (std::uint32_t seed = 500; seed < 500 + 2 * max_stable_per_uid && !refused; ++seed) {
    auto bundle = h.open_model(seed, 64);
    auto put = h.good().put(*bundle, {"cache", {}});
    if (put) {
      ids.push_back(put->descriptor.artifact_id);
    } else {
      refused = put.error();
    }
  }
  CHECK(ids.size() == max_stable_per_uid - h.puts().size());
  REQUIRE(refused);
  CHECK(refused->code == errc::resource_exhausted);
  CHECK_THAT(refused->message, Contains("uid " + std::to_string(::getuid()) + " already keeps its maximum of " +
                                        std::to_string(max_stable_per_uid) + " artifacts in the stable DRAM cache"));
  for (const auto& id : ids) REQUIRE(h.good().deregister(id));
}

void region_table_fill(harness& h) {
  std::vector<std::string> regions;
  std::optional<tensorreg::error> refused;
  for (int i = 0; i < 2 * max_regions_per_uid && !refused; ++i) {
    auto r = h.raw().call(lip::managed_region(::getpid(), 4096));
    if (r) {
      regions.push_back(r->response.register_region().region().region_id());
    } else {
      refused = r.error();
    }
  }
  CHECK(regions.size() == max_regions_per_uid - h.leases().size());
  REQUIRE(refused);
  CHECK(refused->code == errc::resource_exhausted);
  CHECK(refused->message == "cannot register region: uid " + std::to_string(::getuid()) + " holds its share of " +
                                std::to_string(max_regions_per_uid) + " of the registry's 4096 regions");
  for (const auto& id : regions) REQUIRE(h.raw().call(lip::unregister_region(::getpid(), id)));
}

// ---- connections and frames ---------------------------------------------------------------------

wire::Request stats_request(std::uint64_t id) {
  wire::Request r;
  r.set_request_id(id);
  r.mutable_get_stats();
  return r;
}

void idle_connections_past_the_cap(harness& h) {
  std::vector<unique_fd> idle;
  std::optional<wire::Response> refused;
  for (int i = 0; i < 2 * max_sessions_per_uid && !refused; ++i) {
    auto fd = connect_unix(h.socket());
    REQUIRE(fd);
    // The refusal may come before the request is sent, closing the socket under the send.
    const auto request = testing::framed(stats_request(1));
    (void)send_all(fd->get(), as_bytes(request), {});
    auto answer = testing::next_answer(fd->get());
    REQUIRE(answer);
    if (answer->request_id() == 0) {
      refused = *answer;
    } else {
      idle.push_back(std::move(*fd));
    }
  }
  REQUIRE(refused);
  CHECK(code_of(*refused) == code(errc::resource_exhausted));
  CHECK(refused->status().message() == "cannot accept connection: uid " + std::to_string(::getuid()) +
                                           " already has its maximum of " + std::to_string(max_sessions_per_uid) +
                                           " sessions");
  // Left idle, each is closed with DEADLINE_EXCEEDED, and the places come back.
  for (auto& fd : idle) {
    auto closed = testing::next_answer(fd.get());
    REQUIRE(closed);
    CHECK(closed->request_id() == 0);
    CHECK(code_of(*closed) == code(errc::deadline_exceeded));
    CHECK(closed->status().message() ==
          "closing the connection: no request for " + std::to_string(idle_timeout_ms) + " ms (idle timeout)");
  }
}

void stalled_half_frame(harness& h) {
  auto fd = connect_unix(h.socket());
  REQUIRE(fd);
  const auto half = encode_frame(std::string(1 << 20, 'x')).value().substr(0, 4 + (1 << 19));
  REQUIRE(send_all(fd->get(), as_bytes(half), {}));
  auto closed = testing::next_answer(fd->get());
  REQUIRE(closed);
  CHECK(closed->request_id() == 0);
  CHECK(code_of(*closed) == code(errc::deadline_exceeded));
  CHECK(closed->status().message() == "cannot read frame: the frame at stream offset 0 did not arrive whole within " +
                                          std::to_string(frame_timeout_ms) + " ms of its first byte");
  CHECK_FALSE(testing::next_answer(fd->get()));
}

void frame_bomb(harness& h) {
  auto fd = connect_unix(h.socket());
  REQUIRE(fd);
  const std::string header("\xff\xff\xff\xff", 4);
  auto answer = testing::send_and_answer(fd->get(), header);
  REQUIRE(answer);
  CHECK(answer->request_id() == 0);
  CHECK(code_of(*answer) == code(errc::resource_exhausted));
  CHECK_THAT(answer->status().message(), Contains("cannot read frame: length 4294967295 exceeds max_frame_bytes"));
  CHECK_FALSE(testing::next_answer(fd->get()));
}

void garbage_bodies(harness& h) {
  for (const std::string& garbage : {std::string("\xff\xff\xff\xff\x0f", 5), std::string(1000, '\x0a')}) {
    auto fd = connect_unix(h.socket());
    REQUIRE(fd);
    auto answer = testing::send_and_answer(fd->get(), encode_frame(garbage).value());
    REQUIRE(answer);
    CHECK(answer->request_id() == 0);
    CHECK(code_of(*answer) == code(errc::invalid_argument));
    CHECK(answer->status().message() ==
          "cannot parse request: " + std::to_string(garbage.size()) + " bytes are not a tensorreg.wire.v1.Request");
  }
  // A Begin whose body is five bytes of text.
  {
    auto fd = connect_unix(h.socket());
    REQUIRE(fd);
    auto answer = testing::send_and_answer(fd->get(), encode_frame(std::string("\x08\x01\x52\x05hello", 9)).value());
    REQUIRE(answer);
    CHECK(code_of(*answer) == code(errc::invalid_argument));
    CHECK(answer->request_id() == 0);
    CHECK(answer->status().message() == "cannot parse request: 9 bytes are not a tensorreg.wire.v1.Request");
  }
  // A well-formed request with no body.
  wire::Request empty;
  empty.set_request_id(5);
  auto fd = connect_unix(h.socket());
  REQUIRE(fd);
  auto answer = testing::send_and_answer(fd->get(), testing::framed(empty));
  REQUIRE(answer);
  CHECK(answer->request_id() == 5);
  CHECK(answer->status().message() == "cannot handle request 5: the request has no body");
  CHECK(code_of(*answer) == code(errc::invalid_argument));
}

// The end of frame A and all of frame B, with B's fd, arrive in one read: the fd is B's.
void two_frames_one_read(harness& h) {
  auto fd = connect_unix(h.socket());
  REQUIRE(fd);
  auto mem = tensorreg::memory::shared_memory::create(4096, "frame-b").value();
  const auto a = testing::framed(stats_request(1));
  auto region = lip::client_region(::getpid(), 4096, "frame-b");
  region.set_request_id(2);
  const auto b = testing::framed(region);
  REQUIRE(send_all(fd->get(), as_bytes(a.substr(0, a.size() / 2)), {}));
  std::this_thread::sleep_for(50ms);  // the daemon reads A's first half alone
  const std::string rest = a.substr(a.size() / 2) + b;
  const int mem_fd = mem.fd();
  REQUIRE(send_all(fd->get(), as_bytes(rest), std::span<const int>(&mem_fd, 1)));
  const auto answers = testing::next_answers(fd->get(), 2);
  REQUIRE(answers.size() == 2);
  CHECK(answers[0].request_id() == 1);
  CHECK(code_of(answers[0]) == 0);
  INFO("frame B's answer: " << answers[1].status().message());
  CHECK(answers[1].request_id() == 2);
  REQUIRE(code_of(answers[1]) == 0);
  REQUIRE(h.raw().call(lip::unregister_region(::getpid(), answers[1].register_region().region().region_id())));
}

void too_many_fds(harness& h) {
  auto fd = connect_unix(h.socket());
  REQUIRE(fd);
  std::vector<int> fds(253, STDERR_FILENO);  // Linux's SCM_MAX_FD; the daemon takes 250 a frame
  REQUIRE(testing::send_unchecked(fd->get(), testing::framed(stats_request(7)), fds));
  auto answer = testing::next_answer(fd->get());
  REQUIRE(answer);
  CHECK(answer->request_id() == 0);
  CHECK(code_of(*answer) == code(errc::invalid_argument));
  CHECK(answer->status().message() ==
        "cannot read frame: more than 250 file descriptors arrived with one message (at most 250 per frame)");
  CHECK_FALSE(testing::next_answer(fd->get()));
}

// ---- clients that die ---------------------------------------------------------------------------

void killed_mid_stream(harness& h) {
  testing::child_process peer({TENSORREG_HOSTILE_PEER_PATH, "half-frame", h.socket()});
  REQUIRE(peer.read_line(10s) == std::optional<std::string>("sent"));
  peer.kill(SIGKILL);
  CHECK(peer.wait() == 128 + SIGKILL);
}

void killed_mid_commit(harness& h) {
  const std::uint64_t size = 256u << 20;
  testing::child_process peer({TENSORREG_HOSTILE_PEER_PATH, "mid-commit", h.socket(), std::to_string(size), "3"});
  REQUIRE(peer.read_line(30s) == std::optional<std::string>("committing"));
  std::this_thread::sleep_for(20ms);  // the Commit is on its way and hashing
  peer.kill(SIGKILL);
  const auto killed = std::chrono::steady_clock::now();
  CHECK(peer.wait() == 128 + SIGKILL);
  bool released = testing::eventually(
      [&] {
        auto s = testing::snapshot(h.daemon().pid(), h.good());
        return s && s->stats.pending_registrations == h.baseline().stats.pending_registrations &&
               s->stats.regions == h.baseline().stats.regions && s->stats.leases == h.baseline().stats.leases;
      },
      10s);
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - killed);
  CHECK(released);
  WARN("a client killed mid-commit of 256 MiB was released after " << ms.count() << " ms (goal 1000 ms)");
  CHECK(ms < 5s);  // the goal is 1 s; sanitizer builds and a loaded machine get room
}

// ---- the bad-input rows of registration.md §4.2, §4.3 and §5.1 ----------------------------------

struct row {
  const char* rule;
  std::function<void(wire::Request& begin)> change_begin;
  std::function<void(v2::FeedRegisterArtifactStreamRequest& feed)> change_feed;
  errc expected;
  const char* message_part;
  bool at_commit;  // else at Begin (no change_feed) or at Feed
};

void spec_rows(harness& h) {
  auto region = h.raw().call(lip::managed_region(::getpid(), 8192));
  REQUIRE(region);
  const auto region_id = region->response.register_region().region().region_id();
  const std::vector<row> rows = {
      {"total_size 0",
       [](auto& b) { b.mutable_begin_register_artifact()->set_total_size(0); },
       {},
       errc::invalid_argument,
       "total_size must be > 0",
       false},
      {"owner_pid of another process",
       [](auto& b) { b.mutable_begin_register_artifact()->set_owner_pid(::getppid()); },
       {},
       errc::permission_denied,
       "is not the calling process",
       false},
      {"in_place false (a snapshot lease is checked as a lease in place)",
       [](auto& b) { b.mutable_begin_register_artifact()->mutable_lease()->set_in_place(false); },
       [](auto& f) { f.mutable_lease_segments()->mutable_segments(0)->set_length(100); }, errc::invalid_argument,
       "segment 0 of storage 's0' has length 100, not the storage_length 4096", true},
      {"a view without registration_kind",
       [](auto& b) { b.mutable_begin_register_artifact()->mutable_view(); },
       {},
       errc::invalid_argument,
       "cannot register view: registration_kind is required (CANONICAL or PIECE), got 0",
       false},
      {"a malformed CGID",
       [](auto& b) { b.mutable_begin_register_artifact()->set_client_artifact_id("cgid:not valid"); },
       {},
       errc::invalid_argument,
       "cannot begin registration: invalid cgid 'cgid:not valid'",
       false},
      {"segment storage_id empty",
       {},
       [](auto& f) { f.mutable_lease_segments()->mutable_segments(0)->set_storage_id(""); },
       errc::invalid_argument,
       "cannot add lease segment 0: storage_id is empty",
       false},
      {"storage entry with no source",
       {},
       [](auto& f) { f.mutable_storage_entries(0)->clear_region_ref(); },
       errc::invalid_argument,
       "storage entry must specify exactly one source",
       false},
      {"duplicate storage_id",
       {},
       [](auto& f) { *f.add_storage_entries() = f.storage_entries(0); },
       errc::invalid_argument,
       "duplicate storage_id",
       false},
      {"region unknown",
       {},
       [](auto& f) {
         f.mutable_storage_entries(0)->mutable_region_ref()->set_region_id("region:00000000000000000000000000000000");
       },
       errc::not_found,
       "cannot find region 'region:00000000000000000000000000000000': no such region",
       false},
      {"region kind mismatch",
       {},
       [](auto& f) {
         f.mutable_storage_entries(0)->mutable_region_ref()->set_memory_kind(v2::REGION_MEMORY_KIND_VRAM);
       },
       errc::failed_precondition,
       "region is HOST_SHARED, not VRAM",
       false},
      {"region bounds",
       {},
       [](auto& f) { f.mutable_storage_entries(0)->set_mapping_base_offset(8000); },
       errc::failed_precondition,
       "bytes [8000, +4096) exceed the region's 8192 bytes",
       false},
      {"no lease segments",
       {},
       [](auto& f) { f.clear_lease_segments(); },
       errc::failed_precondition,
       "no lease segments fed",
       true},
      {"no aliases",
       {},
       [](auto& f) { f.clear_tensor_aliases(); },
       errc::failed_precondition,
       "registration missing tensor_aliases payload",
       true},
      {"alias of an unknown storage",
       {},
       [](auto& f) { f.mutable_tensor_aliases(0)->set_storage_id("s9"); },
       errc::invalid_argument,
       "alias 'weights' refers to unknown storage_id=s9",
       true},
      {"alias past its storage",
       {},
       [](auto& f) { f.mutable_tensor_aliases(0)->set_storage_offset(1); },
       errc::out_of_range,
       "alias 'weights' ends at byte 4097, past storage_length",
       true},
      {"segment end past total_size",
       {},
       [](auto& f) { f.mutable_lease_segments()->mutable_segments(0)->set_artifact_offset(4096); },
       errc::invalid_argument,
       "tensor 'weights' ends at 8192, past total_size 4096",
       true},
      {"segment length != storage_length",
       {},
       [](auto& f) { f.mutable_lease_segments()->mutable_segments(0)->set_length(100); },
       errc::invalid_argument,
       "segment 0 of storage 's0' has length 100, not the storage_length 4096",
       true},
  };
  for (const auto& r : rows) {
    INFO("rule: " << r.rule);
    auto begin = lip::begin(::getpid(), 4096, 60'000);
    if (r.change_begin) r.change_begin(begin);
    auto begun = h.raw().call(begin);
    if (!r.change_feed) {
      REQUIRE_FALSE(begun);
      CHECK(begun.error().code == r.expected);
      CHECK_THAT(begun.error().message, Contains(r.message_part));
      continue;
    }
    REQUIRE(begun);
    const auto reg = begun->response.begin_register_artifact().registration_id();
    auto feed = lip::one_storage(reg, region_id, 4096);
    r.change_feed(feed);
    auto outcome = h.raw().feed({feed});
    if (outcome && r.at_commit) outcome = h.raw().call(lip::commit(reg));
    REQUIRE_FALSE(outcome);
    CHECK(outcome.error().code == r.expected);
    CHECK_THAT(outcome.error().message, Contains(r.message_part));
    (void)h.raw().call(lip::abort(reg));  // NOT_FOUND where the failure already dropped it
  }
  REQUIRE(h.raw().call(lip::unregister_region(::getpid(), region_id)));
}

}  // namespace

TEST_CASE("adversarial: every attack is answered, and the daemon keeps serving, its artifacts and its baseline",
          "[adversarial][daemon][e2e]") {
  harness h;
  const std::vector<std::pair<const char*, void (*)(harness&)>> attacks = {
      {"unsealed memfd and regular file", unsealed_memory},
      {"shrinking a sealed memfd before and after commit, a WARM copy and a second lease", shrink_sealed_memory},
      {"the replica fd reopened read-write", replica_reopened_writable},
      {"another pid's Feed, Commit, Abort, Revoke, KeepAlive, Deregister, UnregisterRegion", cross_pid},
      {"--socket at a regular file", socket_at_regular_file},
      {"1 EiB Begin and 64-bit overflowing offsets", huge_and_overflowing_sizes},
      {"pending registrations past the per-pid share", pending_share},
      {"many tiny puts past the per-uid stable share", many_tiny_puts},
      {"the region table filled by one uid", region_table_fill},
      {"idle connections past the per-uid cap", idle_connections_past_the_cap},
      {"a stalled half frame", stalled_half_frame},
      {"a frame bomb", frame_bomb},
      {"garbage bodies", garbage_bodies},
      {"the end of frame A and frame B with its fd in one read", two_frames_one_read},
      {"more than 250 fds", too_many_fds},
      {"a client killed mid-stream", killed_mid_stream},
      {"a client killed mid-commit", killed_mid_commit},
      {"the bad-input rows of the spec", spec_rows},
  };
  for (const auto& [name, attack] : attacks) {
    INFO("attack: " << name);
    attack(h);
    h.check_after(name);
  }
  WARN("baseline: " << h.baseline().describe() << "\nafter all attacks: " << h.last().describe());
}
