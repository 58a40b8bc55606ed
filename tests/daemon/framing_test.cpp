#include "daemon/framing.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace {

using tensorreg::errc;
using tensorreg::daemon::decoded_frame;
using tensorreg::daemon::encode_frame;
using tensorreg::daemon::encode_frame_header;
using tensorreg::daemon::frame_decoder;

std::string header_bytes(std::uint32_t length) {
  const auto header = encode_frame_header(length);
  return std::string(reinterpret_cast<const char*>(header.data()), header.size());
}

// One open fd (a dup of stdin's slot is not guaranteed: a pipe end is).
tensorreg::unique_fd some_fd() {
  int ends[2] = {-1, -1};
  REQUIRE(::pipe(ends) == 0);
  ::close(ends[1]);
  return tensorreg::unique_fd(ends[0]);
}

std::vector<tensorreg::unique_fd> fds_of(std::vector<int>& raw, std::size_t n) {
  std::vector<tensorreg::unique_fd> out;
  for (std::size_t i = 0; i < n; ++i) {
    out.push_back(some_fd());
    raw.push_back(out.back().get());
  }
  return out;
}

std::span<const std::byte> bytes_of(const std::string& s) {
  return std::as_bytes(std::span<const char>(s.data(), s.size()));
}

std::string framed(const std::string& payload) {
  return header_bytes(static_cast<std::uint32_t>(payload.size())) + payload;
}

std::vector<decoded_frame> drain(frame_decoder& decoder) {
  std::vector<decoded_frame> frames;
  while (auto frame = decoder.next()) frames.push_back(std::move(*frame));
  return frames;
}

}  // namespace

TEST_CASE("framing: the header is the payload length, 4 bytes little-endian", "[daemon][framing]") {
  CHECK(header_bytes(0x04030201u) == std::string("\x01\x02\x03\x04", 4));
  CHECK(header_bytes(5) == std::string("\x05\x00\x00\x00", 4));
  const auto header = encode_frame_header(0xdeadbeefu);
  CHECK(tensorreg::daemon::decode_frame_header(header) == 0xdeadbeefu);

  const auto frame = encode_frame("hello");
  REQUIRE(frame);
  CHECK(*frame == std::string("\x05\x00\x00\x00hello", 9));
}

TEST_CASE("framing: encode_frame refuses empty and oversized payloads", "[daemon][framing]") {
  const auto empty = encode_frame("");
  REQUIRE_FALSE(empty);
  CHECK(empty.error().code == errc::invalid_argument);
  CHECK(empty.error().message == "cannot write frame: payload is empty");

  const auto big = encode_frame("12345", 4);
  REQUIRE_FALSE(big);
  CHECK(big.error().code == errc::resource_exhausted);
  CHECK(big.error().message == "cannot write frame: length 5 exceeds max_frame_bytes 4");
}

TEST_CASE("framing: a zero-length frame is INVALID_ARGUMENT", "[daemon][framing]") {
  frame_decoder decoder;
  REQUIRE(decoder.feed(framed("ab")));
  const auto fed = decoder.feed(header_bytes(0) + "trailing");
  REQUIRE_FALSE(fed);
  CHECK(fed.error().code == errc::invalid_argument);
  CHECK(fed.error().message == "cannot read frame: zero-length frame at stream offset 6");
  CHECK(decoder.failed());
  CHECK(decoder.failure() == fed.error());

  // The frame completed before the bad header is still delivered.
  const auto frames = drain(decoder);
  REQUIRE(frames.size() == 1);
  CHECK(frames[0].payload == "ab");

  // Sticky: later bytes are ignored and the same error comes back, from finish() too.
  const auto again = decoder.feed(framed("cd"));
  REQUIRE_FALSE(again);
  CHECK(again.error() == fed.error());
  CHECK(decoder.ready_frames() == 0);
  CHECK(decoder.finish().error() == fed.error());
}

TEST_CASE("framing: a frame of exactly max_frame_bytes is accepted", "[daemon][framing]") {
  frame_decoder decoder(16);
  const std::string payload(16, 'x');
  REQUIRE(decoder.feed(framed(payload)));
  const auto frame = decoder.next();
  REQUIRE(frame);
  CHECK(frame->payload == payload);
  CHECK(frame->stream_offset == 0);
  CHECK(decoder.finish());
}

