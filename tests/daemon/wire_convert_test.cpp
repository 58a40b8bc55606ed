#include "daemon/wire_convert.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>

#include <memory>
#include <string>
#include <vector>

namespace {

namespace convert = tensorreg::daemon::convert;
namespace reg = tensorreg::registration;
namespace regions = tensorreg::regions;
namespace wire = convert::wire;
namespace v2 = convert::v2;
using tensorreg::errc;
using tensorreg::unique_fd;

std::shared_ptr<const tensorreg::index::canonical_index> one_tensor_index() {
  std::vector<tensorreg::index::entry> entries{{"a", 0, 16, {4}, {1}, "torch.float32", 0}};
  auto index = tensorreg::index::canonical_index::from_entries(std::move(entries), 16);
  REQUIRE(index);
  return std::make_shared<const tensorreg::index::canonical_index>(std::move(*index));
}

std::shared_ptr<const regions::vmm_chunks> chunks(std::vector<std::uint64_t> sizes) {
  auto c = std::make_shared<regions::vmm_chunks>();
  for (std::size_t i = 0; i < sizes.size(); ++i) c->fds.emplace_back(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  c->chunk_bytes = std::move(sizes);
  return c;
}

}  // namespace

TEST_CASE("wire_convert: a Deregister without wait_for_drain waits, an explicit false does not",
          "[daemon][wire_convert]") {
  v2::DeregisterArtifactRequest in;
  in.set_artifact_id("mi2:x");
  in.set_owner_pid(12);
  auto out = convert::to_deregister(in);
  CHECK(out.artifact_id == "mi2:x");
  CHECK(out.owner_pid == 12);
  CHECK(out.wait_for_drain);
  CHECK(out.drain_timeout_ms == 0);
  in.set_wait_for_drain(false);
  CHECK_FALSE(convert::to_deregister(in).wait_for_drain);
}

TEST_CASE("wire_convert: a KeepAlive carries its four fields", "[daemon][wire_convert]") {
  v2::KeepAliveRegisterArtifactRequest in;
  in.set_registration_id("reg_1");
  in.set_ttl_ms(5000);
  in.set_epoch(3);
  in.set_owner_pid(77);
  const auto out = convert::to_keep_alive(in);
  CHECK(out.registration_id == "reg_1");
  CHECK(out.ttl_ms == 5000);
  CHECK(out.epoch == 3);
  CHECK(out.owner_pid == 77);
}

TEST_CASE("wire_convert: fds_used counts a client memfd and CUDA VMM chunks", "[daemon][wire_convert]") {
  v2::RegisterRegionRequest in;
  in.set_memory_kind(v2::REGION_MEMORY_KIND_HOST_SHARED);
  CHECK(convert::fds_used(in) == 1);
  in.mutable_host_shared()->set_daemon_managed(true);
  CHECK(convert::fds_used(in) == 0);
  in.clear_host_shared();
  in.set_memory_kind(v2::REGION_MEMORY_KIND_VRAM);
  CHECK(convert::fds_used(in) == 0);
  in.mutable_cuda_vmm()->add_chunk_bytes(1 << 21);
  in.mutable_cuda_vmm()->add_chunk_bytes(1 << 21);
  CHECK(convert::fds_used(in) == 2);
}

TEST_CASE("wire_convert: take_vmm_chunks refuses more chunks than one frame carries fds for",
          "[daemon][wire_convert]") {
  v2::RegisterRegionRequest in;
  for (std::size_t i = 0; i <= convert::max_vmm_chunks; ++i) in.mutable_cuda_vmm()->add_chunk_bytes(1 << 21);
  std::vector<unique_fd> fds;
  regions::register_request out;
  auto taken = convert::take_vmm_chunks(in, fds, out);
  REQUIRE_FALSE(taken);
  CHECK(taken.error().code == errc::invalid_argument);
  CHECK(taken.error().message ==
        "cannot register region: 251 CUDA VMM chunks, more than the 250 one frame can carry fds for");
  CHECK(out.vmm == nullptr);

  in.mutable_cuda_vmm()->clear_chunk_bytes();
  in.mutable_cuda_vmm()->add_chunk_bytes(4096);
  fds.emplace_back(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  REQUIRE(convert::take_vmm_chunks(in, fds, out));
  REQUIRE(out.vmm != nullptr);
  CHECK(out.vmm->fds.size() == 1);
  CHECK(out.vmm->chunk_bytes == std::vector<std::uint64_t>{4096});
}

TEST_CASE("wire_convert: fill_device_layout numbers the carried chunks' fds from 0 and marks the others",
          "[daemon][wire_convert]") {
  reg::device_layout layout;
  layout.descriptor.artifact_id = "mi2:layout";
  layout.descriptor.total_size = 16;
  layout.index = one_tensor_index();
  layout.allocations.push_back({0, 4096, "ipc-handle", nullptr});
  layout.allocations.push_back({1, 8192, "", chunks({4096, 4096})});
  layout.allocations.push_back({1, 4096, "", chunks({4096})});
  layout.segments.push_back({0, 16, 1, 64});
  wire::OpenArtifactDeviceResponse out;
  convert::fill_device_layout(out, layout, 2, 3, {"uuid-0", "uuid-1", "uuid-1"});
  CHECK(out.artifact_descriptor().artifact_id() == "mi2:layout");
  CHECK(out.total_size() == 16);
  CHECK(out.end_allocation() == 3);
  CHECK(out.tensor_index_data() == layout.index->json());
  REQUIRE(out.allocations_size() == 3);
  CHECK(out.allocations(0).cuda_ipc_handle() == "ipc-handle");
  CHECK(out.allocations(0).device_uuid() == "uuid-0");
  REQUIRE(out.allocations(1).vmm().chunks_size() == 2);
  CHECK(out.allocations(1).vmm().chunks(0).fd_index() == 0xFFFFFFFFu);  // not on this page
  CHECK(out.allocations(1).vmm().chunks(1).fd_index() == 0xFFFFFFFFu);
  REQUIRE(out.allocations(2).vmm().chunks_size() == 1);
  CHECK(out.allocations(2).vmm().chunks(0).fd_index() == 0);
  CHECK(out.allocations(2).vmm().chunks(0).size_bytes() == 4096);
  REQUIRE(out.segments_size() == 1);
  CHECK(out.segments(0).allocation() == 1);
  CHECK(out.segments(0).allocation_offset() == 64);
}

TEST_CASE("wire_convert: subject_of names the registration, artifact or region of a request",
          "[daemon][wire_convert]") {
  wire::Response ok;
  ok.mutable_status();
  SECTION("a commit names its registration, and the artifact once published") {
    wire::Request r;
    r.mutable_commit_registered_artifact()->set_registration_id("reg_c");
    CHECK(convert::subject_of(r, convert::error_response(1, {errc::not_found, "gone"})) == "registration 'reg_c'");
    ok.mutable_commit_registered_artifact()->mutable_artifact_descriptor()->set_artifact_id("mi2:c");
    CHECK(convert::subject_of(r, ok) == "registration 'reg_c' -> artifact 'mi2:c'");
  }
  SECTION("a Begin names the registration its answer created") {
    wire::Request r;
    r.mutable_begin_register_artifact();
    CHECK(convert::subject_of(r, convert::error_response(1, {errc::invalid_argument, "no"})).empty());
    ok.mutable_begin_register_artifact()->set_registration_id("reg_b");
    CHECK(convert::subject_of(r, ok) == "registration 'reg_b'");
  }
  SECTION("artifact and region requests") {
    wire::Request r;
    r.mutable_deregister_artifact()->set_artifact_id("mi2:d");
    CHECK(convert::subject_of(r, ok) == "artifact 'mi2:d'");
    r.mutable_unregister_region()->set_region_id("region:3");
    CHECK(convert::subject_of(r, ok) == "region 'region:3'");
    r.mutable_get_server_config();
    CHECK(convert::subject_of(r, ok).empty());
  }
}

TEST_CASE("wire_convert: an error response carries only the status", "[daemon][wire_convert]") {
  const auto r = convert::error_response(9, {errc::failed_precondition, "cannot x: y"});
  CHECK(r.request_id() == 9);
  CHECK(r.status().code() == static_cast<int>(errc::failed_precondition));
  CHECK(r.status().message() == "cannot x: y");
  CHECK(r.body_case() == wire::Response::BODY_NOT_SET);
  CHECK(convert::rpc_name(wire::Request::kOpenArtifactDevice) == "OpenArtifactDevice");
  CHECK(convert::rpc_name(wire::Request::BODY_NOT_SET) == "unknown");
}
