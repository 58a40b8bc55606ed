// Lifecycle (registration.md §4.3.1–2, §4.4, §4.6, §5.3; DECISIONS §5.6, §5.16): expiry and
// keep-alive, abort, revoke, the TTL sweep, owner death, idempotent joins, deregister, the
// catalogue and stats, and many registrations at once.
#include "tensorreg/registration/engine.hpp"

#include <catch2/catch.hpp>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "support/child_process.hpp"
#include "support/engine_helpers.hpp"

namespace {

using namespace tensorreg;
using namespace tensorreg::registration;
using std::chrono::milliseconds;
using tensorreg::testing::fake_clock;
namespace t = tensorreg::testing;

const std::int32_t me = static_cast<std::int32_t>(::getpid());

std::uint32_t region_refs(engine& e, const std::string& region_id, std::int32_t owner = me) {
  auto r = e.unregister_region(region_id, owner, false);
  if (r) return 0;
  const auto& m = r.error().message;
  const auto at = m.find("': ");
  REQUIRE(at != std::string::npos);
  return static_cast<std::uint32_t>(std::stoul(m.substr(at + 3)));
}

feed_request chunk(const std::string& id, std::uint64_t at, std::string data) {
  feed_request f;
  f.registration_id = id;
  f.payload = view_chunk{at, 0, std::move(data)};
  return f;
}

keep_alive_request keep(const std::string& id, std::uint32_t ttl_ms, std::int32_t owner = me) {
  return keep_alive_request{id, ttl_ms, 1, owner};
}

// Begin (LIP, ttl) + feed of the small model's storages from `region`; returns the id.
std::string lip_on_region(engine& e, const regions::region_info& region, std::uint32_t ttl_ms) {
  const auto m = t::small_model();
  auto begun = e.begin(t::lip_begin(m.total_size(), me, ttl_ms));
  REQUIRE_OK(begun);
  REQUIRE_OK(e.feed(t::lip_feed(begun->registration_id, m, t::region_entries(region))));
  return begun->registration_id;
}

}  // namespace

// ---- Feed: lookup, expiry, implicit keep-alive ------------------------------------------------

TEST_CASE("engine lifecycle: feed, commit and keep-alive of an unknown id are NOT_FOUND",
          "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  CHECK_ERROR(e->feed(chunk("reg_nope", 0, "x")), errc::not_found,
              "cannot feed registration 'reg_nope': no such registration");
  CHECK_ERROR(e->commit("reg_nope"), errc::not_found, "cannot commit registration 'reg_nope': no such registration");
  CHECK_ERROR(e->keep_alive(keep("reg_nope", 100)), errc::not_found,
              "cannot keep registration 'reg_nope' alive: no such registration or lease");
}

TEST_CASE(
    "engine lifecycle: an expired registration answers DEADLINE_EXCEEDED once, then NOT_FOUND, and its region refs are "
    "released",
    "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto region = e->register_region(t::host_region(me));
  REQUIRE_OK(region);
  const auto id = lip_on_region(*e, *region, 100);
  CHECK(region_refs(*e, region->id) == 1);  // one per registration and region
  clock.advance(milliseconds(100));
  const auto m = t::small_model();
  feed_request more;
  more.registration_id = id;
  more.tensor_aliases.push_back(t::alias_of(m.tensors[0]));
  CHECK_ERROR(e->feed(more), errc::deadline_exceeded, "cannot feed registration '" + id + "': its TTL expired");
  CHECK(e->stats().pending_registrations == 0);
  CHECK(region_refs(*e, region->id) == 0);  // and now unregistered
  CHECK_ERROR(e->feed(more), errc::not_found, "cannot feed registration '" + id + "': no such registration");
}

