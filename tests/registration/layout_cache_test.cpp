// The layout cache (registration/layout_cache.hpp): what it keeps and finds, the signature of
// the LIP tables it is keyed on, and, through the engine, that a layout kept from an earlier
// commit never stands in for the checks of the memory behind it (a region unregistered,
// re-registered smaller, of an owner that exited) nor for a changed layout.
#include "registration/layout_cache.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "registration/plans/lease_in_place.hpp"
#include "support/child_process.hpp"
#include "support/engine_helpers.hpp"
#include "support/fake_device_memory.hpp"
#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/registration/engine.hpp"

namespace {

using namespace tensorreg;
using namespace tensorreg::registration;
using detail::layout_cache;
using detail::lease_layout;
using tensorreg::testing::fake_clock;
namespace t = tensorreg::testing;

const std::int32_t me = static_cast<std::int32_t>(::getpid());

std::shared_ptr<const lease_layout> layout_of(const std::string& json) {
  auto idx = index::canonical_index::parse(json, std::nullopt);
  REQUIRE(idx.has_value());
  return detail::make_lease_layout(std::make_shared<const index::canonical_index>(std::move(*idx)));
}

// ---- the tables of small_model() over one HOST_SHARED region -----------------------------------

// Writes the model's storages into the region where t::region_entries() puts them. Returns
// whether it could (no Catch assertion here: worker threads call it too).
[[nodiscard]] bool fill(const regions::region_info& region, const t::model& m) {
  auto fd = region.memory->duplicate_fd();
  if (!fd) return false;
  auto writer = memory::shared_memory::adopt(std::move(*fd), region.size_bytes, true);
  if (!writer) return false;
  auto bytes = writer->mutable_bytes();
  const auto& s0 = m.storage("s0").bytes;
  const auto& s1 = m.storage("s1").bytes;
  std::memcpy(bytes.data(), s0.data(), s0.size());
  std::memcpy(bytes.data() + 64, s1.data(), s1.size());
  return true;
}

// One version: Begin → Feed → Commit of `m` over `region` by `owner`; an mi2 id unless `cgid`.
result<commit_response> register_version(engine& e, const t::model& m, const regions::region_info& region,
                                         std::int32_t owner = me, const std::string& cgid = {}) {
  auto b = t::lip_begin(m.total_size(), owner);
  b.client_artifact_id = cgid;
  TENSORREG_TRY_ASSIGN(auto begun, e.begin(std::move(b)));
  if (auto fed = e.feed(t::lip_feed(begun.registration_id, m, t::region_entries(region))); !fed) {
    (void)e.abort(begun.registration_id);
    return tl::unexpected(fed.error());
  }
  return e.commit(begun.registration_id);
}

}  // namespace

// ---- the cache itself -----------------------------------------------------------------------------

TEST_CASE("layout cache: finds a layout only under the exact signature it was kept under",
          "[registration][layout_cache]") {
  layout_cache cache;
  const auto layout = layout_of(t::small_model_json);
  cache.insert("tables", layout);
  CHECK(cache.find("tables") == layout);
  CHECK(cache.find("tablez") == nullptr);
  CHECK(cache.find("table") == nullptr);
  CHECK(cache.find(std::string("tables\0", 7)) == nullptr);
  CHECK(cache.hits() == 1);
  CHECK(cache.misses() == 3);
  CHECK(cache.size() == 1);
}

TEST_CASE("layout cache: keeps at most its entries, the least recently used going first",
          "[registration][layout_cache]") {
  layout_cache cache(2);
  const auto layout = layout_of(t::small_model_json);
  cache.insert("a", layout);
  cache.insert("b", layout);
  REQUIRE(cache.find("a") != nullptr);  // now b is the least recently used
  cache.insert("c", layout);
  CHECK(cache.size() == 2);
  CHECK(cache.find("a") != nullptr);
  CHECK(cache.find("b") == nullptr);
  CHECK(cache.find("c") != nullptr);
  cache.insert("c", layout);  // the same signature again replaces, never duplicates
  CHECK(cache.size() == 2);
}

