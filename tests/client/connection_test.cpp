// tensorreg::client against a real tensorregd on a fresh socket: library types in and out,
// leases kept alive and released, and the daemon's errors passed through with their code and
// message.
#include "tensorreg/client/connection.hpp"

#include <catch2/catch.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <thread>

#include "support/client_helpers.hpp"
#include "support/daemon_process.hpp"
#include "support/safetensors_writer.hpp"
#include "support/temp_dir.hpp"
#include "tensorreg/common/thread_pool.hpp"

namespace {

using namespace tensorreg;
using client::connection;
using testing::connect;
using testing::daemon_process;
using testing::offline_id;

std::unique_ptr<index::safetensors_bundle> small_bundle(const testing::temp_dir& dir, std::uint32_t seed) {
  const auto path = dir.path() / ("model-" + std::to_string(seed) + ".safetensors");
  testing::write_safetensors(path, {{"w", "F32", {1024}, testing::pattern_bytes(4096, seed)},
                                    {"b", "BF16", {3}, testing::pattern_bytes(6, seed + 1)}});
  return index::safetensors_bundle::open({path.string()}).value();
}

// The inode of the daemon's publish memfd while this process holds an fd of it (during a put).
std::optional<ino_t> publish_memfd_inode() {
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    const auto target = std::filesystem::read_symlink(entry.path(), ec);
    if (ec || !target.string().starts_with("/memfd:tensorreg-publish")) continue;
    struct stat st {};
    if (::stat(entry.path().c_str(), &st) == 0) return st.st_ino;
  }
  return std::nullopt;
}

// The lines of /proc/self/maps that map a daemon's publish memfd.
std::vector<std::string> publish_mappings() {
  std::ifstream maps("/proc/self/maps");
  std::vector<std::string> found;
  for (std::string line; std::getline(maps, line);) {
    if (line.find("memfd:tensorreg-publish") != std::string::npos) found.push_back(line);
  }
  return found;
}

}  // namespace

TEST_CASE("client connection: a put's memfd is kept as the replica with no copy and no mapping left here",
          "[client][connection][concurrency]") {
  daemon_process d;
  testing::temp_dir dir;
  // Several 4 MiB leaves (written on all cores) and PAD
  // between tensors of odd sizes.
  const auto path = dir.path() / "model.safetensors";
  testing::write_safetensors(path, {{"a", "BF16", {3}, testing::pattern_bytes(6, 1)},
                                    {"big", "F32", {(9 << 20) / 4 + 3}, testing::pattern_bytes((9 << 20) + 12, 2)},
                                    {"b", "U8", {5}, testing::pattern_bytes(5, 3)},
                                    {"big2", "F32", {(5 << 20) / 4}, testing::pattern_bytes(5 << 20, 4)}});
  auto bundle = index::safetensors_bundle::open({path.string()}).value();
  auto c = connect(d);
  const auto before = c.stats();
  REQUIRE(before);

  std::optional<ino_t> publish;
  std::uint64_t progressed = 0;
  client::put_options options{"cache", [&](std::uint64_t done, std::uint64_t) {
                                progressed = done;
                                if (!publish) publish = publish_memfd_inode();
                              }};
  options.hand_over_files = false;  // the memfd path (a put from files has its own tests)
  auto put = c.put(*bundle, options);
  REQUIRE(put);
  CHECK_FALSE(put->existed);
  CHECK(progressed == bundle->index().total_size());
  CHECK(put->descriptor.artifact_id == offline_id(*bundle));
  // Nothing of the memfd is left here: no fd, no mapping (a writable one would have kept the
  // daemon from sealing it).
  CHECK_FALSE(publish_memfd_inode());
  CHECK(publish_mappings().empty());

  // Kept, not copied: the replica is the very memfd the client wrote, and the daemon copied
  // no byte (it hashed each once).
  const auto after = c.stats();
  REQUIRE(after);
  CHECK(after->bytes_copied == before->bytes_copied);
  CHECK(after->bytes_hashed - before->bytes_hashed == bundle->index().total_size());
  auto replica = c.get(put->descriptor.artifact_id);
  REQUIRE(replica);
  struct stat st {};
  REQUIRE(::fstat(replica->memory.fd(), &st) == 0);
  REQUIRE(publish);
  CHECK(st.st_ino == *publish);
  std::vector<std::byte> expected(bundle->index().total_size());
  REQUIRE(bundle->canonical().read(0, expected));
  REQUIRE(replica->memory.size() == expected.size());
  CHECK(std::memcmp(replica->memory.bytes().data(), expected.data(), expected.size()) == 0);
}

