#include "tensorreg/common/fault_injection.hpp"

#include <catch2/catch.hpp>
#include <cerrno>

namespace tensorreg {
namespace {

TEST_CASE("fault_injection: a disarmed site lets every call through", "[common][fault_injection]") {
  for (int i = 0; i < 3; ++i) CHECK(injected_fault(fault_site::write) == 0);
}

TEST_CASE("fault_injection: a scoped fault fails the chosen calls and no others", "[common][fault_injection]") {
  {
    scoped_fault fault(fault_site::fsync, EIO, /*skip=*/2, /*times=*/2);
    CHECK(injected_fault(fault_site::fsync) == 0);
    CHECK(injected_fault(fault_site::fsync) == 0);
    CHECK(injected_fault(fault_site::write) == 0);  // another site is untouched
    CHECK(injected_fault(fault_site::fsync) == EIO);
    CHECK(injected_fault(fault_site::fsync) == EIO);
    CHECK(injected_fault(fault_site::fsync) == 0);
    CHECK(fault.fired() == 2);
  }
  CHECK(injected_fault(fault_site::fsync) == 0);  // disarmed with its scope
}

TEST_CASE("fault_injection: times 0 fails every call after the skipped ones", "[common][fault_injection]") {
  scoped_fault fault(fault_site::mmap, ENOMEM, 0, 0);
  for (int i = 0; i < 5; ++i) CHECK(injected_fault(fault_site::mmap) == ENOMEM);
  CHECK(fault.fired() == 5);
}

TEST_CASE("fault_injection: a spec arms the sites it names", "[common][fault_injection]") {
  REQUIRE(arm_faults("write:ENOSPC:1:1,rename:EIO"));
  // Adopt the sites armed by the spec so that they are disarmed when this test ends.
  scoped_fault write_scope(fault_site::write, ENOSPC, 1, 1);
  scoped_fault rename_scope(fault_site::rename, EIO);
  CHECK(injected_fault(fault_site::write) == 0);
  CHECK(injected_fault(fault_site::write) == ENOSPC);
  CHECK(injected_fault(fault_site::rename) == EIO);
}

TEST_CASE("fault_injection: a spec it cannot read is refused and names the part", "[common][fault_injection]") {
  const auto unknown_site = arm_faults("sendfile:EIO");
  REQUIRE_FALSE(unknown_site);
  CHECK(unknown_site.error().code == errc::invalid_argument);
  CHECK(unknown_site.error().message == "cannot arm fault 'sendfile:EIO': unknown site 'sendfile'");

  const auto unknown_errno = arm_faults("write:EWHATEVER");
  REQUIRE_FALSE(unknown_errno);
  CHECK(unknown_errno.error().message == "cannot arm fault 'write:EWHATEVER': unknown errno 'EWHATEVER'");

  const auto bad_count = arm_faults("write:EIO:x");
  REQUIRE_FALSE(bad_count);
  CHECK(bad_count.error().message == "cannot arm fault 'write:EIO:x': 'x' is not a count");

  const auto too_many = arm_faults("write:EIO:1:1:1");
  REQUIRE_FALSE(too_many);
  CHECK(too_many.error().message == "cannot arm fault 'write:EIO:1:1:1': expected site:ERRNO[:skip[:times]]");
  CHECK(injected_fault(fault_site::write) == 0);
}

}  // namespace
}  // namespace tensorreg
