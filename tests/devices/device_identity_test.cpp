#include "tensorreg/devices/device_identity.hpp"

#include <catch2/catch.hpp>

#include <cstdint>
#include <limits>
#include <vector>

#include "support/engine_helpers.hpp"

namespace {

using tensorreg::errc;
using tensorreg::devices::gpu_uuid;
namespace dev = tensorreg::devices;

// An H100's UUID as nvidia-smi -L prints it.
constexpr std::string_view smi_form = "GPU-5c1ab3b4-7f2e-4d3a-9b8c-0123456789ef";

gpu_uuid smi_bytes() {
  return gpu_uuid{{0x5c, 0x1a, 0xb3, 0xb4, 0x7f, 0x2e, 0x4d, 0x3a, 0x9b, 0x8c, 0x01, 0x23, 0x45, 0x67, 0x89, 0xef}};
}

}  // namespace

TEST_CASE("device_identity: nvidia-smi's form, the bare form and any case parse to the same bytes",
          "[devices][device_identity]") {
  for (const std::string_view text : {smi_form, std::string_view("5c1ab3b4-7f2e-4d3a-9b8c-0123456789ef"),
                                      std::string_view("gpu-5C1AB3B4-7F2E-4D3A-9B8C-0123456789EF"),
                                      std::string_view("GPU-5c1AB3b4-7f2E-4d3a-9B8c-0123456789eF")}) {
    INFO(text);
    auto parsed = dev::parse_gpu_uuid(text);
    REQUIRE_OK(parsed);
    CHECK(*parsed == smi_bytes());
  }
}

TEST_CASE("device_identity: formatting gives nvidia-smi's lower-case form and round-trips",
          "[devices][device_identity]") {
  CHECK(dev::format_gpu_uuid(smi_bytes()) == smi_form);
  CHECK(dev::format_gpu_uuid(gpu_uuid{}) == "GPU-00000000-0000-0000-0000-000000000000");
  gpu_uuid all;
  for (std::size_t i = 0; i < all.bytes.size(); ++i) all.bytes[i] = static_cast<std::uint8_t>(0xf0 + i);
  auto back = dev::parse_gpu_uuid(dev::format_gpu_uuid(all));
  REQUIRE_OK(back);
  CHECK(*back == all);
}

TEST_CASE("device_identity: malformed UUIDs are INVALID_ARGUMENT naming what is wrong", "[devices][device_identity]") {
  CHECK_ERROR(
      dev::parse_gpu_uuid(""), errc::invalid_argument,
      "cannot parse GPU UUID '': expected 36 characters (8-4-4-4-12 hex digits) after an optional 'GPU-', got 0");
  CHECK_ERROR(dev::parse_gpu_uuid("GPU-5c1ab3b4"), errc::invalid_argument,
              "cannot parse GPU UUID 'GPU-5c1ab3b4': expected 36 characters (8-4-4-4-12 hex digits) after an optional "
              "'GPU-', got 8");
  // The prefix twice leaves 40 characters, not a UUID.
  CHECK_CODE(dev::parse_gpu_uuid("GPU-GPU-5c1ab3b4-7f2e-4d3a-9b8c-0123456789ef"), errc::invalid_argument);
  CHECK_ERROR(dev::parse_gpu_uuid("GPU-5c1ab3b4x7f2e-4d3a-9b8c-0123456789ef"), errc::invalid_argument,
              "cannot parse GPU UUID 'GPU-5c1ab3b4x7f2e-4d3a-9b8c-0123456789ef': expected '-' at position 8 of the 36");
  CHECK_ERROR(dev::parse_gpu_uuid("GPU-5c1ab3b4-7f2e-4d3a-9b8c-0123456789eg"), errc::invalid_argument,
              "cannot parse GPU UUID 'GPU-5c1ab3b4-7f2e-4d3a-9b8c-0123456789eg': position 35 of the 36 is not a hex "
              "digit");
  // 36 characters with the dashes elsewhere.
  CHECK_CODE(dev::parse_gpu_uuid("5c1ab3b47-f2e-4d3a-9b8c-0123456789ef"), errc::invalid_argument);
  // Long client text is quoted only in part.
  const std::string garbage(300, 'z');
  auto long_text = dev::parse_gpu_uuid(garbage);
  REQUIRE_FALSE(long_text);
  CHECK(long_text.error().message.size() < 200);
  CHECK(long_text.error().message.find("...'") != std::string::npos);
}

