// End-to-end (docs/wire-format.md): the real tensorregd on a fresh socket, driven by the client library and by raw
// frames. First include is the client (the component most of these cases exercise).
#include "client/raw_connection.hpp"

#include <catch2/catch.hpp>

#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cstring>
#include <thread>

#include "daemon/framing.hpp"
#include "daemon/unix_socket.hpp"
#include "support/daemon_process.hpp"
#include "support/raw_store.hpp"
#include "support/raw_wire.hpp"
#include "support/safetensors_writer.hpp"
#include "support/temp_dir.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/identity/content_id.hpp"
#include "tensorreg/index/safetensors_bundle.hpp"

namespace {

namespace wire = tensorreg::wire::v1;
namespace v2 = tensorcast::daemon::v2;
namespace index = tensorreg::index;
namespace memory = tensorreg::memory;
namespace identity = tensorreg::identity;
namespace testing = tensorreg::testing;
using tensorreg::errc;
using tensorreg::error;
using tensorreg::result;
using tensorreg::thread_pool;
using tensorreg::unique_fd;
using client = tensorreg::client::raw::connection;
using tensorreg::daemon::connect_unix;
using tensorreg::daemon::encode_frame;
using tensorreg::daemon::frame_decoder;
using tensorreg::daemon::receive_some;
using tensorreg::daemon::send_all;
using tensorreg::testing::daemon_process;
using tensorreg::testing::store;
using tensorreg::testing::test_tensor;

std::filesystem::path small_model(const std::filesystem::path& dir, std::uint32_t seed, std::size_t big = 5 << 20) {
  const auto path = dir / ("model-" + std::to_string(seed) + ".safetensors");
  testing::write_safetensors(path,
                             {{"w", "F32", {static_cast<std::int64_t>(big / 4)}, testing::pattern_bytes(big, seed)},
                              {"b", "BF16", {3}, testing::pattern_bytes(6, seed + 1)},
                              {"ids", "I64", {2}, testing::pattern_bytes(16, seed + 2)}});
  return path;
}

std::string offline_id(const index::safetensors_bundle& bundle) {
  thread_pool pool(1);
  return identity::content_id(bundle.index().json(), bundle.canonical(), &pool).value().to_string();
}

std::shared_ptr<client> connect(const daemon_process& d) {
  auto c = client::connect(d.socket_path());
  REQUIRE(c);
  return std::shared_ptr<client>(std::move(*c));
}

// Sends raw bytes on a fresh connection and returns the first answer (or nullopt when the
// daemon closed the connection without one).
std::optional<wire::Response> raw_exchange(const std::string& socket, const std::string& bytes) {
  auto fd = connect_unix(socket).value();
  return tensorreg::testing::send_and_answer(fd.get(), bytes);
}

using tensorreg::testing::framed;

}  // namespace

TEST_CASE("tensorregd: reports ready after bind, with a 0700 directory and a 0660 socket", "[daemon][e2e]") {
  daemon_process d;
  struct stat sock {
  }, dir{};
  REQUIRE(::stat(d.socket_path().c_str(), &sock) == 0);
  REQUIRE(::stat(std::filesystem::path(d.socket_path()).parent_path().c_str(), &dir) == 0);
  CHECK((sock.st_mode & 0777) == 0660);
  CHECK((dir.st_mode & 0777) == 0700);
  CHECK(d.output().find("tensorregd: ready on " + d.socket_path()) != std::string::npos);
}

