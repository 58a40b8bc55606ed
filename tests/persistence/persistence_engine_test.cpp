// The engine with a persist directory: tasks, restart recovery, damage, spill, deregister.
#include "tensorreg/registration/engine.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cerrno>
#include <filesystem>
#include <fstream>
#include <thread>
#include <vector>

#include "support/engine_helpers.hpp"
#include "support/fake_clock.hpp"
#include "support/recording_logger.hpp"
#include "support/temp_dir.hpp"
#include "tensorreg/common/fault_injection.hpp"

namespace {

namespace fs = std::filesystem;
namespace reg = tensorreg::registration;
namespace persistence = tensorreg::persistence;
using tensorreg::errc;
using tensorreg::testing::fake_clock;
using tensorreg::testing::model;
using tensorreg::testing::temp_dir;

model one_tensor(std::size_t n, std::uint32_t seed) {
  model m;
  m.storages = {{"s0", tensorreg::testing::pattern(n, seed)}};
  m.tensors = {{"w", "s0", {static_cast<std::int64_t>(n / 4)}, {1}}};
  return m;
}

tensorreg::policy::store_policy profile(tensorreg::policy::profile p,
                                        tensorreg::policy::overflow o = tensorreg::policy::overflow::unspecified) {
  tensorreg::policy::store_policy out;
  out.profile = p;
  out.overflow = o;
  return out;
}

reg::commit_response put(reg::engine& e, const model& m, tensorreg::policy::store_policy policy) {
  auto b = tensorreg::testing::stable_begin(m, ::getpid());
  b.policy = policy;
  auto begun = e.begin(std::move(b));
  REQUIRE(begun);
  REQUIRE(tensorreg::testing::feed_chunks(e, begun->registration_id, m.canonical(), 1 << 20));
  auto done = e.commit(begun->registration_id);
  REQUIRE(done);
  return *done;
}

// The bytes behind a stable replica fd.
std::string read_fd(int fd, std::size_t n) {
  void* p = ::mmap(nullptr, n, PROT_READ, MAP_SHARED, fd, 0);
  REQUIRE(p != MAP_FAILED);
  std::string out(static_cast<const char*>(p), n);
  ::munmap(p, n);
  return out;
}

struct fixture {
  fake_clock clock;
  temp_dir dir;
  std::string root = (dir.path() / "persist").string();

  std::unique_ptr<reg::engine> open(std::uint64_t stable_bytes = 0, tensorreg::logger* log = nullptr) {
    auto o = tensorreg::testing::deterministic_options(clock);
    auto store = persistence::durable_store::open(root);
    REQUIRE(store);
    o.durable = std::move(*store);
    o.stable_bytes = stable_bytes;
    o.verify_persisted_at_start = log != nullptr;  // a test that watches it passes a logger
    if (log != nullptr) o.log = log;
    return tensorreg::testing::make_engine(std::move(o));
  }
};

}  // namespace

TEST_CASE("engine: a DURABLE commit is persisted and a new engine serves it from disk", "[persistence][engine]") {
  fixture f;
  const auto m = one_tensor((std::size_t{5} << 20) + 8, 21);
  std::string id;
  {
    auto e = f.open();
    auto done = put(*e, m, profile(tensorreg::policy::profile::durable));
    id = done.descriptor.artifact_id;
    CHECK(id == tensorreg::testing::expected_mi2(m.index().json(), m.canonical()));
    REQUIRE_FALSE(done.persistence_task_id.empty());
    auto waited = e->wait_persistence(done.persistence_task_id, std::chrono::milliseconds(0));
    REQUIRE(waited);
    CHECK(waited->state == persistence::task_state::success);
    CHECK(waited->progress == 1.0);
    CHECK(waited->artifact_id == id);
    auto got = e->get(id);
    REQUIRE(got);
    CHECK(got->stable_replica);
    CHECK(got->shared_disk);
    // A cache-profile commit starts no task.
    CHECK(put(*e, one_tensor(64, 22), profile(tensorreg::policy::profile::cache)).persistence_task_id.empty());
  }
  auto e = f.open();  // a restart
  auto listed = e->list();
  REQUIRE(listed.size() == 1);
  CHECK(listed[0].descriptor.artifact_id == id);
  CHECK(listed[0].shared_disk);
  CHECK_FALSE(listed[0].stable_replica);
  auto index = e->index_of(id);
  REQUIRE(index);
  CHECK((*index)->json() == m.index().json());
  auto status = e->persistence_status("", id);
  REQUIRE(status);
  CHECK(status->state == persistence::task_state::success);

  auto replica = e->stable_replica_fd(id);  // loads it back into the stable cache
  REQUIRE(replica);
  CHECK(read_fd(replica->second.get(), m.total_size()) == m.canonical());
  auto got = e->get(id);
  REQUIRE(got);
  CHECK(got->stable_replica);
  CHECK(got->shared_disk);
  auto bytes = e->open_bytes(id);
  REQUIRE(bytes);
  CHECK((*bytes)->size() == m.total_size());
}

