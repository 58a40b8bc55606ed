#include "registration/layout_cache.hpp"

#include <utility>

#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/index/byte_range_map.hpp"

namespace tensorreg::registration::detail {

std::shared_ptr<const lease_layout> make_lease_layout(std::shared_ptr<const index::canonical_index> idx) {
  auto out = std::make_shared<lease_layout>();
  out->index_multihash = hash::encode_multihash(hash::sha256(idx->json()));
  const auto map = index::byte_range_map::from_index(*idx);
  for (const auto& range : map.ranges()) {
    if (range.kind == index::range_kind::data) out->data_ranges.emplace_back(range.offset, range.length);
  }
  out->index = std::move(idx);
  return out;
}

layout_cache::layout_cache(std::size_t max_entries, std::size_t max_bytes)
    : max_entries_(max_entries), max_bytes_(max_bytes) {}

std::shared_ptr<const lease_layout> layout_cache::find(std::string_view signature) {
  std::lock_guard lock(mutex_);
  for (auto it = entries_.begin(); it != entries_.end(); ++it) {
    if (it->signature == signature) {
      entries_.splice(entries_.begin(), entries_, it);
      ++hits_;
      return entries_.front().layout;
    }
  }
  ++misses_;
  return nullptr;
}

void layout_cache::insert(std::string signature, std::shared_ptr<const lease_layout> layout) {
  // The index's JSON and entries are about as large as the tables; the signature is their copy.
  const std::size_t bytes = 2 * signature.size() + layout->index->json().size();
  if (max_entries_ == 0 || bytes > max_bytes_ / 4) return;
  std::lock_guard lock(mutex_);
  for (auto it = entries_.begin(); it != entries_.end(); ++it) {
    if (it->signature == signature) {
      bytes_ -= it->bytes;
      entries_.erase(it);
      break;
    }
  }
  entries_.push_front(entry{std::move(signature), std::move(layout), bytes});
  bytes_ += bytes;
  evict_locked();
}

void layout_cache::evict_locked() {
  while (entries_.size() > max_entries_ || bytes_ > max_bytes_) {
    bytes_ -= entries_.back().bytes;
    entries_.pop_back();
  }
}

std::size_t layout_cache::size() const {
  std::lock_guard lock(mutex_);
  return entries_.size();
}

std::uint64_t layout_cache::hits() const {
  std::lock_guard lock(mutex_);
  return hits_;
}

std::uint64_t layout_cache::misses() const {
  std::lock_guard lock(mutex_);
  return misses_;
}

}  // namespace tensorreg::registration::detail
