#include "support/raw_wire.hpp"

#include <catch2/catch.hpp>

#include <sys/socket.h>

#include <cstddef>
#include <cstring>
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

bool send_unchecked(int fd, const std::string& bytes, std::span<const int> fds) {
  std::vector<char> control(CMSG_SPACE(sizeof(int) * fds.size()));
  iovec iov{const_cast<char*>(bytes.data()), bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
  if (!fds.empty()) std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  return ::sendmsg(fd, &msg, MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size());
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

std::vector<wire::v1::Response> next_answers(int fd, std::size_t count) {
  std::vector<wire::v1::Response> out;
  daemon::frame_decoder decoder(1u << 30);
  std::vector<std::byte> buffer(4096);
  while (out.size() < count) {
    if (auto f = decoder.next()) {
      REQUIRE(out.emplace_back().ParseFromString(f->payload));
      continue;
    }
    auto got = daemon::receive_some(fd, buffer);
    if (!got || got->bytes == 0) break;
    REQUIRE(decoder.feed(std::span<const std::byte>(buffer.data(), got->bytes)));
  }
  return out;
}

std::optional<wire::v1::Response> exchange(int fd, const std::string& bytes) {
  if (!daemon::send_all(fd, std::as_bytes(std::span(bytes.data(), bytes.size())), {})) return std::nullopt;
  daemon::frame_decoder decoder(1u << 30);
  std::vector<std::byte> buffer(4096);
  for (;;) {
    if (auto f = decoder.next()) {
      wire::v1::Response r;
      if (!r.ParseFromString(f->payload)) return std::nullopt;
      return r;
    }
    auto got = daemon::receive_some(fd, buffer);
    if (!got || got->bytes == 0) return std::nullopt;
    if (!decoder.feed(std::span<const std::byte>(buffer.data(), got->bytes))) return std::nullopt;
  }
}

std::optional<wire::v1::Response> send_and_answer(int fd, const std::string& bytes) {
  REQUIRE(daemon::send_all(fd, std::as_bytes(std::span(bytes.data(), bytes.size())), {}));
  return next_answer(fd);
}

}  // namespace tensorreg::testing
