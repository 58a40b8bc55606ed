#include "tensorreg/metrics/registry.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <optional>

#include "tensorreg/common/error.hpp"

namespace tensorreg::metrics {
namespace {

// Text format 0.0.4: help text escapes \ and newline; label values also escape ".
std::string escape(std::string_view text, bool quote) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else if (quote && c == '"') {
      out += "\\\"";
    } else {
      out += c;
    }
  }
  return out;
}

std::string number(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  // Whole numbers print without an exponent or a fraction (byte counts stay exact up to 2^53).
  if (v == std::floor(v) && std::fabs(v) < 9.007199254740992e15) return fmt::format("{}", static_cast<std::int64_t>(v));
  return fmt::format("{}", v);
}

std::string label_text(const labels& l, std::optional<std::pair<std::string_view, std::string>> extra = std::nullopt) {
  if (l.empty() && !extra) return {};
  std::string out = "{";
  bool first = true;
  for (const auto& [k, v] : l) {
    out += fmt::format("{}{}=\"{}\"", first ? "" : ",", k, escape(v, true));
    first = false;
  }
  if (extra) out += fmt::format("{}{}=\"{}\"", first ? "" : ",", extra->first, extra->second);
  return out + "}";
}

std::string key_of(const labels& l) {
  std::string key;
  for (const auto& [k, v] : l) {
    key += k;
    key += '\0';
    key += v;
    key += '\0';
  }
  return key;
}

constexpr std::array<double, 16> kLatency{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                          0.05,   0.1,     0.25,   0.5,   1.0,    2.5,   10.0, 60.0};

}  // namespace

// ---- histogram -------------------------------------------------------------------------------

histogram::histogram(std::span<const double> bounds)
    : bounds_(bounds.begin(), bounds.end()), buckets_(new std::atomic<std::uint64_t>[bounds.size() + 1]) {
  TENSORREG_ASSERT(std::is_sorted(bounds_.begin(), bounds_.end()));
  for (std::size_t i = 0; i <= bounds_.size(); ++i) buckets_[i].store(0, std::memory_order_relaxed);
}

void histogram::observe(double v) noexcept {
  const auto at = static_cast<std::size_t>(std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin());
  buckets_[at].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(v, std::memory_order_relaxed);
}

std::vector<std::uint64_t> histogram::cumulative_counts() const {
  std::vector<std::uint64_t> out(bounds_.size() + 1);
  std::uint64_t running = 0;
  for (std::size_t i = 0; i <= bounds_.size(); ++i) {
    running += buckets_[i].load(std::memory_order_relaxed);
    out[i] = running;
  }
  return out;
}

std::uint64_t histogram::count() const noexcept {
  std::uint64_t n = 0;
  for (std::size_t i = 0; i <= bounds_.size(); ++i) n += buckets_[i].load(std::memory_order_relaxed);
  return n;
}

std::span<const double> latency_buckets() noexcept { return kLatency; }

data_plane_counters& process_counters() noexcept {
  static auto* const instance = new data_plane_counters();
  return *instance;
}

// ---- registry --------------------------------------------------------------------------------

struct registry::child {
  labels label_pairs;
  std::unique_ptr<counter> c;
  std::unique_ptr<gauge> g;
  std::unique_ptr<histogram> h;
  std::function<double()> read;  // a *_function sample
};

struct registry::family {
  std::string name;
  std::string help;
  kind type;
  std::vector<std::unique_ptr<child>> children;
  std::unordered_map<std::string, child*> by_labels;
};

registry::registry() = default;
registry::~registry() = default;

registry::family& registry::family_of(std::string_view name, std::string_view help, kind k) {
  const std::string key(name);
  if (auto it = by_name_.find(key); it != by_name_.end()) {
    TENSORREG_ASSERT(it->second->type == k);
    return *it->second;
  }
  families_.push_back(std::make_unique<family>(family{key, std::string(help), k, {}, {}}));
  by_name_.emplace(key, families_.back().get());
  return *families_.back();
}