TEST_CASE("framing: max_frame_bytes + 1 is RESOURCE_EXHAUSTED before any payload arrives", "[daemon][framing]") {
  frame_decoder decoder(16);
  const auto fed = decoder.feed(header_bytes(17));  // the header alone is enough
  REQUIRE_FALSE(fed);
  CHECK(fed.error().code == errc::resource_exhausted);
  CHECK(fed.error().message == "cannot read frame: length 17 exceeds max_frame_bytes 16");
  CHECK(decoder.partial_bytes() == 0);
  CHECK(decoder.next() == std::nullopt);
}

TEST_CASE("framing: the default cap is 64 MiB", "[daemon][framing]") {
  frame_decoder decoder;
  CHECK(decoder.max_frame_bytes() == 64u * 1024u * 1024u);
  const auto fed = decoder.feed(header_bytes(64u * 1024u * 1024u + 1u));
  REQUIRE_FALSE(fed);
  CHECK(fed.error().code == errc::resource_exhausted);
  CHECK(fed.error().message == "cannot read frame: length 67108865 exceeds max_frame_bytes 67108864");
}

TEST_CASE("framing: a declared length costs nothing until its bytes arrive", "[daemon][framing]") {
  frame_decoder decoder;  // 64 MiB cap
  REQUIRE(decoder.feed(header_bytes(64u * 1024u * 1024u) + "0123456789"));
  CHECK(decoder.partial_bytes() == 14);  // the header and 10 payload bytes
  CHECK(decoder.partial_capacity() <= 64 * 1024);
  CHECK(decoder.ready_frames() == 0);
  const auto end = decoder.finish();
  REQUIRE_FALSE(end);
  CHECK(end.error().code == errc::data_loss);
  CHECK(end.error().message ==
        "cannot read frame: stream ended inside a frame at stream offset 0 (10 of 67108864 "
        "payload bytes)");
}

TEST_CASE("framing: the payload buffer grows with the bytes received, up to the declared length", "[daemon][framing]") {
  constexpr std::uint32_t length = 10u * 1024u * 1024u + 7u;
  frame_decoder decoder(length);
  REQUIRE(decoder.feed(header_bytes(length)));
  const std::string chunk(256 * 1024, 'z');
  std::size_t received = 0;
  while (received + chunk.size() < length) {
    REQUIRE(decoder.feed(chunk));
    received += chunk.size();
    CHECK(decoder.partial_capacity() <= std::max<std::size_t>(2 * received, 64 * 1024) + 64);
  }
  REQUIRE(decoder.feed(std::string(length - received, 'z')));
  const auto frame = decoder.next();
  REQUIRE(frame);
  CHECK(frame->payload.size() == length);
  CHECK(frame->payload.capacity() < std::size_t{length} + 64);
}

TEST_CASE("framing: a stream that ends inside a header is DATA_LOSS", "[daemon][framing]") {
  frame_decoder decoder;
  REQUIRE(decoder.feed(framed("one") + std::string("\x07\x00", 2)));
  CHECK_FALSE(decoder.at_frame_boundary());
  const auto end = decoder.finish();
  REQUIRE_FALSE(end);
  CHECK(end.error().code == errc::data_loss);
  CHECK(end.error().message == "cannot read frame: stream ended inside the frame header (2 of 4 bytes)");
  REQUIRE(decoder.ready_frames() == 1);
  CHECK(decoder.next()->payload == "one");
}

TEST_CASE("framing: a stream that ends inside a body is DATA_LOSS", "[daemon][framing]") {
  frame_decoder decoder;
  REQUIRE(decoder.feed(framed("first")));
  REQUIRE(decoder.feed(header_bytes(8) + "abc"));
  CHECK_FALSE(decoder.at_frame_boundary());
  const auto end = decoder.finish();
  REQUIRE_FALSE(end);
  CHECK(end.error().code == errc::data_loss);
  CHECK(end.error().message ==
        "cannot read frame: stream ended inside a frame at stream offset 9 (3 of 8 payload bytes)");
}

TEST_CASE("framing: an empty stream and a stream of whole frames finish cleanly", "[daemon][framing]") {
  frame_decoder decoder;
  CHECK(decoder.finish());
  REQUIRE(decoder.feed(std::string_view{}));
  CHECK(decoder.at_frame_boundary());
  REQUIRE(decoder.feed(framed("x")));
  CHECK(decoder.at_frame_boundary());
  CHECK(decoder.finish());
}

