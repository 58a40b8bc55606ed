// Every fault site the engine reaches, failed under every operation that reaches it: the
// operation answers the error the real failure would (code and message), and once the fault is
// gone the engine is as before — nothing pending, no region, lease, stable byte or reservation
// left over, earlier artifacts unchanged — and the same operation succeeds with the right id.
#include "tensorreg/registration/engine.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "support/engine_helpers.hpp"
#include "support/fake_device_memory.hpp"
#include "tensorreg/common/fault_injection.hpp"

namespace {

using namespace tensorreg;
using namespace tensorreg::registration;
using tensorreg::testing::fake_clock;
using tensorreg::testing::fake_device_memory;
namespace t = tensorreg::testing;

const std::int32_t me = static_cast<std::int32_t>(::getpid());

// An engine with a fake GPU (for the coalesced plan) and one committed artifact, the witness,
// whose bytes and descriptor no failed operation may change.
struct rig {
  fake_clock clock;
  std::shared_ptr<fake_device_memory> devices = std::make_shared<fake_device_memory>(1);
  std::unique_ptr<engine> e;
  t::model witness = t::small_model();
  std::string witness_id;

  rig() {
    auto options = t::deterministic_options(clock);
    options.devices = devices;
    options.stable_bytes = 1 << 20;
    e = t::make_engine(options);
    witness.storages[0].bytes = t::pattern(witness.storages[0].bytes.size(), 7);
    auto put = t::register_stable(*e, witness, me);
    REQUIRE_OK(put);
    witness_id = put->descriptor.artifact_id;
    REQUIRE(witness_id == t::expected_mi2(t::small_model_json, witness.canonical()));
  }
};

// What must be back to its value from before a failed operation.
struct engine_state {
  engine_stats stats;
  std::vector<std::string> artifacts;

  static engine_state of(engine& e) {
    engine_state out{e.stats(), {}};
    for (const auto& a : e.list()) out.artifacts.push_back(a.descriptor.artifact_id);
    return out;
  }
};

void check_same(const engine_state& before, const engine_state& after) {
  CHECK(after.stats.pending_registrations == before.stats.pending_registrations);
  CHECK(after.stats.regions == before.stats.regions);
  CHECK(after.stats.leases == before.stats.leases);
  CHECK(after.stats.leased_bytes == before.stats.leased_bytes);
  CHECK(after.stats.artifacts == before.stats.artifacts);
  CHECK(after.stats.stable_bytes == before.stats.stable_bytes);
  CHECK(after.stats.stable_reserved_bytes == before.stats.stable_reserved_bytes);
  CHECK(after.stats.open_mappings == before.stats.open_mappings);
  CHECK(after.artifacts == before.artifacts);
}

// The witness reads back as committed.
void check_witness(rig& r) {
  auto got = r.e->get(r.witness_id);
  REQUIRE_OK(got);
  CHECK(got->descriptor.artifact_id == r.witness_id);
  CHECK(got->stable_replica);
  auto bytes = r.e->open_bytes(r.witness_id);
  REQUIRE_OK(bytes);
  std::string read((*bytes)->size(), '\0');
  REQUIRE_OK((*bytes)->read(0, std::as_writable_bytes(std::span<char>(read))));
  CHECK(read == r.witness.canonical());
}

policy::store_policy local_stable_must() {
  policy::store_policy p;
  p.must = {policy::tier_spec{policy::tier::stable_dram, policy::scope::local, 0, policy::retention::pinned, {}}};
  return p;
}

// ---- the operations ------------------------------------------------------------------------
//
// Each runs a whole client operation on the rig's engine and answers the artifact id it made
// (or the first error). Region-backed operations unregister nothing: what they leave is what a
// client would leave.

using operation = std::function<result<std::string>(rig&)>;

result<std::string> stable_put(rig& r) {
  TENSORREG_TRY_ASSIGN(auto done, t::register_stable(*r.e, t::small_model(), me));
  return done.descriptor.artifact_id;
}

result<std::string> lease_with_local_stable_copy(rig& r) {
  TENSORREG_TRY_ASSIGN(auto done, t::register_lip(*r.e, t::small_model(), me, nullptr, local_stable_must()));
  return done.descriptor.artifact_id;
}

// A lease over a region: daemon-managed memory (the engine creates it), or the client's own
// sealed memfd (the engine maps it).
result<std::string> lease_over_region(rig& r, bool daemon_managed) {
  const auto m = t::small_model();
  regions::register_request request;
  request.kind = regions::memory_kind::host_shared;
  request.owner_pid = me;
  request.size_bytes = 4096;
  if (daemon_managed) {
    request.host_shared = regions::host_shared_spec{"", true, regions::host_shared_class::scratch};
  } else {
    request.host_shared = regions::host_shared_spec{"attach-me", false, regions::host_shared_class::scratch};
    unique_fd fd(::memfd_create("tensorreg-faults-client", MFD_CLOEXEC | MFD_ALLOW_SEALING));
    REQUIRE(fd);
    REQUIRE(::ftruncate(fd.get(), 4096) == 0);
    REQUIRE(::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK) == 0);
    // The client writes its storages before registering; the engine maps the memfd read-only.
    std::uint64_t at = 0;
    for (const auto& s : m.storages) {
      REQUIRE(::pwrite(fd.get(), s.bytes.data(), s.bytes.size(), static_cast<off_t>(at)) ==
              static_cast<ssize_t>(s.bytes.size()));
      at += 64;
    }
    request.memfd = std::move(fd);
  }
  TENSORREG_TRY_ASSIGN(auto region, r.e->register_region(std::move(request)));
  std::map<std::string, storage_entry> entries;
  std::uint64_t at = 0;
  for (const auto& s : m.storages) {
    if (daemon_managed) std::memcpy(region.memory->mutable_bytes().data() + at, s.bytes.data(), s.bytes.size());
    storage_entry entry;
    entry.storage_id = s.id;
    entry.device_id = region.device_id;
    entry.storage_length = s.bytes.size();
    entry.source = region_ref_source{region.id, region.kind, region.device_id, region.size_bytes};
    entry.mapping_base_offset = at;
    entries.emplace(s.id, std::move(entry));
    at += 64;
  }
  TENSORREG_TRY_ASSIGN(auto begun, r.e->begin(t::lip_begin(m.total_size(), me)));
  TENSORREG_TRY(r.e->feed(t::lip_feed(begun.registration_id, m, entries)));
  TENSORREG_TRY_ASSIGN(auto done, r.e->commit(begun.registration_id));
  return done.descriptor.artifact_id;
}

