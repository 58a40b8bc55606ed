#include "tensorreg/common/logger.hpp"

#include <catch2/catch.hpp>

#include "common/log.hpp"
#include "support/recording_logger.hpp"

using tensorreg::errc;
using tensorreg::log_level;

TEST_CASE("logger: level names parse back to their level", "[common][logger]") {
  for (auto level :
       {log_level::trace, log_level::debug, log_level::info, log_level::warn, log_level::error, log_level::off}) {
    auto parsed = tensorreg::parse_log_level(tensorreg::log_level_name(level));
    REQUIRE(parsed.has_value());
    CHECK(*parsed == level);
  }
  CHECK(tensorreg::parse_log_level("warning").value() == log_level::warn);
}

TEST_CASE("logger: an unknown level name is INVALID_ARGUMENT naming it", "[common][logger]") {
  auto parsed = tensorreg::parse_log_level("verbose");
  REQUIRE_FALSE(parsed.has_value());
  CHECK(parsed.error().code == errc::invalid_argument);
  CHECK(parsed.error().message == "cannot parse log level 'verbose': expected trace, debug, info, warn, error or off");
}

TEST_CASE("logger: the null logger and the stderr logger enable by level", "[common][logger]") {
  CHECK_FALSE(tensorreg::null_logger().enabled(log_level::error));
  auto sink = tensorreg::stderr_logger(log_level::warn);
  CHECK_FALSE(sink->enabled(log_level::info));
  CHECK(sink->enabled(log_level::warn));
  CHECK(sink->enabled(log_level::error));
  CHECK_FALSE(sink->enabled(log_level::off));
  sink->write(log_level::info, "not written: below the level");
}

TEST_CASE("logger: log() formats only lines its sink enables", "[common][logger]") {
  tensorreg::testing::recording_logger sink(log_level::info);
  tensorreg::log(sink, log_level::debug, "dropped {}", 1);
  tensorreg::log(sink, log_level::warn, "evicted {} ({} bytes) for pid {}", "mi2:abc", 4096, 17);
  const auto lines = sink.lines();
  REQUIRE(lines.size() == 1);
  CHECK(lines[0].level == log_level::warn);
  CHECK(lines[0].text == "evicted mi2:abc (4096 bytes) for pid 17");
  CHECK(sink.count(log_level::warn, "mi2:abc", "pid 17") == 1);
}