TEST_CASE("engine lifecycle: every feed message extends the TTL", "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto r = t::stable_begin(t::small_model(), me);
  r.ttl_ms = 100;
  auto begun = e->begin(r);
  REQUIRE_OK(begun);
  const auto& id = begun->registration_id;
  const auto bytes = t::small_model().canonical();
  for (std::uint64_t at = 0; at < 40; at += 8) {
    clock.advance(milliseconds(90));  // 450 ms in all, never 100 ms without a message
    REQUIRE_OK(e->feed(chunk(id, at, bytes.substr(at, 8))));
  }
  clock.advance(milliseconds(99));
  REQUIRE_OK(e->commit(id));
}

TEST_CASE("engine lifecycle: a pending registration without a TTL never expires", "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto begun = e->begin(t::stable_begin(t::small_model(), me));
  REQUIRE_OK(begun);
  clock.advance(std::chrono::hours(24 * 365));
  e->sweep();
  REQUIRE_OK(t::feed_chunks(*e, begun->registration_id, t::small_model().canonical(), 40));
  REQUIRE_OK(e->commit(begun->registration_id));
}

TEST_CASE("engine lifecycle: a pending registration expired by the sweep answers DEADLINE_EXCEEDED on the next feed",
          "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto region = e->register_region(t::host_region(me));
  REQUIRE_OK(region);
  const auto id = lip_on_region(*e, *region, 100);
  clock.advance(milliseconds(101));
  e->sweep();
  CHECK(e->stats().pending_registrations == 0);
  CHECK(region_refs(*e, region->id) == 0);  // released by the sweep
  CHECK_ERROR(e->feed(chunk(id, 0, "x")), errc::deadline_exceeded,
              "cannot feed registration '" + id + "': its TTL expired");
  CHECK_ERROR(e->commit(id), errc::not_found, "cannot commit registration '" + id + "': no such registration");
}

// ---- KeepAlive (§4.4) -------------------------------------------------------------------------

TEST_CASE("engine lifecycle: keep-alive of a pending registration checks the owner and resets the expiry",
          "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto r = t::stable_begin(t::small_model(), me);
  r.ttl_ms = 100;
  auto begun = e->begin(r);
  REQUIRE_OK(begun);
  const auto& id = begun->registration_id;
  CHECK_ERROR(e->keep_alive(keep(id, 100, me + 1)), errc::permission_denied,
              "cannot keep registration '" + id + "' alive: owner_pid " + std::to_string(me + 1) +
                  " is not the registration's owner " + std::to_string(me));
  clock.advance(milliseconds(90));
  REQUIRE_OK(e->keep_alive(keep(id, 500)));
  clock.advance(milliseconds(400));
  e->sweep();
  REQUIRE_OK(t::feed_chunks(*e, id, t::small_model().canonical(), 40));  // and a feed renews 500 ms
  clock.advance(milliseconds(499));
  REQUIRE_OK(e->commit(id));
}

TEST_CASE("engine lifecycle: keep-alive of a pending registration with ttl 0 keeps the old expiry",
          "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto r = t::stable_begin(t::small_model(), me);
  r.ttl_ms = 100;
  auto begun = e->begin(r);
  REQUIRE_OK(begun);
  REQUIRE_OK(e->keep_alive(keep(begun->registration_id, 0)));
  clock.advance(milliseconds(100));
  CHECK_CODE(e->commit(begun->registration_id), errc::deadline_exceeded);
}

