// What one client can make the engine hold, and what it gives back when something goes wrong
// (issue #15): sizes refused before anything is allocated, a commit that throws ends as failed
// and releases what it held.
#include "tensorreg/registration/engine.hpp"

#include <catch2/catch.hpp>

#include <unistd.h>

#include <chrono>
#include <stdexcept>
#include <thread>

#include "support/engine_helpers.hpp"
#include "tensorreg/hash/sha256.hpp"

namespace {

using namespace tensorreg;
using namespace tensorreg::registration;
using tensorreg::testing::fake_clock;
namespace t = tensorreg::testing;

const std::int32_t me = static_cast<std::int32_t>(::getpid());

// A storage whose bytes cannot be read: visiting it throws, as foreign code under a commit may.
class throwing_bytes final : public memory::byte_source {
 public:
  explicit throwing_bytes(std::uint64_t size) : size_(size) {}
  [[nodiscard]] std::uint64_t size() const noexcept override { return size_; }
  [[nodiscard]] status visit(std::uint64_t, std::uint64_t, memory::piece_sink) const override {
    throw std::runtime_error("the storage threw while it was read");
  }

 private:
  std::uint64_t size_;
};

// Zeros that take `per_read` to read, each time they are visited (a commit hashes one 4 MiB
// leaf per visit): a commit that takes long enough to be interrupted.
class slow_zeros final : public memory::byte_source {
 public:
  slow_zeros(std::uint64_t size, std::chrono::milliseconds per_read) : size_(size), per_read_(per_read) {}
  [[nodiscard]] std::uint64_t size() const noexcept override { return size_; }
  [[nodiscard]] status visit(std::uint64_t, std::uint64_t length, memory::piece_sink sink) const override {
    std::this_thread::sleep_for(per_read_);
    static const std::vector<std::byte> zeros(1 << 20);
    while (length > 0) {
      const auto n = std::min<std::uint64_t>(length, zeros.size());
      TENSORREG_TRY(sink(std::span<const std::byte>(zeros.data(), n)));
      length -= n;
    }
    return {};
  }

 private:
  std::uint64_t size_;
  std::chrono::milliseconds per_read_;
};

regions::register_request host_region(std::uint64_t size) {
  regions::register_request r;
  r.kind = regions::memory_kind::host_shared;
  r.owner_pid = me;
  r.size_bytes = size;
  r.host_shared = regions::host_shared_spec{"", true, regions::host_shared_class::scratch};
  return r;
}

}  // namespace

TEST_CASE("engine limits: a total_size above max_total_size is RESOURCE_EXHAUSTED at Begin, for every plan",
          "[registration][engine_limits]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  constexpr std::uint64_t one_eib = std::uint64_t{1} << 60;
  const std::string message =
      "cannot begin registration: total_size 1152921504606846976 exceeds this engine's "
      "limit of 1099511627776 bytes";
  CHECK_ERROR(e->begin(t::lip_begin(one_eib, me)), errc::resource_exhausted, message);
  auto stable = t::stable_begin(t::small_model(), me);
  stable.total_size = one_eib;
  CHECK_ERROR(e->begin(stable), errc::resource_exhausted, message);
  CHECK(e->stats().pending_registrations == 0);
  // The limit is an option; 0 lifts it.
  auto options = t::deterministic_options(clock);
  options.max_total_size = 40;
  auto small = t::make_engine(options);
  CHECK_ERROR(small->begin(t::lip_begin(41, me)), errc::resource_exhausted,
              "cannot begin registration: total_size 41 exceeds this engine's limit of 40 bytes");
  CHECK(small->begin(t::lip_begin(40, me)));
}

