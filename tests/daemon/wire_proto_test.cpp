#include "tensorreg/wire/v1/frame.pb.h"

#include <catch2/catch.hpp>

#include <string>

#include "daemon/framing.hpp"
#include "tensorcast/common/v1/common.pb.h"
#include "tensorcast/daemon/v2/store_daemon.pb.h"

namespace {

namespace wire = tensorreg::wire::v1;
namespace v2 = tensorcast::daemon::v2;
namespace common = tensorcast::common::v1;

}  // namespace

TEST_CASE("wire_proto: a Request holding a Begin round-trips", "[daemon][wire_proto]") {
  wire::Request request;
  request.set_request_id(42);
  v2::BeginRegisterArtifactRequest* begin = request.mutable_begin_register_artifact();
  begin->set_device_id(0);
  begin->set_total_size(16);
  begin->set_ttl_ms(60000);
  begin->set_owner_pid(1234);
  begin->mutable_tensor_index_data()->set_data(R"({"weights":[0,16,[2,2],[2,1],"torch.float32",0]})");
  begin->mutable_tensor_index_data()->set_schema_version("v3");
  begin->mutable_tensor_index_data()->set_encoding("json");
  begin->mutable_lease()->set_in_place(true);
  begin->mutable_policy()->set_profile(common::POLICY_PROFILE_CACHE);
  begin->set_client_artifact_id("cgid:example-1");

  std::string bytes;
  REQUIRE(request.SerializeToString(&bytes));
  const auto frame = tensorreg::daemon::encode_frame(bytes);
  REQUIRE(frame);

  tensorreg::daemon::frame_decoder decoder;
  REQUIRE(decoder.feed(*frame));
  auto decoded = decoder.next();
  REQUIRE(decoded);

  wire::Request parsed;
  REQUIRE(parsed.ParseFromString(decoded->payload));
  CHECK(parsed.request_id() == 42);
  CHECK_FALSE(parsed.end_of_stream());
  REQUIRE(parsed.body_case() == wire::Request::kBeginRegisterArtifact);
  const v2::BeginRegisterArtifactRequest& got = parsed.begin_register_artifact();
  CHECK(got.total_size() == 16);
  CHECK(got.has_ttl_ms());
  CHECK(got.ttl_ms() == 60000);
  CHECK(got.owner_pid() == 1234);
  CHECK(got.index_case() == v2::BeginRegisterArtifactRequest::kTensorIndexData);
  CHECK(got.tensor_index_data().encoding() == "json");
  CHECK(got.plan_case() == v2::BeginRegisterArtifactRequest::kLease);
  CHECK(got.lease().in_place());
  CHECK(got.policy().profile() == common::POLICY_PROFILE_CACHE);
  CHECK(got.client_artifact_id() == "cgid:example-1");
  CHECK(parsed.SerializeAsString() == bytes);
}

TEST_CASE("wire_proto: field numbers are the fixed ones", "[daemon][wire_proto]") {
  // DECISIONS §4.1 and registration.md §1: other-language clients depend on these.
  CHECK(wire::Request::kRequestIdFieldNumber == 1);
  CHECK(wire::Request::kEndOfStreamFieldNumber == 2);
  CHECK(wire::Request::kBeginRegisterArtifactFieldNumber == 10);
  CHECK(wire::Request::kFeedRegisterArtifactStreamFieldNumber == 11);
  CHECK(wire::Request::kUnregisterVramRegionFieldNumber == 19);
  CHECK(wire::Request::kWaitPersistenceStatusFieldNumber == 25);
  CHECK(wire::Request::kListArtifactsFieldNumber == 40);
  CHECK(wire::Request::kGetStatsFieldNumber == 41);
  CHECK(wire::Response::kStatusFieldNumber == 2);
  CHECK(wire::Response::kGetServerConfigFieldNumber == 20);
  CHECK(wire::Status::kCodeFieldNumber == 1);
  CHECK(wire::Status::kMessageFieldNumber == 2);
  CHECK(v2::BeginRegisterArtifactRequest::kOwnerPidFieldNumber == 6);
  CHECK(v2::BeginRegisterArtifactRequest::kViewFieldNumber == 1001);
  CHECK(v2::CommitRegisteredArtifactResponse::kRegistrationKindFieldNumber == 1006);
  CHECK(v2::CommitRegisteredArtifactResponse::kLocalStableTierFieldNumber == 2000);
  CHECK(v2::StorageEntry::kRegionRefFieldNumber == 7);
  CHECK(v2::GetServerConfigResponse::kStartupPhaseFieldNumber == 8);
}

TEST_CASE("wire_proto: the worked example of docs/wire-format.md encodes as documented", "[daemon][wire_proto]") {
  wire::Request request;
  request.set_request_id(1);
  v2::KeepAliveRegisterArtifactRequest* keep_alive = request.mutable_keep_alive_register_artifact();
  keep_alive->set_registration_id("reg_1");
  keep_alive->set_ttl_ms(30000);
  keep_alive->set_epoch(2);
  keep_alive->set_owner_pid(4242);
  const auto frame = tensorreg::daemon::encode_frame(request.SerializeAsString());
  REQUIRE(frame);
  const std::string expected(
      "\x14\x00\x00\x00"  // length 20
      "\x08\x01"          // request_id = 1
      "\x62\x10"          // field 12, 16 bytes
      "\x0a\x05reg_1"     // registration_id
      "\x10\xb0\xea\x01"  // ttl_ms = 30000
      "\x18\x02"          // epoch = 2
      "\x20\x92\x21",     // owner_pid = 4242
      24);
  CHECK(*frame == expected);

  wire::Response response;
  response.set_request_id(1);
  response.mutable_status()->set_code(5);
  response.mutable_status()->set_message("cannot keep alive registration 'reg_1': not found");
  wire::Response parsed;
  REQUIRE(parsed.ParseFromString(response.SerializeAsString()));
  CHECK(parsed.status().code() == 5);
  CHECK(parsed.body_case() == wire::Response::BODY_NOT_SET);
}

TEST_CASE("wire_proto: a garbage payload does not parse as a Request", "[daemon][wire_proto]") {
  wire::Request parsed;
  // Field 1 with wire type 7 (invalid).
  CHECK_FALSE(parsed.ParseFromString(std::string("\x0f\x01", 2)));
  // A length-delimited body that claims more bytes than there are.
  CHECK_FALSE(parsed.ParseFromString(std::string("\x52\x7f\x01\x02", 4)));
  // A truncated varint.
  CHECK_FALSE(parsed.ParseFromString(std::string("\x08\xff\xff", 3)));
  // Tag 0 is never valid.
  CHECK_FALSE(parsed.ParseFromString(std::string("\x00\x00", 2)));
}