TEST_CASE("engine lifecycle: keep-alive does not revive an expired registration", "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto r = t::stable_begin(t::small_model(), me);
  r.ttl_ms = 100;
  auto begun = e->begin(r);
  REQUIRE_OK(begun);
  const auto& id = begun->registration_id;
  clock.advance(milliseconds(100));
  CHECK_ERROR(e->keep_alive(keep(id, 60'000)), errc::deadline_exceeded,
              "cannot keep alive registration '" + id + "': its TTL expired");
  CHECK_CODE(e->commit(id), errc::not_found);
}

TEST_CASE("engine lifecycle: keep-alive of a lease sets its TTL, and ttl 0 clears it",
          "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto begun = e->begin(t::lip_begin(m.total_size(), me, 100));
  REQUIRE_OK(begun);
  const auto& id = begun->registration_id;
  REQUIRE_OK(e->feed(t::lip_feed(id, m)));
  auto committed = e->commit(id);
  REQUIRE_OK(committed);
  const auto artifact = committed->descriptor.artifact_id;

  CHECK_ERROR(e->keep_alive(keep(id, 0, me + 1)), errc::permission_denied,
              "cannot keep registration '" + id + "' alive: owner_pid " + std::to_string(me + 1) +
                  " is not the lease's owner " + std::to_string(me));
  REQUIRE_OK(e->keep_alive(keep(id, 0)));  // no expiry at all now
  clock.advance(std::chrono::hours(1));
  e->sweep();
  REQUIRE_OK(e->get(artifact));
  CHECK(e->get(artifact)->leases == 1);

  REQUIRE_OK(e->keep_alive(keep(id, 50)));
  clock.advance(milliseconds(49));
  e->sweep();
  CHECK(e->stats().leases == 1);
  clock.advance(milliseconds(1));
  e->sweep();
  CHECK(e->stats().leases == 0);
  CHECK_CODE(e->get(artifact), errc::not_found);
  CHECK_CODE(e->keep_alive(keep(id, 50)), errc::not_found);
}

// ---- Abort (§4.6; DECISIONS §5.6) ------------------------------------------------------------

TEST_CASE("engine lifecycle: abort of a pending stable registration releases it", "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto begun = e->begin(t::stable_begin(t::small_model(), me));
  REQUIRE_OK(begun);
  REQUIRE_OK(e->feed(chunk(begun->registration_id, 0, "abcd")));
  REQUIRE_OK(e->abort(begun->registration_id));
  CHECK(e->stats().pending_registrations == 0);
  CHECK_ERROR(e->abort(begun->registration_id), errc::not_found,
              "cannot abort registration '" + begun->registration_id + "': no such registration");
  CHECK_CODE(e->feed(chunk(begun->registration_id, 4, "abcd")), errc::not_found);
}

TEST_CASE("engine lifecycle: abort of a pending LIP registration is OK and releases its region refs",
          "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto region = e->register_region(t::host_region(me));
  REQUIRE_OK(region);
  const auto id = lip_on_region(*e, *region, 0);
  CHECK(region_refs(*e, region->id) == 1);  // one per registration and region
  REQUIRE_OK(e->abort(id));
  CHECK(region_refs(*e, region->id) == 0);
  CHECK(e->stats().regions == 0);
}

TEST_CASE("engine lifecycle: abort of an unknown id is NOT_FOUND", "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  CHECK_ERROR(e->abort("reg_1_2_3"), errc::not_found, "cannot abort registration 'reg_1_2_3': no such registration");
}

// ---- Revoke (§4.6) ---------------------------------------------------------------------------

TEST_CASE("engine lifecycle: revoke always succeeds, also for unknown ids", "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  REQUIRE_OK(t::register_stable(*e, t::small_model(), me));
  e->revoke("reg_unknown", "no reason");
  e->revoke("", "");
  CHECK(e->stats().artifacts == 1);
}

TEST_CASE("engine lifecycle: revoke of a pending registration drops it", "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto region = e->register_region(t::host_region(me));
  REQUIRE_OK(region);
  const auto id = lip_on_region(*e, *region, 0);
  e->revoke(id, "client gone");
  CHECK(e->stats().pending_registrations == 0);
  CHECK(region_refs(*e, region->id) == 0);
  CHECK_CODE(e->commit(id), errc::not_found);
}

TEST_CASE("engine lifecycle: revoke of a lease releases its region refs and removes the artifact held by nothing else",
          "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto region = e->register_region(t::host_region(me));
  REQUIRE_OK(region);
  const auto id = lip_on_region(*e, *region, 0);
  auto committed = e->commit(id);
  REQUIRE_OK(committed);
  const auto artifact = committed->descriptor.artifact_id;
  CHECK(committed->descriptor.artifact_id == t::expected_mi2(t::small_model_json, std::string(40, '\0')));
  CHECK(region_refs(*e, region->id) == 1);  // the lease took the registration's ref
  CHECK(e->stats().leases == 1);
  CHECK(e->stats().leased_bytes == 40);
  e->revoke(id, "done");
  CHECK(e->stats().leases == 0);
  CHECK(e->stats().artifacts == 0);
  CHECK_ERROR(e->get(artifact), errc::not_found, "cannot find artifact " + artifact + ": not held here");
  CHECK(region_refs(*e, region->id) == 0);
}

TEST_CASE("engine lifecycle: revoke of a lease keeps an artifact that has a stable replica",
          "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  std::string lease_id;
  auto leased = t::register_lip(*e, m, me, &lease_id);
  REQUIRE_OK(leased);
  REQUIRE_OK(t::register_stable(*e, m, me));
  e->revoke(lease_id, "");
  auto got = e->get(leased->descriptor.artifact_id);
  REQUIRE_OK(got);
  CHECK(got->leases == 0);
  CHECK(got->stable_replica);
}

TEST_CASE("engine lifecycle: revoke of an idempotent join drops the join", "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto first = t::register_stable(*e, m, me);
  REQUIRE_OK(first);
  std::string join_id;
  auto second = t::register_stable(*e, m, me, &join_id);
  REQUIRE_OK(second);
  REQUIRE(second->existed);
  CHECK(e->get(first->descriptor.artifact_id)->joined_refs == 1);
  e->revoke(join_id, "");
  CHECK(e->get(first->descriptor.artifact_id)->joined_refs == 0);
  CHECK(e->get(first->descriptor.artifact_id)->stable_replica);
}

TEST_CASE("engine lifecycle: keep-alive of an idempotent join sets its TTL", "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  REQUIRE_OK(t::register_stable(*e, m, me));
  std::string join_id;
  auto joined = t::register_stable(*e, m, me, &join_id);  // no TTL: held until revoked
  REQUIRE_OK(joined);
  REQUIRE(joined->existed);
  const auto& artifact = joined->descriptor.artifact_id;
  CHECK_ERROR(e->keep_alive(keep(join_id, 10, me + 1)), errc::permission_denied,
              "cannot keep registration '" + join_id + "' alive: owner_pid " + std::to_string(me + 1) +
                  " is not the lease's owner " + std::to_string(me));
  REQUIRE_OK(e->keep_alive(keep(join_id, 10)));
  clock.advance(milliseconds(10));
  e->sweep();
  CHECK(e->get(artifact)->joined_refs == 0);
}

// ---- The TTL sweep -----------------------------------------------------------------------------

TEST_CASE("engine lifecycle: the sweep expires leases and releases their region refs",
          "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto region = e->register_region(t::host_region(me));
  REQUIRE_OK(region);
  const auto id = lip_on_region(*e, *region, 100);
  REQUIRE_OK(e->commit(id));
  clock.advance(milliseconds(99));
  e->sweep();
  CHECK(e->stats().leases == 1);
  clock.advance(milliseconds(1));
  e->sweep();
  CHECK(e->stats().leases == 0);
  CHECK(e->stats().artifacts == 0);
  CHECK(region_refs(*e, region->id) == 0);
}

TEST_CASE("engine lifecycle: the sweep drops joins past their TTL", "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  REQUIRE_OK(t::register_stable(*e, m, me));
  auto r = t::stable_begin(m, me);
  r.ttl_ms = 100;
  auto begun = e->begin(r);
  REQUIRE_OK(begun);
  REQUIRE_OK(t::feed_chunks(*e, begun->registration_id, m.canonical(), 40));
  auto joined = e->commit(begun->registration_id);
  REQUIRE_OK(joined);
  REQUIRE(joined->existed);
  const auto& artifact = joined->descriptor.artifact_id;
  CHECK(e->get(artifact)->joined_refs == 1);
  clock.advance(milliseconds(100));
  e->sweep();
  CHECK(e->get(artifact)->joined_refs == 0);
  CHECK(e->get(artifact)->stable_replica);
}

TEST_CASE("engine lifecycle: the sweep expires unreferenced regions past their TTL",
          "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto r = t::host_region(me);
  r.ttl_ms = 1000;
  auto region = e->register_region(std::move(r));
  REQUIRE_OK(region);
  clock.advance(milliseconds(1000));
  e->sweep();
  CHECK(e->stats().regions == 0);
}

// ---- Owner death -------------------------------------------------------------------------------

TEST_CASE("engine lifecycle: when the owner process dies its registrations, leases and regions go",
          "[registration][engine_lifecycle][owner]") {
  // A second process that only sleeps: the owner whose death the engine watches for.
  tensorreg::testing::child_process child({"/bin/sleep", "1000"});

  const auto owner = static_cast<std::int32_t>(child.pid());

  fake_clock clock;
  auto options = t::deterministic_options(clock);
  options.watch_owners = true;
  auto e = t::make_engine(options);
  const auto m = t::small_model();

  auto region = e->register_region(t::host_region(owner));
  REQUIRE_OK(region);
  auto pending = e->begin(t::stable_begin(m, owner));
  REQUIRE_OK(pending);
  auto lip = e->begin(t::lip_begin(m.total_size(), owner));
  REQUIRE_OK(lip);
  REQUIRE_OK(e->feed(t::lip_feed(lip->registration_id, m, t::region_entries(*region))));  // pending, with refs
  REQUIRE_OK(t::register_lip(*e, m, owner));                                              // a lease
  auto mine = t::register_stable(*e, m, me);  // someone else's artifact stays
  REQUIRE_OK(mine);
  {
    const auto s = e->stats();
    CHECK(s.pending_registrations == 2);
    CHECK(s.leases == 1);
    CHECK(s.regions == 1);
  }

  child.kill(SIGKILL);
  REQUIRE(child.wait() == 128 + SIGKILL);
  engine_stats s;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(1);
  do {
    s = e->stats();
    if (s.pending_registrations == 0 && s.leases == 0 && s.regions == 0) break;
    std::this_thread::sleep_for(milliseconds(5));
  } while (std::chrono::steady_clock::now() < give_up);
  CHECK(s.pending_registrations == 0);
  CHECK(s.leases == 0);
  CHECK(s.regions == 0);
  CHECK(s.artifacts == 1);
  auto got = e->get(mine->descriptor.artifact_id);
  REQUIRE_OK(got);
  CHECK(got->leases == 0);
  CHECK_CODE(e->commit(pending->registration_id), errc::not_found);
}

TEST_CASE("engine lifecycle: an owner pid that does not exist is refused when watched",
          "[registration][engine_lifecycle][owner]") {
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) ::_exit(0);
  REQUIRE(::waitpid(child, nullptr, 0) == child);  // a pid that surely has no process now
  fake_clock clock;
  auto options = t::deterministic_options(clock);
  options.watch_owners = true;
  auto e = t::make_engine(options);
  const auto owner = static_cast<std::int32_t>(child);
  CHECK_ERROR(e->begin(t::stable_begin(t::small_model(), owner)), errc::invalid_argument,
              "cannot watch owner process " + std::to_string(owner) + ": no such process");
  CHECK(e->stats().pending_registrations == 0);
}

// ---- Many registrations at once ------------------------------------------------------------------

TEST_CASE("engine lifecycle: many threads registering at once", "[registration][engine_lifecycle][concurrency]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto shared = t::small_model();
  constexpr int threads = 8;
  constexpr int rounds = 6;
  std::atomic<int> failures{0};
  std::atomic<int> existed{0};
  std::vector<std::string> lip_ids(threads * rounds);
  std::vector<std::thread> pool;
  for (int th = 0; th < threads; ++th) {
    pool.emplace_back([&, th] {
      for (int i = 0; i < rounds; ++i) {
        t::model own = shared;
        own.storages[0].bytes = t::pattern(16, static_cast<std::uint32_t>(1000 + th * rounds + i));
        auto leased = t::register_lip(*e, own, me);
        if (!leased) {
          ++failures;
          continue;
        }
        lip_ids[static_cast<std::size_t>(th * rounds + i)] = leased->descriptor.artifact_id;
        auto put = t::register_stable(*e, shared, me);
        if (!put)
          ++failures;
        else if (put->existed)
          ++existed;
        // A registration that is abandoned half way.
        auto begun = e->begin(t::stable_begin(shared, me));
        if (!begun)
          ++failures;
        else if (!e->abort(begun->registration_id))
          ++failures;
      }
    });
  }
  for (auto& th : pool) th.join();
  CHECK(failures == 0);
  CHECK(existed == threads * rounds - 1);
  const auto s = e->stats();
  CHECK(s.pending_registrations == 0);
  CHECK(s.leases == threads * rounds);
  CHECK(s.artifacts == threads * rounds + 1);
  for (std::size_t i = 0; i < lip_ids.size(); ++i) {
    t::model own = shared;
    own.storages[0].bytes = t::pattern(16, static_cast<std::uint32_t>(1000 + i));
    CHECK(lip_ids[i] == t::expected_mi2(t::small_model_json, own.canonical()));
  }
}

namespace {

// Storage bytes whose reads wait until the test opens the gate: holds a commit mid-hash.
class gated_bytes final : public memory::byte_source {
 public:
  explicit gated_bytes(std::string bytes) : bytes_(std::move(bytes)) {}
  [[nodiscard]] std::uint64_t size() const noexcept override { return bytes_.size(); }
  [[nodiscard]] status visit(std::uint64_t offset, std::uint64_t length, memory::piece_sink sink) const override {
    {
      std::unique_lock lock(mutex_);
      reading_ = true;
      changed_.notify_all();
      changed_.wait(lock, [&] { return open_; });
    }
    TENSORREG_TRY(check_range(offset, length));
    if (length == 0) return {};
    return sink(std::as_bytes(std::span<const char>(bytes_)).subspan(offset, length));
  }
  void wait_until_read() const {
    std::unique_lock lock(mutex_);
    changed_.wait(lock, [&] { return reading_; });
  }
  void open() const {
    std::lock_guard lock(mutex_);
    open_ = true;
    changed_.notify_all();
  }

 private:
  std::string bytes_;
  mutable std::mutex mutex_;
  mutable std::condition_variable changed_;
  mutable bool reading_ = false;
  mutable bool open_ = false;
};

}  // namespace

TEST_CASE("engine lifecycle: revoke or owner death during a commit undoes the lease the commit makes",
          "[registration][engine_lifecycle][concurrency]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  const bool by_owner = GENERATE(false, true);
  CAPTURE(by_owner);
  auto begun = e->begin(t::lip_begin(m.total_size(), me));
  REQUIRE_OK(begun);
  const auto& id = begun->registration_id;
  auto gate = std::make_shared<gated_bytes>(m.storage("s0").bytes);
  std::map<std::string, storage_entry> entries;
  for (const auto& st : m.storages) {
    storage_entry entry;
    entry.storage_id = st.id;
    entry.storage_length = st.bytes.size();
    entry.source = host_storage_source{st.id == "s0" ? std::shared_ptr<const memory::byte_source>(gate)
                                                     : std::make_shared<t::owned_bytes>(st.bytes)};
    entries.emplace(st.id, entry);
  }
  REQUIRE_OK(e->feed(t::lip_feed(id, m, entries)));
  result<commit_response> committed = tl::unexpected(error{});
  std::thread committer([&] { committed = e->commit(id); });
  gate->wait_until_read();  // the commit is hashing now
  if (by_owner) {
    e->release_owner(me);
  } else {
    e->revoke(id, "client gone");
  }
  CHECK_ERROR(e->feed(chunk(id, 0, "x")), errc::failed_precondition,
              "cannot feed registration '" + id + "': it is being committed");
  gate->open();
  committer.join();
  REQUIRE_OK(committed);
  CHECK(e->stats().leases == 0);
  CHECK(e->stats().artifacts == 0);
  CHECK(e->stats().pending_registrations == 0);
  CHECK_CODE(e->keep_alive(keep(id, 10)), errc::not_found);
}

// ---- Deregister (§5.3) -------------------------------------------------------------------------

TEST_CASE("engine lifecycle: deregister of an unknown artifact is NOT_FOUND", "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  CHECK_ERROR(e->deregister({"mi2:nothing", true, 0, me}), errc::not_found,
              "cannot deregister mi2:nothing: not held here");
}