TEST_CASE("framing: many frames in one chunk come out in order with their offsets", "[daemon][framing]") {
  std::string stream;
  std::vector<std::string> payloads;
  for (int i = 1; i <= 100; ++i) {
    payloads.push_back(std::string(static_cast<std::size_t>(i), static_cast<char>('a' + i % 26)));
    stream += framed(payloads.back());
  }
  frame_decoder decoder;
  REQUIRE(decoder.feed(stream));
  CHECK(decoder.bytes_fed() == stream.size());
  const auto frames = drain(decoder);
  REQUIRE(frames.size() == payloads.size());
  std::uint64_t offset = 0;
  for (std::size_t i = 0; i < frames.size(); ++i) {
    CHECK(frames[i].payload == payloads[i]);
    CHECK(frames[i].stream_offset == offset);
    offset += 4 + payloads[i].size();
  }
  CHECK(decoder.finish());
}

TEST_CASE("framing: a frame split byte by byte is reassembled", "[daemon][framing]") {
  const std::string payload = "a payload split into single bytes";
  const std::string stream = framed("lead") + framed(payload);
  frame_decoder decoder;
  for (const char c : stream) {
    REQUIRE(decoder.feed(std::string_view(&c, 1)));
  }
  const auto frames = drain(decoder);
  REQUIRE(frames.size() == 2);
  CHECK(frames[0].payload == "lead");
  CHECK(frames[1].payload == payload);
  CHECK(frames[1].stream_offset == 8);
  CHECK(decoder.finish());
}

TEST_CASE("framing: random chunkings of one stream give the same frames", "[daemon][framing]") {
  std::mt19937 rng(1234);
  std::string stream;
  std::vector<std::string> payloads;
  for (int i = 0; i < 50; ++i) {
    std::string payload(std::uniform_int_distribution<std::size_t>(1, 300)(rng), '\0');
    for (char& c : payload) c = static_cast<char>(rng());
    stream += framed(payload);
    payloads.push_back(std::move(payload));
  }
  for (int round = 0; round < 20; ++round) {
    frame_decoder decoder(300);
    std::size_t pos = 0;
    while (pos < stream.size()) {
      const std::size_t n = std::min(stream.size() - pos, std::uniform_int_distribution<std::size_t>(1, 700)(rng));
      REQUIRE(decoder.feed(std::string_view(stream).substr(pos, n)));
      pos += n;
    }
    const auto frames = drain(decoder);
    REQUIRE(frames.size() == payloads.size());
    for (std::size_t i = 0; i < frames.size(); ++i) CHECK(frames[i].payload == payloads[i]);
    CHECK(decoder.finish());
  }
}

TEST_CASE("framing: garbage is rejected by its length, not trusted", "[daemon][framing]") {
  // A random 4-byte "length" is almost surely far above a small cap.
  std::mt19937 rng(42);
  for (int i = 0; i < 100; ++i) {
    std::string garbage(4 + static_cast<std::size_t>(i), '\0');
    for (char& c : garbage) c = static_cast<char>(rng());
    const std::uint32_t declared = static_cast<std::uint8_t>(garbage[0]) |
                                   (static_cast<std::uint32_t>(static_cast<std::uint8_t>(garbage[1])) << 8) |
                                   (static_cast<std::uint32_t>(static_cast<std::uint8_t>(garbage[2])) << 16) |
                                   (static_cast<std::uint32_t>(static_cast<std::uint8_t>(garbage[3])) << 24);
    frame_decoder decoder(1024);
    const auto fed = decoder.feed(garbage);
    if (declared == 0) {
      REQUIRE_FALSE(fed);
      CHECK(fed.error().code == errc::invalid_argument);
    } else if (declared > 1024) {
      REQUIRE_FALSE(fed);
      CHECK(fed.error().code == errc::resource_exhausted);
      CHECK(fed.error().message ==
            "cannot read frame: length " + std::to_string(declared) + " exceeds max_frame_bytes 1024");
      CHECK(decoder.partial_bytes() == 0);
    } else {
      REQUIRE(fed);  // a plausible length: the decoder waits for the rest
      CHECK(decoder.partial_bytes() <= garbage.size());
    }
  }
  // The fixed case: "GET " read as a length is 0x20544547.
  frame_decoder decoder;
  const auto fed = decoder.feed("GET / HTTP/1.1\r\n");
  REQUIRE_FALSE(fed);
  CHECK(fed.error().code == errc::resource_exhausted);
  CHECK(fed.error().message == "cannot read frame: length 542393671 exceeds max_frame_bytes 67108864");
}