TEST_CASE("client connection: put, then get, index, list and stats answer in library types", "[client][connection]") {
  daemon_process d;
  testing::temp_dir dir;
  auto bundle = small_bundle(dir, 1);
  auto c = connect(d);
  CHECK(c.socket_path() == d.socket_path());

  std::uint64_t progressed = 0;
  auto put = c.put(*bundle, {"cache", [&](std::uint64_t done, std::uint64_t) { progressed = done; }});
  REQUIRE(put);
  CHECK_FALSE(put->existed);
  CHECK(put->descriptor.artifact_id == offline_id(*bundle));
  CHECK(put->descriptor.id_kind == identity::id_kind::mi2);
  CHECK(put->descriptor.total_size == bundle->index().total_size());
  CHECK(progressed == bundle->index().total_size());
  CHECK(put->registration_id.starts_with("reg"));

  auto again = c.put(*bundle);
  REQUIRE(again);
  CHECK(again->existed);

  auto replica = c.get(put->descriptor.artifact_id);
  REQUIRE(replica);
  CHECK(replica->descriptor.artifact_id == put->descriptor.artifact_id);
  CHECK(replica->index_json == bundle->index().json());
  REQUIRE(replica->memory.size() == bundle->index().total_size());
  std::vector<std::byte> expected(bundle->index().total_size());
  thread_pool pool(1);
  REQUIRE(memory::copy_in_chunks(bundle->canonical(), expected, 4096, pool,
                                 [](std::size_t, std::uint64_t, std::uint64_t) {}));
  CHECK(std::memcmp(replica->memory.bytes().data(), expected.data(), expected.size()) == 0);

  auto idx = c.index(put->descriptor.artifact_id);
  REQUIRE(idx);
  CHECK(idx->descriptor.artifact_id == put->descriptor.artifact_id);
  CHECK(idx->descriptor.index_multihash == put->descriptor.index_multihash);
  CHECK(idx->index_json == bundle->index().json());

  auto listed = c.list();
  REQUIRE(listed);
  REQUIRE(listed->size() == 1);
  CHECK((*listed)[0].descriptor.artifact_id == put->descriptor.artifact_id);
  CHECK((*listed)[0].tiers == std::vector<client::tier>{client::tier::stable_dram});
  CHECK(client::tier_name((*listed)[0].tiers[0]) == "stable_dram");

  auto stats = c.stats();
  REQUIRE(stats);
  CHECK(stats->artifacts == 1);
  CHECK(stats->pending_registrations == 0);
  CHECK(stats->connections >= 1);
  REQUIRE(stats->tiers.size() == 1);
  CHECK(stats->tiers[0].where == client::tier::stable_dram);
  CHECK(stats->tiers[0].bytes == bundle->index().total_size());

  auto config = c.config();
  REQUIRE(config);
  CHECK(config->phase == client::startup_phase::ready);
  CHECK(config->artifact_chunk_bytes > 0);

  auto gone = c.deregister(put->descriptor.artifact_id);
  REQUIRE(gone);
  CHECK(gone->removed);
  auto after = c.list();
  REQUIRE(after);
  CHECK(after->empty());
}

TEST_CASE("client connection: reuse_held answers a put of held content with nothing uploaded", "[client][connection]") {
  daemon_process d;
  testing::temp_dir dir;
  auto first = small_bundle(dir, 1);
  auto other = small_bundle(dir, 7);  // the same layout (index), other bytes
  REQUIRE(first->index().json() == other->index().json());
  auto c = connect(d);
  auto put = c.put(*first, {"cache", {}});
  REQUIRE(put);

  client::put_options reuse;
  reuse.reuse_held = true;
  reuse.hand_over_files = false;  // with files handed over the daemon does this instead
  std::uint64_t written = 0;
  reuse.progress = [&](std::uint64_t done, std::uint64_t) { written = done; };
  auto again = c.put(*first, reuse);
  REQUIRE(again);
  CHECK(again->existed);
  CHECK(again->registration_id.empty());  // no registration: nothing was sent
  CHECK(written == 0);
  CHECK(again->descriptor.artifact_id == put->descriptor.artifact_id);

  // Same index, other bytes: hashed here, not held, so uploaded as usual.
  auto fresh = c.put(*other, reuse);
  REQUIRE(fresh);
  CHECK_FALSE(fresh->existed);
  CHECK(fresh->registration_id.starts_with("reg"));
  CHECK(written == other->index().total_size());
  CHECK(fresh->descriptor.artifact_id == offline_id(*other));

  // A policy is a join the daemon must see: then the bytes go up again, as without the option.
  reuse.profile = "cache";
  auto with_policy = c.put(*first, reuse);
  REQUIRE(with_policy);
  CHECK(with_policy->existed);
  CHECK(with_policy->registration_id.starts_with("reg"));
}

