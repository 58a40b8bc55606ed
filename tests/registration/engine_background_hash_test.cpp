// The background data hash of a cgid artifact (registration.md §4.8; DECISIONS §5.17): the
// commit answers before the hash, the artifact is usable by its cgid meanwhile, the mi2 id
// follows and becomes an alias, and a revoke, an owner's exit or a deregister stops the hash
// with no read of the lease after it returns. The hash is held on a gate in the leased bytes.
#include "tensorreg/registration/engine.hpp"

#include <catch2/catch.hpp>

#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>

#include "support/engine_helpers.hpp"

namespace {

using namespace tensorreg;
using namespace tensorreg::registration;
using tensorreg::testing::fake_clock;
namespace t = tensorreg::testing;
using std::chrono::milliseconds;

const std::int32_t me = static_cast<std::int32_t>(::getpid());

// Leased bytes whose every read waits while the gate is closed, counting the reads.
class gated_bytes final : public memory::byte_source {
 public:
  explicit gated_bytes(std::string bytes) : bytes_(std::move(bytes)) {}
  [[nodiscard]] std::uint64_t size() const noexcept override { return bytes_.size(); }
  [[nodiscard]] status visit(std::uint64_t offset, std::uint64_t length, memory::piece_sink sink) const override {
    {
      std::unique_lock lock(mutex_);
      ++entered_;
      changed_.notify_all();
      changed_.wait(lock, [&] { return open_; });
    }
    return t::owned_bytes(bytes_).visit(offset, length, sink);
  }
  void open() {
    std::lock_guard lock(mutex_);
    open_ = true;
    changed_.notify_all();
  }
  // Waits for the first read to begin.
  void wait_entered() const {
    std::unique_lock lock(mutex_);
    changed_.wait(lock, [&] { return entered_ > 0; });
  }
  [[nodiscard]] std::size_t reads() const {
    std::lock_guard lock(mutex_);
    return entered_;
  }

 private:
  std::string bytes_;
  mutable std::mutex mutex_;
  mutable std::condition_variable changed_;
  mutable std::size_t entered_ = 0;
  bool open_ = false;
};

// Opens the gate when the test ends, before the engine (declared earlier) goes: the engine
// waits for its hashes, which wait for the gate.
struct open_at_exit {
  gated_bytes& gate;
  ~open_at_exit() { gate.open(); }
};

// One 12 MiB float32 storage: three 4 MiB leaves.
t::model three_leaves() {
  t::model m;
  const std::uint64_t bytes = 12u << 20;
  m.storages = {{"s0", t::pattern(bytes, 7)}};
  m.tensors = {{"w", "s0", {static_cast<std::int64_t>(bytes / 4)}, {1}, "torch.float32", 0, bytes}};
  return m;
}

// Begin (with `cgid`) and feed `m`, every storage read through `gate` when given.
std::string begin_and_feed(engine& e, const t::model& m, const std::string& cgid,
                           const std::shared_ptr<gated_bytes>& gate, std::uint32_t ttl_ms = 0) {
  auto b = t::lip_begin(m.total_size(), me, ttl_ms);
  b.client_artifact_id = cgid;
  auto begun = e.begin(std::move(b));
  REQUIRE_OK(begun);
  std::map<std::string, storage_entry> entries;
  for (const auto& s : m.storages) {
    storage_entry entry;
    entry.storage_id = s.id;
    entry.storage_length = s.bytes.size();
    entry.source = host_storage_source{gate ? std::shared_ptr<const memory::byte_source>(gate)
                                            : std::make_shared<t::owned_bytes>(s.bytes)};
    entries.emplace(s.id, std::move(entry));
  }
  REQUIRE_OK(e.feed(t::lip_feed(begun->registration_id, m, entries)));
  return begun->registration_id;
}

const commit_options in_background = [] {
  commit_options how;
  how.hash_in_background = true;
  return how;
}();

// Polls `done` every millisecond for up to 10 s: for a state another thread reaches.
bool eventually(const std::function<bool()>& done) {
  for (int i = 0; i < 10'000; ++i) {
    if (done()) return true;
    std::this_thread::sleep_for(milliseconds(1));
  }
  return done();
}

}  // namespace

