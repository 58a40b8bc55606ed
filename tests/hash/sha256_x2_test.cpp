#include "hash/sha256_x2.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <fstream>
#include <optional>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

namespace {

using tensorreg::hash::digest;
using tensorreg::hash::sha256;
using tensorreg::hash::sha_ni_available;
using tensorreg::hash::to_hex;
using tensorreg::hash::two_lane_sha256;

std::span<const std::byte> bytes_of(std::string_view s) {
  return std::as_bytes(std::span<const char>(s.data(), s.size()));
}

std::vector<std::byte> random_bytes(std::size_t size, std::mt19937_64& rng) {
  std::vector<std::byte> out(size);
  for (auto& b : out) b = static_cast<std::byte>(rng());
  return out;
}

// Every compression this machine can run: the portable one always, SHA-NI where the CPU has
// it, so that a SHA-NI machine checks both against OpenSSL.
std::vector<bool> implementations() {
  if (sha_ni_available()) return {false, true};
  return {false};
}

// Both lanes of `lanes` (fed elsewhere) against OpenSSL's one-shot digests of the same bytes.
void check_lanes(two_lane_sha256& lanes, std::span<const std::byte> a, std::span<const std::byte> b) {
  const std::array<digest, 2> got = lanes.finish();
  CHECK(to_hex(got[0]) == to_hex(sha256(a)));
  CHECK(to_hex(got[1]) == to_hex(sha256(b)));
}

// The flags of /proc/cpuinfo's first processor, or nothing where it cannot be read.
std::optional<std::vector<std::string>> cpuinfo_flags() {
  std::ifstream in("/proc/cpuinfo");
  if (!in) return std::nullopt;
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("flags", 0) != 0) continue;
    const auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::istringstream words(line.substr(colon + 1));
    std::vector<std::string> flags;
    for (std::string flag; words >> flag;) flags.push_back(flag);
    return flags;
  }
  // Other architectures name the line differently ("Features" on arm64): no flags, no SHA-NI.
  return std::vector<std::string>{};
}

}  // namespace

TEST_CASE("sha256_x2: sha_ni_available agrees with the kernel's cpu flags", "[hash][sha256_x2]") {
  const auto flags = cpuinfo_flags();
  if (!flags) {
    WARN("/proc/cpuinfo cannot be read: sha_ni_available() is not checked against it");
    return;
  }
  const bool kernel_says = std::find(flags->begin(), flags->end(), "sha_ni") != flags->end();
  CHECK(sha_ni_available() == kernel_says);
  // Asked twice (the answer is cached), the same.
  CHECK(sha_ni_available() == sha_ni_available());
  // The default object takes SHA-NI exactly where it is available; the flag forces the fallback.
  CHECK(two_lane_sha256().uses_sha_ni() == kernel_says);
  CHECK_FALSE(two_lane_sha256(false).uses_sha_ni());
  if (sha_ni_available()) CHECK(two_lane_sha256(true).uses_sha_ni());
}

