#include "registration/materialize.hpp"

#include <vector>

#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/metrics/registry.hpp"

namespace tensorreg::registration::detail {

status check_cancel(cancel_flag cancel) {
  if (cancel != nullptr && cancel->load(std::memory_order_relaxed)) {
    return fail(errc::cancelled, "the commit was cancelled");
  }
  return {};
}

status cancellable_source::visit(std::uint64_t offset, std::uint64_t length, memory::piece_sink sink) const {
  TENSORREG_TRY(check_cancel(cancel_));
  return inner_.visit(offset, length, sink);
}

result<materialized> materialize(const memory::byte_source& source_in, bool want_digest, thread_pool& pool,
                                 device_memory* devices, cancel_flag cancel) {
  TENSORREG_TRY(check_cancel(cancel));
  if (devices != nullptr) {
    const auto* wrapper = dynamic_cast<const view_source*>(&source_in);
    const memory::byte_source& canonical = wrapper != nullptr ? wrapper->view() : source_in;
    if (auto on_device = devices->copy_to_host(canonical, want_digest, pool)) {
      TENSORREG_TRY(check_cancel(cancel));
      return std::move(*on_device);
    }
  }
  const cancellable_source source(source_in, cancel);
  const std::uint64_t total = source.size();
  TENSORREG_TRY_ASSIGN(auto copy, memory::shared_memory::create(total, "tensorreg-stable"));
  const auto dst = copy.mutable_bytes();
  std::vector<hash::digest> digests(want_digest ? hash::leaf_count(total) : 0);
  TENSORREG_TRY(memory::copy_in_chunks(
      source, dst, hash::leaf_bytes, pool, [&](std::size_t leaf, std::uint64_t begin, std::uint64_t length) {
        // Hash the copy, not the source: the id describes what is kept.
        if (want_digest) digests[leaf] = hash::sha256(std::span<const std::byte>(dst.subspan(begin, length)));
      }));
  // The bytes are final: seal them, so that no fd handed out later (GetArtifactMemfd),
  // reopened read-write through /proc, can change what the id names.
  TENSORREG_TRY(copy.seal_read_only());
  metrics::process_counters().bytes_copied.add(total);
  if (want_digest) metrics::process_counters().bytes_hashed.add(total);
  materialized out;
  if (want_digest) out.data_digest = hash::tree_root(digests);
  out.replica = std::make_shared<const memory::shared_memory>(std::move(copy));
  return out;
}

}  // namespace tensorreg::registration::detail
