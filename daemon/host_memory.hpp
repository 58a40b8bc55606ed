// daemon/host_memory.hpp — how much memory this host gives the daemon, and the stable DRAM
// budget read from `--stable-bytes` (a number of bytes, or a percentage of that memory).
//
// The systemd units (packaging/systemd/) size the budget from the machine (`--stable-bytes
// 50%`), and no budget is ever above the memory there is: stable DRAM is memfds, which past the
// machine's memory would only swap or wake the OOM killer.
//
// Thread-safety: stateless functions. Ownership: values only.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "tensorreg/common/error.hpp"

namespace tensorreg::daemon {

/// The memory this process may use: the machine's physical memory, or its cgroup's memory.max
/// (cgroup v2) when that is lower. nullopt when neither can be read.
[[nodiscard]] std::optional<std::uint64_t> usable_memory_bytes();

/// The smaller of `total` and the limit in `cgroup_memory_max` (the text of a cgroup v2
/// memory.max: a number of bytes, or "max" for none); `total` when the text is not a number.
[[nodiscard]] std::uint64_t lower_by_cgroup_limit(std::uint64_t total, std::string_view cgroup_memory_max);

/// A budget the daemon will use, and why it differs from what was asked, if it does.
struct stable_budget {
  std::uint64_t bytes = 0;  ///< 0 = unlimited
  std::string note;         ///< empty, or why `bytes` is not what the text said (for the log)
};

/// `--stable-bytes TEXT`: "N" bytes (0 = unlimited) or "P%" (1 to 100) of `memory` (what
/// usable_memory_bytes() said; nullopt when unknown). A budget above `memory` is lowered to it.
/// Errors: INVALID_ARGUMENT (not a number or percentage, a percentage out of 1-100, or a
/// percentage when the memory is unknown), naming the text.
[[nodiscard]] result<stable_budget> parse_stable_budget(std::string_view text, std::optional<std::uint64_t> memory);

/// Has malloc serve blocks up to `largest_block` from its heap, and keep up to `retained_bytes`
/// of freed heap per arena, where glibc's defaults map each block above a few MiB afresh and give
/// freed memory back at once. The daemon allocates and frees buffers of a whole frame (up to
/// default_max_frame_bytes: a 4 MiB view_chunk, a large Feed) for every request; with the
/// defaults each of them was faulted in and zeroed again. A GLIBC_TUNABLES that sets a
/// glibc.malloc tunable wins. Call it before any thread starts.
void keep_frame_buffers_on_heap(std::uint64_t largest_block, std::uint64_t retained_bytes) noexcept;

}  // namespace tensorreg::daemon