TEST_CASE("engine: a background-hash commit answers pending and its cgid is usable before the hash",
          "[registration][engine][background_hash]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto gate = std::make_shared<gated_bytes>(m.storage("s1").bytes);
  const open_at_exit opener{*gate};
  // Both storages through the gate: b's bytes (s1) and v/w's (s0) differ, so gate only s1.
  auto b = t::lip_begin(m.total_size(), me);
  b.client_artifact_id = "cgid:sync~v1";
  auto begun = e->begin(std::move(b));
  REQUIRE_OK(begun);
  std::map<std::string, storage_entry> entries;
  for (const auto& s : m.storages) {
    storage_entry entry;
    entry.storage_id = s.id;
    entry.storage_length = s.bytes.size();
    entry.source = host_storage_source{s.id == "s1" ? std::shared_ptr<const memory::byte_source>(gate)
                                                    : std::make_shared<t::owned_bytes>(s.bytes)};
    entries.emplace(s.id, std::move(entry));
  }
  REQUIRE_OK(e->feed(t::lip_feed(begun->registration_id, m, entries)));

  auto committed = e->commit(begun->registration_id, in_background);
  REQUIRE_OK(committed);
  CHECK(committed->hash == hash_state::pending);
  CHECK(committed->descriptor.artifact_id == "cgid:sync~v1");
  CHECK(committed->descriptor.data_multihash.empty());

  // Usable by its cgid while the hash waits on the gate.
  auto got = e->get("cgid:sync~v1");
  REQUIRE_OK(got);
  CHECK(got->leases == 1);
  CHECK(got->hash == hash_state::pending);
  CHECK(got->verified_id.empty());
  REQUIRE_OK(e->index_of("cgid:sync~v1"));
  REQUIRE_OK(e->open_bytes("cgid:sync~v1"));

  auto waited = e->wait_artifact_hash("cgid:sync~v1", milliseconds(20));
  REQUIRE_OK(waited);
  CHECK(waited->state == hash_state::pending);  // a timeout is an answer, not an error
  CHECK(waited->mi2_id.empty());

  gate->open();
  auto done = e->wait_artifact_hash("cgid:sync~v1", milliseconds(0));
  REQUIRE_OK(done);
  CHECK(done->state == hash_state::done);
  // The mi2 id a normal commit of the same bytes gives.
  const auto expected = t::expected_mi2(t::small_model_json, m.canonical());
  CHECK(done->mi2_id == expected);
  CHECK(done->message.empty());
  auto other = t::make_engine(clock);
  auto normal = t::register_lip(*other, m, me);
  REQUIRE_OK(normal);
  CHECK(normal->descriptor.artifact_id == done->mi2_id);
  CHECK(normal->hash == hash_state::none);
  CHECK(done->data_multihash == normal->descriptor.data_multihash);

  // Recorded on the artifact, and its mi2 id resolves to it (an alias).
  auto listed = e->list();
  REQUIRE(listed.size() == 1);
  CHECK(listed[0].verified_id == expected);
  CHECK(listed[0].hash == hash_state::done);
  auto by_mi2 = e->get(expected);
  REQUIRE_OK(by_mi2);
  CHECK(by_mi2->descriptor.artifact_id == "cgid:sync~v1");
  REQUIRE_OK(e->index_of(expected));
  auto again = e->wait_artifact_hash(expected, milliseconds(0));
  REQUIRE_OK(again);
  CHECK(again->state == hash_state::done);
  CHECK(again->mi2_id == expected);

  // Revoking the cgid's lease removes the alias with the artifact.
  CHECK(e->revoke(begun->registration_id, "test"));
  CHECK_ERROR(e->get(expected), errc::not_found, "cannot find artifact " + expected + ": not held here");
}

TEST_CASE("engine: hash_in_background without a cgid is INVALID_ARGUMENT and leaves the registration open",
          "[registration][engine][background_hash]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  const auto id = begin_and_feed(*e, m, "", nullptr);
  CHECK_ERROR(e->commit(id, in_background), errc::invalid_argument,
              "cannot commit registration '" + id +
                  "': hash_in_background needs a client_artifact_id (a cgid): an mi2 id is the hash itself, so "
                  "its commit must compute it");
  auto committed = e->commit(id);
  REQUIRE_OK(committed);
  CHECK(committed->descriptor.artifact_id == t::expected_mi2(t::small_model_json, m.canonical()));
}