TEST_CASE("sha256_x2: empty messages give the standard empty digest in both lanes", "[hash][sha256_x2]") {
  for (const bool ni : implementations()) {
    CAPTURE(ni);
    two_lane_sha256 lanes(ni);
    const auto got = lanes.finish();
    CHECK(to_hex(got[0]) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    CHECK(to_hex(got[1]) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    // Empty updates append nothing.
    lanes.update({}, {});
    lanes.update(bytes_of(""), bytes_of(""));
    check_lanes(lanes, {}, {});
  }
}

TEST_CASE("sha256_x2: FIPS 180-2 vectors in one lane, other bytes in the other", "[hash][sha256_x2]") {
  for (const bool ni : implementations()) {
    CAPTURE(ni);
    two_lane_sha256 lanes(ni);
    lanes.update(bytes_of("abc"), bytes_of("xyz"));
    auto got = lanes.finish();
    CHECK(to_hex(got[0]) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    CHECK(got[1] == sha256(std::string_view("xyz")));

    // 56 bytes: the padding's length field no longer fits, so a second block is compressed.
    const std::string_view nist = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    const std::string other(nist.size(), 'Q');
    lanes.update(bytes_of(other), bytes_of(nist));
    got = lanes.finish();
    CHECK(got[0] == sha256(std::string_view(other)));
    CHECK(to_hex(got[1]) == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  }
}

TEST_CASE("sha256_x2: every length from 1 to 300 bytes, both lanes", "[hash][sha256_x2]") {
  // Covers every padding edge: 55 (one block), 56 and 63 (a second block), 64, 119, 120, ...
  std::mt19937_64 rng(20240611);
  const auto a = random_bytes(300, rng);
  const auto b = random_bytes(300, rng);
  for (const bool ni : implementations()) {
    CAPTURE(ni);
    two_lane_sha256 lanes(ni);
    for (std::size_t length = 1; length <= 300; ++length) {
      CAPTURE(length);
      const auto lane_a = std::span<const std::byte>(a).first(length);
      const auto lane_b = std::span<const std::byte>(b).first(length);
      lanes.update(lane_a, lane_b);
      check_lanes(lanes, lane_a, lane_b);
    }
  }
}

TEST_CASE("sha256_x2: a 4 MiB + 13 byte pair, SHA-NI and the fallback agree", "[hash][sha256_x2]") {
  std::mt19937_64 rng(7);
  const auto a = random_bytes((std::size_t{4} << 20) + 13, rng);
  const auto b = random_bytes(a.size(), rng);
  const digest want_a = sha256(a);
  const digest want_b = sha256(b);
  std::vector<std::array<digest, 2>> results;
  for (const bool ni : implementations()) {
    CAPTURE(ni);
    two_lane_sha256 lanes(ni);
    lanes.update(a, b);
    results.push_back(lanes.finish());
    CHECK(to_hex(results.back()[0]) == to_hex(want_a));
    CHECK(to_hex(results.back()[1]) == to_hex(want_b));
  }
  // Swapped lanes: a lane's digest depends only on its own bytes.
  two_lane_sha256 swapped;
  swapped.update(b, a);
  const auto got = swapped.finish();
  CHECK(got[0] == want_b);
  CHECK(got[1] == want_a);
}

TEST_CASE("sha256_x2: any split into updates, reuse after finish, reset discards", "[hash][sha256_x2]") {
  std::mt19937_64 rng(99);
  for (const bool ni : implementations()) {
    CAPTURE(ni);
    two_lane_sha256 lanes(ni);
    for (int message = 0; message < 6; ++message) {
      CAPTURE(message);
      // Small updates (0..200 bytes, partial blocks of every fill level) with a few large ones
      // (many whole blocks in one call) among them, then finish() and a new pair of messages.
      std::vector<std::byte> a;
      std::vector<std::byte> b;
      std::uniform_int_distribution<std::size_t> small(0, 200);
      std::uniform_int_distribution<std::size_t> large(1000, 70000);
      for (int piece = 0; piece < 60; ++piece) {
        const std::size_t size = piece % 15 == 7 ? large(rng) : small(rng);
        const auto piece_a = random_bytes(size, rng);
        const auto piece_b = random_bytes(size, rng);
        lanes.update(piece_a, piece_b);
        a.insert(a.end(), piece_a.begin(), piece_a.end());
        b.insert(b.end(), piece_b.begin(), piece_b.end());
      }
      check_lanes(lanes, a, b);
    }

    // reset() drops a partial block and whole blocks already compressed.
    const auto junk = random_bytes(1000, rng);
    lanes.update(junk, junk);
    lanes.reset();
    lanes.update(bytes_of("abc"), bytes_of("abd"));
    check_lanes(lanes, bytes_of("abc"), bytes_of("abd"));
    lanes.update(std::span<const std::byte>(junk).first(37), std::span<const std::byte>(junk).last(37));
    lanes.reset();
    check_lanes(lanes, {}, {});
  }
}