TEST_CASE("device_identity: find_device returns the ordinal, FAILED_PRECONDITION for a UUID not present",
          "[devices][device_identity]") {
  gpu_uuid other = smi_bytes();
  other.bytes[15] = 0x00;
  const std::vector<gpu_uuid> devices{other, smi_bytes()};
  auto found = dev::find_device(devices, smi_form);
  REQUIRE_OK(found);
  CHECK(*found == 1);
  auto bare_upper = dev::find_device(devices, "5C1AB3B4-7F2E-4D3A-9B8C-012345678900");
  REQUIRE_OK(bare_upper);
  CHECK(*bare_upper == 0);

  CHECK_ERROR(dev::find_device(devices, "GPU-5C1AB3B4-7F2E-4D3A-9B8C-0123456789EE"), errc::failed_precondition,
              "cannot find CUDA device GPU-5c1ab3b4-7f2e-4d3a-9b8c-0123456789ee: no CUDA device "
              "GPU-5c1ab3b4-7f2e-4d3a-9b8c-0123456789ee is visible to the daemon (2 present)");
  CHECK_CODE(dev::find_device(devices, "not-a-uuid"), errc::invalid_argument);
  CHECK_CODE(dev::find_device({}, smi_form), errc::failed_precondition);
}

TEST_CASE("device_identity: round_up to the granularity", "[devices][device_identity]") {
  constexpr std::uint64_t g = 2 << 20;
  CHECK(dev::round_up(0, g).value() == 0);
  CHECK(dev::round_up(1, g).value() == g);
  CHECK(dev::round_up(g, g).value() == g);
  CHECK(dev::round_up(g + 1, g).value() == 2 * g);
  CHECK_CODE(dev::round_up(5, 0), errc::invalid_argument);
  CHECK_CODE(dev::round_up(std::numeric_limits<std::uint64_t>::max() - 3, g), errc::out_of_range);
  CHECK(dev::round_up(std::numeric_limits<std::uint64_t>::max(), 1).value() ==
        std::numeric_limits<std::uint64_t>::max());
}

TEST_CASE("device_identity: a VMM import reserves the sum of its chunks and rejects bad chunk lists",
          "[devices][device_identity]") {
  constexpr std::uint64_t g = 2 << 20;
  constexpr std::string_view what = "cannot import CUDA VMM memory of process 7 on device 0";
  const std::vector<std::uint64_t> chunks{g, 3 * g, g};
  auto reserved = dev::vmm_reservation_bytes(3, chunks, g, what);
  REQUIRE_OK(reserved);
  CHECK(*reserved == 5 * g);

  CHECK_ERROR(dev::vmm_reservation_bytes(0, {}, g, what), errc::invalid_argument, std::string(what) + ": no chunks");
  CHECK_ERROR(dev::vmm_reservation_bytes(2, chunks, g, what), errc::invalid_argument,
              std::string(what) + ": 2 fds for 3 chunk sizes");
  const std::vector<std::uint64_t> zero{g, 0};
  CHECK_ERROR(dev::vmm_reservation_bytes(2, zero, g, what), errc::invalid_argument,
              std::string(what) + ": chunk 1 has 0 bytes");
  const std::vector<std::uint64_t> ragged{g, g + 4096};
  CHECK_ERROR(dev::vmm_reservation_bytes(2, ragged, g, what), errc::invalid_argument,
              std::string(what) +
                  ": chunk 1 has 2101248 bytes, not a multiple of the device's allocation granularity "
                  "2097152");
  const std::vector<std::uint64_t> huge{std::numeric_limits<std::uint64_t>::max() / g * g, g};
  CHECK_ERROR(dev::vmm_reservation_bytes(2, huge, g, what), errc::invalid_argument,
              std::string(what) + ": the chunk sizes sum past 2^64 - 1");
  CHECK_CODE(dev::vmm_reservation_bytes(3, chunks, 0, what), errc::internal);
}

TEST_CASE("device_identity: a chunk list's total, whatever the granularity", "[devices][device_identity]") {
  constexpr std::string_view what = "cannot register region";
  const std::vector<std::uint64_t> chunks{4096, 12288, 1};
  auto total = dev::vmm_chunks_total(3, chunks, what);
  REQUIRE_OK(total);
  CHECK(*total == 16385);  // sizes are not checked against a granularity here: the provider does that
  CHECK_ERROR(dev::vmm_chunks_total(1, chunks, what), errc::invalid_argument,
              "cannot register region: 1 fds for 3 chunk sizes");
  const std::vector<std::uint64_t> zero{0};
  CHECK_ERROR(dev::vmm_chunks_total(1, zero, what), errc::invalid_argument,
              "cannot register region: chunk 0 has 0 bytes");
}