TEST_CASE("client connection: a lease keeps itself alive past its TTL, release revokes it and frees its region",
          "[client][connection]") {
  daemon_process d;
  testing::temp_dir dir;
  auto bundle = small_bundle(dir, 2);
  auto c = connect(d);
  auto held = c.register_lease(*bundle, 2000);  // keep-alive every ~1 s
  REQUIRE(held);
  CHECK(held->info().descriptor.artifact_id == offline_id(*bundle));
  CHECK(held->region_ids().size() == 1);
  std::this_thread::sleep_for(std::chrono::milliseconds(3300));  // past the TTL
  CHECK(held->keepalives_sent() >= 2);
  auto during = c.stats();
  REQUIRE(during);
  CHECK(during->leases == 1);
  CHECK(during->regions == 1);
  auto listed = c.list();
  REQUIRE(listed);
  REQUIRE(listed->size() == 1);
  CHECK((*listed)[0].tiers == std::vector<client::tier>{client::tier::vram_leased});
  CHECK((*listed)[0].lease_count == 1);

  // A lease only: no stable replica to get.
  auto get = c.get(held->info().descriptor.artifact_id);
  REQUIRE_FALSE(get);
  CHECK(get.error().code == errc::failed_precondition);

  // Moving a lease moves its keep-alive; releasing twice is harmless.
  client::lease moved = std::move(*held);
  REQUIRE(moved.release());
  REQUIRE(moved.release());
  auto after = c.stats();
  REQUIRE(after);
  CHECK(after->leases == 0);
  CHECK(after->regions == 0);
}

TEST_CASE("client connection: a lease the daemon refuses leaves no region behind", "[client][connection]") {
  daemon_process d;
  testing::temp_dir dir;
  auto bundle = small_bundle(dir, 3);
  auto c = connect(d);
  auto held = c.register_lease(*bundle, 0);
  REQUIRE(held);
  // The same bytes again on the same device: refused at Commit, after the region was made.
  for (int attempt = 0; attempt < 3; ++attempt) {
    auto again = c.register_lease(*bundle, 0);
    REQUIRE_FALSE(again);
    CHECK(again.error().code == errc::already_exists);
    CHECK_THAT(again.error().message, Catch::Contains("lease already exists for artifact on device"));
  }
  auto stats = c.stats();
  REQUIRE(stats);
  CHECK(stats->regions == 1);
  CHECK(stats->leases == 1);
  CHECK(stats->pending_registrations == 0);
}

TEST_CASE("client connection: the daemon's errors come back with its code and message", "[client][connection]") {
  daemon_process d;
  auto c = connect(d);
  auto missing = c.index("mi2:none");
  REQUIRE_FALSE(missing);
  CHECK(missing.error().code == errc::not_found);
  CHECK(missing.error().message.find("mi2:none") != std::string::npos);

  // Revoke is idempotent: an unknown registration is OK; abort is not.
  CHECK(c.revoke("reg_nope"));
  auto abort = c.abort("reg_nope");
  REQUIRE_FALSE(abort);
  CHECK(abort.error().code == errc::not_found);
  CHECK(abort.error().message.find("reg_nope") != std::string::npos);

  auto deregister = c.deregister("mi2:none");
  REQUIRE_FALSE(deregister);
  CHECK(deregister.error().code == errc::not_found);

  auto open = c.open_device("mi2:none");
  REQUIRE_FALSE(open);
  CHECK(open.error().code == errc::not_found);

  // A daemon without --cluster cannot publish (docs/cluster.md §5).
  auto publish = c.publish("mi2:none", 2);
  REQUIRE_FALSE(publish);
  CHECK(publish.error().code == errc::failed_precondition);
  CHECK(publish.error().message == "cannot publish mi2:none: the daemon runs without --cluster");

  testing::temp_dir dir;
  auto bundle = small_bundle(dir, 3);
  auto profile = c.put(*bundle, {"no-such-profile", {}});
  REQUIRE_FALSE(profile);
  CHECK(profile.error().code == errc::invalid_argument);
  CHECK(profile.error().message.find("no-such-profile") != std::string::npos);
}

TEST_CASE("client connection: connecting where no daemon listens is UNAVAILABLE naming the path",
          "[client][connection]") {
  testing::temp_dir dir;
  const auto path = (dir.path() / "nobody.sock").string();
  auto c = connection::connect(path);
  REQUIRE_FALSE(c);
  CHECK(c.error().code == errc::unavailable);
  CHECK(c.error().message.find(path) != std::string::npos);
}

TEST_CASE("client connection: register_cuda without CUDA in this build is FAILED_PRECONDITION",
          "[client][connection]") {
  if (connection::cuda_supported()) return;  // the GPU suite covers CUDA builds
  daemon_process d;
  auto c = connect(d);
  const std::vector<client::cuda_tensor> tensors = {{"w", 0x1000, 16, "torch.float32", {4}, {1}, 0}};
  auto held = c.register_cuda(tensors);
  REQUIRE_FALSE(held);
  CHECK(held.error() ==
        error{errc::failed_precondition,
              "cannot register CUDA tensors: this tensorreg client was built without CUDA (TENSORREG_CUDA=OFF)"});
  auto stats = c.stats();
  REQUIRE(stats);
  CHECK(stats->pending_registrations == 0);
  CHECK(stats->regions == 0);
}

TEST_CASE("client connection: a call after the daemon closed an idle connection goes out on a new one",
          "[client][connection]") {
  daemon_process d({"--idle-timeout-ms", "200"});
  auto c = connect(d);
  REQUIRE(c.stats());
  // Past the idle timeout the daemon has answered request 0 and closed this connection.
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
  auto again = c.stats();
  INFO((again ? std::string("ok") : again.error().message));
  CHECK(again.has_value());
}