TEST_CASE("engine lifecycle: deregister drains, removes, and revokes leases", "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto region = e->register_region(t::host_region(me));
  REQUIRE_OK(region);
  const auto lease_id = lip_on_region(*e, *region, 0);
  auto leased = e->commit(lease_id);
  REQUIRE_OK(leased);
  const auto artifact = leased->descriptor.artifact_id;
  auto out = e->deregister({artifact, true, 0, me});
  REQUIRE_OK(out);
  CHECK(out->drained);
  CHECK(out->removed);
  CHECK(out->released_region_ids == std::vector<std::string>{region->id});  // each region once
  CHECK_CODE(e->get(artifact), errc::not_found);
  CHECK(e->stats().leases == 0);
  CHECK(region_refs(*e, region->id) == 0);
  CHECK_CODE(e->keep_alive(keep(lease_id, 10)), errc::not_found);
  e->revoke(lease_id, "");  // still fine
}

TEST_CASE("engine lifecycle: deregister times out while a reader holds the bytes, stays quiesced, then succeeds",
          "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto put = t::register_stable(*e, m, me);
  REQUIRE_OK(put);
  const auto artifact = put->descriptor.artifact_id;
  auto reader = e->open_bytes(artifact);
  REQUIRE_OK(reader);

  CHECK_ERROR(e->deregister({artifact, true, 20, me}), errc::deadline_exceeded,
              "cannot deregister " + artifact + ": 1 readers still hold it after 20 ms; it stays quiesced");
  CHECK(e->get(artifact)->quiesced);
  CHECK_ERROR(e->open_bytes(artifact), errc::failed_precondition,
              "cannot open " + artifact + ": it is being deregistered");
  // A lease of a quiescing artifact is refused.
  CHECK_ERROR(t::register_lip(*e, m, me), errc::failed_precondition,
              "cannot commit lease of " + artifact + ": the artifact is being deregistered");
  CHECK_CODE(e->deregister({artifact, false, 0, me}), errc::deadline_exceeded);

  // The reader still reads the bytes.
  std::string seen(40, '\0');
  REQUIRE_OK((*reader)->read(0, std::as_writable_bytes(std::span<char>(seen))));
  CHECK(seen == m.canonical());
  reader->reset();
  auto out = e->deregister({artifact, true, 20, me});
  REQUIRE_OK(out);
  CHECK(out->removed);
  CHECK(e->stats().stable_bytes == 0);
  CHECK(e->stats().artifacts == 0);
}