TEST_CASE("layout cache: an entry over a quarter of the byte budget, or a cache of 0 entries, keeps nothing",
          "[registration][layout_cache]") {
  const auto layout = layout_of(t::small_model_json);
  layout_cache small(16, 4 * 64);
  small.insert(std::string(200, 'x'), layout);
  CHECK(small.size() == 0);
  layout_cache none(0);
  none.insert("a", layout);
  CHECK(none.size() == 0);
  CHECK(none.find("a") == nullptr);
}

TEST_CASE("layout cache: a kept layout carries its index's multihash and DATA ranges", "[registration][layout_cache]") {
  const auto layout = layout_of(t::small_model_json);
  CHECK(layout->index->json() == t::small_model_json);
  CHECK(layout->index_multihash == hash::encode_multihash(hash::sha256(t::small_model_json)));
  // b: [0, 20), PAD [20, 24), v and w: [24, 40).
  const std::vector<std::pair<std::uint64_t, std::uint64_t>> data{{0, 20}, {24, 16}};
  CHECK(layout->data_ranges == data);
}

TEST_CASE("layout cache: the LIP tables' signature changes with what the index rebuild reads, not with memory",
          "[registration][layout_cache]") {
  fake_clock clock;
  regions::region_registry registry(clock);
  auto r1 = registry.register_region(t::host_region(me));
  auto r2 = registry.register_region(t::host_region(me));
  REQUIRE_OK(r1);
  REQUIRE_OK(r2);
  const auto m = t::small_model();
  auto signature = [&](const regions::region_info& region, auto&& change) {
    auto f = t::lip_feed("reg", m, t::region_entries(region));
    change(f);
    detail::lip_tables tables;
    REQUIRE_OK(tables.add_storages(std::move(f.storage_entries), registry, me));
    REQUIRE_OK(tables.add_segments(std::get<lease_segments>(f.payload).segments));
    tables.add_aliases(std::move(f.tensor_aliases));
    auto out = tables.layout_signature(m.total_size());
    (void)registry.release_all(tables.region_ids());
    return out;
  };
  const auto same = [](feed_request&) {};
  const auto base = signature(*r1, same);
  CHECK(signature(*r1, same) == base);
  // The memory behind the storages is checked on every registration, so it is not in it.
  CHECK(signature(*r2, same) == base);
  CHECK(signature(*r1, [](feed_request& f) { f.storage_entries[0].mapping_base_offset = 128; }) == base);
  // Everything steps 4–6 read is.
  CHECK(signature(*r1, [](feed_request& f) { f.tensor_aliases[0].shape[0] = 4; }) != base);
  CHECK(signature(*r1, [](feed_request& f) { f.tensor_aliases[0].stride[0] = 3; }) != base);
  CHECK(signature(*r1, [](feed_request& f) { f.tensor_aliases[0].name = "c"; }) != base);
  CHECK(signature(*r1, [](feed_request& f) { f.tensor_aliases[0].dtype = "torch.int32"; }) != base);
  CHECK(signature(*r1, [](feed_request& f) { f.tensor_aliases[1].storage_offset = 1; }) != base);
  CHECK(signature(*r1, [](feed_request& f) { f.storage_entries[0].storage_length = 12; }) != base);
  CHECK(signature(*r1, [](feed_request& f) { std::get<lease_segments>(f.payload).segments[0].artifact_offset += 8; }) !=
        base);
  detail::lip_tables empty;
  CHECK(empty.layout_signature(40) != empty.layout_signature(48));
}

// ---- through the engine ---------------------------------------------------------------------------

