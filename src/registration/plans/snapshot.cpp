#include "registration/plans/snapshot.hpp"

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tensorreg/memory/shared_memory.hpp"
#include "tensorreg/metrics/registry.hpp"

namespace tensorreg::registration::detail {
namespace {

// Bytes one pool index copies on the host path: large enough that a visit's per-call work is
// noise, small enough that every thread gets a share of a few hundred MiB.
constexpr std::uint64_t host_piece_bytes = std::uint64_t{64} << 20;

result<lip_view> host_snapshot(const memory::segmented_view& leased, thread_pool& pool) {
  const std::uint64_t size = leased.size();
  TENSORREG_TRY_ASSIGN(auto memfd, memory::shared_memory::create(size, "tensorreg-snapshot"));
  TENSORREG_TRY(memory::copy_in_chunks(leased, memfd.mutable_bytes(), host_piece_bytes, pool,
                                       [](std::size_t, std::uint64_t, std::uint64_t) {}));
  // Readers may get its fd (GetArtifactMemfd): nobody may change the bytes the id describes.
  TENSORREG_TRY(memfd.seal_read_only());
  metrics::process_counters().bytes_copied.add(size);
  return view_over(std::make_shared<const memory::shared_memory>(std::move(memfd)));
}

}  // namespace

result<lip_view> view_over(std::shared_ptr<const memory::byte_source> copy) {
  const std::uint64_t size = copy->size();
  std::vector<memory::segment> whole;
  if (size > 0) whole.push_back({0, size, copy.get(), 0});
  TENSORREG_TRY_ASSIGN(auto assembled, memory::segmented_view::create(size, std::move(whole)));
  lip_view view;
  view.bytes = std::make_shared<const memory::segmented_view>(std::move(assembled));
  view.keep_alive.push_back(std::move(copy));
  return view;
}

std::optional<result<device_buffer>> snapshot_on_device(const memory::segmented_view& leased, device_memory* devices) {
  if (devices == nullptr || leased.size() == 0) return std::nullopt;
  auto copied = devices->snapshot_to_device(leased);
  if (copied && *copied) metrics::process_counters().bytes_copied.add(leased.size());
  return copied;
}

result<lip_view> snapshot_view(const memory::segmented_view& leased, device_memory* devices, thread_pool& pool) {
  if (auto copied = snapshot_on_device(leased, devices)) {
    if (!*copied) return tl::unexpected(with_context(std::move(*copied).error(), "cannot snapshot the lease"));
    auto buffer = std::move(**copied);
    const memory::byte_source* key = buffer.bytes.get();
    TENSORREG_TRY_ASSIGN(auto view, view_over(buffer.bytes));
    view.device_allocations = std::make_shared<const device_allocation_map>(device_allocation_map{
        {key, device_allocation{buffer.device_id, buffer.bytes->size(), std::move(buffer.ipc_handle), {}}}});
    return view;
  }
  auto copied = host_snapshot(leased, pool);
  if (!copied) return tl::unexpected(with_context(std::move(copied).error(), "cannot snapshot the lease"));
  return copied;
}

}  // namespace tensorreg::registration::detail
