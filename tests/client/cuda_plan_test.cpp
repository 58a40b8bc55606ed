// The CPU half of connection::register_cuda: the canonical layout of a CUDA tensor dict and the
// plan of its allocations (IPC handles, VRAM regions, VMM windows), against a fake driver.
#include "client/cuda_plan.hpp"

#include <catch2/catch.hpp>

#include <map>
#include <set>

namespace {

using namespace tensorreg;
using client::cuda_tensor;
using client::detail::cuda_driver;
using client::detail::plan_device;
using client::detail::plan_layout;
using client::detail::storage_span;

// Allocations at fixed addresses: cudaMalloc blocks (IPC-exportable) or VMM pages.
class fake_driver final : public cuda_driver {
 public:
  struct block {
    std::uint64_t size = 0;
    bool vmm = false;
    std::uint64_t handle_types = client::detail::posix_fd_handle_type;
  };

  void add(std::uint64_t base, block b) { blocks_[base] = b; }

  result<std::pair<std::uint64_t, std::uint64_t>> address_range(std::uint64_t ptr) override {
    ++range_calls;
    auto it = blocks_.upper_bound(ptr);
    if (it != blocks_.begin() && ptr < std::prev(it)->first + std::prev(it)->second.size) {
      --it;
      return std::pair<std::uint64_t, std::uint64_t>{it->first, it->second.size};
    }
    return fail(errc::failed_precondition, "fake: no allocation holds " + std::to_string(ptr));
  }
  std::optional<std::string> try_ipc_handle(std::uint64_t base) override {
    ++ipc_calls;
    if (blocks_.at(base).vmm || unexportable.contains(base)) return std::nullopt;
    return "ipc@" + std::to_string(base);
  }
  error ipc_handle_error(std::uint64_t) override { return {errc::failed_precondition, "CUDA_ERROR_INVALID_VALUE"}; }
  std::optional<std::uint64_t> retain_allocation(std::uint64_t base) override {
    ++retain_calls;
    if (!blocks_.at(base).vmm) return std::nullopt;
    held.insert(base);
    return base;
  }
  void release(std::uint64_t handle) noexcept override { held.erase(handle); }
  std::uint64_t handle_types(std::uint64_t handle) override { return blocks_.at(handle).handle_types; }
  result<unique_fd> export_fd(std::uint64_t) override { return unique_fd(); }

  int range_calls = 0;
  int ipc_calls = 0;
  int retain_calls = 0;
  std::set<std::uint64_t> held;  // retained, not yet released
  std::set<std::uint64_t> unexportable;

 private:
  std::map<std::uint64_t, block> blocks_;
};

constexpr std::uint64_t mib = 1 << 20;
constexpr std::uint64_t page = 2 * mib;

cuda_tensor f32(std::string name, std::uint64_t ptr, std::uint64_t nbytes, std::int64_t count,
                std::int64_t offset = 0) {
  return {std::move(name), ptr, nbytes, "torch.float32", {count}, {1}, offset};
}

}  // namespace

TEST_CASE("client cuda_plan: storages are found by address and size, laid out in name order", "[client][cuda_plan]") {
  // "b" and "a" share one storage; "c" is a second storage of 12 bytes, so "z" lands at 16.
  const std::vector<cuda_tensor> tensors = {f32("b", 0x1000, 16, 2, 2), f32("a", 0x1000, 16, 4),
                                            f32("z", 0x9000, 12, 3), f32("c", 0x5000, 8, 1)};
  auto layout = plan_layout(tensors, "register");
  REQUIRE(layout);
  CHECK(layout->storages == std::vector<storage_span>{{0x1000, 16}, {0x9000, 12}, {0x5000, 8}});
  // Canonical positions follow the names: a (storage 0), c (storage 2), z (storage 1).
  CHECK(layout->canonical_storages == std::vector<std::size_t>{0, 2, 1});
  CHECK(layout->canonical_offsets == std::vector<std::uint64_t>{0, 16, 24});
  CHECK(layout->alias_storage == std::vector<std::size_t>{0, 0, 1, 2});  // a, b, c, z
  CHECK(layout->logical_lengths == std::vector<std::uint64_t>{16, 8, 4, 12});
  CHECK(layout->index.total_size() == 36);
  CHECK(layout->index.entries()[1].storage_offset == 2);
}

