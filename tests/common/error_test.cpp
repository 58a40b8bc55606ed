#include "tensorreg/common/error.hpp"

#include <catch2/catch.hpp>

#include <cerrno>

namespace {

using tensorreg::errc;
using tensorreg::fail;
using tensorreg::result;
using tensorreg::status;

result<int> parse_positive(int v) {
  if (v <= 0) return fail(errc::invalid_argument, "cannot parse value: " + std::to_string(v) + " is not positive");
  return v;
}

result<int> doubled(int v) {
  TENSORREG_TRY_ASSIGN(const int x, parse_positive(v));
  return 2 * x;
}

status checked(int v) {
  TENSORREG_TRY(parse_positive(v));
  return {};
}

}  // namespace

TEST_CASE("error: codes are numbered as gRPC's", "[common][error]") {
  CHECK(static_cast<int>(errc::ok) == 0);
  CHECK(static_cast<int>(errc::invalid_argument) == 3);
  CHECK(static_cast<int>(errc::not_found) == 5);
  CHECK(static_cast<int>(errc::failed_precondition) == 9);
  CHECK(static_cast<int>(errc::out_of_range) == 11);
  CHECK(static_cast<int>(errc::data_loss) == 15);
  CHECK(static_cast<int>(errc::unauthenticated) == 16);
  CHECK(tensorreg::errc_name(errc::resource_exhausted) == "RESOURCE_EXHAUSTED");
  CHECK(tensorreg::errc_name(static_cast<errc>(99)) == "UNKNOWN");
}

TEST_CASE("error: TRY macros propagate the first error unchanged", "[common][error]") {
  REQUIRE(doubled(21).value() == 42);
  const auto bad = doubled(-1);
  REQUIRE_FALSE(bad);
  CHECK(bad.error().code == errc::invalid_argument);
  CHECK(bad.error().message == "cannot parse value: -1 is not positive");
  CHECK(checked(1).has_value());
  CHECK(checked(0).error().code == errc::invalid_argument);
}

TEST_CASE("error: with_context prefixes the message", "[common][error]") {
  const auto e = tensorreg::with_context({errc::not_found, "no such file"}, "cannot open 'x'");
  CHECK(e.code == errc::not_found);
  CHECK(e.message == "cannot open 'x': no such file");
}

TEST_CASE("error: running out of fds, memory or space is RESOURCE_EXHAUSTED, anything else as asked",
          "[common][error]") {
  for (int e : {EMFILE, ENFILE, ENOMEM, ENOSPC})
    CHECK(tensorreg::errc_of_errno(e, errc::internal) == errc::resource_exhausted);
  CHECK(tensorreg::errc_of_errno(EBADF, errc::internal) == errc::internal);
  CHECK(tensorreg::errc_of_errno(EACCES, errc::permission_denied) == errc::permission_denied);
}
