// tensorreg::client's register_cuda on a real GPU against a real tensorregd (part of
// tensorreg_gpu_tests, which exits 77 without a device): cudaMalloc tensors leased in place
// under the id of their canonical bytes, each allocation sent once, and released cleanly.
#include "tensorreg/client/connection.hpp"

#include <catch2/catch.hpp>

#include <cuda_runtime_api.h>

#include <vector>

#include "support/daemon_process.hpp"
#include "tensorreg/client/weight_sync.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/identity/content_id.hpp"
#include "tensorreg/index/canonical_index.hpp"

namespace {

using namespace tensorreg;
using client::cuda_tensor;

struct device_block {
  explicit device_block(std::size_t bytes, int fill) {
    REQUIRE(cudaMalloc(&ptr, bytes) == cudaSuccess);
    REQUIRE(cudaMemset(ptr, fill, bytes) == cudaSuccess);
  }
  ~device_block() { static_cast<void>(cudaFree(ptr)); }
  device_block(const device_block&) = delete;
  device_block& operator=(const device_block&) = delete;
  [[nodiscard]] std::uint64_t at(std::uint64_t offset) const { return reinterpret_cast<std::uint64_t>(ptr) + offset; }
  void* ptr = nullptr;
};

// The id the artifact must have: the canonical bytes gathered on the host, hashed offline.
std::string offline_id(const std::vector<cuda_tensor>& tensors) {
  std::vector<index::tensor_desc> descs;
  for (const auto& t : tensors) {
    descs.push_back({t.name, t.dtype, t.shape, t.stride,
                     std::to_string(t.storage_ptr) + ":" + std::to_string(t.storage_nbytes), t.storage_nbytes,
                     t.storage_offset});
  }
  const auto idx = index::canonical_index::build(descs).value();
  std::vector<std::byte> canonical(idx.total_size());
  for (const auto& e : idx.entries()) {
    const auto& t =
        *std::find_if(tensors.begin(), tensors.end(), [&](const cuda_tensor& c) { return c.name == e.name; });
    REQUIRE(cudaMemcpy(canonical.data() + e.offset, reinterpret_cast<const void*>(t.storage_ptr), e.size,
                       cudaMemcpyDeviceToHost) == cudaSuccess);
  }
  thread_pool pool(1);
  return identity::content_id(idx.json(), memory::host_bytes_view(canonical), &pool).value().to_string();
}

}  // namespace

TEST_CASE("client register_cuda: cudaMalloc tensors lease in place under their content id, each allocation once",
          "[cuda][client]") {
  testing::daemon_process d;
  auto conn = client::connection::connect(d.socket_path());
  REQUIRE(conn);
  device_block shared(1 << 20, 3);
  device_block alone(64 << 10, 5);
  const std::vector<cuda_tensor> tensors = {
      {"embed", shared.at(0), 256 << 10, "torch.float32", {256, 256}, {256, 1}, 0},
      {"embed_tied", shared.at(0), 256 << 10, "torch.float32", {256, 256}, {256, 1}, 0},
      {"norm", shared.at(512 << 10), 4096, "torch.bfloat16", {1024}, {2}, 0},
      {"head", alone.at(0), 64 << 10, "torch.float16", {32, 1024}, {1024, 1}, 0},
  };
  client::cuda_register_report report;
  auto held = conn->register_cuda(tensors, {client::default_ttl_ms, -1, &report});
  REQUIRE(held);
  CHECK(held->info().descriptor.artifact_id == offline_id(tensors));
  CHECK_FALSE(held->info().existed);
  CHECK(report.storages == 3);
  CHECK(report.allocations == 2);
  CHECK(report.regions == 1);       // the allocation behind "embed" and "norm"
  CHECK(report.lone_handles == 1);  // "head"
  CHECK(held->region_ids().size() == 1);

  auto layout = conn->open_device(held->info().descriptor.artifact_id);
  REQUIRE(layout);
  CHECK(layout->allocations.size() == 2);
  CHECK(layout->segments.size() == 3);
  for (const auto& a : layout->allocations) {
    CHECK(a.device_uuid.starts_with("GPU-"));
    CHECK_FALSE(a.cuda_ipc_handle.empty());
  }

  // A second lease of the same bytes on the same device is refused (docs/registration.md
  // §4.5), and the refused register gives back the region it made.
  auto again = conn->register_cuda(tensors);
  REQUIRE_FALSE(again);
  CHECK(again.error().code == errc::already_exists);
  CHECK_THAT(again.error().message, Catch::Contains("lease already exists for artifact on device 0"));

  REQUIRE(held->release());
  auto stats = conn->stats();
  REQUIRE(stats);
  CHECK(stats->leases == 0);
  CHECK(stats->regions == 0);
}

