#include "tensorreg/metrics/registry.hpp"

#include <catch2/catch.hpp>

#include <string>
#include <thread>
#include <vector>

namespace m = tensorreg::metrics;

TEST_CASE("registry: counters and gauges render as Prometheus text 0.0.4", "[metrics][registry]") {
  m::registry r;
  r.counter_of("tensorreg_things_total", "Things done").add(3);
  r.gauge_of("tensorreg_level", "A level", {{"kind", "a"}}).set(-2);
  r.gauge_of("tensorreg_level", "A level", {{"kind", "b"}}).set(7);
  const std::string text = r.render();
  CHECK(text ==
        "# HELP tensorreg_things_total Things done\n"
        "# TYPE tensorreg_things_total counter\n"
        "tensorreg_things_total 3\n"
        "# HELP tensorreg_level A level\n"
        "# TYPE tensorreg_level gauge\n"
        "tensorreg_level{kind=\"a\"} -2\n"
        "tensorreg_level{kind=\"b\"} 7\n");
}

TEST_CASE("registry: the same name and labels give the same metric", "[metrics][registry]") {
  m::registry r;
  auto& a = r.counter_of("tensorreg_x_total", "x", {{"k", "v"}});
  auto& b = r.counter_of("tensorreg_x_total", "x", {{"k", "v"}});
  auto& other = r.counter_of("tensorreg_x_total", "x", {{"k", "w"}});
  a.add();
  b.add(2);
  CHECK(&a == &b);
  CHECK(&a != &other);
  CHECK(a.value() == 3);
  CHECK(other.value() == 0);
}

TEST_CASE("registry: histograms render cumulative buckets, +Inf, sum and count", "[metrics][registry]") {
  m::registry r;
  const double bounds[] = {0.125, 1.0};
  auto& h = r.histogram_of("tensorreg_rpc_duration_seconds", "Time", bounds, {{"method", "Commit"}, {"code", "OK"}});
  h.observe(0.0625);
  h.observe(0.125);  // on a bound: counted in it (le = less or equal)
  h.observe(0.5);
  h.observe(30);
  const std::string text = r.render();
  CHECK(text ==
        "# HELP tensorreg_rpc_duration_seconds Time\n"
        "# TYPE tensorreg_rpc_duration_seconds histogram\n"
        "tensorreg_rpc_duration_seconds_bucket{method=\"Commit\",code=\"OK\",le=\"0.125\"} 2\n"
        "tensorreg_rpc_duration_seconds_bucket{method=\"Commit\",code=\"OK\",le=\"1\"} 3\n"
        "tensorreg_rpc_duration_seconds_bucket{method=\"Commit\",code=\"OK\",le=\"+Inf\"} 4\n"
        "tensorreg_rpc_duration_seconds_sum{method=\"Commit\",code=\"OK\"} 30.6875\n"
        "tensorreg_rpc_duration_seconds_count{method=\"Commit\",code=\"OK\"} 4\n");
  CHECK(h.count() == 4);
}

TEST_CASE("registry: help text and label values are escaped", "[metrics][registry]") {
  m::registry r;
  r.gauge_of("tensorreg_info", "line one\nback\\slash", {{"path", "a\"b\\c\nd"}}).set(1);
  const std::string text = r.render();
  CHECK(text ==
        "# HELP tensorreg_info line one\\nback\\\\slash\n"
        "# TYPE tensorreg_info gauge\n"
        "tensorreg_info{path=\"a\\\"b\\\\c\\nd\"} 1\n");
}

TEST_CASE("registry: collectors run before the function samples read their snapshot", "[metrics][registry]") {
  m::registry r;
  int snapshot = 0;
  int scrapes = 0;
  r.add_collector([&] { snapshot = ++scrapes * 10; });
  r.gauge_function("tensorreg_snap", "snapshot", [&] { return static_cast<double>(snapshot); });
  r.counter_function("tensorreg_snap_total", "snapshot too", [&] { return static_cast<double>(snapshot + 1); });
  CHECK(r.render().find("tensorreg_snap 10\n") != std::string::npos);
  const std::string second = r.render();
  CHECK(second.find("tensorreg_snap 20\n") != std::string::npos);
  CHECK(second.find("tensorreg_snap_total 21\n") != std::string::npos);
  CHECK(second.find("# TYPE tensorreg_snap_total counter\n") != std::string::npos);
}

TEST_CASE("registry: updates from many threads are all counted", "[metrics][registry][concurrency]") {
  m::registry r;
  auto& c = r.counter_of("tensorreg_n_total", "n");
  const double bounds[] = {1.0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&r, &c, &bounds, t] {
      for (int i = 0; i < 1000; ++i) {
        c.add();
        r.histogram_of("tensorreg_h_seconds", "h", bounds, {{"t", std::to_string(t % 2)}}).observe(0.5);
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(c.value() == 4000);
  const double* b = bounds;
  CHECK(r.histogram_of("tensorreg_h_seconds", "h", std::span<const double>(b, 1), {{"t", "0"}}).count() == 2000);
  CHECK(r.histogram_of("tensorreg_h_seconds", "h", std::span<const double>(b, 1), {{"t", "1"}}).count() == 2000);
}
