#include "tensorreg/common/error.hpp"

#include <cerrno>
#include <cstdio>
#include <cstdlib>

namespace tensorreg {

errc errc_of_errno(int err, errc otherwise) noexcept {
  switch (err) {
    case EMFILE:
    case ENFILE:
    case ENOMEM:
    case ENOSPC: return errc::resource_exhausted;
    default: return otherwise;
  }
}

std::string_view errc_name(errc code) noexcept {
  switch (code) {
    case errc::ok: return "OK";
    case errc::cancelled: return "CANCELLED";
    case errc::unknown: return "UNKNOWN";
    case errc::invalid_argument: return "INVALID_ARGUMENT";
    case errc::deadline_exceeded: return "DEADLINE_EXCEEDED";
    case errc::not_found: return "NOT_FOUND";
    case errc::already_exists: return "ALREADY_EXISTS";
    case errc::permission_denied: return "PERMISSION_DENIED";
    case errc::resource_exhausted: return "RESOURCE_EXHAUSTED";
    case errc::failed_precondition: return "FAILED_PRECONDITION";
    case errc::aborted: return "ABORTED";
    case errc::out_of_range: return "OUT_OF_RANGE";
    case errc::unimplemented: return "UNIMPLEMENTED";
    case errc::internal: return "INTERNAL";
    case errc::unavailable: return "UNAVAILABLE";
    case errc::data_loss: return "DATA_LOSS";
    case errc::unauthenticated: return "UNAUTHENTICATED";
  }
  return "UNKNOWN";
}

void assertion_failed(const char* expr, const char* file, int line) noexcept {
  std::fprintf(stderr, "tensorreg: assertion failed: %s (%s:%d)\n", expr, file, line);
  std::abort();
}

}  // namespace tensorreg
