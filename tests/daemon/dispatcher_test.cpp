#include "daemon/dispatcher.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "support/fake_clock.hpp"
#include "support/recording_logger.hpp"
#include "support/two_tensor_artifact.hpp"
#include "tensorcast/common/v1/common.pb.h"
#include "tensorcast/daemon/v2/store_daemon.pb.h"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/memory/shared_memory.hpp"
#include "tensorreg/registration/engine.hpp"
#include "tensorreg/wire/v1/frame.pb.h"

namespace {

namespace wire = tensorreg::wire::v1;
namespace v2 = tensorcast::daemon::v2;
namespace common = tensorcast::common::v1;

using tensorreg::errc;
using tensorreg::error;
using tensorreg::unique_fd;
using tensorreg::daemon::dispatcher;
using tensorreg::daemon::dispatcher_options;
using tensorreg::daemon::frame_in;
using tensorreg::daemon::frame_out;
using tensorreg::daemon::peer_credentials;
using tensorreg::memory::shared_memory;
using namespace std::chrono_literals;

// The artifact every registration here uses.
namespace two_tensors = tensorreg::testing::two_tensors;
using tensorreg::testing::two_tensors::index_json;
using tensorreg::testing::two_tensors::total;

peer_credentials self() { return {getpid(), getuid(), getgid()}; }

std::int32_t my_pid() { return static_cast<std::int32_t>(getpid()); }

int code(errc c) { return static_cast<int>(c); }

dispatcher_options trusting(bool trust, uid_t daemon_uid) {
  dispatcher_options options;
  options.trust_client_pids = trust;
  options.daemon_uid = daemon_uid;
  return options;
}

unique_fd make_memfd(std::uint64_t size) {
  unique_fd fd(::memfd_create("dispatcher-test", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  REQUIRE(fd);
  REQUIRE(::ftruncate(fd.get(), static_cast<off_t>(size)) == 0);
  REQUIRE(::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK) == 0);  // the daemon maps only sealed memfds
  return fd;
}

bool is_open(int fd) { return ::fcntl(fd, F_GETFD) != -1 || errno != EBADF; }

struct answer {
  wire::Response response;
  std::vector<unique_fd> fds;
};

// A dispatcher over a fresh engine with a fake clock, and one connection from this process.
struct harness {
  explicit harness(dispatcher_options options = {}, peer_credentials peer = self())
      : engine(make_engine(clock)), dispatch(*engine, std::move(options)), conn(dispatch.open_connection(peer)) {}

  static std::unique_ptr<tensorreg::registration::engine> make_engine(const tensorreg::testing::fake_clock& c) {
    tensorreg::registration::engine_options options;
    options.time = &c;
    options.hash_threads = 2;
    options.sweep_interval = 0ms;
    options.watch_owners = false;
    auto e = tensorreg::registration::engine::create(std::move(options));
    REQUIRE(e);
    return std::move(*e);
  }

  wire::Request request() {
    wire::Request r;
    r.set_request_id(next_id++);
    return r;
  }

  std::optional<frame_out> send(const wire::Request& r, std::vector<unique_fd> fds = {}) {
    return dispatch.handle(*conn, frame_in{r.SerializeAsString(), std::move(fds)});
  }

  answer call(const wire::Request& r, std::vector<unique_fd> fds = {}) {
    auto out = send(r, std::move(fds));
    REQUIRE(out);
    answer a;
    REQUIRE(a.response.ParseFromString(out->payload));
    a.fds = std::move(out->fds);
    CHECK(a.response.request_id() == r.request_id());
    REQUIRE(a.response.has_status());
    return a;
  }

  // Calls and requires OK (printing the status otherwise).
  answer ok(const wire::Request& r, std::vector<unique_fd> fds = {}) {
    auto a = call(r, std::move(fds));
    INFO(a.response.status().message());
    REQUIRE(a.response.status().code() == 0);
    CHECK(a.response.status().message().empty());
    return a;
  }

  tensorreg::testing::fake_clock clock;
  std::unique_ptr<tensorreg::registration::engine> engine;
  dispatcher dispatch;
  dispatcher::connection_ptr conn;
  std::uint64_t next_id = 1;
};

void check_status(const answer& a, errc expected, const std::string& message) {
  CHECK(a.response.status().code() == code(expected));
  CHECK(a.response.status().message() == message);
  CHECK(a.response.body_case() == wire::Response::BODY_NOT_SET);
  CHECK(a.fds.empty());
}

void check_status_contains(const answer& a, errc expected, const std::string& part) {
  CHECK(a.response.status().code() == code(expected));
  CHECK_THAT(a.response.status().message(), Catch::Contains(part));
  CHECK(a.response.body_case() == wire::Response::BODY_NOT_SET);
}

answer parse(const frame_out& out) {
  answer a;
  REQUIRE(a.response.ParseFromString(out.payload));
  return a;
}

// ---- request builders ----

wire::Request begin_stable(harness& h, std::int32_t owner_pid = my_pid()) {
  auto r = h.request();
  auto* b = r.mutable_begin_register_artifact();
  b->set_device_id(0);
  b->set_total_size(total);
  b->set_ttl_ms(60'000);
  b->set_owner_pid(owner_pid);
  b->mutable_tensor_index_data()->set_data(index_json());
  b->mutable_tensor_index_data()->set_schema_version("v3");
  b->mutable_tensor_index_data()->set_encoding("json");
  b->mutable_stable_dram();
  return r;
}

wire::Request begin_lease(harness& h) {
  auto r = h.request();
  auto* b = r.mutable_begin_register_artifact();
  b->set_device_id(0);
  b->set_total_size(total);
  b->set_ttl_ms(60'000);
  b->set_owner_pid(my_pid());
  b->mutable_lease()->set_in_place(true);
  return r;
}

wire::Request commit(harness& h, const std::string& registration_id) {
  auto r = h.request();
  r.mutable_commit_registered_artifact()->set_registration_id(registration_id);
  return r;
}

wire::Request feed_frame(std::uint64_t id, const std::string& registration_id) {
  wire::Request r;
  r.set_request_id(id);
  r.mutable_feed_register_artifact_stream()->set_registration_id(registration_id);
  return r;
}

wire::Request end_of_stream(std::uint64_t id) {
  wire::Request r;
  r.set_request_id(id);
  r.set_end_of_stream(true);
  return r;
}

wire::Request register_slab(harness& h, std::uint64_t size) {
  auto r = h.request();
  auto* g = r.mutable_register_region();
  g->set_memory_kind(v2::REGION_MEMORY_KIND_HOST_SHARED);
  g->set_owner_pid(my_pid());
  g->set_size_bytes(size);
  g->set_ttl_ms(60'000);
  g->mutable_host_shared()->set_daemon_managed(true);
  g->mutable_host_shared()->set_region_class(v2::HOST_SHARED_REGION_CLASS_SCRATCH);
  return r;
}

// Feeds `frames` as one stream and requires the single OK answer at its end.
void feed_all(harness& h, std::vector<wire::Request> frames) {
  const auto id = h.next_id++;
  for (auto& f : frames) {
    f.set_request_id(id);
    CHECK_FALSE(h.send(f));
  }
  auto done = h.ok(end_of_stream(id));
  CHECK(done.response.has_feed_register_artifact_stream());
}

// Begins a stable_dram registration and returns its id.
std::string begin_stable_id(harness& h) {
  auto begun = h.ok(begin_stable(h));
  return begun.response.begin_register_artifact().registration_id();
}

// A stable_dram put of the artifact in `chunk` bytes view chunks; returns the commit answer.
v2::CommitRegisteredArtifactResponse put_chunks(harness& h, std::size_t chunk) {
  const auto id = begin_stable_id(h);
  const auto bytes = two_tensors::bytes();
  std::vector<wire::Request> frames;
  for (std::size_t at = 0; at < bytes.size(); at += chunk) {
    auto f = feed_frame(0, id);
    auto* c = f.mutable_feed_register_artifact_stream()->mutable_view_chunk();
    c->set_canonical_offset(at);
    c->set_data(bytes.substr(at, chunk));
    frames.push_back(std::move(f));
  }
  feed_all(h, std::move(frames));
  return h.ok(commit(h, id)).response.commit_registered_artifact();
}

}  // namespace

// ---- envelope ------------------------------------------------------------------------------

TEST_CASE("dispatcher: an unparsable payload is INVALID_ARGUMENT with request_id 0", "[daemon][dispatcher]") {
  harness h;
  auto out = h.dispatch.handle(*h.conn, frame_in{std::string("\xff\xff\xff", 3), {}});
  REQUIRE(out);
  auto a = parse(*out);
  CHECK(a.response.request_id() == 0);
  check_status(a, errc::invalid_argument, "cannot parse request: 3 bytes are not a tensorreg.wire.v1.Request");
}

TEST_CASE("dispatcher: a request without a body is INVALID_ARGUMENT", "[daemon][dispatcher]") {
  harness h;
  auto r = h.request();
  check_status(h.call(r), errc::invalid_argument, "cannot handle request 1: the request has no body");
}

TEST_CASE("dispatcher: a body field the daemon does not know is UNIMPLEMENTED", "[daemon][dispatcher]") {
  harness h;
  auto r = h.request();
  // Field 27, length-delimited, empty: a newer RPC.
  auto out = h.dispatch.handle(*h.conn, frame_in{r.SerializeAsString() + std::string("\xda\x01\x00", 3), {}});
  REQUIRE(out);
  auto a = parse(*out);
  CHECK(a.response.request_id() == 1);
  check_status(a, errc::unimplemented, "cannot handle request 1: body field 27 is not a request this daemon knows");
}

TEST_CASE("dispatcher: request_id 0 is reserved", "[daemon][dispatcher]") {
  harness h;
  wire::Request r;
  r.mutable_get_server_config();
  auto a = h.call(r);
  check_status(a, errc::invalid_argument, "cannot handle request: request_id 0 is reserved");
}

TEST_CASE("dispatcher: end_of_stream on a request that is not a Feed is INVALID_ARGUMENT", "[daemon][dispatcher]") {
  harness h;
  auto r = h.request();
  r.set_end_of_stream(true);
  r.mutable_get_server_config();
  check_status(h.call(r), errc::invalid_argument,
               "cannot handle GetServerConfig request 1: end_of_stream is only for Feed streams");
}

TEST_CASE("dispatcher: reject() answers request_id 0 with the error", "[daemon][dispatcher]") {
  harness h;
  auto a = parse(
      h.dispatch.reject(error{errc::resource_exhausted, "cannot read frame: length 99 exceeds max_frame_bytes 8"}));
  CHECK(a.response.request_id() == 0);
  check_status(a, errc::resource_exhausted, "cannot read frame: length 99 exceeds max_frame_bytes 8");
}

// ---- peer identity (DECISIONS §4) -----------------------------------------------------------

TEST_CASE("dispatcher: an owner_pid other than the peer's is PERMISSION_DENIED", "[daemon][dispatcher]") {
  harness h;
  const auto other = my_pid() + 1;
  const auto pids = std::to_string(other) + " is not the calling process " + std::to_string(my_pid()) +
                    " (start tensorregd with --trust-client-pids to allow it)";
  SECTION("Begin") {
    check_status(h.call(begin_stable(h, other)), errc::permission_denied,
                 "cannot begin registration: owner_pid " + pids);
  }
  SECTION("KeepAlive") {
    auto r = h.request();
    r.mutable_keep_alive_register_artifact()->set_registration_id("reg_x");
    r.mutable_keep_alive_register_artifact()->set_owner_pid(other);
    check_status(h.call(r), errc::permission_denied, "cannot keep registration 'reg_x' alive: owner_pid " + pids);
  }
  SECTION("RegisterRegion") {
    auto r = register_slab(h, 64);
    r.mutable_register_region()->set_owner_pid(other);
    check_status(h.call(r), errc::permission_denied, "cannot register region: owner_pid " + pids);
  }
  SECTION("UnregisterRegion") {
    auto r = h.request();
    r.mutable_unregister_region()->set_region_id("region:1");
    r.mutable_unregister_region()->set_owner_pid(other);
    check_status(h.call(r), errc::permission_denied, "cannot unregister region 'region:1': owner_pid " + pids);
  }
  SECTION("RegisterVramRegion") {
    auto r = h.request();
    r.mutable_register_vram_region()->set_owner_pid(other);
    check_status(h.call(r), errc::permission_denied, "cannot register VRAM region: owner_pid " + pids);
  }
  SECTION("UnregisterVramRegion") {
    auto r = h.request();
    r.mutable_unregister_vram_region()->set_region_id("region:2");
    r.mutable_unregister_vram_region()->set_owner_pid(other);
    check_status(h.call(r), errc::permission_denied, "cannot unregister VRAM region 'region:2': owner_pid " + pids);
  }
  SECTION("DeregisterArtifact with owner_pid set") {
    auto r = h.request();
    r.mutable_deregister_artifact()->set_artifact_id("mi2:x");
    r.mutable_deregister_artifact()->set_owner_pid(other);
    check_status(h.call(r), errc::permission_denied, "cannot deregister mi2:x: owner_pid " + pids);
  }
}

TEST_CASE("dispatcher: --trust-client-pids accepts another owner_pid from root or the daemon's uid",
          "[daemon][dispatcher]") {
  const auto other = my_pid() + 1;
  SECTION("the daemon's uid") {
    harness h(trusting(true, 4242), {getpid(), 4242, 4242});
    auto a = h.ok(begin_stable(h, other));
    CHECK(a.response.begin_register_artifact().has_stable_dram());
  }
  SECTION("root") {
    harness h(trusting(true, 4242), {getpid(), 0, 0});
    h.ok(begin_stable(h, other));
  }
  SECTION("another uid is still refused") {
    harness h(trusting(true, 4242), {getpid(), 1000, 1000});
    check_status(h.call(begin_stable(h, other)), errc::permission_denied,
                 "cannot begin registration: owner_pid " + std::to_string(other) + " is not the calling process " +
                     std::to_string(my_pid()) + " (start tensorregd with --trust-client-pids to allow it)");
  }
  SECTION("without the flag root is refused too") {
    harness h(trusting(false, 0), {getpid(), 0, 0});
    check_status_contains(h.call(begin_stable(h, other)), errc::permission_denied, "is not the calling process");
  }
}

TEST_CASE("dispatcher: owner_pid <= 0 gets the engine's INVALID_ARGUMENT", "[daemon][dispatcher]") {
  harness h;
  check_status(h.call(begin_stable(h, 0)), errc::invalid_argument,
               "cannot begin registration: owner_pid is required (>0)");
}

// ---- Begin / Feed / Commit ------------------------------------------------------------------

TEST_CASE("dispatcher: a stable_dram Begin sends the publish memfd as fd 0", "[daemon][dispatcher]") {
  harness h;
  auto a = h.ok(begin_stable(h));
  const auto& begun = a.response.begin_register_artifact();
  CHECK_THAT(begun.registration_id(), Catch::StartsWith("reg_"));
  CHECK(begun.device_id() == 0);
  CHECK(begun.total_size() == total);
  REQUIRE(begun.has_stable_dram());
  CHECK(begun.stable_dram().publish_cpu_memfd().size_bytes() == total);
  CHECK(begun.stable_dram().publish_cpu_memfd().offset_bytes() == 0);
  CHECK_FALSE(begun.stable_dram().publish_cpu_memfd_lease_token().empty());
  REQUIRE(a.fds.size() == 1);
  auto mapped = shared_memory::adopt(std::move(a.fds[0]), total, true);
  REQUIRE(mapped);
}

TEST_CASE("dispatcher: a Begin with no plan is coalesced, which needs a GPU", "[daemon][dispatcher]") {
  harness h;
  auto r = begin_stable(h);
  r.mutable_begin_register_artifact()->clear_plan();
  check_status_contains(h.call(r), errc::failed_precondition, "cannot begin coalesced registration");
}

TEST_CASE("dispatcher: a Begin's policy reaches the engine", "[daemon][dispatcher]") {
  harness h;
  auto r = begin_stable(h);
  auto* p = r.mutable_begin_register_artifact()->mutable_policy();
  p->set_profile(common::POLICY_PROFILE_CACHE);
  p->add_must()->set_tier(common::POLICY_TIER_STABLE_DRAM);
  check_status_contains(h.call(r), errc::invalid_argument, "cannot begin registration");
}

TEST_CASE("dispatcher: a stable_dram put in chunks commits, and a second put exists already", "[daemon][dispatcher]") {
  harness h;
  auto first = put_chunks(h, 10);
  CHECK_THAT(first.artifact_descriptor().artifact_id(), Catch::StartsWith("mi2:"));
  CHECK(first.artifact_descriptor().id_kind() == common::ARTIFACT_ID_KIND_MI2);
  CHECK(first.artifact_descriptor().total_size() == total);
  CHECK(first.artifact_descriptor().schema_version() == "v3");
  CHECK(first.artifact_descriptor().encoding() == "json");
  CHECK_FALSE(first.existed());
  REQUIRE(first.has_local_stable_tier());
  CHECK(first.local_stable_tier().status() == v2::LOCAL_STABLE_TIER_STATUS_SKIPPED);

  auto second = put_chunks(h, 7);
  CHECK(second.artifact_descriptor().artifact_id() == first.artifact_descriptor().artifact_id());
  CHECK(second.existed());
}

TEST_CASE("dispatcher: a stable_dram put through the publish memfd commits", "[daemon][dispatcher]") {
  harness h;
  auto begun = h.ok(begin_stable(h));
  const auto id = begun.response.begin_register_artifact().registration_id();
  REQUIRE(begun.fds.size() == 1);
  auto mapped = shared_memory::adopt(std::move(begun.fds[0]), total, true);
  REQUIRE(mapped);
  const auto bytes = two_tensors::bytes();
  std::memcpy(mapped->mutable_bytes().data(), bytes.data(), bytes.size());

  auto f = feed_frame(0, id);
  auto* progress = f.mutable_feed_register_artifact_stream()->mutable_stable_dram_write_progress();
  auto* range = progress->add_ranges();
  range->set_canonical_offset(0);
  range->set_length(total);
  progress->set_upload_complete(true);
  feed_all(h, {f});
  auto done = h.ok(commit(h, id)).response.commit_registered_artifact();

  harness other;
  CHECK(done.artifact_descriptor().artifact_id() == put_chunks(other, 24).artifact_descriptor().artifact_id());
}

TEST_CASE("dispatcher: a LIP registration over a daemon-managed HOST_SHARED region has the stable_dram id",
          "[daemon][dispatcher]") {
  harness h;
  // 1. A 64-byte slab; its memfd comes back as fd 0.
  auto slab = h.ok(register_slab(h, 64));
  const auto& region = slab.response.register_region();
  CHECK_THAT(region.region().region_id(), Catch::StartsWith("region:"));
  CHECK(region.region().memory_kind() == v2::REGION_MEMORY_KIND_HOST_SHARED);
  CHECK(region.region().device_id() == -1);
  CHECK(region.region().size_bytes() == 64);
  CHECK(region.ttl_ms() == 60'000);
  CHECK(region.expires_at().seconds() >
        std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count());
  CHECK(region.host_shared().daemon_managed());
  CHECK(region.host_shared().region_class() == v2::HOST_SHARED_REGION_CLASS_SCRATCH);
  CHECK_THAT(region.host_shared().attach_token(), Catch::StartsWith("region-attach:"));
  REQUIRE(slab.fds.size() == 1);
  auto mapped = shared_memory::adopt(std::move(slab.fds[0]), 64, true);
  REQUIRE(mapped);

  // 2. Write the two storages into the slab: "a" at 8, "b" at 40.
  const auto bytes = two_tensors::bytes();
  std::memcpy(mapped->mutable_bytes().data() + 8, bytes.data(), 16);
  std::memcpy(mapped->mutable_bytes().data() + 40, bytes.data() + 16, 8);

  // 3. Begin (lease) → Feed stream (storages, segments, aliases) → Commit.
  auto begun = h.ok(begin_lease(h));
  REQUIRE(begun.response.begin_register_artifact().has_lease());
  CHECK(begun.fds.empty());
  const auto id = begun.response.begin_register_artifact().registration_id();

  auto storages = feed_frame(0, id);
  for (auto [name, length, base] : {std::tuple{"s0", 16, 8}, std::tuple{"s1", 8, 40}}) {
    auto* e = storages.mutable_feed_register_artifact_stream()->add_storage_entries();
    e->set_storage_id(name);
    e->set_storage_length(static_cast<std::uint64_t>(length));
    e->set_mapping_base_offset(static_cast<std::uint64_t>(base));
    e->mutable_region_ref()->set_region_id(region.region().region_id());
    e->mutable_region_ref()->set_memory_kind(v2::REGION_MEMORY_KIND_HOST_SHARED);
    e->mutable_region_ref()->set_device_id(-1);
    e->mutable_region_ref()->set_size_bytes(64);
  }
  auto segments = feed_frame(0, id);
  for (auto [name, offset, length] : {std::tuple{"s0", 0, 16}, std::tuple{"s1", 16, 8}}) {
    auto* s = segments.mutable_feed_register_artifact_stream()->mutable_lease_segments()->add_segments();
    s->set_storage_id(name);
    s->set_artifact_offset(static_cast<std::uint64_t>(offset));
    s->set_length(static_cast<std::uint64_t>(length));
  }
  auto aliases = feed_frame(0, id);
  for (auto [name, storage, length, elements] : {std::tuple{"a", "s0", 16, 4}, std::tuple{"b", "s1", 8, 2}}) {
    auto* t = aliases.mutable_feed_register_artifact_stream()->add_tensor_aliases();
    t->set_name(name);
    t->set_storage_id(storage);
    t->set_logical_length(static_cast<std::uint64_t>(length));
    t->add_shape(elements);
    t->add_stride(1);
    t->set_dtype("torch.float32");
  }
  feed_all(h, {storages, segments, aliases});
  auto lip = h.ok(commit(h, id)).response.commit_registered_artifact();
  CHECK_FALSE(lip.existed());
  CHECK(lip.artifact_descriptor().total_size() == total);

  // 4. The same bytes put through stable_dram give the same id.
  auto stable = put_chunks(h, 16);
  CHECK(stable.artifact_descriptor().artifact_id() == lip.artifact_descriptor().artifact_id());
  CHECK(stable.artifact_descriptor().index_multihash() == lip.artifact_descriptor().index_multihash());
  CHECK_FALSE(stable.existed());  // no stable replica existed yet, only the lease
  CHECK(put_chunks(h, 5).existed());

  // 5. The catalogue shows both tiers.
  auto listed = h.request();
  listed.mutable_list_artifacts();
  auto list = h.ok(listed).response.list_artifacts();
  REQUIRE(list.artifacts_size() == 1);
  const auto& summary = list.artifacts(0);
  CHECK(summary.artifact_id() == lip.artifact_descriptor().artifact_id());
  CHECK(summary.artifact_descriptor().artifact_id() == summary.artifact_id());
  CHECK(summary.total_size() == total);
  REQUIRE(summary.tiers_size() == 2);
  CHECK(summary.tiers(0) == wire::TIER_VRAM_LEASED);
  CHECK(summary.tiers(1) == wire::TIER_STABLE_DRAM);
  CHECK(summary.lease_count() == 2);  // the lease and the second put's join

  auto stats_request = h.request();
  stats_request.mutable_get_stats();
  auto stats = h.ok(stats_request).response.get_stats();
  CHECK(stats.artifacts() == 1);
  REQUIRE(stats.tiers_size() == 2);
  CHECK(stats.tiers(0).tier() == wire::TIER_VRAM_LEASED);
  CHECK(stats.tiers(0).bytes() == total);
  CHECK(stats.tiers(0).artifacts() == 1);
  CHECK(stats.tiers(1).tier() == wire::TIER_STABLE_DRAM);
  CHECK(stats.tiers(1).bytes() == total);
  CHECK(stats.leases() == 2);
  CHECK(stats.regions() == 1);
  CHECK(stats.pending_registrations() == 0);
  CHECK(stats.connections() == 1);
}

TEST_CASE("dispatcher: an error mid-stream is answered once, at once", "[daemon][dispatcher]") {
  harness h;
  const auto id = h.ok(begin_lease(h)).response.begin_register_artifact().registration_id();
  const std::uint64_t stream = 50;
  auto bad = feed_frame(stream, id);
  bad.mutable_feed_register_artifact_stream()->add_storage_entries()->set_storage_id("s0");  // no source
  auto early = h.send(bad);
  REQUIRE(early);
  auto a = parse(*early);
  CHECK(a.response.request_id() == stream);
  check_status(a, errc::invalid_argument, "cannot add storage 's0': storage entry must specify exactly one source");

  auto good = feed_frame(stream, id);
  good.mutable_feed_register_artifact_stream()->add_tensor_aliases()->set_name("a");
  CHECK_FALSE(h.send(good));                   // ignored
  CHECK_FALSE(h.send(end_of_stream(stream)));  // no second answer

  // The id is free again: a new stream with it works.
  CHECK_FALSE(h.send(good));
  auto done = h.call(end_of_stream(stream));
  CHECK(done.response.status().code() == 0);
  CHECK(done.response.has_feed_register_artifact_stream());
}

TEST_CASE("dispatcher: another registration_id later in a stream is INVALID_ARGUMENT", "[daemon][dispatcher]") {
  harness h;
  const auto first = h.ok(begin_lease(h)).response.begin_register_artifact().registration_id();
  const auto second = h.ok(begin_lease(h)).response.begin_register_artifact().registration_id();
  auto one = feed_frame(60, first);
  one.mutable_feed_register_artifact_stream()->add_tensor_aliases()->set_name("a");
  CHECK_FALSE(h.send(one));
  auto two = feed_frame(60, second);
  two.mutable_feed_register_artifact_stream()->add_tensor_aliases()->set_name("b");
  auto a = h.call(two);
  check_status(a, errc::invalid_argument,
               "cannot feed registration '" + second + "': stream 60 feeds registration '" + first + "'");
  CHECK_FALSE(h.send(end_of_stream(60)));
}

TEST_CASE("dispatcher: a Feed of an unknown registration is NOT_FOUND", "[daemon][dispatcher]") {
  harness h;
  auto f = feed_frame(7, "reg_nope");
  f.mutable_feed_register_artifact_stream()->add_tensor_aliases()->set_name("a");
  check_status(h.call(f), errc::not_found, "cannot feed registration 'reg_nope': no such registration");
  CHECK_FALSE(h.send(end_of_stream(7)));
}

TEST_CASE("dispatcher: an empty Feed stream is INVALID_ARGUMENT", "[daemon][dispatcher]") {
  harness h;
  check_status(h.call(end_of_stream(9)), errc::invalid_argument,
               "cannot end feed stream 9: missing feed payload (no feed frame came before end_of_stream)");
}

TEST_CASE("dispatcher: an end_of_stream frame with a body is INVALID_ARGUMENT", "[daemon][dispatcher]") {
  harness h;
  auto f = feed_frame(11, "reg_x");
  f.set_end_of_stream(true);
  check_status(h.call(f), errc::invalid_argument, "cannot end feed stream 11: the end_of_stream frame carries a body");
}

TEST_CASE("dispatcher: a request reusing the id of an open stream is a connection-level error",
          "[daemon][dispatcher]") {
  harness h;
  const auto id = h.ok(begin_lease(h)).response.begin_register_artifact().registration_id();
  auto f = feed_frame(12, id);
  f.mutable_feed_register_artifact_stream()->add_tensor_aliases()->set_name("a");
  CHECK_FALSE(h.send(f));
  wire::Request r;
  r.set_request_id(12);
  r.mutable_get_server_config();
  auto out = h.send(r);
  REQUIRE(out);
  auto a = parse(*out);
  CHECK(a.response.request_id() == 0);
  check_status(a, errc::invalid_argument,
               "cannot handle GetServerConfig request 12: request_id 12 is in use by an open feed stream");
}

TEST_CASE("dispatcher: close_connection drops open streams, the registration stays abortable", "[daemon][dispatcher]") {
  harness h;
  const auto id = h.ok(begin_lease(h)).response.begin_register_artifact().registration_id();
  auto f = feed_frame(13, id);
  f.mutable_feed_register_artifact_stream()->add_tensor_aliases()->set_name("a");
  CHECK_FALSE(h.send(f));
  h.dispatch.close_connection(*h.conn);
  h.conn = h.dispatch.open_connection(self());
  auto abort = h.request();
  abort.mutable_abort_registered_artifact()->set_registration_id(id);
  CHECK(h.ok(abort).response.has_abort_registered_artifact());
}

// ---- file descriptors (DECISIONS §4.1) --------------------------------------------------------

TEST_CASE("dispatcher: fds on a message that uses none are closed and the request fails", "[daemon][dispatcher]") {
  harness h;
  auto fd = make_memfd(4096);
  const int raw = fd.get();
  std::vector<unique_fd> fds;
  fds.push_back(std::move(fd));
  SECTION("GetServerConfig") {
    auto r = h.request();
    r.mutable_get_server_config();
    check_status(h.call(r, std::move(fds)), errc::invalid_argument,
                 "cannot handle GetServerConfig request 1: 1 file descriptor arrived with a message that uses none");
  }
  SECTION("a daemon-managed RegisterRegion") {
    check_status(h.call(register_slab(h, 64), std::move(fds)), errc::invalid_argument,
                 "cannot register region: 1 file descriptor arrived with a message that uses none");
  }
  SECTION("a stable_dram Begin without file segments") {
    check_status(h.call(begin_stable(h), std::move(fds)), errc::invalid_argument,
                 "cannot begin registration: 1 file descriptor arrived with a message that uses none");
  }
  SECTION("a Feed frame") {
    auto f = feed_frame(5, "reg_x");
    f.mutable_feed_register_artifact_stream()->add_tensor_aliases()->set_name("a");
    check_status(h.call(f, std::move(fds)), errc::invalid_argument,
                 "cannot feed registration 'reg_x': 1 file descriptor arrived with a message that uses none");
  }
  CHECK_FALSE(is_open(raw));
}

TEST_CASE("dispatcher: a client HOST_SHARED region takes its memfd as fd 0", "[daemon][dispatcher]") {
  harness h;
  auto r = register_slab(h, 4096);
  r.mutable_register_region()->mutable_host_shared()->set_daemon_managed(false);
  r.mutable_register_region()->mutable_host_shared()->set_attach_token("client-token");
  SECTION("with the memfd") {
    std::vector<unique_fd> fds;
    fds.push_back(make_memfd(4096));
    auto a = h.ok(r, std::move(fds));
    CHECK(a.fds.empty());
    CHECK(a.response.register_region().host_shared().attach_token() == "client-token");
    CHECK_FALSE(a.response.register_region().host_shared().daemon_managed());
    CHECK(a.response.register_region().region().size_bytes() == 4096);
  }
  SECTION("without it") {
    check_status_contains(h.call(r), errc::invalid_argument,
                          "cannot register region: HOST_SHARED needs the client's memfd");
  }
  SECTION("with two") {
    std::vector<unique_fd> fds;
    fds.push_back(make_memfd(4096));
    fds.push_back(make_memfd(4096));
    check_status(h.call(r, std::move(fds)), errc::invalid_argument,
                 "cannot register region: 2 file descriptors arrived with a message that uses one");
  }
}

// ---- the other RPCs ------------------------------------------------------------------------

TEST_CASE("dispatcher: RegisterRegion with memory_kind UNSPECIFIED is INVALID_ARGUMENT", "[daemon][dispatcher]") {
  harness h;
  auto r = register_slab(h, 64);
  r.mutable_register_region()->set_memory_kind(v2::REGION_MEMORY_KIND_UNSPECIFIED);
  check_status(h.call(r), errc::invalid_argument, "cannot register region: memory_kind is unspecified");
}

TEST_CASE("dispatcher: UnregisterRegion releases a region", "[daemon][dispatcher]") {
  harness h;
  const auto id = h.ok(register_slab(h, 64)).response.register_region().region().region_id();
  auto r = h.request();
  r.mutable_unregister_region()->set_region_id(id);
  r.mutable_unregister_region()->set_owner_pid(my_pid());
  CHECK(h.ok(r).response.unregister_region().released());
  auto again = h.request();
  again.mutable_unregister_region()->set_region_id(id);
  again.mutable_unregister_region()->set_owner_pid(my_pid());
  check_status(h.call(again), errc::not_found, "cannot find region '" + id + "': no such region");
}

TEST_CASE("dispatcher: RegisterVramRegion and UnregisterVramRegion wrap the region RPCs", "[daemon][dispatcher]") {
  harness h;
  auto r = h.request();
  auto* v = r.mutable_register_vram_region();
  v->set_device_id(0);
  v->set_cuda_ipc_handle(std::string(64, 'h'));
  v->set_size_bytes(1 << 20);
  v->set_ttl_ms(1000);
  v->set_owner_pid(my_pid());
  auto a = h.ok(r);
  const auto& out = a.response.register_vram_region();
  CHECK_THAT(out.region_id(), Catch::StartsWith("region:"));
  CHECK(out.ttl_ms() == 1000);
  CHECK(out.has_expires_at());

  auto u = h.request();
  u.mutable_unregister_vram_region()->set_region_id(out.region_id());
  u.mutable_unregister_vram_region()->set_owner_pid(my_pid());
  CHECK(h.ok(u).response.unregister_vram_region().released());
}

TEST_CASE("dispatcher: KeepAlive, Abort and Revoke", "[daemon][dispatcher]") {
  harness h;
  const auto id = h.ok(begin_lease(h)).response.begin_register_artifact().registration_id();
  auto keep = h.request();
  keep.mutable_keep_alive_register_artifact()->set_registration_id(id);
  keep.mutable_keep_alive_register_artifact()->set_ttl_ms(30'000);
  keep.mutable_keep_alive_register_artifact()->set_epoch(2);
  keep.mutable_keep_alive_register_artifact()->set_owner_pid(my_pid());
  CHECK(h.ok(keep).response.has_keep_alive_register_artifact());

  auto abort = h.request();
  abort.mutable_abort_registered_artifact()->set_registration_id(id);
  CHECK(h.ok(abort).response.has_abort_registered_artifact());
  abort.set_request_id(h.next_id++);
  check_status(h.call(abort), errc::not_found, "cannot abort registration '" + id + "': no such registration");

  keep.set_request_id(h.next_id++);
  check_status_contains(h.call(keep), errc::not_found, "cannot keep registration '" + id + "' alive");

  auto revoke = h.request();
  revoke.mutable_revoke_registered_artifact()->set_registration_id("reg_unknown");
  revoke.mutable_revoke_registered_artifact()->set_reason("test");
  CHECK(h.ok(revoke).response.has_revoke_registered_artifact());
}

TEST_CASE("dispatcher: GetServerConfig reports the daemon's settings", "[daemon][dispatcher]") {
  dispatcher_options options;
  options.socket_path = "/tmp/tensorreg-test/tensorregd.sock";
  harness h(options);
  auto r = h.request();
  r.mutable_get_server_config();
  const auto config = h.ok(r).response.get_server_config();
  CHECK(config.artifact_chunk_bytes() == 256u << 20);
  CHECK(config.tx_slice_bytes() == 32u << 20);
  CHECK(config.local_handle_socket_path() == "/tmp/tensorreg-test/tensorregd.sock");
  CHECK(config.cpu_shared_memory_enabled());
  CHECK(config.startup_phase() == v2::DAEMON_STARTUP_PHASE_READY);
  CHECK(config.mem_pool_size() == 0);  // unlimited stable budget
}

TEST_CASE("dispatcher: GetArtifactIndexById answers the canonical index bytes", "[daemon][dispatcher]") {
  harness h;
  const auto id = put_chunks(h, 24).artifact_descriptor().artifact_id();
  auto r = h.request();
  r.mutable_get_artifact_index_by_id()->set_artifact_id(id);
  const auto out = h.ok(r).response.get_artifact_index_by_id();
  CHECK(out.tensor_index_data() == index_json());
  CHECK(out.artifact_descriptor().artifact_id() == id);
  CHECK(out.artifact_descriptor().total_size() == total);

  auto unknown = h.request();
  unknown.mutable_get_artifact_index_by_id()->set_artifact_id("mi2:unknown");
  check_status(h.call(unknown), errc::not_found, "cannot find the index of mi2:unknown: not held here");
}

TEST_CASE("dispatcher: GetArtifactMemfd hands over the stable replica read-only as fd 0", "[daemon][dispatcher]") {
  harness h(trusting(false, getuid()));
  const auto id = put_chunks(h, 24).artifact_descriptor().artifact_id();
  auto r = h.request();
  r.mutable_get_artifact_memfd()->set_artifact_id(id);
  auto a = h.ok(r);
  const auto& out = a.response.get_artifact_memfd();
  CHECK(out.tensor_index_data() == index_json());
  CHECK(out.artifact_descriptor().artifact_id() == id);
  CHECK(out.size_bytes() == total);
  REQUIRE(a.fds.size() == 1);
  CHECK((::fcntl(a.fds[0].get(), F_GETFL) & O_ACCMODE) == O_RDONLY);
  // Readers cannot write the replica through a shared mapping; they read the canonical bytes.
  CHECK(::mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, a.fds[0].get(), 0) == MAP_FAILED);
  auto mapped = shared_memory::adopt(std::move(a.fds[0]), total, false);
  REQUIRE(mapped);
  CHECK(std::string(reinterpret_cast<const char*>(mapped->bytes().data()), total) == two_tensors::bytes());

  auto unknown = h.request();
  unknown.mutable_get_artifact_memfd()->set_artifact_id("mi2:unknown");
  check_status(h.call(unknown), errc::not_found, "cannot open the stable replica of mi2:unknown: not held here");
}

TEST_CASE("dispatcher: GetArtifactMemfd is only for root and the daemon's uid", "[daemon][dispatcher]") {
  const uid_t stranger = getuid() + 1;
  harness h(trusting(false, getuid()), peer_credentials{getpid(), stranger, getgid()});
  auto r = h.request();
  r.mutable_get_artifact_memfd()->set_artifact_id("mi2:x");
  check_status(h.call(r), errc::permission_denied,
               "cannot open the stable replica of mi2:x: uid " + std::to_string(stranger) +
                   " is neither root nor the daemon's uid " + std::to_string(getuid()));
}

TEST_CASE("dispatcher: DeregisterArtifact drains and removes an artifact", "[daemon][dispatcher]") {
  harness h;
  const auto id = put_chunks(h, 24).artifact_descriptor().artifact_id();
  auto r = h.request();
  r.mutable_deregister_artifact()->set_artifact_id(id);
  r.mutable_deregister_artifact()->set_owner_pid(my_pid());
  const auto out = h.ok(r).response.deregister_artifact();
  CHECK(out.drained());
  CHECK(out.removed());

  r.set_request_id(h.next_id++);
  r.mutable_deregister_artifact()->clear_owner_pid();
  check_status(h.call(r), errc::not_found, "cannot deregister " + id + ": not held here");
}

TEST_CASE("dispatcher: ListArtifacts is sorted by id and GetStats counts an empty engine", "[daemon][dispatcher]") {
  harness h;
  auto list = h.request();
  list.mutable_list_artifacts();
  CHECK(h.ok(list).response.list_artifacts().artifacts_size() == 0);
  auto stats = h.request();
  stats.mutable_get_stats();
  const auto s = h.ok(stats).response.get_stats();
  CHECK(s.artifacts() == 0);
  CHECK(s.tiers_size() == 0);
  CHECK(s.connections() == 1);

  // Two artifacts: ids come back in order.
  put_chunks(h, 24);
  auto r = begin_stable(h);
  auto* data = r.mutable_begin_register_artifact()->mutable_tensor_index_data();
  data->set_data(R"({"z":[0,24,[6],[1],"torch.float32",0]})");
  const auto id = h.ok(r).response.begin_register_artifact().registration_id();
  auto f = feed_frame(0, id);
  f.mutable_feed_register_artifact_stream()->mutable_view_chunk()->set_data(two_tensors::bytes());
  feed_all(h, {f});
  h.ok(commit(h, id));
  list.set_request_id(h.next_id++);
  const auto listed = h.ok(list).response.list_artifacts();
  REQUIRE(listed.artifacts_size() == 2);
  CHECK(listed.artifacts(0).artifact_id() < listed.artifacts(1).artifact_id());
  CHECK(listed.artifacts(0).tiers_size() == 1);
  CHECK(listed.artifacts(0).tiers(0) == wire::TIER_STABLE_DRAM);
}

TEST_CASE("dispatcher: persistence RPCs without a persist directory", "[daemon][dispatcher]") {
  harness h;
  auto start = h.request();
  start.mutable_start_persistence()->set_artifact_id("mi2:x");
  check_status(h.call(start), errc::failed_precondition,
               "cannot start persistence of mi2:x: the daemon has no persist directory (tensorregd --persist-dir)");
  auto query = h.request();
  query.mutable_query_persistence_status()->set_task_id("t");
  check_status(h.call(query), errc::not_found, "cannot find persistence task 't': no such task");
  auto wait = h.request();
  wait.mutable_wait_persistence_status()->set_task_id("t");
  check_status(h.call(wait), errc::not_found, "cannot wait for persistence task 't': no such task");
}

TEST_CASE("dispatcher: ActivateStableLocalBacking is UNIMPLEMENTED", "[daemon][dispatcher]") {
  harness h;
  auto r = h.request();
  r.mutable_activate_stable_local_backing()->set_region_id("region:1");
  r.mutable_activate_stable_local_backing()->set_owner_pid(my_pid());
  check_status(h.call(r), errc::unimplemented, "cannot activate stable local backing: it is not implemented yet");
}

TEST_CASE("dispatcher: PublishArtifact without --cluster is FAILED_PRECONDITION", "[daemon][dispatcher]") {
  harness h;
  auto r = h.request();
  r.mutable_publish_artifact()->set_artifact_id("mi2:x");
  r.mutable_publish_artifact()->set_replicas(3);
  auto a = h.call(r);
  check_status(a, errc::failed_precondition, "cannot publish mi2:x: the daemon runs without --cluster");
  CHECK_FALSE(a.response.has_publish_artifact());
}

// ---- logging -------------------------------------------------------------------------------

namespace {

using tensorreg::log_level;
using tensorreg::testing::recording_logger;

dispatcher_options logging_to(recording_logger& log) {
  dispatcher_options options;
  options.log = &log;
  return options;
}

}  // namespace

TEST_CASE("dispatcher: a rejected request is logged at info with its code name, peer pid and id",
          "[daemon][dispatcher]") {
  recording_logger log;
  const peer_credentials peer{4242, getuid(), getgid()};
  harness h(logging_to(log), peer);
  SECTION("an engine error") {
    auto a = h.call(commit(h, "reg_missing"));
    REQUIRE(a.response.status().code() == code(errc::not_found));
    const auto& message = a.response.status().message();
    CHECK_THAT(message, Catch::Contains("reg_missing"));
    CHECK(log.count(log_level::info, "rejected CommitRegisteredArtifact request 1 from pid 4242", "NOT_FOUND",
                    "registration 'reg_missing'", message) == 1);
  }
  SECTION("an owner check") {
    auto r = h.request();
    r.mutable_keep_alive_register_artifact()->set_registration_id("reg_x");
    r.mutable_keep_alive_register_artifact()->set_owner_pid(4243);
    check_status(h.call(r), errc::permission_denied,
                 "cannot keep registration 'reg_x' alive: owner_pid 4243 is not the calling process 4242 (start "
                 "tensorregd with --trust-client-pids to allow it)");
    CHECK(log.count(log_level::info, "rejected KeepAliveRegisterArtifact request 1 from pid 4242",
                    "registration 'reg_x'",
                    "PERMISSION_DENIED: cannot keep registration 'reg_x' alive: owner_pid 4243") == 1);
  }
  SECTION("a connection-level error names request 0") {
    auto out = h.dispatch.handle(*h.conn, frame_in{std::string("\xff\xff\xff", 3), {}});
    REQUIRE(out);
    CHECK(log.count(log_level::info, "rejected unknown request 0 from pid 4242",
                    "INVALID_ARGUMENT: cannot parse request: 3 bytes are not a tensorreg.wire.v1.Request") == 1);
  }
  SECTION("an error mid-stream names the stream's registration") {
    CHECK(h.send(feed_frame(7, "reg_nowhere")));
    CHECK(log.count(log_level::info, "rejected FeedRegisterArtifactStream request 7 from pid 4242",
                    "registration 'reg_nowhere'", "NOT_FOUND") == 1);
  }
  // The reject is also the RPC's debug line.
  CHECK(log.count(log_level::debug, "from pid 4242 uid " + std::to_string(getuid())) == 1);
  CHECK(log.lines().size() == 2);
}

TEST_CASE("dispatcher: each RPC is logged at debug with its method, peer, id, code and time", "[daemon][dispatcher]") {
  recording_logger log;
  harness h(logging_to(log));
  const auto pid = "from pid " + std::to_string(my_pid()) + " uid " + std::to_string(getuid());

  auto begun = h.ok(begin_stable(h));
  const auto id = begun.response.begin_register_artifact().registration_id();
  CHECK(log.count(log_level::debug, "rpc BeginRegisterArtifact request 1 " + pid, "registration '" + id + "'",
                  ": OK in ", " us") == 1);

  // Feed frames the stream goes on after are trace lines; the stream's one answer is the RPC.
  auto f = feed_frame(2, id);
  auto* chunk = f.mutable_feed_register_artifact_stream()->mutable_view_chunk();
  chunk->set_canonical_offset(0);
  chunk->set_data(two_tensors::bytes());
  CHECK_FALSE(h.send(f));
  CHECK(log.count(log_level::trace, "rpc FeedRegisterArtifactStream request 2 " + pid, "registration '" + id + "'",
                  "frame taken in ") == 1);
  CHECK(h.ok(end_of_stream(2)).response.has_feed_register_artifact_stream());
  CHECK(log.count(log_level::debug, "rpc FeedRegisterArtifactStream request 2 " + pid, "registration '" + id + "'",
                  ": OK in ") == 1);
  h.next_id = 3;

  auto committed = h.ok(commit(h, id));
  const auto artifact = committed.response.commit_registered_artifact().artifact_descriptor().artifact_id();
  CHECK(log.count(log_level::debug, "rpc CommitRegisteredArtifact request 3 " + pid,
                  "registration '" + id + "' -> artifact '" + artifact + "'", ": OK in ") == 1);

  auto config = h.request();
  config.mutable_get_server_config();
  h.ok(config);
  CHECK(log.count(log_level::debug, "rpc GetServerConfig request 4 " + pid + ": OK in ") == 1);

  auto index = h.request();
  index.mutable_get_artifact_index_by_id()->set_artifact_id(artifact);
  h.ok(index);
  CHECK(log.count(log_level::debug, "rpc GetArtifactIndexById request 5 " + pid, "artifact '" + artifact + "'") == 1);

  // OK answers are not rejects.
  CHECK(log.count(log_level::info, "") == 0);
  CHECK(log.count(log_level::debug, "rpc ") == 5);
}

TEST_CASE("dispatcher: at info only rejects are logged", "[daemon][dispatcher]") {
  recording_logger log(log_level::info);
  harness h(logging_to(log));
  auto config = h.request();
  config.mutable_get_server_config();
  h.ok(config);
  auto missing = h.request();
  missing.mutable_abort_registered_artifact()->set_registration_id("reg_gone");
  CHECK(h.call(missing).response.status().code() == code(errc::not_found));
  REQUIRE(log.lines().size() == 1);
  CHECK(log.count(log_level::info, "rejected AbortRegisteredArtifact request 2", "registration 'reg_gone'",
                  "NOT_FOUND") == 1);
}

// ---- ownership (DECISIONS §8) ----------------------------------------------------------------

namespace {

// A second connection, from another process of the same uid.
struct stranger {
  explicit stranger(harness& shared)
      : daemon(shared), conn(shared.dispatch.open_connection({getpid() + 1, getuid(), getgid()})) {}
  std::optional<answer> send(const wire::Request& r) {
    auto out = daemon.dispatch.handle(*conn, frame_in{r.SerializeAsString(), {}});
    if (!out) return std::nullopt;
    return parse(*out);
  }
  harness& daemon;
  dispatcher::connection_ptr conn;
};

}  // namespace

TEST_CASE("dispatcher: Feed, Commit, Abort and Revoke of another process's registration are PERMISSION_DENIED",
          "[daemon][dispatcher]") {
  harness h;
  const auto id = begin_stable_id(h);
  stranger s(h);
  const auto denied = [&](const std::string& verb) {
    return "cannot " + verb + " registration '" + id + "': it belongs to pid " + std::to_string(my_pid()) +
           ", not to the calling process " + std::to_string(my_pid() + 1);
  };
  check_status(*s.send(commit(h, id)), errc::permission_denied, denied("commit"));
  auto abort = h.request();
  abort.mutable_abort_registered_artifact()->set_registration_id(id);
  check_status(*s.send(abort), errc::permission_denied, denied("abort"));
  auto revoke = h.request();
  revoke.mutable_revoke_registered_artifact()->set_registration_id(id);
  check_status(*s.send(revoke), errc::permission_denied, denied("revoke"));
  auto feed = feed_frame(h.next_id++, id);
  feed.mutable_feed_register_artifact_stream()->mutable_view_chunk()->set_data("x");
  auto fed = s.send(feed);
  REQUIRE(fed);  // answered at once: the stream failed
  check_status(*fed, errc::permission_denied, denied("feed"));

  // The owner's registration is untouched: it feeds and commits.
  auto chunk = feed_frame(0, id);
  chunk.mutable_feed_register_artifact_stream()->mutable_view_chunk()->set_data(two_tensors::bytes());
  feed_all(h, {chunk});
  CHECK(h.ok(commit(h, id)).response.commit_registered_artifact().has_artifact_descriptor());
}

TEST_CASE("dispatcher: a trusted peer may act on registrations of other pids", "[daemon][dispatcher]") {
  harness h(trusting(true, getuid()));
  const auto id = begin_stable_id(h);
  stranger s(h);
  auto abort = h.request();
  abort.mutable_abort_registered_artifact()->set_registration_id(id);
  auto a = s.send(abort);
  REQUIRE(a);
  CHECK(a->response.status().code() == 0);
}

TEST_CASE("dispatcher: DeregisterArtifact of an artifact another process holds is PERMISSION_DENIED",
          "[daemon][dispatcher]") {
  harness h;
  const auto id = put_chunks(h, 24).artifact_descriptor().artifact_id();
  REQUIRE(put_chunks(h, 24).existed());  // a join held by this process
  stranger s(h);
  auto r = h.request();
  r.mutable_deregister_artifact()->set_artifact_id(id);
  check_status(*s.send(r), errc::permission_denied,
               "cannot deregister " + id + ": it is also held (leases or joins) by pid " + std::to_string(my_pid()) +
                   ", not only by the calling process " + std::to_string(my_pid() + 1));
  // An explicit owner_pid 0 does not make the stranger the daemon.
  r.set_request_id(h.next_id++);
  r.mutable_deregister_artifact()->set_owner_pid(0);
  check_status(*s.send(r), errc::permission_denied,
               "cannot deregister " + id + ": it is also held (leases or joins) by pid " + std::to_string(my_pid()) +
                   ", not only by the calling process " + std::to_string(my_pid() + 1));
  // The holder itself may.
  r.set_request_id(h.next_id++);
  r.mutable_deregister_artifact()->clear_owner_pid();
  CHECK(h.ok(r).response.deregister_artifact().removed());
}

TEST_CASE("dispatcher: a client memfd not sealed against shrinking is FAILED_PRECONDITION", "[daemon][dispatcher]") {
  harness h;
  unique_fd fd(::memfd_create("dispatcher-test", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  REQUIRE(fd);
  REQUIRE(::ftruncate(fd.get(), 4096) == 0);
  auto r = h.request();
  auto* g = r.mutable_register_region();
  g->set_memory_kind(v2::REGION_MEMORY_KIND_HOST_SHARED);
  g->set_owner_pid(my_pid());
  g->set_size_bytes(4096);
  g->mutable_host_shared()->set_attach_token("client-token");
  std::vector<unique_fd> fds;
  fds.push_back(std::move(fd));
  check_status(h.call(r, std::move(fds)), errc::failed_precondition,
               "cannot register region: cannot map shared memory: the memfd lacks the seal F_SEAL_SHRINK, so it could "
               "shrink under the mapping; add it with fcntl(F_ADD_SEALS, F_SEAL_SHRINK) before sending");
}

TEST_CASE("dispatcher: DeregisterArtifact of a stable copy another uid put is PERMISSION_DENIED",
          "[daemon][dispatcher]") {
  // The putter is uid 1000; the tests may run as root, who may remove anything.
  harness h({}, peer_credentials{getpid(), 1000, getgid()});
  const auto id = put_chunks(h, 24).artifact_descriptor().artifact_id();
  auto r = h.request();
  r.mutable_deregister_artifact()->set_artifact_id(id);
  auto other_uid = h.dispatch.open_connection({getpid() + 1, 1001, getgid()});
  const auto refused = h.dispatch.handle(*other_uid, frame_in{r.SerializeAsString(), {}});
  REQUIRE(refused);
  check_status(parse(*refused), errc::permission_denied,
               "cannot deregister " + id +
                   ": its stable DRAM copy was put by uid 1000, not by the calling uid 1001 (only that uid or root may "
                   "remove it)");
  // Another process of the same uid may: the putter may be long gone.
  auto same_uid = h.dispatch.open_connection({getpid() + 2, 1000, getgid()});
  r.set_request_id(h.next_id++);
  const auto done = h.dispatch.handle(*same_uid, frame_in{r.SerializeAsString(), {}});
  REQUIRE(done);
  const auto answered = parse(*done);
  CHECK(answered.response.status().code() == 0);
  CHECK(answered.response.deregister_artifact().removed());
}

TEST_CASE("dispatcher: lane_of sends cheap requests to immediate or control, Feed frames to stream, the rest to work",
          "[daemon][dispatcher]") {
  using tensorreg::daemon::request_lane;
  const auto lane = [](const wire::Request& r) {
    const auto [found, id] = dispatcher::lane_of(frame_in{r.SerializeAsString(), {}});
    CHECK(id == r.request_id());
    return found;
  };
  wire::Request r;
  r.set_request_id(5);
  r.mutable_get_stats();
  CHECK(lane(r) == request_lane::immediate);
  r.mutable_get_server_config();
  CHECK(lane(r) == request_lane::immediate);
  r.mutable_keep_alive_register_artifact()->set_registration_id("reg_1");
  CHECK(lane(r) == request_lane::control);  // it takes the engine mutex: not on the I/O thread
  r.mutable_list_artifacts();
  CHECK(lane(r) == request_lane::control);
  r.mutable_get_artifact_index_by_id()->set_artifact_id("mi2:x");
  CHECK(lane(r) == request_lane::control);
  r.mutable_abort_registered_artifact()->set_registration_id("reg_1");
  CHECK(lane(r) == request_lane::control);
  r.mutable_revoke_registered_artifact()->set_registration_id("reg_1");
  CHECK(lane(r) == request_lane::control);

  r.mutable_commit_registered_artifact()->set_registration_id("reg_1");
  CHECK(lane(r) == request_lane::work);
  r.mutable_begin_register_artifact()->set_total_size(1);
  CHECK(lane(r) == request_lane::work);
  r.mutable_get_artifact_memfd();
  CHECK(lane(r) == request_lane::work);
  r.mutable_deregister_artifact();
  CHECK(lane(r) == request_lane::work);
  r.mutable_publish_artifact()->set_artifact_id("mi2:x");
  CHECK(lane(r) == request_lane::work);  // it waits for the members to pull

  r.mutable_feed_register_artifact_stream()->set_registration_id("reg_1");
  CHECK(lane(r) == request_lane::stream);
  wire::Request end;
  end.set_request_id(5);
  end.set_end_of_stream(true);
  CHECK(lane(end) == request_lane::stream);

  // Frames the dispatcher will refuse go where handle() answers them.
  CHECK(dispatcher::lane_of(frame_in{"\xff\xff\xff", {}}).first == request_lane::work);
  CHECK(dispatcher::lane_of(frame_in{"", {}}).first == request_lane::work);
  wire::Request bodiless;
  bodiless.set_request_id(5);
  CHECK(lane(bodiless) == request_lane::work);
}

// ---- background hash (registration.md §4.8) --------------------------------------------------

namespace {

// A stable_dram put of the artifact under `cgid` in one chunk, committed with
// hash_in_background; returns the commit answer.
answer put_cgid_in_background(harness& h, const std::string& cgid) {
  auto begin = begin_stable(h);
  begin.mutable_begin_register_artifact()->set_client_artifact_id(cgid);
  const auto id = h.ok(begin).response.begin_register_artifact().registration_id();
  auto f = feed_frame(0, id);
  f.mutable_feed_register_artifact_stream()->mutable_view_chunk()->set_data(two_tensors::bytes());
  feed_all(h, {f});
  auto c = commit(h, id);
  c.mutable_commit_registered_artifact()->set_hash_in_background(true);
  return h.call(c);
}

wire::Request wait_hash(harness& h, const std::string& artifact_id, std::uint32_t timeout_ms) {
  auto r = h.request();
  r.mutable_wait_artifact_hash()->set_artifact_id(artifact_id);
  r.mutable_wait_artifact_hash()->set_timeout_ms(timeout_ms);
  return r;
}

}  // namespace

TEST_CASE("dispatcher: a commit with hash_in_background answers HASH_PENDING and WaitArtifactHash the mi2 id",
          "[daemon][dispatcher][background_hash]") {
  harness h;
  auto committed = put_cgid_in_background(h, "cgid:dispatch~1");
  REQUIRE(committed.response.status().code() == 0);
  const auto& c = committed.response.commit_registered_artifact();
  CHECK(c.artifact_descriptor().artifact_id() == "cgid:dispatch~1");
  CHECK(c.hash_state() == v2::HASH_PENDING);

  auto waited = h.ok(wait_hash(h, "cgid:dispatch~1", 0)).response.wait_artifact_hash();
  CHECK(waited.hash_state() == v2::HASH_DONE);
  CHECK(waited.message().empty());
  // The id a plain put of the same bytes gets.
  harness plain;
  const auto mi2 = put_chunks(plain, 24).artifact_descriptor();
  CHECK(waited.mi2_id() == mi2.artifact_id());
  CHECK(waited.data_multihash() == mi2.data_multihash());

  // ListArtifacts shows it; GetArtifactIndexById by the mi2 id reaches the cgid artifact.
  auto listed = h.request();
  listed.mutable_list_artifacts();
  auto list = h.ok(listed).response.list_artifacts();
  REQUIRE(list.artifacts_size() == 1);
  CHECK(list.artifacts(0).verified_id() == mi2.artifact_id());
  CHECK(list.artifacts(0).hash_state() == v2::HASH_DONE);
  auto by_mi2 = h.request();
  by_mi2.mutable_get_artifact_index_by_id()->set_artifact_id(mi2.artifact_id());
  auto index = h.ok(by_mi2).response.get_artifact_index_by_id();
  CHECK(index.artifact_descriptor().artifact_id() == "cgid:dispatch~1");
  CHECK(index.tensor_index_data() == index_json());
}

TEST_CASE("dispatcher: hash_in_background without a cgid is INVALID_ARGUMENT",
          "[daemon][dispatcher][background_hash]") {
  harness h;
  const auto id = begin_stable_id(h);
  auto c = commit(h, id);
  c.mutable_commit_registered_artifact()->set_hash_in_background(true);
  check_status(h.call(c), errc::invalid_argument,
               "cannot commit registration '" + id +
                   "': hash_in_background needs a client_artifact_id (a cgid): an mi2 id is the hash itself, so its "
                   "commit must compute it");
}

TEST_CASE("dispatcher: WaitArtifactHash of an unknown artifact is NOT_FOUND, of a plain cgid HASH_NONE",
          "[daemon][dispatcher][background_hash]") {
  harness h;
  check_status(h.call(wait_hash(h, "cgid:nothing-here", 5)), errc::not_found,
               "cannot wait for the hash of cgid:nothing-here: no such artifact");
  auto begin = begin_stable(h);
  begin.mutable_begin_register_artifact()->set_client_artifact_id("cgid:dispatch~plain");
  const auto id = h.ok(begin).response.begin_register_artifact().registration_id();
  auto f = feed_frame(0, id);
  f.mutable_feed_register_artifact_stream()->mutable_view_chunk()->set_data(two_tensors::bytes());
  feed_all(h, {f});
  CHECK(h.ok(commit(h, id)).response.commit_registered_artifact().hash_state() == v2::HASH_NONE);
  auto none = h.ok(wait_hash(h, "cgid:dispatch~plain", 5)).response.wait_artifact_hash();
  CHECK(none.hash_state() == v2::HASH_NONE);
  CHECK(none.mi2_id().empty());

  using tensorreg::daemon::request_lane;
  const auto [lane, request_id] = dispatcher::lane_of(frame_in{wait_hash(h, "x", 0).SerializeAsString(), {}});
  CHECK(lane == request_lane::work);  // it waits
  CHECK(request_id > 0);
}

// ---- policies that ask for stable copies on other hosts (docs/cluster.md §5) -----------------

namespace {

// A cluster that answers publish() as told and records what it was asked.
struct fake_cluster final : tensorreg::daemon::cluster_hooks {
  void committed(const std::string&) override {}
  tensorreg::status fetch(const std::string&) override { return {}; }
  std::vector<tensorreg::cluster::pull_status> pulls() const override { return {}; }
  tensorreg::result<tensorreg::cluster::publish_status> publish(const std::string& artifact_id, std::uint32_t replicas,
                                                                bool all, std::chrono::milliseconds timeout) override {
    asked.push_back({artifact_id, replicas, all, timeout});
    auto out = answer;
    out.target = replicas;
    return out;
  }
  struct ask {
    std::string artifact_id;
    std::uint32_t replicas;
    bool all;
    std::chrono::milliseconds timeout;
  };
  std::vector<ask> asked;
  tensorreg::cluster::publish_status answer = [] {
    tensorreg::cluster::publish_status a;
    a.members = 8;  // more than any test asks for: "not reached" is the timeout's
    return a;
  }();
};

// A stable_dram tier with `scope` and `min_replicas` in the list `level` of a stable_dram Begin.
wire::Request begin_with_tier(harness& h, const std::string& level, common::PolicyScope scope,
                              std::uint32_t min_replicas) {
  auto r = begin_stable(h);
  auto* p = r.mutable_begin_register_artifact()->mutable_policy();
  auto* t = level == "must" ? p->add_must() : level == "should" ? p->add_should() : p->add_may();
  t->set_tier(common::POLICY_TIER_STABLE_DRAM);
  t->set_scope(scope);
  t->set_min_replicas(min_replicas);
  return r;
}

// Begins the artifact with `begin` and feeds it in one chunk; the registration id.
std::string fed_registration(harness& h, const wire::Request& begin) {
  const auto id = h.ok(begin).response.begin_register_artifact().registration_id();
  auto f = feed_frame(0, id);
  auto* c = f.mutable_feed_register_artifact_stream()->mutable_view_chunk();
  c->set_canonical_offset(0);
  c->set_data(two_tensors::bytes());
  feed_all(h, {f});
  return id;
}

// Puts the artifact through `begin` in one chunk and answers the commit.
answer put_with(harness& h, const wire::Request& begin) { return h.call(commit(h, fed_registration(h, begin))); }

}  // namespace

TEST_CASE("dispatcher: remote replicas without --cluster: should is DEGRADED, must refused at Begin",
          "[daemon][dispatcher][policy]") {
  harness h;
  auto a = put_with(h, begin_with_tier(h, "should", common::POLICY_SCOPE_REMOTE, 2));
  REQUIRE(a.response.status().code() == 0);
  const auto& done = a.response.commit_registered_artifact();
  REQUIRE(done.has_remote_stable_tier());
  CHECK(done.remote_stable_tier().status() == v2::LOCAL_STABLE_TIER_STATUS_DEGRADED);
  CHECK(done.remote_stable_tier().message() == "the policy asks for 3 hosts and the daemon runs without --cluster");

  check_status(h.call(begin_with_tier(h, "must", common::POLICY_SCOPE_REMOTE, 1)), errc::failed_precondition,
               "cannot begin registration: its policy must keep stable copies on 2 hosts and the daemon runs "
               "without --cluster");

  // any 1 is this host: no remote tier, nothing asked.
  auto local = put_with(h, begin_with_tier(h, "should", common::POLICY_SCOPE_ANY, 1));
  REQUIRE(local.response.status().code() == 0);
  CHECK_FALSE(local.response.commit_registered_artifact().has_remote_stable_tier());
}

TEST_CASE("dispatcher: remote replicas are placed through the cluster and reported", "[daemon][dispatcher][policy]") {
  fake_cluster cluster;
  dispatcher_options options;
  options.cluster = &cluster;
  options.replica_timeout = 1500ms;
  harness h(std::move(options));

  SECTION("reached: READY") {
    cluster.answer.holders = {"a", "b", "c"};
    cluster.answer.reached = true;
    auto a = put_with(h, begin_with_tier(h, "should", common::POLICY_SCOPE_REMOTE, 2));
    REQUIRE(a.response.status().code() == 0);
    const auto& done = a.response.commit_registered_artifact();
    REQUIRE(cluster.asked.size() == 1);
    CHECK(cluster.asked[0].artifact_id == done.artifact_descriptor().artifact_id());
    CHECK(cluster.asked[0].replicas == 3);  // remote 2: two others and this host
    CHECK_FALSE(cluster.asked[0].all);
    CHECK(cluster.asked[0].timeout == 1500ms);
    REQUIRE(done.has_remote_stable_tier());
    CHECK(done.remote_stable_tier().status() == v2::LOCAL_STABLE_TIER_STATUS_READY);
    CHECK(done.remote_stable_tier().message() == "3 of 3 hosts hold it");
  }
  SECTION("not reached, should: DEGRADED") {
    cluster.answer.holders = {"a"};
    auto a = put_with(h, begin_with_tier(h, "should", common::POLICY_SCOPE_ANY, 3));
    REQUIRE(a.response.status().code() == 0);
    REQUIRE(cluster.asked.size() == 1);
    CHECK(cluster.asked[0].replicas == 3);  // any 3: this host counted
    const auto& done = a.response.commit_registered_artifact();
    CHECK(done.remote_stable_tier().status() == v2::LOCAL_STABLE_TIER_STATUS_DEGRADED);
    CHECK(done.remote_stable_tier().message() == "1 of 3 hosts hold it after 1500 ms");
  }
  SECTION("a commit's own replica_timeout_ms: shorter is taken, longer is capped at the daemon's") {
    cluster.answer.holders = {"a"};
    auto short_wait = commit(h, fed_registration(h, begin_with_tier(h, "should", common::POLICY_SCOPE_ANY, 3)));
    short_wait.mutable_commit_registered_artifact()->set_replica_timeout_ms(200);
    auto a = h.call(short_wait);
    REQUIRE(a.response.status().code() == 0);
    REQUIRE(cluster.asked.size() == 1);
    CHECK(cluster.asked[0].timeout == 200ms);
    CHECK(a.response.commit_registered_artifact().remote_stable_tier().message() ==
          "1 of 3 hosts hold it after 200 ms");

    auto long_wait = commit(h, fed_registration(h, begin_with_tier(h, "should", common::POLICY_SCOPE_ANY, 3)));
    long_wait.mutable_commit_registered_artifact()->set_replica_timeout_ms(3'600'000);
    REQUIRE(h.call(long_wait).response.status().code() == 0);
    REQUIRE(cluster.asked.size() == 2);
    CHECK(cluster.asked[1].timeout == 1500ms);
  }
  SECTION("may: asked, not waited for") {
    cluster.answer.holders = {"a"};
    auto a = put_with(h, begin_with_tier(h, "may", common::POLICY_SCOPE_REMOTE, 1));
    REQUIRE(a.response.status().code() == 0);
    REQUIRE(cluster.asked.size() == 1);
    CHECK(cluster.asked[0].timeout == 0ms);
    CHECK(a.response.commit_registered_artifact().remote_stable_tier().status() ==
          v2::LOCAL_STABLE_TIER_STATUS_DEGRADED);
  }
  SECTION("not reached, must: the commit fails DEADLINE_EXCEEDED, the artifact stays") {
    cluster.answer.holders = {"a"};
    auto a = put_with(h, begin_with_tier(h, "must", common::POLICY_SCOPE_REMOTE, 1));
    CHECK(a.response.status().code() == code(errc::deadline_exceeded));
    CHECK_THAT(a.response.status().message(),
               Catch::Contains("on 2 hosts: 1 hold it after 1500 ms (it stays committed here"));
    auto list = h.request();
    list.mutable_list_artifacts();
    CHECK(h.ok(list).response.list_artifacts().artifacts_size() == 1);
  }
  SECTION("a cgid: must refused at Begin, should DEGRADED, nothing asked") {
    auto must = begin_with_tier(h, "must", common::POLICY_SCOPE_REMOTE, 1);
    must.mutable_begin_register_artifact()->set_client_artifact_id("cgid:remote~1");
    check_status(h.call(must), errc::invalid_argument,
                 "cannot begin registration: its policy must keep stable copies on 2 hosts and cgid:remote~1 "
                 "is a cgid: only mi2 artifacts are replicated");
    auto should = begin_with_tier(h, "should", common::POLICY_SCOPE_REMOTE, 1);
    should.mutable_begin_register_artifact()->set_client_artifact_id("cgid:remote~1");
    auto a = put_with(h, should);
    REQUIRE(a.response.status().code() == 0);
    CHECK(a.response.commit_registered_artifact().remote_stable_tier().message() ==
          "the policy asks for 2 hosts and only mi2 artifacts are replicated");
    CHECK(cluster.asked.empty());
  }
}