TEST_CASE("engine limits: a commit that throws answers INTERNAL and releases the registration and its regions",
          "[registration][engine_limits]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto region = e->register_region(host_region(4096));
  REQUIRE_OK(region);
  const auto m = t::small_model();
  auto begun = e->begin(t::lip_begin(m.total_size(), me));
  REQUIRE_OK(begun);
  const auto id = begun->registration_id;
  // s1 comes from the region, s0 from a storage that throws when the commit hashes it.
  std::map<std::string, storage_entry> entries;
  storage_entry s0;
  s0.storage_id = "s0";
  s0.storage_length = m.storage("s0").bytes.size();
  s0.source = host_storage_source{std::make_shared<throwing_bytes>(s0.storage_length)};
  entries["s0"] = s0;
  storage_entry s1;
  s1.storage_id = "s1";
  s1.storage_length = m.storage("s1").bytes.size();
  s1.device_id = region->device_id;
  s1.source = region_ref_source{region->id, region->kind, region->device_id, region->size_bytes};
  entries["s1"] = s1;
  REQUIRE_OK(e->feed(t::lip_feed(id, m, entries)));
  // Held now: one reference on the region.
  CHECK_CODE(e->unregister_region(region->id, me, false), errc::failed_precondition);

  CHECK_ERROR(e->commit(id), errc::internal,
              "cannot commit registration '" + id + "': the storage threw while it was read");
  CHECK(e->stats().pending_registrations == 0);
  CHECK_ERROR(e->commit(id), errc::not_found, "cannot commit registration '" + id + "': no such registration");
  // The region reference went back with the registration: the region unregisters at once.
  auto gone = e->unregister_region(region->id, me, false);
  REQUIRE_OK(gone);
  CHECK(*gone);
  // The engine still serves.
  REQUIRE_OK(t::register_lip(*e, m, me));
}

TEST_CASE("engine limits: uploads in progress reserve the stable budget at Begin, and give it back when they end",
          "[registration][engine_limits]") {
  fake_clock clock;
  auto options = t::deterministic_options(clock);
  options.stable_bytes = 100;
  auto e = t::make_engine(options);
  const auto m = t::small_model();  // 40 bytes
  auto first = e->begin(t::stable_begin(m, me));
  auto second = e->begin(t::stable_begin(m, me));
  REQUIRE_OK(first);
  REQUIRE_OK(second);
  CHECK(e->stats().stable_reserved_bytes == 80);
  // A third would hold 120 bytes of a 100-byte budget.
  CHECK_ERROR(e->begin(t::stable_begin(m, me)), errc::resource_exhausted,
              "cannot begin stable_dram registration: cannot reserve 40 bytes of the stable budget: 20 of 100 bytes "
              "free (80 reserved by uploads in progress, 0 held by entries that cannot be evicted)");
  // Abort gives the reservation back.
  REQUIRE_OK(e->abort(first->registration_id));
  CHECK(e->stats().stable_reserved_bytes == 40);
  auto third = e->begin(t::stable_begin(m, me));
  REQUIRE_OK(third);
  // Commit turns the reservation into the entry.
  REQUIRE_OK(t::feed_chunks(*e, second->registration_id, m.canonical_with_pad('\x5a'), 7));
  auto committed = e->commit(second->registration_id);
  REQUIRE_OK(committed);
  CHECK(e->stats().stable_reserved_bytes == 40);
  CHECK(e->stats().stable_bytes == 40);
  // Expiry gives it back too; revoke of the TTL-less one as well.
  e->revoke(third->registration_id, "test");
  CHECK(e->stats().stable_reserved_bytes == 0);
  auto timed = t::stable_begin(m, me);
  timed.ttl_ms = 1000;
  auto expiring = e->begin(timed);
  REQUIRE_OK(expiring);
  CHECK(e->stats().stable_reserved_bytes == 40);
  clock.advance(std::chrono::seconds(2));
  e->sweep();
  CHECK(e->stats().stable_reserved_bytes == 0);
  CHECK(e->stats().pending_registrations == 0);
}