TEST_CASE("engine: an injected ENOSPC ends the task FAILED with its reason and the artifact stays served",
          "[persistence][engine]") {
  fixture f;
  auto e = f.open();
  const auto m = one_tensor(1 << 20, 23);
  const auto id = put(*e, m, profile(tensorreg::policy::profile::cache)).descriptor.artifact_id;
  {
    tensorreg::scoped_fault full(tensorreg::fault_site::write, ENOSPC, 0, 1000);
    auto started = e->start_persistence(id);
    REQUIRE(started);
    auto waited = e->wait_persistence(started->task_id, std::chrono::milliseconds(0));
    REQUIRE(waited);
    CHECK(waited->state == persistence::task_state::failed);
    CHECK_THAT(waited->last_error, Catch::StartsWith("RESOURCE_EXHAUSTED: cannot persist " + id + ": cannot write '") &&
                                       Catch::EndsWith("index.json': No space left on device"));
  }
  CHECK(std::vector<std::string>{fs::directory_iterator(f.root)->path().filename().string()} ==
        std::vector<std::string>{"quarantine"});
  auto got = e->get(id);
  REQUIRE(got);
  CHECK(got->stable_replica);
  CHECK_FALSE(got->shared_disk);
  CHECK(e->open_bytes(id));
  // The disk has room again: a new task succeeds.
  auto again = e->start_persistence(id);
  REQUIRE(again);
  auto waited = e->wait_persistence(again->task_id, std::chrono::milliseconds(0));
  REQUIRE(waited);
  CHECK(waited->state == persistence::task_state::success);
  CHECK(e->get(id)->shared_disk);
  // Once persisted, starting again answers SUCCESS at once.
  auto done = e->start_persistence(id);
  REQUIRE(done);
  CHECK(done->state == persistence::task_state::success);
}