TEST_CASE("engine: wait_artifact_hash answers NOT_FOUND, none for a plain cgid, done for an mi2 artifact",
          "[registration][engine][background_hash]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  CHECK_ERROR(e->wait_artifact_hash("cgid:nobody", milliseconds(0)), errc::not_found,
              "cannot wait for the hash of cgid:nobody: no such artifact");

  const auto plain = begin_and_feed(*e, m, "cgid:plain", nullptr);
  auto committed = e->commit(plain);
  REQUIRE_OK(committed);
  CHECK(committed->hash == hash_state::none);
  auto none = e->wait_artifact_hash("cgid:plain", milliseconds(0));
  REQUIRE_OK(none);
  CHECK(none->state == hash_state::none);
  CHECK(none->mi2_id.empty());

  auto mi2 = t::register_lip(*e, m, me);
  REQUIRE_OK(mi2);
  auto done = e->wait_artifact_hash(mi2->descriptor.artifact_id, milliseconds(0));
  REQUIRE_OK(done);
  CHECK(done->state == hash_state::done);
  CHECK(done->mi2_id == mi2->descriptor.artifact_id);
  CHECK(done->data_multihash == mi2->descriptor.data_multihash);
  // An mi2 artifact held itself wins over the cgid alias of the same bytes.
  const auto bg = begin_and_feed(*e, m, "cgid:also", nullptr);
  REQUIRE_OK(e->commit(bg, in_background));
  auto also = e->wait_artifact_hash("cgid:also", milliseconds(0));
  REQUIRE_OK(also);
  CHECK(also->mi2_id == mi2->descriptor.artifact_id);
  auto by_mi2 = e->get(mi2->descriptor.artifact_id);
  REQUIRE_OK(by_mi2);
  CHECK(by_mi2->descriptor.artifact_id == mi2->descriptor.artifact_id);
}

TEST_CASE("engine: a revoke mid-hash fails the hash and no byte of the lease is read after it returns",
          "[registration][engine][background_hash][concurrency]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = three_leaves();
  auto gate = std::make_shared<gated_bytes>(m.storages[0].bytes);
  const open_at_exit opener{*gate};
  const auto id = begin_and_feed(*e, m, "cgid:sync~v2", gate);
  auto committed = e->commit(id, in_background);
  REQUIRE_OK(committed);
  REQUIRE(committed->hash == hash_state::pending);
  gate->wait_entered();  // the hash is reading a leaf now

  std::atomic<bool> returned{false};
  std::size_t reads_at_return = 0;
  bool revoked = false;
  std::thread revoker([&] {
    revoked = e->revoke(id, "test");
    reads_at_return = gate->reads();
    returned = true;
  });
  // The lease is gone (and its hash cancelled) first; the revoke then waits for the leaf being
  // read: give it time to be wrongly done.
  REQUIRE(eventually([&] { return !e->get("cgid:sync~v2"); }));
  std::this_thread::sleep_for(milliseconds(20));
  const bool returned_while_reading = returned.load();
  gate->open();
  revoker.join();
  CHECK_FALSE(returned_while_reading);
  CHECK(revoked);

  auto failed = e->wait_artifact_hash("cgid:sync~v2", milliseconds(0));
  REQUIRE_OK(failed);
  CHECK(failed->state == hash_state::failed);
  CHECK(failed->message == "cannot hash cgid:sync~v2: cancelled: lease " + id + " was revoked");
  CHECK(failed->mi2_id.empty());
  CHECK(gate->reads() == reads_at_return);  // nothing read after the revoke returned
  CHECK(reads_at_return < 3);               // the leaves not started were never read
  CHECK_CODE(e->get("cgid:sync~v2"), errc::not_found);
}

TEST_CASE("engine: the owner's exit mid-hash fails the hash with the reason",
          "[registration][engine][background_hash][concurrency]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = three_leaves();
  auto gate = std::make_shared<gated_bytes>(m.storages[0].bytes);
  const open_at_exit opener{*gate};
  const auto id = begin_and_feed(*e, m, "cgid:sync~v3", gate);
  REQUIRE_OK(e->commit(id, in_background));
  gate->wait_entered();
  std::thread exiting([&] { e->release_owner(me); });
  REQUIRE(eventually([&] { return !e->get("cgid:sync~v3"); }));  // cancelled with it, before the hash ends
  gate->open();
  exiting.join();
  auto failed = e->wait_artifact_hash("cgid:sync~v3", milliseconds(0));
  REQUIRE_OK(failed);
  CHECK(failed->state == hash_state::failed);
  CHECK(failed->message == "cannot hash cgid:sync~v3: cancelled: lease " + id + " ended: its owner (pid " +
                               std::to_string(me) + ") exited");
}

