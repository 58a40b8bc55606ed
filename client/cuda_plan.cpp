#include "client/cuda_plan.hpp"

#include <algorithm>
#include <cstdio>
#include <map>
#include <unordered_map>

#include "tensorreg/index/dtype.hpp"

namespace tensorreg::client::detail {

std::string hex_address(std::uint64_t address) {
  char buffer[24];
  std::snprintf(buffer, sizeof buffer, "%#llx", static_cast<unsigned long long>(address));
  return buffer;
}

namespace {

// Bytes from a view's first element to the end of its last (0 when it has none); false on
// overflow. As the Python client's _layout.extent_bytes.
bool extent_bytes(const std::vector<std::int64_t>& shape, const std::vector<std::int64_t>& stride,
                  std::uint64_t element, std::uint64_t& out) {
  std::uint64_t last = 0;
  for (std::size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 0) {
      out = 0;
      return true;
    }
  }
  for (std::size_t d = 0; d < shape.size(); ++d) {
    const std::int64_t st = stride[d];
    const std::uint64_t magnitude = st >= 0 ? static_cast<std::uint64_t>(st) : 0 - static_cast<std::uint64_t>(st);
    std::uint64_t step = 0;
    if (__builtin_mul_overflow(static_cast<std::uint64_t>(shape[d] - 1), magnitude, &step)) return false;
    if (__builtin_add_overflow(last, step, &last)) return false;
  }
  return last + 1 != 0 && !__builtin_mul_overflow(last + 1, element, &out);
}

}  // namespace

result<lease_layout> plan_layout(std::span<const cuda_tensor> tensors, std::string_view what) {
  const auto bad = [&](const cuda_tensor& t, const std::string& reason) {
    return fail(errc::invalid_argument, "cannot " + std::string(what) + ": tensor '" + t.name + "' " + reason);
  };
  std::vector<storage_span> storages;
  std::map<std::pair<std::uint64_t, std::uint64_t>, std::size_t> storage_of_key;
  std::vector<std::size_t> storage_of_tensor;
  std::vector<std::uint64_t> extent_of_tensor;
  std::vector<index::tensor_desc> descs;
  descs.reserve(tensors.size());
  for (const auto& t : tensors) {
    const auto element = index::element_size(t.dtype);
    if (!element) return bad(t, "has dtype " + t.dtype + ", which the canonical index does not know");
    if (t.shape.size() != t.stride.size()) {
      return bad(t, "has " + std::to_string(t.shape.size()) + " dimensions in shape but " +
                        std::to_string(t.stride.size()) + " in stride");
    }
    if (std::any_of(t.shape.begin(), t.shape.end(), [](std::int64_t d) { return d < 0; })) {
      return bad(t, "has a negative dimension");
    }
    if (t.storage_offset < 0) return bad(t, "has a negative storage_offset " + std::to_string(t.storage_offset));
    std::uint64_t extent = 0;
    std::uint64_t first = 0;
    std::uint64_t end = 0;
    if (!extent_bytes(t.shape, t.stride, *element, extent) ||
        __builtin_mul_overflow(static_cast<std::uint64_t>(t.storage_offset), std::uint64_t{*element}, &first) ||
        __builtin_add_overflow(first, extent, &end) || end > t.storage_nbytes) {
      return bad(t, "reaches past its storage of " + std::to_string(t.storage_nbytes) + " bytes");
    }
    const auto [it, inserted] = storage_of_key.try_emplace({t.storage_ptr, t.storage_nbytes}, storages.size());
    if (inserted) storages.push_back({t.storage_ptr, t.storage_nbytes});
    storage_of_tensor.push_back(it->second);
    extent_of_tensor.push_back(extent);
    descs.push_back({t.name, t.dtype, t.shape, t.stride,
                     std::to_string(t.storage_ptr) + ":" + std::to_string(t.storage_nbytes), t.storage_nbytes,
                     t.storage_offset});
  }
  auto built = index::canonical_index::build(descs);
  if (!built) return fail(built.error().code, "cannot " + std::string(what) + ": " + built.error().message);

  std::unordered_map<std::string_view, std::size_t> tensor_of_name;
  for (std::size_t i = 0; i < tensors.size(); ++i) tensor_of_name.emplace(tensors[i].name, i);
  const auto& entries = built->entries();
  std::vector<std::size_t> canonical_storages;
  std::vector<std::uint64_t> canonical_offsets;
  std::vector<std::size_t> alias_storage(entries.size());
  std::vector<std::uint64_t> logical_lengths(entries.size());
  std::vector<std::optional<std::size_t>> canonical_of(storages.size());
  for (std::size_t i = 0; i < entries.size(); ++i) {
    const std::size_t t = tensor_of_name.at(entries[i].name);
    const std::size_t s = storage_of_tensor[t];
    if (!canonical_of[s]) {
      canonical_of[s] = canonical_storages.size();
      canonical_storages.push_back(s);
      canonical_offsets.push_back(entries[i].offset);
    }
    alias_storage[i] = *canonical_of[s];
    logical_lengths[i] = extent_of_tensor[t];
  }
  return lease_layout{
      std::move(*built),        std::move(storages),       std::move(canonical_storages), std::move(canonical_offsets),
      std::move(alias_storage), std::move(logical_lengths)};
}

