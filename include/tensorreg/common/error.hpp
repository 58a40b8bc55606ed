// tensorreg/common/error.hpp — value-based errors for the whole library.
//
// Provides `errc` (numbered exactly as gRPC status codes, so the daemon maps 1:1),
// `error {code, message}`, `result<T>` = tl::expected<T, error>, `status` = result<void>,
// and the propagation macros TENSORREG_TRY / TENSORREG_TRY_ASSIGN.
//
// Thread-safety: plain values; no shared state.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>

#include <tl/expected.hpp>

namespace tensorreg {

/// Status codes, numbered as gRPC's (0 OK … 16 UNAUTHENTICATED).
enum class errc : std::int32_t {
  ok = 0,
  cancelled = 1,
  unknown = 2,
  invalid_argument = 3,
  deadline_exceeded = 4,
  not_found = 5,
  already_exists = 6,
  permission_denied = 7,
  resource_exhausted = 8,
  failed_precondition = 9,
  aborted = 10,
  out_of_range = 11,
  unimplemented = 12,
  internal = 13,
  unavailable = 14,
  data_loss = 15,
  unauthenticated = 16,
};

/// gRPC's upper-case name of a code ("INVALID_ARGUMENT"); "UNKNOWN" for values outside 0..16.
[[nodiscard]] std::string_view errc_name(errc code) noexcept;

/// An error: a code and a message of the form "cannot <verb> <object>: <reason>".
struct error {
  errc code = errc::unknown;
  std::string message;

  friend bool operator==(const error&, const error&) = default;
};

template <typename T>
using result = tl::expected<T, error>;
using status = result<void>;

/// The code of a system call's failure where the process or the system ran out of something
/// (fds: EMFILE, ENFILE; memory: ENOMEM; space: ENOSPC): RESOURCE_EXHAUSTED, which a client may
/// retry later; any other errno gives `otherwise`.
[[nodiscard]] errc errc_of_errno(int err, errc otherwise) noexcept;

/// Builds the unexpected value of a result: `return fail(errc::not_found, "...")`.
[[nodiscard]] inline tl::unexpected<error> fail(errc code, std::string message) {
  return tl::unexpected<error>(error{code, std::move(message)});
}

/// Prefixes the message of an error with context ("while reading 'x': ...").
[[nodiscard]] inline error with_context(error e, std::string_view context) {
  e.message.insert(0, std::string(context) + ": ");
  return e;
}

[[noreturn]] void assertion_failed(const char* expr, const char* file, int line) noexcept;

}  // namespace tensorreg

#define TENSORREG_DETAIL_CONCAT2(a, b) a##b
#define TENSORREG_DETAIL_CONCAT(a, b) TENSORREG_DETAIL_CONCAT2(a, b)

/// Evaluates a result-returning expression; returns its error from the enclosing function.
#define TENSORREG_TRY(expr) TENSORREG_DETAIL_TRY(TENSORREG_DETAIL_CONCAT(tensorreg_try_, __COUNTER__), expr)
#define TENSORREG_DETAIL_TRY(tmp, expr)                        \
  do {                                                         \
    auto&& tmp = (expr);                                       \
    if (!tmp) return ::tl::unexpected(std::move(tmp).error()); \
  } while (false)

/// `TENSORREG_TRY_ASSIGN(auto x, f());` declares/assigns lhs from the value, or returns the error.
#define TENSORREG_TRY_ASSIGN(lhs, expr) \
  TENSORREG_DETAIL_TRY_ASSIGN(TENSORREG_DETAIL_CONCAT(tensorreg_try_tmp_, __COUNTER__), lhs, expr)
#define TENSORREG_DETAIL_TRY_ASSIGN(tmp, lhs, expr)          \
  auto tmp = (expr);                                         \
  if (!tmp) return ::tl::unexpected(std::move(tmp).error()); \
  lhs = std::move(tmp).value()

/// Broken internal invariants are bugs: abort with the location.
#define TENSORREG_ASSERT(expr) \
  ((expr) ? static_cast<void>(0) : ::tensorreg::assertion_failed(#expr, __FILE__, __LINE__))