TEST_CASE("client cuda_plan: a tensor the layout cannot place is INVALID_ARGUMENT naming it", "[client][cuda_plan]") {
  auto past = plan_layout(std::vector<cuda_tensor>{f32("w", 0x1000, 16, 4, 1)}, "register");
  REQUIRE_FALSE(past);
  CHECK(past.error().code == errc::invalid_argument);
  CHECK(past.error().message == "cannot register: tensor 'w' reaches past its storage of 16 bytes");

  auto dtype = plan_layout(std::vector<cuda_tensor>{{"q", 0x1000, 16, "torch.qint4", {4}, {1}, 0}}, "register");
  REQUIRE_FALSE(dtype);
  CHECK(dtype.error().code == errc::invalid_argument);
  CHECK(dtype.error().message ==
        "cannot register: tensor 'q' has dtype torch.qint4, which the canonical index does not know");

  auto rank = plan_layout(std::vector<cuda_tensor>{{"r", 0x1000, 16, "torch.float32", {2, 2}, {2}, 0}}, "register");
  REQUIRE_FALSE(rank);
  CHECK(rank.error().message == "cannot register: tensor 'r' has 2 dimensions in shape but 1 in stride");

  auto twice = plan_layout(std::vector<cuda_tensor>{f32("x", 0x1000, 16, 4), f32("x", 0x2000, 16, 4)}, "register");
  REQUIRE_FALSE(twice);
  CHECK(twice.error().code == errc::invalid_argument);
  CHECK(twice.error().message.starts_with("cannot register: "));
}

TEST_CASE("client cuda_plan: cudaMalloc memory gives a VRAM region when shared, else the storage's own handle",
          "[client][cuda_plan]") {
  fake_driver drv;
  drv.add(0x100000, {mib});
  drv.add(0x400000, {mib});
  const std::vector<storage_span> spans = {{0x100000 + 4096, 256}, {0x400000 + 64, 128}, {0x100000, 512}};
  auto plan = plan_device(drv, spans, "register");
  REQUIRE(plan);
  REQUIRE(plan->regions.size() == 1);
  CHECK(plan->regions[0].base == 0x100000);
  CHECK(plan->regions[0].size == mib);
  CHECK(plan->regions[0].ipc_handle == "ipc@1048576");
  CHECK(plan->regions[0].storages == std::vector<std::size_t>{2, 0});  // in address order
  CHECK(plan->sources[0].region == 0u);
  CHECK(plan->sources[0].mapping_base_offset == 4096);
  CHECK(plan->sources[2].region == 0u);
  CHECK(plan->sources[2].mapping_base_offset == 0);
  CHECK_FALSE(plan->sources[1].region);
  CHECK(plan->sources[1].ipc_handle == "ipc@4194304");
  CHECK(plan->sources[1].mapping_base_offset == 64);
  CHECK(plan->lone_handles == 1);
  CHECK(plan->allocations.size() == 2);
  // Each allocation is looked up once, whatever the number of storages in it.
  CHECK(drv.range_calls == 2);
  CHECK(drv.ipc_calls == 2);
  CHECK(drv.retain_calls == 0);
}

TEST_CASE("client cuda_plan: empty storages borrow a source, all empty is DATA_LOSS", "[client][cuda_plan]") {
  fake_driver drv;
  drv.add(0x100000, {mib});
  auto plan = plan_device(drv, std::vector<storage_span>{{0, 0}, {0x100000 + 8, 8}}, "register");
  REQUIRE(plan);
  CHECK(plan->sources[0].ipc_handle == plan->sources[1].ipc_handle);
  CHECK(plan->sources[0].mapping_base_offset == 8);

  auto empty = plan_device(drv, std::vector<storage_span>{{0, 0}}, "register");
  REQUIRE_FALSE(empty);
  CHECK(empty.error().code == errc::data_loss);
  CHECK(empty.error().message == "cannot register: every storage is empty");
}

TEST_CASE("client cuda_plan: memory the driver cannot place or export is refused with its reason",
          "[client][cuda_plan]") {
  fake_driver drv;
  drv.add(0x100000, {mib});
  auto past = plan_device(drv, std::vector<storage_span>{{0x100000 + mib - 8, 16}}, "register");
  REQUIRE_FALSE(past);
  CHECK(past.error().code == errc::data_loss);
  CHECK(past.error().message ==
        "cannot register: storage 0 at 0x1ffff8 of 16 bytes ends past its allocation [0x100000, 0x200000)");

  drv.unexportable.insert(0x100000);
  auto neither = plan_device(drv, std::vector<storage_span>{{0x100000, 16}}, "register");
  REQUIRE_FALSE(neither);
  CHECK(neither.error().code == errc::failed_precondition);
  CHECK(neither.error().message ==
        "cannot register: cannot export the allocation at 0x100000: it is neither "
        "cudaMalloc nor VMM memory (CUDA_ERROR_INVALID_VALUE)");

  auto nowhere = plan_device(drv, std::vector<storage_span>{{0x900000, 16}}, "register");
  REQUIRE_FALSE(nowhere);
  CHECK(nowhere.error().code == errc::failed_precondition);
  CHECK(nowhere.error().message == "fake: no allocation holds 9437184");
}