// ---- the device plan ----------------------------------------------------------------------

device_plan::device_plan(device_plan&& other) noexcept
    : regions(std::move(other.regions)),
      sources(std::move(other.sources)),
      allocations(std::move(other.allocations)),
      lone_handles(other.lone_handles),
      driver_(other.driver_) {
  other.allocations.clear();
  other.driver_ = nullptr;
}

device_plan::~device_plan() {
  if (driver_ == nullptr) return;
  for (const auto& a : allocations) {
    if (a.vmm_handle) driver_->release(*a.vmm_handle);
  }
}

std::vector<std::vector<allocation>> merge_runs(std::vector<allocation> pages) {
  std::sort(pages.begin(), pages.end(), [](const allocation& a, const allocation& b) { return a.base < b.base; });
  std::vector<std::vector<allocation>> runs;
  for (auto& p : pages) {
    if (!runs.empty() && runs.back().back().base + runs.back().back().size == p.base) {
      runs.back().push_back(std::move(p));
    } else {
      runs.push_back({std::move(p)});
    }
  }
  return runs;
}

result<std::vector<window>> windows(std::vector<run_member> members, std::size_t limit, std::string_view what) {
  std::sort(members.begin(), members.end(), [](const run_member& a, const run_member& b) {
    return std::tie(a.first, a.last, a.storage) < std::tie(b.first, b.last, b.storage);
  });
  std::vector<window> out;
  std::size_t i = 0;
  while (i < members.size()) {
    const auto& m = members[i];
    if (m.last - m.first + 1 > limit) {
      return fail(errc::unimplemented, "cannot " + std::string(what) + ": storage " + std::to_string(m.storage) +
                                           " spans " + std::to_string(m.last - m.first + 1) +
                                           " VMM pages, more than one region may hold (at most " +
                                           std::to_string(limit) + " fds a frame)");
    }
    window w{m.first, m.last, {}};
    std::size_t j = i;
    while (j < members.size() && (j == i || members[j].last < m.first + limit)) {
      w.last = std::max(w.last, members[j].last);
      w.storages.push_back(members[j].storage);
      ++j;
    }
    out.push_back(std::move(w));
    i = j;
  }
  return out;
}

namespace {

// The allocations looked up so far, by base (each one queried once).
class allocation_finder {
 public:
  allocation_finder(cuda_driver& driver, std::string_view what) : driver_(driver), what_(what) {}

  // The allocation holding `ptr`, looked up at most once.
  result<const allocation*> at(std::uint64_t ptr) {
    if (auto it = by_base_.upper_bound(ptr); it != by_base_.begin()) {
      --it;
      if (ptr < it->second.base + it->second.size) return &it->second;
    }
    TENSORREG_TRY_ASSIGN(const auto range, driver_.address_range(ptr));
    const auto [base, size] = range;
    // Each kind of memory refuses the other's export, and allocations of one kind come in runs
    // (a state dict is all cudaMalloc blocks or all expandable-segments pages): ask first as
    // the last allocation answered, so that each costs two driver calls.
    std::optional<std::uint64_t> vmm = vmm_last_ ? driver_.retain_allocation(base) : std::nullopt;
    std::optional<std::string> handle = vmm ? std::nullopt : driver_.try_ipc_handle(base);
    if (!vmm && !handle && !vmm_last_) vmm = driver_.retain_allocation(base);
    allocation a{base, size, vmm, handle.value_or(std::string())};
    if (!vmm && !handle) {
      const error why = driver_.ipc_handle_error(base);
      return fail(errc::failed_precondition, "cannot " + std::string(what_) + ": cannot export the allocation at " +
                                                 hex_address(base) + ": it is neither cudaMalloc nor VMM memory (" +
                                                 why.message + ")");
    }
    vmm_last_ = vmm.has_value();
    return &by_base_.emplace(base, std::move(a)).first->second;
  }

  std::map<std::uint64_t, allocation>& found() noexcept { return by_base_; }

 private:
  cuda_driver& driver_;
  std::string_view what_;
  std::map<std::uint64_t, allocation> by_base_;
  bool vmm_last_ = false;
};

}  // namespace