TEST_CASE("engine limits: an index is kept while an artifact uses it and freed with the last one",
          "[registration][engine_limits]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto other_data = m;
  for (auto& s : other_data.storages) s.bytes = t::pattern(s.bytes.size(), 99);
  auto first = t::register_stable(*e, m, me);
  auto second = t::register_stable(*e, other_data, me);
  REQUIRE_OK(first);
  REQUIRE_OK(second);
  REQUIRE(first->descriptor.artifact_id != second->descriptor.artifact_id);
  REQUIRE(first->descriptor.index_multihash == second->descriptor.index_multihash);
  const auto key = hash::to_hex(hash::sha256(std::string_view(t::small_model_json)));
  auto by_key = [&] {
    auto r = t::stable_begin(m, me);
    r.tensor_index_data.reset();
    r.tensor_index_key = key;
    auto begun = e->begin(r);
    if (begun) REQUIRE_OK(e->abort(begun->registration_id));
    return begun;
  };
  auto deregister = [&](const std::string& artifact_id) {
    deregister_request d;
    d.artifact_id = artifact_id;
    d.owner_pid = me;
    auto out = e->deregister(d);
    REQUIRE_OK(out);
    CHECK(out->removed);
  };
  REQUIRE_OK(by_key());
  deregister(first->descriptor.artifact_id);
  REQUIRE_OK(by_key());  // the second artifact still uses it
  deregister(second->descriptor.artifact_id);
  CHECK_ERROR(by_key(), errc::not_found, "cannot begin registration: unknown tensor_index_key " + key);
  // Rounds of put + deregister leave nothing behind: the index is known again after a put.
  for (int round = 0; round < 3; ++round) {
    auto again = t::register_stable(*e, m, me);
    REQUIRE_OK(again);
    REQUIRE_OK(by_key());
    deregister(again->descriptor.artifact_id);
    CHECK_CODE(by_key(), errc::not_found);
  }
}

TEST_CASE("engine limits: one owner's pending registrations stay within max_pending_per_owner",
          "[registration][engine_limits]") {
  fake_clock clock;
  auto options = t::deterministic_options(clock);
  options.max_pending_per_owner = 2;
  auto e = t::make_engine(options);
  auto a = e->begin(t::lip_begin(40, me));
  auto b = e->begin(t::lip_begin(40, me));
  REQUIRE_OK(a);
  REQUIRE_OK(b);
  const std::string message = "cannot begin registration: owner_pid " + std::to_string(me) +
                              " already has its maximum of 2 pending registrations";
  CHECK_ERROR(e->begin(t::lip_begin(40, me)), errc::resource_exhausted, message);
  CHECK_ERROR(e->begin(t::stable_begin(t::small_model(), me)), errc::resource_exhausted, message);
  // Another owner is not affected (the engine is told owner pids; this one need not watch them).
  REQUIRE_OK(e->begin(t::lip_begin(40, me + 1)));
  // An ended registration gives its place back: abort, commit, revoke.
  REQUIRE_OK(e->abort(a->registration_id));
  auto c = e->begin(t::lip_begin(40, me));
  REQUIRE_OK(c);
  e->revoke(b->registration_id, "test");
  REQUIRE_OK(t::register_lip(*e, t::small_model(), me));
  CHECK(e->stats().pending_registrations == 2);
}

TEST_CASE("engine limits: one uid's regions stay within its share of the registry", "[registration][engine_limits]") {
  fake_clock clock;
  auto options = t::deterministic_options(clock);
  options.region_capacity = 4;
  options.region_capacity_per_uid = 2;
  auto e = t::make_engine(options);
  auto of_uid = [](std::uint32_t uid) {
    auto r = host_region(4096);
    r.owner_uid = uid;
    return r;
  };
  auto first = e->register_region(of_uid(1000));
  REQUIRE_OK(first);
  REQUIRE_OK(e->register_region(of_uid(1000)));
  CHECK_ERROR(e->register_region(of_uid(1000)), errc::resource_exhausted,
              "cannot register region: uid 1000 holds its share of 2 of the registry's 4 regions");
  // Root still gets in, and so do callers the engine is not told the uid of.
  REQUIRE_OK(e->register_region(of_uid(0)));
  REQUIRE_OK(e->register_region(host_region(4096)));
  // A region that goes gives its place back.
  REQUIRE_OK(e->unregister_region(first->id, me, false));
  REQUIRE_OK(e->register_region(of_uid(1000)));
}