TEST_CASE("layout cache: versions over the same regions share the index, and a changed layout gets its own",
          "[registration][layout_cache]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  auto region = e->register_region(t::host_region(me));
  REQUIRE_OK(region);
  const auto m = t::small_model();
  REQUIRE(fill(*region, m));
  auto v1 = register_version(*e, m, *region, me, "cgid:wsync~test~1");
  REQUIRE_OK(v1);
  auto v2 = register_version(*e, m, *region, me, "cgid:wsync~test~2");
  REQUIRE_OK(v2);
  CHECK(v2->descriptor.index_multihash == v1->descriptor.index_multihash);
  CHECK(v2->descriptor.index_multihash == t::index_multihash_of(t::small_model_json));
  auto i1 = e->index_of("cgid:wsync~test~1");
  auto i2 = e->index_of("cgid:wsync~test~2");
  REQUIRE_OK(i1);
  REQUIRE_OK(i2);
  CHECK((*i2)->json() == t::small_model_json);
  // The bytes read are the region's, PAD as zero: the mi2 id of a version without a cgid.
  auto hashed = register_version(*e, m, *region);
  REQUIRE_OK(hashed);
  CHECK(hashed->descriptor.artifact_id == t::expected_mi2(t::small_model_json, m.canonical()));

  // Another layout over the same memory: b viewed as 4 floats, its index rebuilt.
  auto changed = m;
  REQUIRE(changed.tensors[2].name == "b");
  changed.tensors[2].shape = {4};
  changed.tensors[2].logical_length = 16;
  auto v3 = register_version(*e, changed, *region, me, "cgid:wsync~test~3");
  REQUIRE_OK(v3);
  CHECK(v3->descriptor.index_multihash == t::index_multihash_of(changed.index().json()));
  CHECK(v3->descriptor.index_multihash != v1->descriptor.index_multihash);
  // And a layout the rebuild refuses is refused again, not found in the cache.
  auto bad = m;
  bad.tensors[2].logical_length = 400;  // past its storage
  CHECK_CODE(register_version(*e, bad, *region, me, "cgid:wsync~test~4"), errc::out_of_range);
  CHECK_CODE(register_version(*e, bad, *region, me, "cgid:wsync~test~4"), errc::out_of_range);
}

TEST_CASE("layout cache: a kept layout still has its region checked: unregistered, re-registered smaller, elsewhere",
          "[registration][layout_cache]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  auto first = e->register_region(t::host_region(me));
  REQUIRE_OK(first);
  REQUIRE(fill(*first, m));
  auto v1 = register_version(*e, m, *first);
  REQUIRE_OK(v1);
  deregister_request drop;
  drop.artifact_id = v1->descriptor.artifact_id;
  REQUIRE_OK(e->deregister(drop));  // its lease let go of the region

  // Unregistered: the same tables naming it fail at Feed as before.
  auto gone = e->unregister_region(first->id, me, false);
  REQUIRE_OK(gone);
  CHECK(*gone);
  CHECK_ERROR(register_version(*e, m, *first), errc::not_found,
              "cannot add storage 's0': cannot find region '" + first->id + "': no such region");

  // Re-registered too small for s1 at 64: refused by the fit check.
  auto small = e->register_region(t::host_region(me, 80));
  REQUIRE_OK(small);
  CHECK_ERROR(register_version(*e, m, *small), errc::failed_precondition,
              "cannot add storage 's1': cannot use region '" + small->id +
                  "' for storage 's1': bytes [64, +20) exceed the region's 80 bytes");

  // Re-registered with other bytes: the version reads those.
  auto other = e->register_region(t::host_region(me));
  REQUIRE_OK(other);
  auto changed_bytes = m;
  for (auto& s : changed_bytes.storages) s.bytes = t::pattern(s.bytes.size(), 99);
  REQUIRE(fill(*other, changed_bytes));
  auto v2 = register_version(*e, m, *other);
  REQUIRE_OK(v2);
  CHECK(v2->descriptor.artifact_id == t::expected_mi2(t::small_model_json, changed_bytes.canonical()));
  CHECK(v2->descriptor.artifact_id != v1->descriptor.artifact_id);
}

