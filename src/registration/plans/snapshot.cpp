#include "registration/plans/snapshot.hpp"

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <utility>

#include "tensorreg/memory/shared_memory.hpp"

namespace tensorreg::registration::detail {
namespace {

// Bytes one pool index copies on the host path: large enough that the visit's per-call work is
// noise, small enough that every thread gets a share of a few hundred MiB.
constexpr std::uint64_t host_piece_bytes = std::uint64_t{64} << 20;

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

result<lip_view> host_snapshot(const memory::segmented_view& leased, thread_pool& pool) {
  const std::uint64_t size = leased.size();
  TENSORREG_TRY_ASSIGN(auto memfd,
                       memory::shared_memory::create(std::max<std::uint64_t>(size, 1), "tensorreg-snapshot"));
  const auto to = memfd.mutable_bytes();
  const std::size_t pieces = static_cast<std::size_t>((size + host_piece_bytes - 1) / host_piece_bytes);
  TENSORREG_TRY(pool.parallel_for(pieces, [&](std::size_t i) -> status {
    const std::uint64_t at = static_cast<std::uint64_t>(i) * host_piece_bytes;
    std::uint64_t written = at;
    return leased.visit(at, std::min(host_piece_bytes, size - at), [&](std::span<const std::byte> piece) -> status {
      std::memcpy(to.data() + written, piece.data(), piece.size());
      written += piece.size();
      return {};
    });
  }));
  // Readers may get its fd (GetArtifactMemfd): nobody may change the bytes the id describes.
  TENSORREG_TRY(memfd.seal_against_writes());
  return view_over(std::make_shared<const memory::shared_memory>(std::move(memfd)));
}

}  // namespace

result<lip_view> snapshot_view(const memory::segmented_view& leased, device_memory* devices, thread_pool& pool) {
  if (devices != nullptr && leased.size() > 0) {
    if (auto copied = devices->snapshot_to_device(leased)) {
      if (!*copied) return tl::unexpected(with_context(std::move(*copied).error(), "cannot snapshot the lease"));
      auto buffer = std::move(**copied);
      const memory::byte_source* key = buffer.bytes.get();
      TENSORREG_TRY_ASSIGN(auto view, view_over(buffer.bytes));
      view.device_allocations.emplace(
          key, device_allocation{buffer.device_id, buffer.bytes->size(), std::move(buffer.ipc_handle), {}});
      return view;
    }
  }
  auto copied = host_snapshot(leased, pool);
  if (!copied) return tl::unexpected(with_context(std::move(copied).error(), "cannot snapshot the lease"));
  return copied;
}

}  // namespace tensorreg::registration::detail