TEST_CASE("client register_cuda: a storage that runs past its allocation is DATA_LOSS and leaves nothing behind",
          "[cuda][client]") {
  testing::daemon_process d;
  auto conn = client::connection::connect(d.socket_path());
  REQUIRE(conn);
  device_block block(1 << 20, 1);
  // 2 MiB from 512 KiB into a 1 MiB allocation: the driver's range of the address says otherwise.
  const std::vector<cuda_tensor> tensors = {{"w", block.at(512 << 10), 2 << 20, "torch.uint8", {2 << 20}, {1}, 0}};
  auto held = conn->register_cuda(tensors);
  REQUIRE_FALSE(held);
  CHECK(held.error().code == errc::data_loss);
  CHECK(held.error().message.starts_with("cannot register CUDA tensors: storage 0 at "));
  CHECK(held.error().message.find("ends past its allocation") != std::string::npos);
  auto stats = conn->stats();
  REQUIRE(stats);
  CHECK(stats->pending_registrations == 0);
  CHECK(stats->regions == 0);
}

TEST_CASE("client register_cuda: hash_in_background answers before the hash, the mi2 id follows and is an alias",
          "[cuda][client][background_hash]") {
  testing::daemon_process d;
  auto conn = client::connection::connect(d.socket_path());
  REQUIRE(conn);
  device_block weights(8 << 20, 9);  // two 4 MiB leaves
  const std::vector<cuda_tensor> tensors = {
      {"w", weights.at(0), 8 << 20, "torch.bfloat16", {4096, 1024}, {1024, 1}, 0},
  };
  client::cuda_register_options o;
  o.client_artifact_id = "cgid:gpu-bg~1";
  o.hash_in_background = true;
  auto held = conn->register_cuda(tensors, o);
  REQUIRE(held);
  CHECK(held->info().descriptor.artifact_id == "cgid:gpu-bg~1");
  CHECK(held->info().hash != client::hash_state::none);
  auto by_cgid = conn->open_device("cgid:gpu-bg~1");  // usable whether or not the hash is done
  REQUIRE(by_cgid);
  auto st = conn->wait_artifact_hash("cgid:gpu-bg~1");
  REQUIRE(st);
  CHECK(st->state == client::hash_state::done);
  CHECK(st->mi2_id == offline_id(tensors));  // the GPU or host hash gives the mi2 of a normal commit
  auto by_mi2 = conn->open_device(st->mi2_id);
  REQUIRE(by_mi2);
  CHECK(by_mi2->descriptor.artifact_id == "cgid:gpu-bg~1");
  REQUIRE(held->release());
  auto gone = conn->wait_artifact_hash(st->mi2_id);
  REQUIRE_FALSE(gone);
  CHECK(gone.error().code == errc::not_found);
}

TEST_CASE("weight sync on a GPU: in-place versions, each verified before the next write",
          "[cuda][client][weight_sync]") {
  testing::daemon_process d;
  auto producer_conn = client::connection::connect(d.socket_path());
  auto consumer_conn = client::connection::connect(d.socket_path());
  REQUIRE(producer_conn);
  REQUIRE(consumer_conn);
  device_block weights(4 << 20, 1);
  const std::vector<cuda_tensor> tensors = {
      {"w", weights.at(0), 4 << 20, "torch.float32", {1024, 1024}, {1024, 1}, 0},
  };
  auto producer = client::weight_sync_producer::create(std::move(*producer_conn), "gpu-test");
  auto consumer = client::weight_sync_consumer::create(std::move(*consumer_conn), "gpu-test");
  REQUIRE(producer);
  REQUIRE(consumer);
  for (int step = 1; step <= 3; ++step) {
    auto hashed = step > 1 ? producer->wait_hashed() : result<std::string>(std::string());
    REQUIRE(hashed);  // the previous version's id is of its bytes: only now write again
    REQUIRE(cudaMemset(weights.ptr, step, 4 << 20) == cudaSuccess);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    auto v = producer->publish(tensors);
    REQUIRE(v);
    CHECK(v->k == static_cast<std::uint64_t>(step));
    auto seen = consumer->wait_for(v->k, std::chrono::milliseconds(5000));
    REQUIRE(seen);
    auto verified = consumer->wait_verified(*seen);
    REQUIRE(verified);
    CHECK(*verified == offline_id(tensors));
  }
}