result<device_plan> plan_device(cuda_driver& driver, std::span<const storage_span> spans, std::string_view what) {
  const std::string verb = "cannot " + std::string(what);
  allocation_finder found(driver, what);
  // Whatever happens, the retained VMM handles end up in a plan that releases them.
  device_plan plan(&driver);
  const auto finish_found = [&] {
    plan.allocations.clear();
    for (auto& [base, a] : found.found()) plan.allocations.push_back(a);
  };
  std::vector<std::vector<std::uint64_t>> covers(spans.size());  // VMM storage -> page bases
  std::map<std::uint64_t, std::vector<std::size_t>> users;       // cudaMalloc base -> storages
  std::vector<std::size_t> by_address(spans.size());
  for (std::size_t k = 0; k < spans.size(); ++k) by_address[k] = k;
  std::stable_sort(by_address.begin(), by_address.end(),
                   [&](std::size_t a, std::size_t b) { return spans[a].ptr < spans[b].ptr; });
  for (const std::size_t k : by_address) {
    const auto [ptr, nbytes] = spans[k];
    if (nbytes == 0) continue;
    auto current = found.at(ptr);
    if (!current) {
      finish_found();
      return tl::unexpected(current.error());
    }
    const allocation* a = *current;
    const std::uint64_t end = ptr + nbytes;
    if (!a->vmm_handle) {
      if (end > a->base + a->size) {
        finish_found();
        return fail(errc::data_loss, verb + ": storage " + std::to_string(k) + " at " + hex_address(ptr) + " of " +
                                         std::to_string(nbytes) + " bytes ends past its allocation [" +
                                         hex_address(a->base) + ", " + hex_address(a->base + a->size) + ")");
      }
      users[a->base].push_back(k);
      continue;
    }
    std::vector<std::uint64_t> pages{a->base};
    std::uint64_t page_end = a->base + a->size;
    while (page_end < end) {
      auto next = found.at(page_end);
      if (!next) {
        finish_found();
        return tl::unexpected(next.error());
      }
      if (!(*next)->vmm_handle) {
        finish_found();
        return fail(errc::data_loss, verb + ": storage " + std::to_string(k) + " at " + hex_address(ptr) + " of " +
                                         std::to_string(nbytes) + " bytes runs from VMM memory into a cudaMalloc " +
                                         "allocation at " + hex_address((*next)->base));
      }
      pages.push_back((*next)->base);
      page_end = (*next)->base + (*next)->size;
    }
    covers[k] = std::move(pages);
  }
  finish_found();
  for (const auto& a : plan.allocations) {
    if (a.vmm_handle && (driver.handle_types(*a.vmm_handle) & posix_fd_handle_type) == 0) {
      return fail(errc::failed_precondition,
                  verb + ": the VMM allocation at " + hex_address(a.base) +
                      " cannot be exported as a POSIX fd (its handle types are " +
                      hex_address(driver.handle_types(*a.vmm_handle)) +
                      "); allocate these tensors with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False, or put() them "
                      "instead");
    }
  }

  std::vector<std::optional<source>> sources(spans.size());
  // cudaMalloc allocations: a region when several storages share one, else a handle each.
  for (const auto& [base, ks] : users) {
    const allocation& a = found.found().at(base);
    if (ks.size() > 1) {
      for (const std::size_t k : ks) sources[k] = source{plan.regions.size(), {}, spans[k].ptr - base};
      plan.regions.push_back({base, a.size, a.ipc_handle, {}, ks});
    } else {
      sources[ks[0]] = source{std::nullopt, a.ipc_handle, spans[ks[0]].ptr - base};
      ++plan.lone_handles;
    }
  }
  // VMM pages: runs of adjacent pages, in windows of at most max_pages_per_region pages.
  std::vector<allocation> vmm;
  for (const auto& a : plan.allocations) {
    if (a.vmm_handle) vmm.push_back(a);
  }
  for (auto& run : merge_runs(std::move(vmm))) {
    std::map<std::uint64_t, std::size_t> position;
    for (std::size_t p = 0; p < run.size(); ++p) position.emplace(run[p].base, p);
    std::vector<run_member> members;
    for (std::size_t k = 0; k < covers.size(); ++k) {
      if (covers[k].empty()) continue;
      if (const auto it = position.find(covers[k].front()); it != position.end()) {
        members.push_back({it->second, it->second + covers[k].size() - 1, k});
      }
    }
    TENSORREG_TRY_ASSIGN(auto ws, windows(std::move(members), max_pages_per_region, what));
    for (auto& w : ws) {
      region r;
      r.base = run[w.first].base;
      for (std::size_t p = w.first; p <= w.last; ++p) {
        r.size += run[p].size;
        r.pages.push_back(run[p]);
      }
      for (const std::size_t k : w.storages) sources[k] = source{plan.regions.size(), {}, spans[k].ptr - r.base};
      r.storages = std::move(w.storages);
      plan.regions.push_back(std::move(r));
    }
  }
  // Empty storages borrow a source (length 0 is in bounds anywhere).
  const auto borrowed = std::find_if(sources.begin(), sources.end(), [](const auto& s) { return s.has_value(); });
  if (borrowed == sources.end()) return fail(errc::data_loss, verb + ": every storage is empty");
  const source lent = **borrowed;
  for (auto& s : sources) plan.sources.push_back(s ? *s : lent);
  return plan;
}

}  // namespace tensorreg::client::detail