TEST_CASE("layout cache: a kept layout does not outlive the regions of an owner that exited",
          "[registration][layout_cache][owner]") {
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
  REQUIRE(fill(*region, m));
  REQUIRE_OK(register_version(*e, m, *region, owner, "cgid:wsync~dead~1"));

  child.kill(SIGKILL);
  REQUIRE(child.wait() == 128 + SIGKILL);
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (e->stats().regions != 0 && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  REQUIRE(e->stats().regions == 0);
  CHECK(e->stats().leases == 0);

  // The next version of the same tables, now by this process: the dead owner's region is gone.
  CHECK_ERROR(register_version(*e, m, *region, me, "cgid:wsync~dead~2"), errc::not_found,
              "cannot add storage 's0': cannot find region '" + region->id + "': no such region");
  auto mine = e->register_region(t::host_region(me));
  REQUIRE_OK(mine);
  REQUIRE(fill(*mine, m));
  auto v3 = register_version(*e, m, *mine);
  REQUIRE_OK(v3);
  CHECK(v3->descriptor.artifact_id == t::expected_mi2(t::small_model_json, m.canonical()));
}

TEST_CASE("layout cache: versions committed at once from several threads all get the one index",
          "[registration][layout_cache][concurrency]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  constexpr int threads = 4, each = 8;
  std::vector<regions::region_info> regions;
  for (int i = 0; i < threads; ++i) {
    auto r = e->register_region(t::host_region(me));
    REQUIRE_OK(r);
    REQUIRE(fill(*r, m));
    regions.push_back(*r);
  }
  // Collected per thread, checked here: no Catch assertion runs on a worker.
  std::vector<std::vector<std::string>> outcomes(threads);
  std::vector<std::thread> workers;
  for (int i = 0; i < threads; ++i) {
    workers.emplace_back([&, i] {
      for (int k = 0; k < each; ++k) {
        const auto cgid = "cgid:wsync~t" + std::to_string(i) + "~" + std::to_string(k);
        auto done = register_version(*e, m, regions[static_cast<std::size_t>(i)], me, cgid);
        outcomes[static_cast<std::size_t>(i)].push_back(done ? done->descriptor.index_multihash
                                                             : "error: " + done.error().message);
      }
    });
  }
  for (auto& w : workers) w.join();
  const auto expected = t::index_multihash_of(t::small_model_json);
  for (const auto& per_thread : outcomes) {
    REQUIRE(per_thread.size() == static_cast<std::size_t>(each));
    for (const auto& got : per_thread) CHECK(got == expected);
  }
  CHECK(e->stats().leases == static_cast<std::size_t>(threads * each));
}

// ---- under concurrent churn -----------------------------------------------------------------------

namespace {

// What one stress worker saw: the calls that succeeded, and each failure's code and message
// (checked on the main thread: no Catch assertion runs on a worker).
struct churn_log {
  std::size_t committed = 0;
  std::vector<std::string> failures;
  void failed(const std::string& what, const error& e) {
    failures.push_back(what + ": " + std::string(errc_name(e.code)) + ": " + e.message);
  }
};

// Failures a racing revoke, expiry, abort or forced unregister may cause, and nothing else
// (ALREADY_EXISTS: versions without a cgid over equal bytes are one mi2 id, leased once).
bool expected_in_churn(const std::string& failure) {
  for (const char* code :
       {": NOT_FOUND: ", ": CANCELLED: ", ": FAILED_PRECONDITION: ", ": DEADLINE_EXCEEDED: ", ": ALREADY_EXISTS: "}) {
    if (failure.find(code) != std::string::npos) return true;
  }
  return false;
}

// Unregisters a trainer's region, if it has one (forced: a version may still lease it).
void drop_region(engine& e, const std::optional<regions::region_info>& region, churn_log& log) {
  if (!region) return;
  if (auto gone = e.unregister_region(region->id, me, true); !gone) log.failed("unregister", gone.error());
}

// A trainer's last steps: its last version revoked, its region unregistered.
void finish_trainer(engine& e, const std::string& previous, const std::optional<regions::region_info>& region,
                    churn_log& log) {
  if (!previous.empty()) (void)e.revoke(previous, "done");
  drop_region(e, region, log);
}

}  // namespace

TEST_CASE("layout cache: one layout re-registered while its versions and regions are dropped stays sound",
          "[registration][layout_cache][concurrency]") {
  fake_clock clock;
  auto options = t::deterministic_options(clock);
  options.hash_threads = 16;  // as many hashing threads as a large host has, whatever runs this
  auto e = t::make_engine(options);
  const auto m = t::small_model();
  constexpr int trainers = 4, versions = 40;
  // The registration a trainer is feeding or committing now, for the saboteur to revoke.
  std::mutex current_mutex;
  std::vector<std::string> current(trainers);
  std::atomic<bool> done{false};
  std::vector<churn_log> logs(trainers + 2);

  std::vector<std::thread> workers;
  for (int i = 0; i < trainers; ++i) {
    workers.emplace_back([&, i] {
      auto& log = logs[static_cast<std::size_t>(i)];
      std::optional<regions::region_info> region;
      std::string previous;  // the registration of the version before, revoked once the next is in
      for (int k = 0; k < versions; ++k) {
        if (!region || k % 7 == 3) {
          // A fresh region every few versions, the old one unregistered (forced: a version may
          // still lease it): the same layout over other memory, the kept one over none.
          drop_region(*e, region, log);
          auto r = e->register_region(t::host_region(me));
          if (!r) {
            log.failed("register region", r.error());
            return;
          }
          if (!fill(*r, m)) {
            log.failed("fill region", error{errc::internal, "cannot map the region"});
            return;
          }
          region = *r;
        }
        auto b = t::lip_begin(m.total_size(), me, k % 5 == 0 ? 1 : 0);
        const bool in_background = k % 2 == 1;
        if (in_background || k % 3 == 0)
          b.client_artifact_id = "cgid:wsync~churn" + std::to_string(i) + "~" + std::to_string(k);
        auto begun = e->begin(std::move(b));
        if (!begun) {
          log.failed("begin", begun.error());
          continue;
        }
        {
          std::lock_guard lock(current_mutex);
          current[static_cast<std::size_t>(i)] = begun->registration_id;
        }
        if (auto fed = e->feed(t::lip_feed(begun->registration_id, m, t::region_entries(*region))); !fed) {
          log.failed("feed", fed.error());
          continue;
        }
        if (k % 11 == 5) {
          // A client that dies between Begin and Commit: its registration is dropped.
          if (auto aborted = e->abort(begun->registration_id); !aborted) log.failed("abort", aborted.error());
          continue;
        }
        commit_options how;
        how.hash_in_background = in_background;
        auto committed = e->commit(begun->registration_id, how);
        if (!committed) {
          log.failed("commit", committed.error());
          continue;
        }
        ++log.committed;
        if (!previous.empty()) (void)e->revoke(previous, "next version");
        previous = begun->registration_id;
      }
      finish_trainer(*e, previous, region, log);
    });
  }
  // The saboteur: revokes whatever a trainer is feeding or committing, and lets TTLs run out.
  workers.emplace_back([&] {
    auto& log = logs[trainers];
    for (int n = 0; !done.load(); ++n) {
      std::string victim;
      {
        std::lock_guard lock(current_mutex);
        victim = current[static_cast<std::size_t>(n % trainers)];
      }
      if (!victim.empty() && n % 3 == 0) (void)e->revoke(victim, "saboteur");
      if (n % 5 == 0) {
        clock.advance(std::chrono::milliseconds(2));
        e->sweep();
      }
      std::this_thread::yield();
    }
    log.committed = 1;
  });
  // A reader: lists the versions and reads their indexes and stats while they come and go.
  workers.emplace_back([&] {
    auto& log = logs[trainers + 1];
    while (!done.load()) {
      for (const auto& a : e->list()) {
        auto idx = e->index_of(a.descriptor.artifact_id);
        if (idx && (*idx)->json() != t::small_model_json)
          log.failures.push_back("index of " + a.descriptor.artifact_id);
        (void)e->wait_artifact_hash(a.descriptor.artifact_id, std::chrono::milliseconds(1));
      }
      (void)e->stats();
    }
    log.committed = 1;
  });
  for (int i = 0; i < trainers; ++i) workers[static_cast<std::size_t>(i)].join();
  done.store(true);
  for (std::size_t i = trainers; i < workers.size(); ++i) workers[i].join();

  std::size_t committed = 0;
  for (const auto& log : logs) {
    committed += log.committed;
    for (const auto& f : log.failures) {
      INFO(f);
      CHECK(expected_in_churn(f));
    }
  }
  CHECK(committed > trainers + 2);  // most versions got through
  // Everything let go: no lease, registration or region is left, and the cache stays usable.
  e->sweep();
  const auto s = e->stats();
  CHECK(s.leases == 0);
  CHECK(s.pending_registrations == 0);
  CHECK(s.regions == 0);
  auto region = e->register_region(t::host_region(me));
  REQUIRE_OK(region);
  REQUIRE(fill(*region, m));
  auto last = register_version(*e, m, *region);
  REQUIRE_OK(last);
  CHECK(last->descriptor.artifact_id == t::expected_mi2(t::small_model_json, m.canonical()));
}

TEST_CASE("layout cache: one layout over device regions re-registered while readers open its versions",
          "[registration][layout_cache][devices][concurrency]") {
  // The CUDA paths of the LIP commit (IPC mappings kept by their regions, VMM mappings, the
  // device layout a reader opens) on a fake device: VRAM regions by IPC handle and of VMM
  // chunks, replaced every few versions and unregistered (forced) under the leases reading them.
  fake_clock clock;
  auto devices = std::make_shared<t::fake_device_memory>(1);
  auto options = t::deterministic_options(clock);
  options.devices = devices;
  options.hash_threads = 16;
  auto e = t::make_engine(options);
  const auto m = t::small_model();
  constexpr int trainers = 3, versions = 30;
  auto vram_region = [&](std::uint32_t seed) -> result<regions::region_info> {
    const auto handle = devices->export_allocation(0, 4096);
    auto memory = devices->memory_of(handle);
    const auto& s0 = m.storage("s0").bytes;
    const auto& s1 = m.storage("s1").bytes;
    std::memcpy(memory.data(), s0.data(), s0.size());
    std::memcpy(memory.data() + 64, s1.data(), s1.size());
    memory[200] = static_cast<std::byte>(seed);  // outside the storages: the same canonical bytes
    regions::register_request r;
    r.kind = regions::memory_kind::vram;
    r.owner_pid = me;
    r.device_id = 0;
    r.size_bytes = 4096;
    if (seed % 2 == 0) {
      r.cuda_ipc_handle = handle;
      return e->register_region(std::move(r));
    }
    // Odd seeds: CUDA VMM memory (expandable segments), two chunks of the same bytes.
    auto vmm = std::make_shared<regions::vmm_chunks>();
    for (std::size_t at = 0; at < 4096; at += 2048) {
      auto chunk = memory::shared_memory::create(2048, "test-vmm");
      if (!chunk) return tl::unexpected(chunk.error());
      std::memcpy(chunk->mutable_bytes().data(), memory.data() + at, 2048);
      vmm->fds.emplace_back(::fcntl(chunk->fd(), F_DUPFD_CLOEXEC, 0));
      vmm->chunk_bytes.push_back(2048);
    }
    r.vmm = std::move(vmm);
    return e->register_region(std::move(r));
  };
  auto entries_of = [](const regions::region_info& region) {
    std::map<std::string, storage_entry> out;
    for (auto [id, length, at] : {std::tuple{"s0", 16u, 0u}, std::tuple{"s1", 20u, 64u}}) {
      storage_entry s;
      s.storage_id = id;
      s.device_id = 0;
      s.storage_length = length;
      s.source = region_ref_source{region.id, regions::memory_kind::vram, 0, region.size_bytes};
      s.mapping_base_offset = at;
      out.emplace(id, s);
    }
    return out;
  };
  std::atomic<bool> done{false};
  std::vector<churn_log> logs(trainers + 1);
  std::mutex ids_mutex;
  std::vector<std::string> ids;  // committed versions, for the reader
  std::vector<std::thread> workers;
  for (int i = 0; i < trainers; ++i) {
    workers.emplace_back([&, i] {
      auto& log = logs[static_cast<std::size_t>(i)];
      std::optional<regions::region_info> region;
      std::string previous;
      for (int k = 0; k < versions; ++k) {
        if (!region || k % 5 == 2) {
          drop_region(*e, region, log);
          auto r = vram_region(static_cast<std::uint32_t>(k + i));
          if (!r) return log.failed("register region", r.error());
          region = *r;
        }
        auto b = t::lip_begin(m.total_size(), me, 0);
        b.device_id = 0;
        b.client_artifact_id = "cgid:wsync~gpu" + std::to_string(i) + "~" + std::to_string(k);
        auto begun = e->begin(std::move(b));
        if (!begun) {
          log.failed("begin", begun.error());
          continue;
        }
        if (auto fed = e->feed(t::lip_feed(begun->registration_id, m, entries_of(*region))); !fed) {
          log.failed("feed", fed.error());
          continue;
        }
        commit_options how;
        how.hash_in_background = k % 2 == 0;
        auto committed = e->commit(begun->registration_id, how);
        if (!committed) {
          log.failed("commit", committed.error());
          continue;
        }
        ++log.committed;
        {
          std::lock_guard lock(ids_mutex);
          ids.push_back(committed->descriptor.artifact_id);
        }
        if (!previous.empty()) (void)e->revoke(previous, "next version");
        previous = begun->registration_id;
      }
      finish_trainer(*e, previous, region, log);
    });
  }
  // The reader: opens the newest versions' device layouts and reads them back.
  workers.emplace_back([&] {
    auto& log = logs[trainers];
    while (!done.load()) {
      std::vector<std::string> newest;
      {
        std::lock_guard lock(ids_mutex);
        for (std::size_t n = ids.size() > 3 ? ids.size() - 3 : 0; n < ids.size(); ++n) newest.push_back(ids[n]);
      }
      for (const auto& id : newest) {
        auto layout = e->device_layout_of(id);
        if (!layout) {
          if (layout.error().code != errc::not_found) log.failed("device layout of " + id, layout.error());
          continue;
        }
        std::string bytes(layout->descriptor.total_size, '\0');
        for (const auto& seg : layout->segments) {
          if (seg.allocation >= layout->allocations.size()) {
            log.failures.push_back("segment past the allocations of " + id);
            break;
          }
          const auto& allocation = layout->allocations[seg.allocation];
          if (seg.allocation_offset + seg.length > allocation.size_bytes) {
            log.failures.push_back("segment past its allocation in " + id);
            break;
          }
          if (allocation.vmm) {
            bytes = m.canonical();  // VMM chunks are read through their fds, not the fake's handles
            break;
          }
          const auto memory = devices->memory_of(allocation.cuda_ipc_handle);
          if (seg.allocation_offset + seg.length > memory.size()) {
            log.failures.push_back("segment past its allocation in " + id);
            break;
          }
          std::memcpy(bytes.data() + seg.artifact_offset, memory.data() + seg.allocation_offset, seg.length);
        }
        if (bytes != m.canonical()) log.failures.push_back("the bytes of " + id + " read back differ");
        (void)e->wait_artifact_hash(id, std::chrono::milliseconds(1));
      }
      (void)e->stats();
    }
  });
  for (int i = 0; i < trainers; ++i) workers[static_cast<std::size_t>(i)].join();
  done.store(true);
  workers.back().join();

  std::size_t committed = 0;
  for (const auto& log : logs) {
    committed += log.committed;
    for (const auto& f : log.failures) {
      INFO(f);
      CHECK(false);  // nothing here races: each trainer revokes only its own versions
    }
  }
  CHECK(committed == static_cast<std::size_t>(trainers * versions));
  const auto s = e->stats();
  CHECK(s.leases == 0);
  CHECK(s.pending_registrations == 0);
  CHECK(s.regions == 0);
}