TEST_CASE("client cuda_plan: VMM pages merge into runs and one region per run, handles released with the plan",
          "[client][cuda_plan]") {
  fake_driver drv;
  const std::uint64_t base = 0x7f0000000000;
  for (std::uint64_t p = 0; p < 4; ++p) drv.add(base + p * page, {page, true});
  drv.add(base + 10 * page, {page, true});  // a second run
  const std::vector<storage_span> spans = {
      {base + 100, 4096},         // page 0
      {base + page - 16, 64},     // crosses pages 0 → 1
      {base + 3 * page + 8, 8},   // page 3 (page 2 backs no storage: never looked up)
      {base + 10 * page, page}};  // the other run
  {
    auto plan = plan_device(drv, spans, "register");
    REQUIRE(plan);
    // Pages 0, 1 and 3 are found (page 2 is never touched, so 0-1 and 3 are separate runs).
    REQUIRE(plan->regions.size() == 3);
    CHECK(plan->regions[0].base == base);
    CHECK(plan->regions[0].size == 2 * page);
    CHECK(plan->regions[0].pages.size() == 2);
    CHECK(plan->regions[0].storages == std::vector<std::size_t>{0, 1});
    CHECK(plan->regions[0].ipc_handle.empty());
    CHECK(plan->regions[1].base == base + 3 * page);
    CHECK(plan->regions[2].base == base + 10 * page);
    CHECK(plan->sources[1].region == 0u);
    CHECK(plan->sources[1].mapping_base_offset == page - 16);
    CHECK(plan->sources[2].region == 1u);
    CHECK(plan->sources[2].mapping_base_offset == 8);
    CHECK(plan->lone_handles == 0);
    CHECK(drv.held.size() == 4);
    // Asked as the previous allocation answered: after the first VMM page, no IPC attempts.
    CHECK(drv.ipc_calls == 1);
  }
  CHECK(drv.held.empty());
}

TEST_CASE("client cuda_plan: VMM pages without the POSIX fd handle type are FAILED_PRECONDITION, handles released",
          "[client][cuda_plan]") {
  fake_driver drv;
  drv.add(0x200000, {page, true, 0});
  auto plan = plan_device(drv, std::vector<storage_span>{{0x200000, 16}}, "register");
  REQUIRE_FALSE(plan);
  CHECK(plan.error().code == errc::failed_precondition);
  CHECK(
      plan.error().message.starts_with("cannot register: the VMM allocation at 0x200000 cannot be exported as a "
                                       "POSIX fd (its handle types are 0); allocate these tensors with "
                                       "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False"));
  CHECK(drv.held.empty());
}

TEST_CASE("client cuda_plan: windows hold at most the limit of pages and each storage once", "[client][cuda_plan]") {
  using client::detail::run_member;
  // Storages on pages [0,1], [1,2], [3,3], [4,6] with a limit of 4 pages.
  auto ws = client::detail::windows({{4, 6, 3}, {0, 1, 0}, {1, 2, 1}, {3, 3, 2}}, 4, "register");
  REQUIRE(ws);
  REQUIRE(ws->size() == 2);
  CHECK((*ws)[0].first == 0);
  CHECK((*ws)[0].last == 3);
  CHECK((*ws)[0].storages == std::vector<std::size_t>{0, 1, 2});
  CHECK((*ws)[1].first == 4);
  CHECK((*ws)[1].last == 6);
  CHECK((*ws)[1].storages == std::vector<std::size_t>{3});

  auto big = client::detail::windows({{0, 4, 7}}, 4, "register");
  REQUIRE_FALSE(big);
  CHECK(big.error().code == errc::unimplemented);
  CHECK(big.error().message ==
        "cannot register: storage 7 spans 5 VMM pages, more than one region may hold (at most 4 fds a frame)");

  auto runs = client::detail::merge_runs({{30, 10, 3, ""}, {10, 10, 1, ""}, {20, 10, 2, ""}, {50, 10, 5, ""}});
  REQUIRE(runs.size() == 2);
  CHECK(runs[0].size() == 3);
  CHECK(runs[0][0].base == 10);
  CHECK(runs[1][0].base == 50);
}