result<std::string> coalesced_put(rig& r, std::optional<policy::store_policy> p) {
  const auto m = t::small_model();
  auto request = t::stable_begin(m, me);
  request.plan = coalesced_options{};
  request.policy = std::move(p);
  TENSORREG_TRY_ASSIGN(auto begun, r.e->begin(request));
  const auto& hs = std::get<coalesced_handshake>(begun.handshake);
  auto memory = r.devices->memory_of(hs.daemon_ipc_handle);
  REQUIRE(memory.size() == m.canonical().size());
  std::memcpy(memory.data(), m.canonical().data(), memory.size());
  TENSORREG_TRY_ASSIGN(auto done, r.e->commit(begun.registration_id));
  return done.descriptor.artifact_id;
}

// GetArtifactMemfd of the witness: the fd must map its bytes.
result<std::string> get_memfd(rig& r) {
  TENSORREG_TRY_ASSIGN(auto opened, r.e->stable_replica_fd(r.witness_id));
  const auto& fd = opened.second;
  const auto size = r.witness.canonical().size();
  void* base = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd.get(), 0);
  REQUIRE(base != MAP_FAILED);
  const std::string seen(static_cast<const char*>(base), size);
  ::munmap(base, size);
  CHECK(seen == r.witness.canonical());
  return r.witness_id;
}

struct fault_case {
  std::string operation_name;
  operation run;
  fault_site site;
  int error;
  std::uint64_t skip;  // calls of the site that go through first
  errc code;
  std::string message;  // "{id}" stands for the id the operation makes
};

std::string with_id(std::string message, const std::string& id) {
  if (const auto at = message.find("{id}"); at != std::string::npos) message.replace(at, 4, id);
  return message;
}

const std::string emfile = std::strerror(EMFILE);
const std::string enomem = std::strerror(ENOMEM);
const std::string enospc = std::strerror(ENOSPC);
const std::string eio = std::strerror(EIO);