TEST_CASE("engine limits: an owner that exits mid-commit is released at once, its commit CANCELLED",
          "[registration][engine_limits][cancel]") {
  using std::chrono::milliseconds;
  using std::chrono::steady_clock;
  fake_clock clock;
  auto options = t::deterministic_options(clock);
  options.hash_threads = 1;  // one leaf at a time: 16 leaves take 16 × 100 ms
  auto e = t::make_engine(options);
  constexpr std::uint64_t size = 64 << 20;
  t::model m;
  m.storages = {{"s0", std::string(size, '\0')}};
  m.tensors = {{"w", "s0", {static_cast<std::int64_t>(size / 4)}, {1}, "torch.float32", 0, size}};
  auto region = e->register_region(host_region(4096));
  REQUIRE_OK(region);
  auto begun = e->begin(t::lip_begin(m.total_size(), me));
  REQUIRE_OK(begun);
  const auto id = begun->registration_id;
  storage_entry s0;
  s0.storage_id = "s0";
  s0.storage_length = size;
  s0.source = host_storage_source{std::make_shared<slow_zeros>(size, milliseconds(100))};
  REQUIRE_OK(e->feed(t::lip_feed(id, m, {{"s0", s0}})));

  SECTION("owner death") {
    std::optional<result<commit_response>> out;
    steady_clock::time_point done;
    std::thread committer([&] {
      out = e->commit(id);
      done = steady_clock::now();
    });
    std::this_thread::sleep_for(milliseconds(250));  // the commit is hashing now
    const auto released = steady_clock::now();
    e->release_owner(me);
    committer.join();
    REQUIRE(out);
    CHECK_ERROR(*out, errc::cancelled,
                "cannot commit registration '" + id +
                    "': cancelled: it was revoked or its owner exited while it was committed");
    // Within one leaf (100 ms) and some slack; the whole hash would take 1.6 s.
    CHECK(done - released < milliseconds(600));
    CHECK(e->stats().pending_registrations == 0);
  }
  SECTION("revoke") {
    std::optional<result<commit_response>> out;
    std::thread committer([&] { out = e->commit(id); });
    std::this_thread::sleep_for(milliseconds(250));
    const auto revoked = steady_clock::now();
    e->revoke(id, "test");
    committer.join();
    CHECK(steady_clock::now() - revoked < milliseconds(600));
    REQUIRE(out);
    CHECK_CODE(*out, errc::cancelled);
    CHECK(e->stats().pending_registrations == 0);
  }
  // The engine still serves, and a commit that nobody cancels is not cancelled.
  REQUIRE_OK(t::register_lip(*e, t::small_model(), me));
}

TEST_CASE("engine limits: one uid's puts keep at most max_stable_entries_per_uid cache entries",
          "[registration][engine_limits]") {
  fake_clock clock;
  auto options = t::deterministic_options(clock);
  options.max_stable_entries_per_uid = 2;
  auto e = t::make_engine(options);
  auto put = [&](std::uint32_t seed, std::optional<std::uint32_t> uid) -> result<commit_response> {
    auto m = t::small_model();
    for (auto& s : m.storages) s.bytes = t::pattern(s.bytes.size(), seed);
    auto r = t::stable_begin(m, me);
    r.owner_uid = uid;
    TENSORREG_TRY_ASSIGN(auto begun, e->begin(r));
    TENSORREG_TRY(t::feed_chunks(*e, begun.registration_id, m.canonical(), 64));
    return e->commit(begun.registration_id);
  };
  auto first = put(1, 1000);
  REQUIRE_OK(first);
  REQUIRE_OK(put(2, 1000));
  CHECK_ERROR(put(3, 1000), errc::resource_exhausted,
              "cannot begin stable_dram registration: uid 1000 already keeps its maximum of 2 artifacts in the stable "
              "DRAM cache");
  // A put that joins an entry creates none, so it is not refused at Commit; other uids, and callers
  // the engine is not told the uid of, are not counted.
  REQUIRE_OK(put(3, 0));
  REQUIRE_OK(put(4, std::nullopt));
  // A removed entry gives its place back.
  deregister_request d;
  d.artifact_id = first->descriptor.artifact_id;
  d.owner_pid = me;
  REQUIRE_OK(e->deregister(d));
  REQUIRE_OK(put(5, 1000));
  CHECK_CODE(put(6, 1000), errc::resource_exhausted);
}
