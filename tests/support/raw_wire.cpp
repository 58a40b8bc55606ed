#include "support/raw_wire.hpp"

#include <catch2/catch.hpp>

#include <cstddef>
#include <span>
#include <vector>

#include "daemon/framing.hpp"
#include "daemon/unix_socket.hpp"

namespace tensorreg::testing {

std::string framed(const wire::v1::Request& request) {
  std::string payload;
  request.SerializeToString(&payload);
  return daemon::encode_frame(payload).value();
}

std::optional<wire::v1::Response> next_answer(int fd) {
  daemon::frame_decoder decoder(1u << 30);
  std::vector<std::byte> buffer(4096);
  for (;;) {
    if (auto f = decoder.next()) {
      wire::v1::Response r;
      REQUIRE(r.ParseFromString(f->payload));
      return r;
    }
    auto got = daemon::receive_some(fd, buffer);
    if (!got || got->bytes == 0) return std::nullopt;
    REQUIRE(decoder.feed(std::span<const std::byte>(buffer.data(), got->bytes)));
  }
}

std::optional<wire::v1::Response> send_and_answer(int fd, const std::string& bytes) {
  REQUIRE(daemon::send_all(fd, std::as_bytes(std::span(bytes.data(), bytes.size())), {}));
  return next_answer(fd);
}

}  // namespace tensorreg::testing
