// tensorreg/metrics/registry.hpp — counters, gauges and histograms, rendered as Prometheus text.
//
// Provides `counter` (monotonic), `gauge` (up and down) and `histogram` (fixed buckets), each
// one relaxed atomic per value so that the hot paths that update them take no lock; and
// `registry`, which names them (metric name, help text, label pairs) and renders every one of
// them in the Prometheus text exposition format 0.0.4 (`render()`). Values that live
// elsewhere (the engine's tables) are read at scrape time through `add_collector` hooks and
// `*_function` samples, so nothing has to mirror them.
//
// `process_counters()` holds the library's own data-plane totals (bytes hashed, bytes copied),
// counted where the bytes are hashed or copied whoever the caller is.
//
// Thread-safety: counter, gauge and histogram updates are lock-free and safe from any thread.
// Registry members may be called from any thread; registration and render() take the
// registry's mutex (render() runs the collectors under it, so a collector must not call back
// into the registry). Names, label names and help text are the caller's to get right
// (REQUIRES: [a-zA-Z_:][a-zA-Z0-9_:]* names).
// Ownership: the registry owns every metric it hands out; references stay valid for the
// registry's lifetime. process_counters() is a process-wide object that lives forever.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace tensorreg::metrics {

/// Label pairs of one sample, in the order they are printed: {{"method", "Commit"}, ...}.
using labels = std::vector<std::pair<std::string, std::string>>;

/// A monotonic count.
class counter {
 public:
  void add(std::uint64_t n = 1) noexcept { value_.fetch_add(n, std::memory_order_relaxed); }
  [[nodiscard]] std::uint64_t value() const noexcept { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<std::uint64_t> value_{0};
};

/// A value that goes up and down.
class gauge {
 public:
  void set(std::int64_t v) noexcept { value_.store(v, std::memory_order_relaxed); }
  void add(std::int64_t d) noexcept { value_.fetch_add(d, std::memory_order_relaxed); }
  [[nodiscard]] std::int64_t value() const noexcept { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<std::int64_t> value_{0};
};

/// Observations counted into fixed buckets (upper bounds, ascending), with their sum.
class histogram {
 public:
  /// REQUIRES: `bounds` ascending and finite (the +Inf bucket is implicit).
  explicit histogram(std::span<const double> bounds);

  void observe(double v) noexcept;

  [[nodiscard]] const std::vector<double>& bounds() const noexcept { return bounds_; }
  /// Observations ≤ bounds()[i] (cumulative), for i < bounds().size(); then all of them.
  [[nodiscard]] std::vector<std::uint64_t> cumulative_counts() const;
  [[nodiscard]] std::uint64_t count() const noexcept;
  [[nodiscard]] double sum() const noexcept { return sum_.load(std::memory_order_relaxed); }

 private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<std::uint64_t>[]> buckets_;  // per bucket (not cumulative), +Inf last
  std::atomic<double> sum_{0.0};
};

/// Buckets for request latencies in seconds: 100 µs to 60 s.
[[nodiscard]] std::span<const double> latency_buckets() noexcept;

/// The library's data-plane totals (see the header comment).
struct data_plane_counters {
  counter bytes_hashed;  ///< bytes whose SHA-256 leaves were computed on the host
  counter bytes_copied;  ///< bytes copied into daemon-owned memory
};
[[nodiscard]] data_plane_counters& process_counters() noexcept;

class registry {
 public:
  registry();
  registry(const registry&) = delete;
  registry& operator=(const registry&) = delete;
  ~registry();

  /// The counter `name{labels}`, made on first use (then `help` is kept). A name is one type:
  /// asking for it as another type is a bug (TENSORREG_ASSERT).
  counter& counter_of(std::string_view name, std::string_view help, const labels& l = {});
  gauge& gauge_of(std::string_view name, std::string_view help, const labels& l = {});
  /// REQUIRES: every child of one name has the same bounds.
  histogram& histogram_of(std::string_view name, std::string_view help, std::span<const double> bounds,
                          const labels& l = {});

  /// A sample whose value `read` returns at scrape time (after the collectors ran).
  void counter_function(std::string_view name, std::string_view help, std::function<double()> read,
                        const labels& l = {});
  void gauge_function(std::string_view name, std::string_view help, std::function<double()> read, const labels& l = {});

  /// Runs before each render(), under the registry's lock: takes one snapshot that several
  /// *_function samples then read.
  void add_collector(std::function<void()> collect);

  /// Every metric in the Prometheus text format 0.0.4, families in registration order,
  /// children in creation order.
  [[nodiscard]] std::string render() const;

 private:
  enum class kind { counter, gauge, histogram };
  struct child;
  struct family;
  family& family_of(std::string_view name, std::string_view help, kind k);
  child* find_child(family& f, const labels& l);
  child& add_child(family& f, child made);
  void add_function(std::string_view name, std::string_view help, kind k, std::function<double()> read,
                    const labels& l);

  mutable std::mutex mutex_;
  std::vector<std::unique_ptr<family>> families_;
  std::unordered_map<std::string, family*> by_name_;
  std::vector<std::function<void()>> collectors_;
};

}  // namespace tensorreg::metrics
