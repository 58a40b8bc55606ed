// tests/support/raw_wire.hpp — hand-made frames on a raw socket, for tests that speak to a real
// tensorregd below any client (malformed bytes, limits, connection-level answers).
#pragma once

#include <optional>
#include <string>

#include "tensorreg/wire/v1/frame.pb.h"

namespace tensorreg::testing {

/// `request` serialised and framed as docs/wire-format.md §2 says.
[[nodiscard]] std::string framed(const wire::v1::Request& request);

/// The next answer read from `fd`, or nullopt when the daemon closes the connection first.
[[nodiscard]] std::optional<wire::v1::Response> next_answer(int fd);

/// Sends `bytes` on `fd`, then returns next_answer(fd).
[[nodiscard]] std::optional<wire::v1::Response> send_and_answer(int fd, const std::string& bytes);

}  // namespace tensorreg::testing
