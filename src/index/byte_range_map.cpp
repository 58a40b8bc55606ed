#include "tensorreg/index/byte_range_map.hpp"

#include <algorithm>
#include <string>

#include "index/text.hpp"

namespace tensorreg::index {

namespace {

struct item {
  std::uint64_t dst = 0;
  std::uint64_t end = 0;
  std::uint32_t source_id = 0;
  std::uint64_t src = 0;
  std::size_t input = 0;  // position in the caller's list, for messages
};

enum class overlap_rule {
  identical_only,  // index entries: aliases share (offset, size) exactly (DECISIONS §5.15)
  same_mapping,    // source ranges: same source and same dst - src delta (DECISIONS §5.14)
};

std::string span_text(std::uint64_t begin, std::uint64_t end) {
  // Appended piece by piece: `"[" + std::to_string(...)` trips g++ 12's -Wrestrict false
  // positive at -O3 (GCC bug 105329).
  std::string out = "[";
  out += std::to_string(begin);
  out += ", ";
  out += std::to_string(end);
  out += ")";
  return out;
}

tl::unexpected<error> fail_map(std::string reason) {
  return fail(errc::invalid_argument, "cannot build byte range map: " + std::move(reason));
}

// Modular differences compare exactly here: both ranges were checked not to overflow, so two
// items that agree mod 2^64 on a shared byte map it to the same source offset.
bool same_mapping(const item& a, const item& b) { return a.source_id == b.source_id && a.src - a.dst == b.src - b.dst; }

struct built_ranges {
  std::vector<byte_range> ranges;
  std::uint64_t data_bytes = 0;
};

// Shared by both builders: the callers have turned their inputs into checked items.
result<built_ranges> build_ranges(std::vector<item> items, std::uint64_t total_size, overlap_rule rule,
                                  range_namer name_of) {
  std::sort(items.begin(), items.end(), [](const item& a, const item& b) {
    if (a.dst != b.dst) return a.dst < b.dst;
    if (a.end != b.end) return a.end < b.end;
    return a.input < b.input;
  });
  const auto describe = [&](const item& it) {
    std::string text = name_of(it.input) + " " + span_text(it.dst, it.end);
    if (rule == overlap_rule::same_mapping) {
      text += " (source " + std::to_string(it.source_id) + " at " + std::to_string(it.src) + ")";
    }
    return text;
  };

  std::vector<byte_range> out;
  out.reserve(2 * items.size() + 1);  // at most a PAD before each DATA run, and a tail
  std::uint64_t cursor = 0;
  std::uint64_t data_bytes = 0;
  std::size_t i = 0;
  while (i < items.size()) {
    const item first = items[i];
    // `reach` is the run's item with the largest end: any later item starting before that
    // end overlaps it, so it is the one to name.
    item reach = first;
    for (++i; i < items.size() && items[i].dst < reach.end; ++i) {
      const item& next = items[i];
      const bool ok = rule == overlap_rule::identical_only ? (next.dst == first.dst && next.end == first.end)
                                                           : same_mapping(first, next);
      if (!ok) {
        const std::string why = rule == overlap_rule::identical_only ? " overlap without being aliases"
                                                                     : " overlap but map to different source bytes";
        return fail(errc::invalid_argument,
                    "cannot build byte range map: " + describe(reach) + " and " + describe(next) + why);
      }
      if (next.end > reach.end) reach = next;
    }
    if (first.dst > cursor) out.push_back({cursor, first.dst - cursor, range_kind::pad, 0, 0});
    out.push_back({first.dst, reach.end - first.dst, range_kind::data, first.source_id, first.src});
    data_bytes += reach.end - first.dst;
    cursor = reach.end;
  }
  if (cursor < total_size) out.push_back({cursor, total_size - cursor, range_kind::pad, 0, 0});
  return built_ranges{std::move(out), data_bytes};
}

}  // namespace

result<byte_range_map> byte_range_map::from_entries(std::span<const entry> entries, std::uint64_t total_size) {
  if (total_size == 0) return fail_map("total_size must be > 0");
  std::vector<item> items;
  items.reserve(entries.size());
  for (std::size_t k = 0; k < entries.size(); ++k) {
    const entry& e = entries[k];
    const auto end = detail::checked_add(e.offset, e.size);
    if (!end) {
      return fail_map("tensor " + detail::quote_name(e.name) + " at offset " + std::to_string(e.offset) +
                      " with size " + std::to_string(e.size) + " ends past 2^64");
    }
    if (*end > total_size) {
      return fail_map("tensor " + detail::quote_name(e.name) + " ends at " + std::to_string(*end) +
                      ", past total_size " + std::to_string(total_size));
    }
    if (e.size == 0) continue;
    items.push_back({e.offset, *end, 0, e.offset, k});
  }
  TENSORREG_TRY_ASSIGN(auto built,
                       build_ranges(std::move(items), total_size, overlap_rule::identical_only,
                                    [&](std::size_t k) { return "tensor " + detail::quote_name(entries[k].name); }));
  return byte_range_map(std::move(built.ranges), total_size, built.data_bytes);
}

byte_range_map byte_range_map::from_index(const canonical_index& index) {
  auto map = from_entries(index.entries(), index.total_size());
  TENSORREG_ASSERT(map.has_value());
  return std::move(map).value();
}

result<byte_range_map> byte_range_map::from_sources(std::span<const source_range> ranges, std::uint64_t total_size) {
  return from_sources(ranges, total_size, [](std::size_t k) { return "range " + std::to_string(k); });
}

result<byte_range_map> byte_range_map::from_sources(std::span<const source_range> ranges, std::uint64_t total_size,
                                                    range_namer namer) {
  if (total_size == 0) return fail_map("total_size must be > 0");
  std::vector<item> items;
  items.reserve(ranges.size());
  for (std::size_t k = 0; k < ranges.size(); ++k) {
    const source_range& r = ranges[k];
    const auto end = detail::checked_add(r.dst_offset, r.length);
    if (!end || !detail::checked_add(r.src_offset, r.length)) {
      return fail_map(namer(k) + " at offset " + std::to_string(r.dst_offset) + " (source " +
                      std::to_string(r.source_id) + " at " + std::to_string(r.src_offset) + ") with length " +
                      std::to_string(r.length) + " ends past 2^64");
    }
    if (*end > total_size) {
      return fail_map(namer(k) + " ends at " + std::to_string(*end) + ", past total_size " +
                      std::to_string(total_size));
    }
    if (r.length == 0) continue;
    items.push_back({r.dst_offset, *end, r.source_id, r.src_offset, k});
  }
  TENSORREG_TRY_ASSIGN(auto built, build_ranges(std::move(items), total_size, overlap_rule::same_mapping, namer));
  return byte_range_map(std::move(built.ranges), total_size, built.data_bytes);
}

std::size_t byte_range_map::find(std::uint64_t offset) const noexcept {
  TENSORREG_ASSERT(offset < total_size_);
  const auto it = std::upper_bound(ranges_.begin(), ranges_.end(), offset,
                                   [](std::uint64_t v, const byte_range& r) { return v < r.offset; });
  return static_cast<std::size_t>(it - ranges_.begin()) - 1;
}

}  // namespace tensorreg::index
