// Client memory that shrinks under the engine (issue #15's crash): the read answers DATA_LOSS
// and the engine goes on serving (DECISIONS §6).
#include "tensorreg/registration/engine.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "support/engine_helpers.hpp"
#include "tensorreg/memory/shared_memory.hpp"

namespace {

using namespace tensorreg;
using namespace tensorreg::registration;
using tensorreg::testing::fake_clock;
namespace t = tensorreg::testing;

const std::int32_t me = static_cast<std::int32_t>(::getpid());

// A storage in a client memfd the client can still shrink (no seal): the library's adopt()
// maps it, as a host_storage_source could; only the read guard stands between it and SIGBUS.
struct client_storage {
  unique_fd fd;
  std::shared_ptr<const memory::shared_memory> mapping;
};

client_storage unsealed_storage(const std::string& bytes) {
  const std::size_t size = std::max<std::size_t>(bytes.size(), 4096);
  unique_fd fd(::memfd_create("tensorreg-client", MFD_CLOEXEC));
  REQUIRE(fd);
  REQUIRE(::ftruncate(fd.get(), static_cast<off_t>(size)) == 0);
  REQUIRE(::pwrite(fd.get(), bytes.data(), bytes.size(), 0) == static_cast<ssize_t>(bytes.size()));
  unique_fd dup(::fcntl(fd.get(), F_DUPFD_CLOEXEC, 0));
  auto mapped = memory::shared_memory::adopt(std::move(dup), size, false);
  REQUIRE_OK(mapped);
  return {std::move(fd), std::make_shared<const memory::shared_memory>(std::move(*mapped))};
}

}  // namespace

TEST_CASE("engine client memory: a lease over memory that shrank answers DATA_LOSS and the engine serves on",
          "[registration][engine_client_memory]") {
  fake_clock clock;
  auto e = t::make_engine(clock);
  const auto m = t::small_model();
  std::map<std::string, client_storage> storages;
  std::map<std::string, storage_entry> entries;
  for (const auto& s : m.storages) {
    auto& c = storages[s.id] = unsealed_storage(s.bytes);
    storage_entry entry;
    entry.storage_id = s.id;
    entry.device_id = 0;
    entry.storage_length = s.bytes.size();
    entry.source = host_storage_source{c.mapping};
    entries.emplace(s.id, std::move(entry));
  }
  auto begun = e->begin(t::lip_begin(m.total_size(), me));
  REQUIRE_OK(begun);
  REQUIRE_OK(e->feed(t::lip_feed(begun->registration_id, m, entries)));
  // The client shrinks one storage's memfd to nothing before the commit reads it.
  REQUIRE(::ftruncate(storages.begin()->second.fd.get(), 0) == 0);
  auto committed = e->commit(begun->registration_id);
  REQUIRE_FALSE(committed);
  CHECK(committed.error().code == errc::data_loss);
  CHECK_THAT(committed.error().message, Catch::Contains("cannot read shared memory at offset 0: its file shrank under "
                                                        "the mapping"));

  // Still serving: the same model from intact memory commits, to the id computed by hand.
  auto again = t::register_lip(*e, m, me);
  REQUIRE_OK(again);
  CHECK(again->descriptor.artifact_id == t::expected_mi2(m.index().json(), m.canonical()));
}
