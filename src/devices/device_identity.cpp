#include "tensorreg/devices/device_identity.hpp"

#include <limits>

#include "common/text.hpp"

namespace tensorreg::devices {
namespace {

constexpr std::string_view prefix = "GPU-";
constexpr std::size_t bare_length = 36;
constexpr std::size_t dash_at[] = {8, 13, 18, 23};

bool is_dash_position(std::size_t i) noexcept {
  for (const auto d : dash_at) {
    if (i == d) return true;
  }
  return false;
}

bool starts_with_prefix(std::string_view text) noexcept {
  if (text.size() < prefix.size()) return false;
  for (std::size_t i = 0; i < prefix.size(); ++i) {
    char c = text[i];
    if (c >= 'a' && c <= 'z') c = static_cast<char>(c - 'a' + 'A');
    if (c != prefix[i]) return false;
  }
  return true;
}

}  // namespace

result<gpu_uuid> parse_gpu_uuid(std::string_view text) {
  const auto what = [&] { return "cannot parse GPU UUID " + text::quoted(text, 64) + ": "; };
  std::string_view bare = text;
  if (starts_with_prefix(bare)) bare.remove_prefix(prefix.size());
  if (bare.size() != bare_length) {
    return fail(errc::invalid_argument, what() +
                                            "expected 36 characters (8-4-4-4-12 hex digits) after an optional "
                                            "'GPU-', got " +
                                            std::to_string(bare.size()));
  }
  gpu_uuid out;
  std::size_t nibble = 0;
  for (std::size_t i = 0; i < bare.size(); ++i) {
    const char c = bare[i];
    if (is_dash_position(i)) {
      if (c != '-') {
        return fail(errc::invalid_argument, what() + "expected '-' at position " + std::to_string(i) + " of the 36");
      }
      continue;
    }
    const int v = text::hex_value(c);
    if (v < 0) {
      return fail(errc::invalid_argument, what() + "position " + std::to_string(i) + " of the 36 is not a hex digit");
    }
    auto& byte = out.bytes[nibble / 2];
    byte = static_cast<std::uint8_t>(nibble % 2 == 0 ? v << 4 : byte | v);
    ++nibble;
  }
  return out;
}

std::string format_gpu_uuid(const gpu_uuid& uuid) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string out(prefix);
  for (std::size_t i = 0; i < uuid.bytes.size(); ++i) {
    if (is_dash_position(out.size() - prefix.size())) out += '-';
    out += digits[uuid.bytes[i] >> 4];
    out += digits[uuid.bytes[i] & 15];
  }
  return out;
}

result<std::int32_t> find_device(std::span<const gpu_uuid> devices, std::string_view uuid) {
  TENSORREG_TRY_ASSIGN(const gpu_uuid wanted, parse_gpu_uuid(uuid));
  for (std::size_t i = 0; i < devices.size(); ++i) {
    if (devices[i] == wanted) return static_cast<std::int32_t>(i);
  }
  const std::string name = format_gpu_uuid(wanted);
  return fail(errc::failed_precondition, "cannot find CUDA device " + name + ": no CUDA device " + name +
                                             " is visible to the daemon (" + std::to_string(devices.size()) +
                                             " present)");
}

result<std::uint64_t> round_up(std::uint64_t bytes, std::uint64_t granularity) {
  if (granularity == 0) {
    return fail(errc::invalid_argument, "cannot round " + std::to_string(bytes) + " bytes up: the granularity is 0");
  }
  const std::uint64_t rest = bytes % granularity;
  if (rest == 0) return bytes;
  const std::uint64_t add = granularity - rest;
  if (bytes > std::numeric_limits<std::uint64_t>::max() - add) {
    return fail(errc::out_of_range, "cannot round " + std::to_string(bytes) + " bytes up to a multiple of " +
                                        std::to_string(granularity) + ": the result exceeds 2^64 - 1");
  }
  return bytes + add;
}

result<std::uint64_t> vmm_chunks_total(std::size_t fd_count, std::span<const std::uint64_t> chunk_bytes,
                                       std::string_view what) {
  const auto prefix_of = [&] { return std::string(what) + ": "; };
  if (chunk_bytes.empty()) return fail(errc::invalid_argument, prefix_of() + "no chunks");
  if (fd_count != chunk_bytes.size()) {
    return fail(errc::invalid_argument, prefix_of() + std::to_string(fd_count) + " fds for " +
                                            std::to_string(chunk_bytes.size()) + " chunk sizes");
  }
  std::uint64_t sum = 0;
  for (std::size_t i = 0; i < chunk_bytes.size(); ++i) {
    const std::uint64_t c = chunk_bytes[i];
    if (c == 0) return fail(errc::invalid_argument, prefix_of() + "chunk " + std::to_string(i) + " has 0 bytes");
    if (sum > std::numeric_limits<std::uint64_t>::max() - c) {
      return fail(errc::invalid_argument, prefix_of() + "the chunk sizes sum past 2^64 - 1");
    }
    sum += c;
  }
  return sum;
}

result<std::uint64_t> vmm_reservation_bytes(std::size_t fd_count, std::span<const std::uint64_t> chunk_bytes,
                                            std::uint64_t granularity, std::string_view what) {
  const auto prefix_of = [&] { return std::string(what) + ": "; };
  TENSORREG_TRY_ASSIGN(const std::uint64_t sum, vmm_chunks_total(fd_count, chunk_bytes, what));
  if (granularity == 0) return fail(errc::internal, prefix_of() + "the driver reports an allocation granularity of 0");
  for (std::size_t i = 0; i < chunk_bytes.size(); ++i) {
    const std::uint64_t c = chunk_bytes[i];
    if (c % granularity != 0) {
      return fail(errc::invalid_argument, prefix_of() + "chunk " + std::to_string(i) + " has " + std::to_string(c) +
                                              " bytes, not a multiple of the device's allocation granularity " +
                                              std::to_string(granularity));
    }
  }
  // Every chunk is a multiple of the granularity, so this only guards the invariant the
  // reservation relies on (cuMemAddressReserve takes multiples of it).
  auto reserved = round_up(sum, granularity);
  if (!reserved) return fail(errc::invalid_argument, prefix_of() + reserved.error().message);
  return *reserved;
}

}  // namespace tensorreg::devices
