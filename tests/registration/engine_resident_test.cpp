// The engine's export_resident() and adopt_resident(): a second engine takes over the first's
// stable DRAM entries without a copy (docs/architecture.md §14.2).
#include "tensorreg/registration/engine.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <thread>

#include "support/engine_helpers.hpp"
#include "support/fake_clock.hpp"
#include "support/recording_logger.hpp"

namespace {

namespace t = tensorreg::testing;
using tensorreg::errc;
using tensorreg::unique_fd;

t::model one_tensor(std::size_t n, std::uint32_t seed) {
  t::model m;
  m.storages = {{"s0", t::pattern(n, seed)}};
  m.tensors = {{"w", "s0", {static_cast<std::int64_t>(n / 4)}, {1}, "torch.float32", 0, n}};
  return m;
}

// Begin + Feed in 1 MiB chunks + Commit of a stable_dram registration.
tensorreg::result<tensorreg::registration::commit_response> put_stable(tensorreg::registration::engine& e,
                                                                       const t::model& m) {
  TENSORREG_TRY_ASSIGN(auto begun, e.begin(t::stable_begin(m, ::getpid())));
  TENSORREG_TRY(t::feed_chunks(e, begun.registration_id, m.canonical(), std::size_t{1} << 20));
  return e.commit(begun.registration_id);
}

std::string bytes_of(tensorreg::registration::engine& e, const std::string& id) {
  auto src = e.open_bytes(id);
  REQUIRE(src);
  std::string out((*src)->size(), '\0');
  REQUIRE((*src)->read(0, std::as_writable_bytes(std::span(out.data(), out.size()))));
  return out;
}

ino_t inode_of(tensorreg::registration::engine& e, const std::string& id) {
  auto replica = e.stable_replica_fd(id);
  REQUIRE(replica);
  struct stat st {};
  REQUIRE(::fstat(replica->second.get(), &st) == 0);
  return st.st_ino;
}

void wait_verified(const tensorreg::registration::engine& e) {
  for (int i = 0; i < 1000 && e.adopted_unverified() != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  REQUIRE(e.adopted_unverified() == 0);
}

}  // namespace

TEST_CASE("engine resident state: a second engine adopts the stable entries without a copy",
          "[registration][engine][resident][concurrency]") {
  t::fake_clock clock;
  auto first = t::make_engine(clock);
  const auto a = one_tensor((std::size_t{5} << 20) + 8, 1);  // two leaves
  const auto b = one_tensor(4096, 2);
  auto ca = put_stable(*first, a);
  auto cb = put_stable(*first, b);
  REQUIRE_OK(ca);
  REQUIRE_OK(cb);
  auto exported = first->export_resident();
  REQUIRE_OK(exported);
  CHECK(exported->fds.size() == 2);
  auto state = tensorreg::persistence::decode_resident_state(exported->state);
  REQUIRE_OK(state);

  auto second = t::make_engine(clock);
  const auto report = second->adopt_resident(*state, std::move(exported->fds));
  CHECK(report.adopted == 2);
  CHECK(report.adopted_bytes == a.total_size() + b.total_size());
  CHECK(report.refused.empty());
  for (const auto* c : {&*ca, &*cb}) {
    const auto& id = c->descriptor.artifact_id;
    auto got = second->get(id);
    REQUIRE_OK(got);
    CHECK(t::describe(got->descriptor) == t::describe(c->descriptor));
    CHECK(bytes_of(*second, id) == bytes_of(*first, id));
    CHECK(inode_of(*second, id) == inode_of(*first, id));  // the same memory, not a copy
  }
  wait_verified(*second);
  CHECK(second->get(ca->descriptor.artifact_id));  // the re-hash found them whole
  CHECK(second->stats().stable_bytes == a.total_size() + b.total_size());
}

TEST_CASE("engine resident state: an unsealed or short memfd is refused, the others adopted",
          "[registration][engine][resident]") {
  t::fake_clock clock;
  auto first = t::make_engine(clock);
  const auto a = one_tensor(4096, 3);
  const auto b = one_tensor(8192, 4);
  auto ca = put_stable(*first, a);
  auto cb = put_stable(*first, b);
  REQUIRE_OK(ca);
  REQUIRE_OK(cb);
  auto exported = first->export_resident();
  REQUIRE_OK(exported);
  auto state = tensorreg::persistence::decode_resident_state(exported->state);
  REQUIRE_OK(state);
  const auto a_name = tensorreg::persistence::fd_name_of(ca->descriptor.artifact_id);
  const auto b_name = tensorreg::persistence::fd_name_of(cb->descriptor.artifact_id);
  for (auto& f : exported->fds) {
    unique_fd forged(::memfd_create("forged", MFD_CLOEXEC | MFD_ALLOW_SEALING));
    REQUIRE(forged);
    if (f.name == a_name) {
      // The right bytes, but nothing keeps them from changing.
      const auto bytes = a.canonical();
      REQUIRE(::write(forged.get(), bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()));
      REQUIRE(::fcntl(forged.get(), F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK) == 0);
      f.fd = std::move(forged);
    } else if (f.name == b_name) {
      REQUIRE(::ftruncate(forged.get(), 4096) == 0);  // sealed, but shorter than the entry
      REQUIRE(::fcntl(forged.get(), F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK) == 0);
      f.fd = std::move(forged);
    }
  }
  auto second = t::make_engine(clock);
  const auto report = second->adopt_resident(*state, std::move(exported->fds));
  CHECK(report.adopted == 0);
  REQUIRE(report.refused.size() == 2);
  const std::string refused = report.refused[0] + "\n" + report.refused[1];
  CHECK_THAT(refused, Catch::Contains(ca->descriptor.artifact_id + ": cannot adopt the memfd of " +
                                      ca->descriptor.artifact_id + ": it lacks the seal F_SEAL_WRITE"));
  CHECK_THAT(refused, Catch::Contains("it holds 4096 bytes, its entry says 8192"));
  CHECK_CODE(second->get(ca->descriptor.artifact_id), errc::not_found);
  CHECK_CODE(second->get(cb->descriptor.artifact_id), errc::not_found);
}

TEST_CASE("engine resident state: bytes that are not the id's are dropped after the re-hash, never served again",
          "[registration][engine][resident][concurrency]") {
  t::fake_clock clock;
  auto first = t::make_engine(clock);
  const auto a = one_tensor(4096, 5);
  auto ca = put_stable(*first, a);
  REQUIRE_OK(ca);
  auto exported = first->export_resident();
  REQUIRE_OK(exported);
  auto state = tensorreg::persistence::decode_resident_state(exported->state);
  REQUIRE_OK(state);
  REQUIRE(exported->fds.size() == 1);
  // Sealed and of the right size, but one byte differs from what the id names.
  auto bytes = a.canonical();
  bytes[7] = static_cast<char>(bytes[7] ^ 0x40);
  unique_fd forged(::memfd_create("forged", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  REQUIRE(::write(forged.get(), bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()));
  REQUIRE(::fcntl(forged.get(), F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK) == 0);
  exported->fds[0].fd = std::move(forged);

  t::recording_logger log;
  auto options = t::deterministic_options(clock);
  options.log = &log;
  auto second = t::make_engine(options);
  CHECK(second->adopt_resident(*state, std::move(exported->fds)).adopted == 1);
  wait_verified(*second);
  const auto& id = ca->descriptor.artifact_id;
  for (int i = 0; i < 200 && second->get(id); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  CHECK_CODE(second->get(id), errc::not_found);
  CHECK_CODE(second->open_bytes(id), errc::not_found);
  CHECK(log.count(tensorreg::log_level::error,
                  "dropped adopted artifact " + id + ": DATA_LOSS: adopted artifact " + id) == 1);
}