TEST_CASE("engine lifecycle: deregister waits for a reader released meanwhile",
          "[registration][engine_lifecycle][concurrency]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto put = t::register_stable(*e, t::small_model(), me);
  REQUIRE_OK(put);
  auto reader = e->open_bytes(put->descriptor.artifact_id);
  REQUIRE_OK(reader);
  std::thread release([&] {
    std::this_thread::sleep_for(milliseconds(30));
    reader->reset();
  });
  auto out = e->deregister({put->descriptor.artifact_id, true, 5000, me});
  release.join();
  REQUIRE_OK(out);
  CHECK(out->drained);
  CHECK(out->removed);
}

TEST_CASE("engine lifecycle: concurrent deregisters of one artifact both drain",
          "[registration][engine_lifecycle][concurrency]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto put = t::register_stable(*e, t::small_model(), me);
  REQUIRE_OK(put);
  const auto artifact = put->descriptor.artifact_id;
  auto reader = e->open_bytes(artifact);
  REQUIRE_OK(reader);
  std::vector<result<deregister_response>> outs(2, tl::unexpected(error{}));
  std::vector<std::thread> callers;
  for (std::size_t i = 0; i < outs.size(); ++i) {
    callers.emplace_back([&, i] { outs[i] = e->deregister({artifact, true, 5000, me}); });
  }
  std::this_thread::sleep_for(milliseconds(50));  // both are draining now
  reader->reset();
  for (auto& c : callers) c.join();
  int removed = 0;
  for (const auto& out : outs) {
    if (out) {
      CHECK(out->drained);
      removed += out->removed ? 1 : 0;
    } else {
      CHECK(out.error().code == errc::not_found);  // the other one finished first
    }
  }
  CHECK(removed == 1);
  CHECK(e->list().empty());
}