// The rows: each site under each operation that reaches it. A stable put makes its staging
// memfd at Begin (memfd_create, ftruncate, mmap: the first call of each) and its replica at
// Commit (the second), which it then seals through a read-only reopen (open, the third mmap).
std::vector<fault_case> fault_table() {
  using fs = fault_site;
  const auto put = operation(stable_put);
  const auto lease_copy = operation(lease_with_local_stable_copy);
  const auto managed = operation([](rig& r) { return lease_over_region(r, true); });
  const auto client = operation([](rig& r) { return lease_over_region(r, false); });
  const auto coalesced = operation([](rig& r) { return coalesced_put(r, std::nullopt); });
  const auto coalesced_copy = operation([](rig& r) { return coalesced_put(r, local_stable_must()); });
  const auto memfd = operation(get_memfd);
  const auto re = errc::resource_exhausted;
  const std::string no_copy = "cannot keep a local stable copy of {id}: ";
  return {
      // put, Begin: the staging memfd
      {"put (begin)", put, fs::allocate, ENOMEM, 0, re,
       "cannot allocate shared memory 'tensorreg-publish' of 40 bytes: " + enomem},
      {"put (begin)", put, fs::memfd_create, EMFILE, 0, re,
       "cannot create shared memory 'tensorreg-publish': " + emfile},
      {"put (begin)", put, fs::ftruncate, ENOSPC, 0, re,
       "cannot size shared memory 'tensorreg-publish' to 40 bytes: " + enospc},
      {"put (begin)", put, fs::mmap, ENOMEM, 0, re, "cannot map shared memory of 40 bytes: " + enomem},
      // put, Commit (stable DRAM plan): the private replica
      {"put (commit)", put, fs::allocate, ENOMEM, 1, re,
       "cannot allocate shared memory 'tensorreg-stable' of 40 bytes: " + enomem},
      {"put (commit)", put, fs::memfd_create, EMFILE, 1, re,
       "cannot create shared memory 'tensorreg-stable': " + emfile},
      {"put (commit)", put, fs::ftruncate, EIO, 1, re,
       "cannot size shared memory 'tensorreg-stable' to 40 bytes: " + eio},
      {"put (commit)", put, fs::mmap, ENOMEM, 1, re, "cannot map shared memory of 40 bytes: " + enomem},
      {"put (commit)", put, fs::open, EMFILE, 0, re,
       "cannot seal shared memory of 40 bytes: cannot reopen it read-only: " + emfile},
      {"put (commit)", put, fs::mmap, ENOMEM, 2, re,
       "cannot seal shared memory of 40 bytes: cannot map it read-only: " + enomem},
      // lease in place, Commit with a local stable copy that must be made
      {"lease commit (local stable must)", lease_copy, fs::allocate, ENOMEM, 0, re,
       no_copy + "cannot allocate shared memory 'tensorreg-stable' of 40 bytes: " + enomem},
      {"lease commit (local stable must)", lease_copy, fs::memfd_create, ENFILE, 0, re,
       no_copy + "cannot create shared memory 'tensorreg-stable': " + std::strerror(ENFILE)},
      {"lease commit (local stable must)", lease_copy, fs::ftruncate, ENOSPC, 0, re,
       no_copy + "cannot size shared memory 'tensorreg-stable' to 40 bytes: " + enospc},
      {"lease commit (local stable must)", lease_copy, fs::mmap, ENOMEM, 0, re,
       no_copy + "cannot map shared memory of 40 bytes: " + enomem},
      {"lease commit (local stable must)", lease_copy, fs::open, EMFILE, 0, re,
       no_copy + "cannot seal shared memory of 40 bytes: cannot reopen it read-only: " + emfile},
      // a lease over a region: the region's memory is made (daemon-managed) or mapped (client's)
      {"lease over a daemon-managed region", managed, fs::allocate, ENOMEM, 0, re,
       "cannot allocate shared memory 'tensorreg-region' of 4096 bytes: " + enomem},
      {"lease over a daemon-managed region", managed, fs::memfd_create, EMFILE, 0, re,
       "cannot create shared memory 'tensorreg-region': " + emfile},
      {"lease over a daemon-managed region", managed, fs::ftruncate, ENOSPC, 0, re,
       "cannot size shared memory 'tensorreg-region' to 4096 bytes: " + enospc},
      {"lease over a daemon-managed region", managed, fs::mmap, ENOMEM, 0, re,
       "cannot map shared memory of 4096 bytes: " + enomem},
      {"lease over a client's memfd region", client, fs::mmap, ENOMEM, 0, re,
       "cannot register region: cannot map shared memory of 4096 bytes: " + enomem},
      {"lease over a client's memfd region", client, fs::mmap, EACCES, 0, errc::permission_denied,
       "cannot register region: cannot map shared memory of 4096 bytes: " + std::string(std::strerror(EACCES))},
      // coalesced: the device buffer at Begin; the local stable copy at Commit
      {"coalesced put (begin)", coalesced, fs::allocate, ENOMEM, 0, re,
       "cannot allocate device memory on device 0 of 40 bytes: " + enomem},
      {"coalesced commit (local stable must)", coalesced_copy, fs::memfd_create, EMFILE, 0, re,
       no_copy + "cannot create shared memory 'tensorreg-stable': " + emfile},
      {"coalesced commit (local stable must)", coalesced_copy, fs::mmap, ENOMEM, 0, re,
       no_copy + "cannot map shared memory of 40 bytes: " + enomem},
      {"coalesced commit (local stable must)", coalesced_copy, fs::allocate, ENOMEM, 1, re,
       no_copy + "cannot allocate shared memory 'tensorreg-stable' of 40 bytes: " + enomem},
      // GetArtifactMemfd: a fresh read-only open of the replica
      {"get memfd", memfd, fs::open, EMFILE, 0, re,
       "cannot open the stable replica of {id}: cannot reopen shared memory of 40 bytes read-only: " + emfile},
      {"get memfd", memfd, fs::open, EIO, 0, errc::internal,
       "cannot open the stable replica of {id}: cannot reopen shared memory of 40 bytes read-only: " + eio},
  };
}

}  // namespace