TEST_CASE("framing: fds that arrive with the end of frame A and all of frame B belong to B", "[daemon][framing][fds]") {
  frame_decoder decoder;
  const auto a = framed("frame A"), b = framed("frame B");
  std::vector<int> raw;
  REQUIRE(decoder.feed(bytes_of(a.substr(0, 5)), {}));
  REQUIRE(decoder.feed(bytes_of(a.substr(5) + b), fds_of(raw, 2)));
  auto first = decoder.next();
  auto second = decoder.next();
  REQUIRE(first);
  REQUIRE(second);
  CHECK(first->payload == "frame A");
  CHECK(first->fds.empty());
  CHECK(second->payload == "frame B");
  REQUIRE(second->fds.size() == 2);
  CHECK(second->fds[0].get() == raw[0]);
  CHECK(second->fds[1].get() == raw[1]);
}

TEST_CASE("framing: fds go to the last frame that begins in their read, even one not complete yet",
          "[daemon][framing][fds]") {
  frame_decoder decoder;
  const auto a = framed("frame A"), b = framed("frame B"), c = framed("frame C");
  std::vector<int> raw;
  // A whole, B whole, C begun: the fds are C's (a sender starts no later frame in their sendmsg).
  REQUIRE(decoder.feed(bytes_of(a + b + c.substr(0, 6)), fds_of(raw, 1)));
  CHECK(decoder.ready_frames() == 2);
  // The rest of C, and fds that arrive with bytes that only continue it, are C's too.
  REQUIRE(decoder.feed(bytes_of(c.substr(6)), fds_of(raw, 1)));
  auto fa = decoder.next(), fb = decoder.next(), fc = decoder.next();
  REQUIRE((fa && fb && fc));
  CHECK(fa->fds.empty());
  CHECK(fb->fds.empty());
  CHECK(fc->payload == "frame C");
  REQUIRE(fc->fds.size() == 2);
  CHECK(fc->fds[0].get() == raw[0]);
  CHECK(fc->fds[1].get() == raw[1]);
}

TEST_CASE("framing: fds fed with the first byte of a frame split byte by byte stay with it", "[daemon][framing][fds]") {
  frame_decoder decoder;
  const auto a = framed("with fds"), b = framed("without");
  std::vector<int> raw;
  const auto stream = a + b;
  for (std::size_t i = 0; i < stream.size(); ++i) {
    REQUIRE(decoder.feed(bytes_of(stream.substr(i, 1)), i == 0 ? fds_of(raw, 3) : std::vector<tensorreg::unique_fd>{}));
  }
  auto fa = decoder.next(), fb = decoder.next();
  REQUIRE((fa && fb));
  CHECK(fa->fds.size() == 3);
  CHECK(fb->fds.empty());
}

TEST_CASE("framing: more than 250 fds for one frame, sent a few per read, fail the stream", "[daemon][framing][fds]") {
  frame_decoder decoder;
  const auto big = framed(std::string(300, 'x'));
  std::vector<int> raw;
  // 83 reads of one byte with 3 fds each: 249 fds, all the frame's, still allowed.
  std::size_t at = 0;
  for (; at < 83; ++at) REQUIRE(decoder.feed(bytes_of(big.substr(at, 1)), fds_of(raw, 3)));
  // The 84th read brings the frame to 252 fds: refused, and the decoder is failed from then on.
  const auto over = decoder.feed(bytes_of(big.substr(at, 1)), fds_of(raw, 3));
  REQUIRE_FALSE(over);
  CHECK(over.error().code == errc::invalid_argument);
  CHECK(over.error().message ==
        "cannot read frame: more than 250 file descriptors arrived for the frame at stream offset 0");
  CHECK(decoder.failed());
  const auto later = decoder.feed(bytes_of(big.substr(at + 1)), {});
  REQUIRE_FALSE(later);
  CHECK(later.error().message == over.error().message);
  // The 3 refused fds are closed already; the frame's 249 go with the decoder.
  for (std::size_t i = 249; i < raw.size(); ++i) CHECK(::fcntl(raw[i], F_GETFD) == -1);
}

TEST_CASE("framing: a read that breaks the fd cap drops the frames it completed", "[daemon][framing][fds]") {
  frame_decoder decoder;
  const auto a = framed("frame A"), c = framed("frame C");
  std::vector<int> raw;
  REQUIRE(decoder.feed(bytes_of(c), {}));
  REQUIRE(decoder.feed(bytes_of(a.substr(0, 5)), fds_of(raw, 200)));
  // The rest of A completes it and brings it to 260 fds: A goes, C (complete before) stays.
  const auto over = decoder.feed(bytes_of(a.substr(5)), fds_of(raw, 60));
  REQUIRE_FALSE(over);
  CHECK(over.error().message ==
        "cannot read frame: more than 250 file descriptors arrived for the frame at stream offset " +
            std::to_string(c.size()));
  REQUIRE(decoder.ready_frames() == 1);
  CHECK(decoder.next()->payload == "frame C");
}