TEST_CASE("engine: a deregister mid-hash fails the hash before it drains",
          "[registration][engine][background_hash][concurrency]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = three_leaves();
  auto gate = std::make_shared<gated_bytes>(m.storages[0].bytes);
  const open_at_exit opener{*gate};
  const auto id = begin_and_feed(*e, m, "cgid:sync~v4", gate);
  REQUIRE_OK(e->commit(id, in_background));
  gate->wait_entered();
  result<deregister_response> gone = fail(errc::unknown, "not run");
  std::thread deregistering([&] {
    deregister_request r;
    r.artifact_id = "cgid:sync~v4";
    gone = e->deregister(r);
  });
  REQUIRE(eventually([&] {
    auto a = e->get("cgid:sync~v4");
    return a && a->quiesced;  // quiesce cancels the hash
  }));
  gate->open();
  deregistering.join();
  REQUIRE_OK(gone);
  CHECK(gone->removed);
  auto failed = e->wait_artifact_hash("cgid:sync~v4", milliseconds(0));
  REQUIRE_OK(failed);
  CHECK(failed->state == hash_state::failed);
  CHECK(failed->message == "cannot hash cgid:sync~v4: cancelled: cgid:sync~v4 is being deregistered");
}

TEST_CASE("engine: a waiter of a hash in progress is answered when the hash ends",
          "[registration][engine][background_hash][concurrency]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = three_leaves();
  auto gate = std::make_shared<gated_bytes>(m.storages[0].bytes);
  const open_at_exit opener{*gate};
  const auto id = begin_and_feed(*e, m, "cgid:sync~v5", gate);
  REQUIRE_OK(e->commit(id, in_background));
  result<hash_status> waited = fail(errc::unknown, "not run");
  std::thread waiter([&] { waited = e->wait_artifact_hash("cgid:sync~v5", milliseconds(0)); });
  gate->open();
  waiter.join();
  REQUIRE_OK(waited);
  CHECK(waited->state == hash_state::done);
  CHECK(waited->mi2_id == t::expected_mi2(m.index().json(), m.canonical()));
}

TEST_CASE("engine: a lease that expires mid-hash fails the hash with the reason",
          "[registration][engine][background_hash][concurrency]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = three_leaves();
  auto gate = std::make_shared<gated_bytes>(m.storages[0].bytes);
  const open_at_exit opener{*gate};
  const auto id = begin_and_feed(*e, m, "cgid:sync~v6", gate, 1000);
  REQUIRE_OK(e->commit(id, in_background));
  gate->wait_entered();
  clock.advance(std::chrono::milliseconds(1001));
  std::thread sweeping([&] { e->sweep(); });
  REQUIRE(eventually([&] { return !e->get("cgid:sync~v6"); }));
  gate->open();
  sweeping.join();
  auto failed = e->wait_artifact_hash("cgid:sync~v6", milliseconds(0));
  REQUIRE_OK(failed);
  CHECK(failed->state == hash_state::failed);
  CHECK(failed->message == "cannot hash cgid:sync~v6: cancelled: lease " + id + " expired: its TTL passed");
  CHECK_CODE(e->get("cgid:sync~v6"), errc::not_found);
}

TEST_CASE("engine: a second background-hash commit of the same cgid shares the hash that is done",
          "[registration][engine][background_hash]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto first = begin_and_feed(*e, m, "cgid:shared", nullptr);
  REQUIRE_OK(e->commit(first, in_background));
  auto done = e->wait_artifact_hash("cgid:shared", milliseconds(0));
  REQUIRE_OK(done);
  REQUIRE(done->state == hash_state::done);
  // A lease on another device of the same cgid: it joins the artifact and its hash.
  auto b = t::lip_begin(m.total_size(), me);
  b.client_artifact_id = "cgid:shared";
  b.device_id = 1;
  auto begun = e->begin(std::move(b));
  REQUIRE_OK(begun);
  REQUIRE_OK(e->feed(t::lip_feed(begun->registration_id, m)));
  auto second = e->commit(begun->registration_id, in_background);
  REQUIRE_OK(second);
  CHECK(second->hash == hash_state::done);
}