TEST_CASE("engine faults: each failed call answers its error and leaves the engine as it was",
          "[faults][engine_faults]") {
  for (const auto& row : fault_table()) {
    const std::string name = row.operation_name + ", " + std::string(to_string(row.site)) + " fails with " +
                             std::strerror(row.error) + " after " + std::to_string(row.skip);
    DYNAMIC_SECTION(name) {
      rig r;
      const auto expected_id = t::expected_mi2(t::small_model_json, t::small_model().canonical());
      const bool reads_witness = row.operation_name == "get memfd";
      const auto id = reads_witness ? r.witness_id : expected_id;
      const auto before = engine_state::of(*r.e);
      {
        scoped_fault fault(row.site, row.error, row.skip, 1);
        auto failed = row.run(r);
        CHECK(fault.fired() == 1);
        CHECK_ERROR(failed, row.code, with_id(row.message, id));
      }
      check_same(before, engine_state::of(*r.e));
      check_witness(r);
      // The fault gone, the same operation goes through and names the bytes it was given.
      auto again = row.run(r);
      REQUIRE_OK(again);
      CHECK(*again == id);
      check_witness(r);
    }
  }
}

TEST_CASE("engine faults: a failed commit of a stable upload gives back its budget reservation",
          "[faults][engine_faults]") {
  rig r;
  const auto m = t::small_model();
  auto begun = r.e->begin(t::stable_begin(m, me));
  REQUIRE_OK(begun);
  CHECK(r.e->stats().stable_reserved_bytes == 40);
  REQUIRE_OK(t::feed_chunks(*r.e, begun->registration_id, m.canonical(), 16));
  {
    scoped_fault fault(fault_site::memfd_create, ENOMEM);
    CHECK_ERROR(r.e->commit(begun->registration_id), errc::resource_exhausted,
                "cannot create shared memory 'tensorreg-stable': " + enomem);
  }
  CHECK(r.e->stats().stable_reserved_bytes == 0);
  CHECK(r.e->stats().pending_registrations == 0);
  // The registration is over: the client begins again.
  CHECK_CODE(r.e->commit(begun->registration_id), errc::not_found);
}

TEST_CASE("engine faults: a clock that jumps past every TTL ends pending registrations and leases cleanly",
          "[faults][engine_faults]") {
  rig r;
  const auto m = t::small_model();
  const auto before = engine_state::of(*r.e);
  // A pending stable upload (staging memfd, budget reservation), a pending lease and a
  // committed lease over a daemon-managed region, all with TTLs.
  auto upload = t::stable_begin(m, me);
  upload.ttl_ms = 1000;
  auto staged = r.e->begin(upload);
  REQUIRE_OK(staged);
  auto pending_lease = r.e->begin(t::lip_begin(m.total_size(), me, 1000));
  REQUIRE_OK(pending_lease);
  std::string lease_id;
  auto leased = t::register_lip(*r.e, m, me, &lease_id);
  REQUIRE_OK(leased);
  REQUIRE_OK(r.e->keep_alive(keep_alive_request{lease_id, 1000, 1, me}));
  CHECK(r.e->stats().pending_registrations == 2);
  CHECK(r.e->stats().leases == 1);
  CHECK(r.e->stats().stable_reserved_bytes == 40);

  r.clock.advance(std::chrono::hours(24 * 365 * 100));  // a century later
  r.e->sweep();

  check_same(before, engine_state::of(*r.e));
  check_witness(r);
  CHECK_ERROR(r.e->commit(staged->registration_id), errc::deadline_exceeded,
              "cannot commit registration '" + staged->registration_id + "': its TTL expired");
  CHECK_ERROR(r.e->feed(t::lip_feed(pending_lease->registration_id, m)), errc::deadline_exceeded,
              "cannot feed registration '" + pending_lease->registration_id + "': its TTL expired");
  CHECK_CODE(r.e->get(leased->descriptor.artifact_id), errc::not_found);
  // The same bytes register again, under the same id.
  auto again = t::register_lip(*r.e, m, me);
  REQUIRE_OK(again);
  CHECK(again->descriptor.artifact_id == leased->descriptor.artifact_id);
}