TEST_CASE("tensorregd: put, lease and offline index give one id, a second put joins", "[daemon][e2e]") {
  daemon_process d;
  testing::temp_dir dir;
  auto bundle = index::safetensors_bundle::open({small_model(dir.path(), 1).string()}).value();
  store s(connect(d));
  auto first = s.put(*bundle, "cache");
  REQUIRE(first);
  CHECK_FALSE(first->existed);
  CHECK(first->descriptor.artifact_id() == offline_id(*bundle));
  auto second = s.put(*bundle, "");
  REQUIRE(second);
  CHECK(second->existed);
  auto held = s.register_lease(*bundle, 10'000);
  REQUIRE(held);
  CHECK((*held)->info().descriptor.artifact_id() == first->descriptor.artifact_id());

  wire::Request list;
  list.mutable_list_artifacts();
  auto listed = s.connection().call(list).value().response.list_artifacts();
  REQUIRE(listed.artifacts_size() == 1);
  CHECK(listed.artifacts(0).lease_count() >= 1);

  wire::Request index_req;
  index_req.mutable_get_artifact_index_by_id()->set_artifact_id(first->descriptor.artifact_id());
  auto idx = s.connection().call(index_req).value().response.get_artifact_index_by_id();
  CHECK(idx.tensor_index_data() == bundle->index().json());
}

TEST_CASE("tensorregd: every RPC answers over the socket", "[daemon][e2e]") {
  daemon_process d;
  auto c = connect(d);
  auto call = [&](wire::Request r) { return c->call(std::move(r)); };

  wire::Request config;
  config.mutable_get_server_config();
  auto cfg = call(config);
  REQUIRE(cfg);
  CHECK(cfg->response.get_server_config().artifact_chunk_bytes() == 256u << 20);
  CHECK(cfg->response.get_server_config().local_handle_socket_path() == d.socket_path());

  // A daemon-managed HOST_SHARED region: its memfd comes back with the answer.
  wire::Request reg;
  reg.mutable_register_region()->set_memory_kind(v2::REGION_MEMORY_KIND_HOST_SHARED);
  reg.mutable_register_region()->set_owner_pid(::getpid());
  reg.mutable_register_region()->set_size_bytes(4096);
  reg.mutable_register_region()->mutable_host_shared()->set_daemon_managed(true);
  auto region = call(reg);
  REQUIRE(region);
  REQUIRE(region->fds.size() == 1);
  const auto region_id = region->response.register_region().region().region_id();
  CHECK(region_id.rfind("region:", 0) == 0);

  // A LIP registration over it: Begin, Feed stream, KeepAlive, Commit.
  auto slab = memory::shared_memory::adopt(std::move(region->fds[0]), 4096, true).value();
  std::memset(slab.mutable_bytes().data(), 7, 16);
  wire::Request begin;
  auto* b = begin.mutable_begin_register_artifact();
  b->set_total_size(16);
  b->set_owner_pid(::getpid());
  b->set_ttl_ms(60'000);
  b->mutable_lease()->set_in_place(true);
  auto begun = call(begin);
  REQUIRE(begun);
  const auto reg_id = begun->response.begin_register_artifact().registration_id();
  v2::FeedRegisterArtifactStreamRequest feed;
  feed.set_registration_id(reg_id);
  auto* se = feed.add_storage_entries();
  se->set_storage_id("s0");
  se->set_device_id(-1);
  se->set_storage_length(16);
  se->mutable_region_ref()->set_region_id(region_id);
  se->mutable_region_ref()->set_memory_kind(v2::REGION_MEMORY_KIND_HOST_SHARED);
  auto* seg = feed.mutable_lease_segments()->add_segments();
  seg->set_storage_id("s0");
  seg->set_length(16);
  auto* a = feed.add_tensor_aliases();
  a->set_name("weights");
  a->set_storage_id("s0");
  a->set_logical_length(16);
  a->add_shape(2);
  a->add_shape(2);
  a->add_stride(2);
  a->add_stride(1);
  a->set_dtype("torch.float32");
  REQUIRE(c->feed({feed}));
  wire::Request keep;
  keep.mutable_keep_alive_register_artifact()->set_registration_id(reg_id);
  keep.mutable_keep_alive_register_artifact()->set_owner_pid(::getpid());
  keep.mutable_keep_alive_register_artifact()->set_ttl_ms(60'000);
  REQUIRE(call(keep));
  wire::Request commit;
  commit.mutable_commit_registered_artifact()->set_registration_id(reg_id);
  auto committed = call(commit);
  REQUIRE(committed);
  const auto id = committed->response.commit_registered_artifact().artifact_descriptor().artifact_id();
  // The registration.md §3.4 index vector: {"weights":[0,16,[2,2],[2,1],"torch.float32",0]}.
  CHECK(id.rfind("mi2:bciqj5lwemn5gwbuwhk5mgn2iadmjuk3eu4qwaka5dwagpr5obv4kzei:", 0) == 0);

  wire::Request stats;
  stats.mutable_get_stats();
  auto st = call(stats);
  REQUIRE(st);
  CHECK(st->response.get_stats().leases() == 1);
  CHECK(st->response.get_stats().regions() == 1);

  // Persistence needs --persist-dir (DECISIONS §5.11): FAILED_PRECONDITION without one.
  wire::Request persist;
  persist.mutable_start_persistence()->set_artifact_id(id);
  auto p = call(persist);
  REQUIRE_FALSE(p);
  CHECK(p.error().code == errc::failed_precondition);

  // Abort of an unknown id is NOT_FOUND; Revoke always OK.
  wire::Request abort;
  abort.mutable_abort_registered_artifact()->set_registration_id("reg_nope");
  auto aborted = call(abort);
  REQUIRE_FALSE(aborted);
  CHECK(aborted.error().code == errc::not_found);
  wire::Request revoke;
  revoke.mutable_revoke_registered_artifact()->set_registration_id(reg_id);
  REQUIRE(call(revoke));
  wire::Request revoke_unknown;
  revoke_unknown.mutable_revoke_registered_artifact()->set_registration_id("reg_nope");
  REQUIRE(call(revoke_unknown));

  wire::Request unreg;
  unreg.mutable_unregister_region()->set_region_id(region_id);
  unreg.mutable_unregister_region()->set_owner_pid(::getpid());
  auto released = call(unreg);
  REQUIRE(released);
  CHECK(released->response.unregister_region().released());

  // A VRAM region is only recorded (no GPU is opened until a registration uses it).
  wire::Request vram;
  vram.mutable_register_vram_region()->set_device_id(0);
  vram.mutable_register_vram_region()->set_cuda_ipc_handle(std::string(64, '\x01'));
  vram.mutable_register_vram_region()->set_size_bytes(1 << 20);
  vram.mutable_register_vram_region()->set_owner_pid(::getpid());
  auto vr = call(vram);
  REQUIRE(vr);
  wire::Request unvram;
  unvram.mutable_unregister_vram_region()->set_region_id(vr->response.register_vram_region().region_id());
  unvram.mutable_unregister_vram_region()->set_owner_pid(::getpid());
  REQUIRE(call(unvram));

  // Deregister of the (now lease-less) artifact: NOT_FOUND, it is gone.
  wire::Request dereg;
  dereg.mutable_deregister_artifact()->set_artifact_id(id);
  auto gone = call(dereg);
  REQUIRE_FALSE(gone);
  CHECK(gone.error().code == errc::not_found);
}

TEST_CASE("tensorregd: a spoofed owner_pid is PERMISSION_DENIED unless pids are trusted", "[daemon][e2e]") {
  wire::Request begin;
  auto* b = begin.mutable_begin_register_artifact();
  b->set_total_size(16);
  b->set_owner_pid(::getppid());
  b->mutable_lease()->set_in_place(true);
  {
    daemon_process d;
    auto r = connect(d)->call(begin);
    REQUIRE_FALSE(r);
    CHECK(r.error().code == errc::permission_denied);
    CHECK_THAT(r.error().message, Catch::Matchers::Contains("is not the calling process"));
  }
  {
    daemon_process d({"--trust-client-pids"});
    CHECK(connect(d)->call(begin));
  }
}

TEST_CASE("tensorregd: a second instance on a live socket exits non-zero with a clear message", "[daemon][e2e]") {
  daemon_process first;
  daemon_process second(first.socket_path(), {}, false);
  const auto code = second.wait_exit();
  REQUIRE(code);
  CHECK(*code == 1);
  CHECK_THAT(second.output(), Catch::Matchers::Contains("another tensorregd is already serving it"));
  CHECK(connect(first));  // the first one is unharmed
}

TEST_CASE("tensorregd: a stale socket file is replaced", "[daemon][e2e]") {
  testing::temp_dir dir;
  const auto path = (dir.path() / "stale.sock").string();
  {
    // Bind and close without unlinking: what a crashed daemon leaves behind.
    unique_fd s(::socket(AF_UNIX, SOCK_STREAM, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strcpy(addr.sun_path, path.c_str());
    REQUIRE(::bind(s.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  }
  REQUIRE(std::filesystem::exists(path));
  daemon_process d(path, {}, true);
  CHECK(connect(d));
}

TEST_CASE("tensorregd: SIGTERM answers the request in flight, removes the socket and exits 0", "[daemon][e2e]") {
  daemon_process d;
  testing::temp_dir dir;
  // A big put keeps a worker busy hashing while SIGTERM arrives.
  auto bundle = index::safetensors_bundle::open({small_model(dir.path(), 9, 192 << 20).string()}).value();
  store s(connect(d));
  std::atomic<bool> done{false};
  result<tensorreg::testing::registered> outcome = tl::unexpected(error{errc::unknown, "not run"});
  std::thread putter([&] {
    outcome = s.put(*bundle, "");
    done = true;
  });
  // Wait until the registration is pending in the daemon, then signal.
  auto watcher = connect(d);
  for (int i = 0; i < 500 && !done; ++i) {
    wire::Request stats;
    stats.mutable_get_stats();
    auto st = watcher->call(stats);
    if (st && st->response.get_stats().pending_registrations() > 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ::kill(d.pid(), SIGTERM);
  putter.join();
  const auto code = d.wait_exit();
  REQUIRE(code);
  CHECK(*code == 0);
  CHECK_FALSE(std::filesystem::exists(d.socket_path()));
  // The call in flight when the signal came was answered (put makes several calls; the one
  // running at the signal finishes, later ones find the daemon gone).
  if (!outcome) CHECK(outcome.error().code == errc::unavailable);
}

TEST_CASE("tensorregd: 64 clients register at once", "[daemon][e2e]") {
  daemon_process d;
  testing::temp_dir dir;
  std::vector<std::unique_ptr<index::safetensors_bundle>> bundles;
  for (std::uint32_t i = 0; i < 64; ++i) {
    bundles.push_back(index::safetensors_bundle::open({small_model(dir.path(), 100 + i, 4096).string()}).value());
  }
  std::vector<std::string> ids(64);
  std::vector<std::thread> threads;
  for (std::size_t i = 0; i < 64; ++i) {
    threads.emplace_back([&, i] {
      auto c = client::connect(d.socket_path());
      if (!c) return;
      store s(std::shared_ptr<client>(std::move(*c)));
      auto r = i % 2 == 0 ? s.put(*bundles[i], "") : tl::unexpected(error{});
      if (i % 2 == 0) {
        if (r) ids[i] = r->descriptor.artifact_id();
      } else if (auto l = s.register_lease(*bundles[i], 60'000)) {
        ids[i] = (*l)->info().descriptor.artifact_id();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (std::size_t i = 0; i < 64; ++i) {
    INFO(i);
    CHECK(ids[i] == offline_id(*bundles[i]));
  }
  wire::Request list;
  list.mutable_list_artifacts();
  // The 32 leases were revoked when their holders went away; the 32 puts remain.
  CHECK(connect(d)->call(list).value().response.list_artifacts().artifacts_size() == 32);
}

TEST_CASE("tensorregd: an oversized frame gets RESOURCE_EXHAUSTED and only that connection closes", "[daemon][e2e]") {
  daemon_process d({"--max-frame-bytes", "1024"});
  auto bystander = connect(d);
  std::string header(4, '\0');
  const std::uint32_t n = 1025;
  std::memcpy(header.data(), &n, 4);
  auto answer = raw_exchange(d.socket_path(), header);
  REQUIRE(answer);
  CHECK(answer->request_id() == 0);
  CHECK(answer->status().code() == static_cast<int>(errc::resource_exhausted));
  CHECK(answer->status().message() == "cannot read frame: length 1025 exceeds max_frame_bytes 1024");
  wire::Request config;
  config.mutable_get_server_config();
  CHECK(bystander->call(config));
}

TEST_CASE("tensorregd: a garbage payload is INVALID_ARGUMENT on request 0", "[daemon][e2e]") {
  daemon_process d;
  std::string garbage = "\xff\xff\xff\xff\x0f";
  auto answer = raw_exchange(d.socket_path(), encode_frame(garbage).value());
  REQUIRE(answer);
  CHECK(answer->request_id() == 0);
  CHECK(answer->status().code() == static_cast<int>(errc::invalid_argument));
}

TEST_CASE("tensorregd: a client memfd travels by SCM_RIGHTS and backs a lease", "[daemon][e2e]") {
  daemon_process d;
  auto c = connect(d);
  auto mem = memory::shared_memory::create(4096, "client-region").value();
  std::memset(mem.mutable_bytes().data(), 3, 4096);
  wire::Request reg;
  auto* r = reg.mutable_register_region();
  r->set_memory_kind(v2::REGION_MEMORY_KIND_HOST_SHARED);
  r->set_owner_pid(::getpid());
  r->set_size_bytes(4096);
  r->mutable_host_shared()->set_attach_token("my-token");
  const int fd = mem.fd();
  auto region = c->call(reg, std::span<const int>(&fd, 1));
  REQUIRE(region);
  CHECK(region->response.register_region().host_shared().attach_token() == "my-token");

  // A message that uses no fd but carries one fails INVALID_ARGUMENT.
  wire::Request config;
  config.mutable_get_server_config();
  auto stray = c->call(config, std::span<const int>(&fd, 1));
  REQUIRE_FALSE(stray);
  CHECK(stray.error().code == errc::invalid_argument);
}

TEST_CASE("tensorregd: a client that disconnects mid-stream leaves an abortable registration that expires",
          "[daemon][e2e]") {
  daemon_process d;
  std::string abortable, expiring;
  for (auto* id : {&abortable, &expiring}) {
    wire::Request begin;
    auto* b = begin.mutable_begin_register_artifact();
    b->set_total_size(64);
    b->set_owner_pid(::getpid());
    b->set_ttl_ms(id == &expiring ? 200 : 60'000);
    b->mutable_lease()->set_in_place(true);
    *id = connect(d)->call(begin).value().response.begin_register_artifact().registration_id();
  }
  for (const auto& id : {abortable, expiring}) {
    // One feed frame, no end-of-stream, then the connection closes.
    wire::Request f;
    f.set_request_id(7);
    auto* seg = f.mutable_feed_register_artifact_stream()->mutable_lease_segments()->add_segments();
    f.mutable_feed_register_artifact_stream()->set_registration_id(id);
    seg->set_storage_id("s0");
    seg->set_length(64);
    auto fd = connect_unix(d.socket_path()).value();
    const auto bytes = framed(f);
    REQUIRE(send_all(fd.get(), std::as_bytes(std::span(bytes.data(), bytes.size())), {}));
  }
  auto c = connect(d);
  wire::Request abort;
  abort.mutable_abort_registered_artifact()->set_registration_id(abortable);
  CHECK(c->call(abort));
  std::this_thread::sleep_for(std::chrono::milliseconds(1200));  // TTL 200 ms + a background sweep
  wire::Request commit;
  commit.mutable_commit_registered_artifact()->set_registration_id(expiring);
  auto late = c->call(commit);
  REQUIRE_FALSE(late);
  CHECK(late.error().code == errc::deadline_exceeded);
}

TEST_CASE("tensorregd: a lease's keep-alive thread keeps it past its TTL, dropping it revokes", "[daemon][e2e]") {
  daemon_process d;
  testing::temp_dir dir;
  auto bundle = index::safetensors_bundle::open({small_model(dir.path(), 77, 4096).string()}).value();
  auto c = connect(d);
  store s(c);
  auto held = s.register_lease(*bundle, 2000);  // keep-alive every ~1 s (max(1 s, ttl/2) ± 10 %)
  REQUIRE(held);
  std::this_thread::sleep_for(std::chrono::milliseconds(3300));  // past the TTL; the sweep runs every 500 ms
  CHECK((*held)->keepalives_sent() >= 2);
  wire::Request stats;
  stats.mutable_get_stats();
  CHECK(c->call(stats).value().response.get_stats().leases() == 1);
  held->reset();
  auto after = c->call(stats).value().response.get_stats();
  CHECK(after.leases() == 0);
  CHECK(after.regions() == 0);
}

TEST_CASE("tensorregd: a connection over --max-sessions gets RESOURCE_EXHAUSTED and the others go on",
          "[daemon][e2e]") {
  daemon_process d({"--max-sessions", "1"});
  auto first = connect(d);
  wire::Request config;
  config.mutable_get_server_config();
  REQUIRE(first->call(config));  // the one session is live
  auto answer = raw_exchange(d.socket_path(), std::string());
  REQUIRE(answer);
  CHECK(answer->request_id() == 0);
  CHECK(answer->status().code() == static_cast<int>(errc::resource_exhausted));
  CHECK(answer->status().message() == "cannot accept connection: the daemon serves its maximum of 1 sessions");
  CHECK(first->call(config));
}

TEST_CASE("tensorregd: GPU requests on a daemon without a GPU get the wire spec's codes (§12, §13)", "[daemon][e2e]") {
  daemon_process d;
  testing::temp_dir dir;
  auto bundle = index::safetensors_bundle::open({small_model(dir.path(), 7, 4096).string()}).value();
  store s(connect(d));
  auto& c = s.connection();

  // A CUDA VMM region: its fds ride with the request, one per chunk.
  auto chunk = memory::shared_memory::create(4096, "fake-vmm").value();
  const int fds[2] = {chunk.fd(), chunk.fd()};
  wire::Request vmm;
  auto* r = vmm.mutable_register_region();
  r->set_memory_kind(v2::REGION_MEMORY_KIND_VRAM);
  r->set_owner_pid(::getpid());
  r->set_size_bytes(8192);
  r->mutable_cuda_vmm()->add_chunk_bytes(4096);
  r->mutable_cuda_vmm()->add_chunk_bytes(4096);
  auto one_fd = c.call(vmm, std::span<const int>(fds, 1));
  REQUIRE_FALSE(one_fd);
  CHECK(one_fd.error() == error{errc::invalid_argument, "cannot register region: 1 fds for 2 chunk sizes"});
  auto no_gpu = c.call(vmm, std::span<const int>(fds, 2));
  REQUIRE_FALSE(no_gpu);
  CHECK(no_gpu.error() ==
        error{errc::failed_precondition,
              "cannot register region: CUDA VMM memory on device 0 needs a GPU and this engine has none"});
  auto three = c.call(vmm, std::span<const int>(std::array<int, 3>{chunk.fd(), chunk.fd(), chunk.fd()}));
  REQUIRE_FALSE(three);
  CHECK(three.error().code == errc::invalid_argument);  // more fds than the message uses

  // A device named by UUID that this daemon cannot see.
  wire::Request begin;
  auto* b = begin.mutable_begin_register_artifact();
  b->set_owner_pid(::getpid());
  b->set_total_size(64);
  b->set_device_uuid("GPU-12345678-1234-1234-1234-123456789abc");
  b->mutable_coalesced();
  auto unknown = c.call(begin);
  REQUIRE_FALSE(unknown);
  CHECK(unknown.error().code == errc::failed_precondition);
  CHECK(unknown.error().message.find("GPU-12345678-1234-1234-1234-123456789abc") != std::string::npos);

  // OpenArtifactDevice: unknown id, and an artifact held in host memory only.
  wire::Request open;
  open.mutable_open_artifact_device()->set_artifact_id("mi2:none");
  auto missing = c.call(open);
  REQUIRE_FALSE(missing);
  CHECK(missing.error().code == errc::not_found);
  auto put = s.put(*bundle, "cache");
  REQUIRE(put);
  open.mutable_open_artifact_device()->set_artifact_id(put->descriptor.artifact_id());
  auto host_only = c.call(open);
  REQUIRE_FALSE(host_only);
  CHECK(host_only.error().code == errc::failed_precondition);
  CHECK(host_only.error().message.find("GetArtifactMemfd") != std::string::npos);
  // Asked to copy it to a GPU this daemon cannot see: refused, naming the device.
  open.mutable_open_artifact_device()->set_place_on_device_uuid("GPU-12345678-1234-1234-1234-123456789abc");
  auto no_such_gpu = c.call(open);
  REQUIRE_FALSE(no_such_gpu);
  CHECK(no_such_gpu.error().code == errc::failed_precondition);
  CHECK(no_such_gpu.error().message.find("cannot find CUDA device GPU-12345678-1234-1234-1234-123456789abc") !=
        std::string::npos);
}