TEST_CASE("engine: the start-up verification and a restore of the same artifacts both finish",
          "[persistence][engine][concurrency]") {
  fixture f;
  std::vector<std::string> ids;
  std::vector<std::string> canonical;
  {
    auto e = f.open();
    for (int seed = 31; seed < 34; ++seed) {
      const auto m = one_tensor((std::size_t{9} << 20) + 8, seed);
      auto done = put(*e, m, profile(tensorreg::policy::profile::durable));
      REQUIRE(e->wait_persistence(done.persistence_task_id, std::chrono::milliseconds(0)));
      ids.push_back(done.descriptor.artifact_id);
      canonical.push_back(m.canonical());
    }
  }
  tensorreg::testing::recording_logger log;
  auto e = f.open(0, &log);                     // a restart that verifies every persisted leaf in the background
  for (std::size_t i = ids.size(); i-- > 0;) {  // last first, while the verification starts at the first
    auto replica = e->stable_replica_fd(ids[i]);
    REQUIRE(replica);
    CHECK(read_fd(replica->second.get(), canonical[i].size()) == canonical[i]);
  }
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (log.count(tensorreg::log_level::info, "verification of the persist directory done") == 0 &&
         std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  CHECK(log.count(tensorreg::log_level::info, "verification of the persist directory done: 3 good, 0 damaged") == 1);
}

TEST_CASE("engine: persistence of an unknown artifact is NOT_FOUND", "[persistence][engine]") {
  fixture f;
  auto e = f.open();
  auto started = e->start_persistence("mi2:nope");
  REQUIRE_FALSE(started);
  CHECK(started.error().code == errc::not_found);
  CHECK(started.error().message == "cannot start persistence of mi2:nope: no such artifact");
  auto status = e->persistence_status("", "");
  REQUIRE_FALSE(status);
  CHECK(status.error().code == errc::invalid_argument);
  CHECK(status.error().message == "cannot query persistence status: neither task_id nor artifact_id given");
}

TEST_CASE("engine: a damaged persisted copy is DATA_LOSS naming the leaf and never served", "[persistence][engine]") {
  fixture f;
  const auto m = one_tensor(std::size_t{9} << 20, 24);
  std::string id;
  {
    auto e = f.open();
    auto done = put(*e, m, profile(tensorreg::policy::profile::durable));
    id = done.descriptor.artifact_id;
    REQUIRE(e->wait_persistence(done.persistence_task_id, std::chrono::milliseconds(0))->state ==
            persistence::task_state::success);
  }
  {
    std::fstream data(fs::path(f.root) / persistence::durable_store::directory_name(id) / "data.bin",
                      std::ios::in | std::ios::out | std::ios::binary);
    data.seekp((std::int64_t{8} << 20) + 3);  // leaf 2
    data.put('\x00');
    data.seekp((std::int64_t{8} << 20) + 4);
    data.put('\x01');
  }
  auto e = f.open();
  REQUIRE(e->list().size() == 1);
  auto replica = e->stable_replica_fd(id);
  REQUIRE_FALSE(replica);
  CHECK(replica.error().code == errc::data_loss);
  CHECK_THAT(replica.error().message, Catch::Contains("leaf 2 (bytes 8388608..) does not match its XXH3-128"));
  CHECK(e->list().empty());
  CHECK(e->get(id).error().code == errc::not_found);
  CHECK(e->open_bytes(id).error().code == errc::not_found);
}

TEST_CASE("engine: SPILL evicts an entry with a durable copy and the next read loads it back",
          "[persistence][engine]") {
  fixture f;
  const std::size_t n = 1 << 20;
  auto e = f.open(2 * n + n / 2);  // room for two
  const auto spill = profile(tensorreg::policy::profile::durable, tensorreg::policy::overflow::spill);
  std::vector<model> models{one_tensor(n, 31), one_tensor(n, 32), one_tensor(n, 33)};
  std::vector<std::string> ids;
  for (const auto& m : models) {
    auto done = put(*e, m, spill);
    ids.push_back(done.descriptor.artifact_id);
    REQUIRE(e->wait_persistence(done.persistence_task_id, std::chrono::milliseconds(0))->state ==
            persistence::task_state::success);
  }
  CHECK(e->stats().stable_evictions == 1);
  auto first = e->get(ids[0]);
  REQUIRE(first);
  CHECK_FALSE(first->stable_replica);  // spilled
  CHECK(first->shared_disk);
  CHECK(e->list().size() == 3);
  auto replica = e->stable_replica_fd(ids[0]);  // back from disk, spilling the next oldest
  REQUIRE(replica);
  CHECK(read_fd(replica->second.get(), n) == models[0].canonical());
  CHECK(e->get(ids[0])->stable_replica);
  CHECK_FALSE(e->get(ids[1])->stable_replica);
  CHECK(e->stats().stable_evictions == 2);
}

TEST_CASE("engine: SPILL without a durable copy evicts nothing", "[persistence][engine]") {
  fixture f;
  const std::size_t n = 1 << 20;
  auto e = f.open(2 * n + n / 2);
  const auto spill = profile(tensorreg::policy::profile::warm, tensorreg::policy::overflow::spill);
  // warm + spill is refused by the resolver (spill needs a shared_disk tier): use cache-only
  // entries, which are never persisted, and a spilling newcomer.
  (void)spill;
  put(*e, one_tensor(n, 41), profile(tensorreg::policy::profile::cache));
  put(*e, one_tensor(n, 42), profile(tensorreg::policy::profile::cache));
  auto b = tensorreg::testing::stable_begin(one_tensor(n, 43), ::getpid());
  b.policy = profile(tensorreg::policy::profile::durable, tensorreg::policy::overflow::spill);
  auto begun = e->begin(std::move(b));
  REQUIRE(begun);
  REQUIRE(tensorreg::testing::feed_chunks(*e, begun->registration_id, one_tensor(n, 43).canonical(), 1 << 20));
  auto done = e->commit(begun->registration_id);
  REQUIRE_FALSE(done);
  CHECK(done.error().code == errc::resource_exhausted);
  CHECK_THAT(done.error().message, Catch::Contains("could not free enough bytes"));
  CHECK(e->stats().stable_evictions == 0);
}

TEST_CASE("engine: deregister removes the persisted copy too", "[persistence][engine]") {
  fixture f;
  std::string id;
  {
    auto e = f.open();
    auto done = put(*e, one_tensor(4096, 51), profile(tensorreg::policy::profile::durable));
    id = done.descriptor.artifact_id;
    REQUIRE(e->wait_persistence(done.persistence_task_id, std::chrono::milliseconds(0))->state ==
            persistence::task_state::success);
  }
  auto e = f.open();  // held on disk only
  reg::deregister_request r;
  r.artifact_id = id;
  auto gone = e->deregister(r);
  REQUIRE(gone);
  CHECK(gone->removed);
  CHECK(e->list().empty());
  CHECK_FALSE(fs::exists(fs::path(f.root) / persistence::durable_store::directory_name(id)));
}
