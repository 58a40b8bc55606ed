#include "tensorreg/hash/fingerprint.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <string>
#include <vector>

#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/hash/tree_hash.hpp"

namespace {

using tensorreg::errc;
using tensorreg::status;
using tensorreg::hash::fingerprint128;
using tensorreg::hash::leaf_bytes;
using tensorreg::hash::xxh3_128;
using tensorreg::memory::host_bytes_view;

std::vector<std::byte> pattern(std::size_t n) {
  std::vector<std::byte> out(n);
  for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<std::byte>((i * 131 + (i >> 12)) & 0xFFU);
  return out;
}

// Hands out its bytes in pieces of 1000 bytes, so streaming must give the one-shot value.
class split_view final : public tensorreg::memory::byte_source {
 public:
  explicit split_view(std::span<const std::byte> bytes) : bytes_(bytes) {}
  [[nodiscard]] std::uint64_t size() const noexcept override { return bytes_.size(); }
  [[nodiscard]] status visit(std::uint64_t offset, std::uint64_t length,
                             tensorreg::memory::piece_sink sink) const override {
    TENSORREG_TRY(check_range(offset, length));
    while (length > 0) {
      const auto n = std::min<std::uint64_t>(length, 1000);
      TENSORREG_TRY(sink(bytes_.subspan(offset, n)));
      offset += n;
      length -= n;
    }
    return {};
  }

 private:
  std::span<const std::byte> bytes_;
};

}  // namespace

TEST_CASE("fingerprint: XXH3-128 of empty input is libxxhash's value", "[hash][fingerprint]") {
  // XXH3_128bits("", 0) from xxhash's sanity tests.
  CHECK(xxh3_128({}) == fingerprint128{0x6001C324468D497FULL, 0x99AA06D3014798D8ULL});
}

TEST_CASE("fingerprint: equal bytes give equal values, a flipped bit changes them", "[hash][fingerprint]") {
  auto data = pattern(4096);
  const fingerprint128 before = xxh3_128(data);
  CHECK(xxh3_128(pattern(4096)) == before);
  data[1234] ^= std::byte{0x10};
  CHECK_FALSE(xxh3_128(data) == before);
}

TEST_CASE("fingerprint: streaming over pieces equals one-shot", "[hash][fingerprint]") {
  const auto data = pattern(123457);
  const auto streamed = xxh3_128(split_view(data), 0, data.size());
  REQUIRE(streamed.has_value());
  CHECK(*streamed == xxh3_128(data));
  const auto middle = xxh3_128(split_view(data), 100, 5000);
  REQUIRE(middle.has_value());
  CHECK(*middle == xxh3_128(std::span<const std::byte>(data).subspan(100, 5000)));

  const auto past = xxh3_128(split_view(data), 100, data.size());
  REQUIRE_FALSE(past.has_value());
  CHECK(past.error().code == errc::out_of_range);
  // The message is byte_source's own (tests/memory covers its text); it names the range.
  CHECK_THAT(past.error().message, Catch::Contains("123457"));
}

TEST_CASE("fingerprint: one fingerprint per 4 MiB leaf, any thread count", "[hash][fingerprint]") {
  const auto data = pattern(2 * leaf_bytes + 17);
  const std::span<const std::byte> all(data);
  const std::vector<fingerprint128> expected = {xxh3_128(all.subspan(0, leaf_bytes)),
                                                xxh3_128(all.subspan(leaf_bytes, leaf_bytes)),
                                                xxh3_128(all.subspan(2 * leaf_bytes))};
  const auto serial = tensorreg::hash::leaf_fingerprints(host_bytes_view(data));
  REQUIRE(serial.has_value());
  CHECK(*serial == expected);
  for (const unsigned threads : {1U, 4U}) {
    tensorreg::thread_pool pool(threads);
    const auto parallel = tensorreg::hash::leaf_fingerprints(split_view(data), &pool);
    REQUIRE(parallel.has_value());
    CHECK(*parallel == expected);
  }
  const std::vector<std::byte> empty;
  const auto none = tensorreg::hash::leaf_fingerprints(host_bytes_view(empty));
  REQUIRE(none.has_value());
  CHECK(none->empty());
}
