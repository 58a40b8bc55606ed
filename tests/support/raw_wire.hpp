// tests/support/raw_wire.hpp — hand-made frames on a raw socket, for tests that speak to a real
// tensorregd below any client (malformed bytes, limits, connection-level answers).
#pragma once

#include <optional>
#include <span>
#include <string>
#include <vector>

#include "tensorreg/wire/v1/frame.pb.h"

namespace tensorreg::testing {

/// `request` serialised and framed as docs/wire-format.md §2 says.
[[nodiscard]] std::string framed(const wire::v1::Request& request);

/// Sends `bytes` with `fds` attached by one sendmsg, bypassing the library's limit on fds per
/// frame (for attacks that send more than the daemon takes). Returns whether all bytes left.
[[nodiscard]] bool send_unchecked(int fd, const std::string& bytes, std::span<const int> fds);

/// The next answer read from `fd`, or nullopt when the daemon closes the connection first.
[[nodiscard]] std::optional<wire::v1::Response> next_answer(int fd);

/// The next `count` answers read from `fd` with one decoder (next_answer() drops what a read
/// brings past its first answer), or fewer when the daemon closes the connection first.
[[nodiscard]] std::vector<wire::v1::Response> next_answers(int fd, std::size_t count);

/// Sends `bytes` on `fd`, then returns next_answer(fd).
[[nodiscard]] std::optional<wire::v1::Response> send_and_answer(int fd, const std::string& bytes);

/// send_and_answer() without Catch assertions, for worker threads (Catch is not thread-safe):
/// nullopt when the send fails, the daemon closes first or the answer does not parse.
[[nodiscard]] std::optional<wire::v1::Response> exchange(int fd, const std::string& bytes);

}  // namespace tensorreg::testing