// ---- Catalogue and stats --------------------------------------------------------------------------

TEST_CASE("engine lifecycle: list, get, index_of, open_bytes and stats describe what is held",
          "[registration][engine_lifecycle]") {
  fake_clock clock;
  auto options = t::deterministic_options(clock);
  options.stable_bytes = 1000;
  auto e = t::make_engine(options);
  const auto m = t::small_model();
  CHECK(e->list().empty());
  CHECK_ERROR(e->index_of("mi2:x"), errc::not_found, "cannot find the index of mi2:x: not held here");
  CHECK_ERROR(e->open_bytes("mi2:x"), errc::not_found, "cannot open mi2:x: not held here");

  auto leased = t::register_lip(*e, m, me);
  REQUIRE_OK(leased);
  t::model other = m;
  other.storages[1].bytes = t::pattern(20, 99);
  auto put = t::register_stable(*e, other, me);
  REQUIRE_OK(put);

  const auto all = e->list();
  REQUIRE(all.size() == 2);
  CHECK(all[0].descriptor.artifact_id < all[1].descriptor.artifact_id);
  auto lease_summary = e->get(leased->descriptor.artifact_id);
  REQUIRE_OK(lease_summary);
  CHECK(lease_summary->leases == 1);
  CHECK_FALSE(lease_summary->stable_replica);
  CHECK_FALSE(lease_summary->quiesced);
  CHECK(t::describe(lease_summary->descriptor) == t::describe(leased->descriptor));

  auto idx = e->index_of(put->descriptor.artifact_id);
  REQUIRE_OK(idx);
  CHECK((*idx)->json() == t::small_model_json);
  for (const auto* d : {&leased->descriptor, &put->descriptor}) {
    auto bytes = e->open_bytes(d->artifact_id);
    REQUIRE_OK(bytes);
    std::string seen(40, '\0');
    REQUIRE_OK((*bytes)->read(0, std::as_writable_bytes(std::span<char>(seen))));
    CHECK(seen == (d == &put->descriptor ? other.canonical() : m.canonical()));
  }

  const auto s = e->stats();
  CHECK(s.artifacts == 2);
  CHECK(s.pending_registrations == 0);
  CHECK(s.leases == 1);
  CHECK(s.leased_bytes == 40);
  CHECK(s.stable_bytes == 40);
  CHECK(s.stable_budget == 1000);
  CHECK(s.regions == 0);
  CHECK(s.open_mappings == 0);
  CHECK(s.stable_evictions == 0);
}