registry::child* registry::find_child(family& f, const labels& l) {
  auto it = f.by_labels.find(key_of(l));
  return it == f.by_labels.end() ? nullptr : it->second;
}

registry::child& registry::add_child(family& f, child made) {
  auto owned = std::make_unique<child>(std::move(made));
  auto& out = *owned;
  f.by_labels.emplace(key_of(out.label_pairs), &out);
  f.children.push_back(std::move(owned));
  return out;
}

counter& registry::counter_of(std::string_view name, std::string_view help, const labels& l) {
  std::lock_guard lock(mutex_);
  auto& f = family_of(name, help, kind::counter);
  if (auto* c = find_child(f, l)) {
    TENSORREG_ASSERT(c->c != nullptr);
    return *c->c;
  }
  return *add_child(f, child{l, std::make_unique<counter>(), nullptr, nullptr, {}}).c;
}

gauge& registry::gauge_of(std::string_view name, std::string_view help, const labels& l) {
  std::lock_guard lock(mutex_);
  auto& f = family_of(name, help, kind::gauge);
  if (auto* c = find_child(f, l)) {
    TENSORREG_ASSERT(c->g != nullptr);
    return *c->g;
  }
  return *add_child(f, child{l, nullptr, std::make_unique<gauge>(), nullptr, {}}).g;
}

histogram& registry::histogram_of(std::string_view name, std::string_view help, std::span<const double> bounds,
                                  const labels& l) {
  std::lock_guard lock(mutex_);
  auto& f = family_of(name, help, kind::histogram);
  if (auto* c = find_child(f, l)) return *c->h;
  return *add_child(f, child{l, nullptr, nullptr, std::make_unique<histogram>(bounds), {}}).h;
}

void registry::add_function(std::string_view name, std::string_view help, kind k, std::function<double()> read,
                            const labels& l) {
  std::lock_guard lock(mutex_);
  auto& f = family_of(name, help, k);
  TENSORREG_ASSERT(find_child(f, l) == nullptr);
  add_child(f, child{l, nullptr, nullptr, nullptr, std::move(read)});
}

void registry::counter_function(std::string_view name, std::string_view help, std::function<double()> read,
                                const labels& l) {
  add_function(name, help, kind::counter, std::move(read), l);
}

void registry::gauge_function(std::string_view name, std::string_view help, std::function<double()> read,
                              const labels& l) {
  add_function(name, help, kind::gauge, std::move(read), l);
}

void registry::add_collector(std::function<void()> collect) {
  std::lock_guard lock(mutex_);
  collectors_.push_back(std::move(collect));
}

std::string registry::render() const {
  std::lock_guard lock(mutex_);
  for (const auto& collect : collectors_) collect();
  std::string out;
  for (const auto& f : families_) {
    if (f->children.empty()) continue;
    const char* type = f->type == kind::counter ? "counter" : f->type == kind::gauge ? "gauge" : "histogram";
    out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", f->name, escape(f->help, false), f->name, type);
    for (const auto& c : f->children) {
      if (c->h) {
        const auto counts = c->h->cumulative_counts();
        const auto& bounds = c->h->bounds();
        for (std::size_t i = 0; i < counts.size(); ++i) {
          const std::string le = i < bounds.size() ? number(bounds[i]) : "+Inf";
          out += fmt::format("{}_bucket{} {}\n", f->name, label_text(c->label_pairs, std::pair{"le", le}), counts[i]);
        }
        // _count is the +Inf bucket, read once above, so that the two always agree.
        out += fmt::format("{}_sum{} {}\n", f->name, label_text(c->label_pairs), number(c->h->sum()));
        out += fmt::format("{}_count{} {}\n", f->name, label_text(c->label_pairs), counts.back());
        continue;
      }
      const double v = c->read ? c->read()
                       : c->c  ? static_cast<double>(c->c->value())
                               : static_cast<double>(c->g->value());
      out += fmt::format("{}{} {}\n", f->name, label_text(c->label_pairs), number(v));
    }
  }
  return out;
}

}  // namespace tensorreg::metrics
