#include "tensorreg/regions/region_registry.hpp"

#include <algorithm>

#include "tensorreg/common/random.hpp"
#include "tensorreg/memory/unlocked_release.hpp"

namespace tensorreg::regions {
namespace {

tl::unexpected<error> not_found(const std::string& id) {
  return fail(errc::not_found, "cannot find region '" + id + "': no such region");
}

// What regions that go held (their mappings and memory), let go by the caller once the
// registry's lock is, and past the caller's own locks too (memory/unlocked_release.hpp):
// closing a device mapping takes the driver's time and unmapping host memory the kernel's
// mmap lock, and other registry calls need not wait for either.
using released_mappings = memory::deferred_release;

void let_go(region_info& info, released_mappings& out) {
  if (info.ipc_mapping) out.push_back(info.ipc_mapping->drop());
  out.push_back(std::move(info.device_mapping));
  out.push_back(std::move(info.memory));
  out.push_back(std::move(info.vmm));
}

}  // namespace

result<std::shared_ptr<const memory::byte_source>> kept_mapping::get_or_open(opener open) {
  std::lock_guard lock(mutex_);
  if (mapping_) return mapping_;
  TENSORREG_TRY_ASSIGN(auto opened, open());
  if (!dropped_) mapping_ = opened;
  return opened;
}

std::shared_ptr<const memory::byte_source> kept_mapping::drop() noexcept {
  std::lock_guard lock(mutex_);
  dropped_ = true;
  return std::move(mapping_);
}

bool kept_mapping::is_open() const {
  std::lock_guard lock(mutex_);
  return mapping_ != nullptr;
}

region_registry::region_registry(const clock& clock, registry_options options) : clock_(clock), options_(options) {}

std::optional<clock::time_point> region_registry::deadline_for(std::uint32_t ttl_ms) const {
  if (ttl_ms == 0) return std::nullopt;
  return saturating_deadline(clock_.now(), std::chrono::milliseconds(ttl_ms));
}

result<region_info> region_registry::register_region(register_request request) {
  if (request.kind == memory_kind::unspecified) {
    return fail(errc::invalid_argument, "cannot register region: memory_kind is unspecified");
  }
  if (request.owner_pid <= 0) {
    return fail(errc::invalid_argument, "cannot register region: owner_pid is required (>0)");
  }
  if (request.size_bytes == 0) {
    return fail(errc::invalid_argument, "cannot register region: size_bytes must be > 0");
  }

  region_info info;
  info.kind = request.kind;
  info.owner_pid = request.owner_pid;
  info.size_bytes = request.size_bytes;
  // TTL is clamped, never refused: a client asking for a day gets the maximum.
  const auto max_ttl = static_cast<std::uint64_t>(options_.max_ttl.count());
  info.ttl_ms = static_cast<std::uint32_t>(std::min<std::uint64_t>(request.ttl_ms, max_ttl));

  if (request.kind == memory_kind::vram) {
    if (request.device_id < 0) {
      return fail(errc::invalid_argument,
                  "cannot register region: VRAM needs device_id >= 0, got " + std::to_string(request.device_id));
    }
    const bool vmm = request.vmm != nullptr || request.device_mapping != nullptr;
    if (request.cuda_ipc_handle.empty() == !vmm) {
      return fail(errc::invalid_argument, vmm ? "cannot register region: VRAM takes a cuda_ipc_handle or CUDA VMM "
                                                "allocations, not both"
                                              : "cannot register region: VRAM needs a cuda_ipc_handle");
    }
    if (vmm && (request.vmm == nullptr || request.device_mapping == nullptr)) {
      return fail(errc::invalid_argument, "cannot register region: CUDA VMM allocations arrived without their mapping");
    }
    if (vmm && request.device_mapping->size() != request.size_bytes) {
      return fail(errc::invalid_argument, "cannot register region: its CUDA VMM allocations map " +
                                              std::to_string(request.device_mapping->size()) +
                                              " bytes, not size_bytes " + std::to_string(request.size_bytes));
    }
    info.vmm = std::move(request.vmm);
    info.device_mapping = std::move(request.device_mapping);
    if (request.host_shared) {
      return fail(errc::invalid_argument, "cannot register region: VRAM takes no host_shared spec");
    }
    info.device_id = request.device_id;
    info.cuda_ipc_handle = std::move(request.cuda_ipc_handle);
    if (!info.cuda_ipc_handle.empty()) info.ipc_mapping = std::make_shared<kept_mapping>();
  } else {
    if (!request.host_shared) {
      return fail(errc::invalid_argument, "cannot register region: HOST_SHARED needs a host_shared spec");
    }
    if (!request.cuda_ipc_handle.empty()) {
      return fail(errc::invalid_argument, "cannot register region: HOST_SHARED takes no cuda_ipc_handle");
    }
    if (request.vmm || request.device_mapping) {
      return fail(errc::invalid_argument, "cannot register region: HOST_SHARED takes no CUDA VMM allocations");
    }
    info.device_id = -1;
    auto& spec = *request.host_shared;
    if (spec.daemon_managed) {
      if (!spec.attach_token.empty()) {
        return fail(errc::invalid_argument, "cannot register region: a daemon-managed region takes no attach_token");
      }
      if (request.memfd) {
        return fail(errc::invalid_argument, "cannot register region: a daemon-managed region takes no memfd");
      }
      TENSORREG_TRY_ASSIGN(auto slab, memory::shared_memory::create(request.size_bytes, "tensorreg-region"));
      info.memory = std::make_shared<const memory::shared_memory>(std::move(slab));
      info.attach_token = "region-attach:" + random_hex(16);
    } else {
      if (spec.attach_token.empty()) {
        return fail(errc::invalid_argument,
                    "cannot register region: HOST_SHARED needs an attach_token "
                    "unless daemon_managed");
      }
      if (!request.memfd) {
        return fail(errc::invalid_argument,
                    "cannot register region: HOST_SHARED needs the client's memfd "
                    "unless daemon_managed");
      }
      // Sealed against shrinking, or its owner could take pages away under our reads.
      auto adopted = memory::shared_memory::adopt_sealed(std::move(request.memfd), request.size_bytes);
      if (!adopted) return tl::unexpected(with_context(std::move(adopted).error(), "cannot register region"));
      info.memory = std::make_shared<const memory::shared_memory>(std::move(*adopted));
      info.attach_token = std::move(spec.attach_token);
    }
  }

  std::lock_guard lock(mutex_);
  if (regions_.size() >= options_.capacity) {
    return fail(errc::resource_exhausted, "cannot register region: the registry holds its capacity of " +
                                              std::to_string(options_.capacity) + " regions");
  }
  if (request.owner_uid && options_.capacity_per_uid != 0) {
    const auto held = static_cast<std::size_t>(std::count_if(
        regions_.begin(), regions_.end(), [&](const auto& kv) { return kv.second.owner_uid == request.owner_uid; }));
    if (held >= options_.capacity_per_uid) {
      return fail(errc::resource_exhausted, "cannot register region: uid " + std::to_string(*request.owner_uid) +
                                                " holds its share of " + std::to_string(options_.capacity_per_uid) +
                                                " of the registry's " + std::to_string(options_.capacity) + " regions");
    }
  }
  info.id = "region:" + random_hex(16);
  info.expires_at = deadline_for(info.ttl_ms);
  entry e;
  e.info = info;
  e.owner_uid = request.owner_uid;
  regions_.emplace(info.id, std::move(e));
  count_.store(regions_.size(), std::memory_order_relaxed);
  return info;
}

result<region_info> region_registry::acquire(const std::string& region_id, std::int32_t owner_pid) {
  std::lock_guard lock(mutex_);
  auto it = regions_.find(region_id);
  if (it == regions_.end()) return not_found(region_id);
  return acquire_locked(it->second, region_id, owner_pid);
}

result<region_info> region_registry::acquire_checked(const std::string& region_id, std::int32_t owner_pid,
                                                     function_ref<status(const region_info&)> check) {
  std::lock_guard lock(mutex_);
  auto it = regions_.find(region_id);
  if (it == regions_.end()) return not_found(region_id);
  TENSORREG_TRY(check(it->second.info));
  return acquire_locked(it->second, region_id, owner_pid);
}

status region_registry::check_acquire_locked(const entry& e, const std::string& region_id, std::int32_t owner_pid) {
  if (e.poisoned) {
    return fail(errc::failed_precondition,
                "cannot acquire region '" + region_id + "': region is poisoned: " + e.poison_reason);
  }
  if (e.retiring) {
    return fail(errc::failed_precondition, "cannot acquire region '" + region_id + "': region is retiring");
  }
  if (owner_pid != 0 && owner_pid != e.info.owner_pid) {
    return fail(errc::permission_denied, "cannot acquire region '" + region_id + "': owned by pid " +
                                             std::to_string(e.info.owner_pid) + ", not " + std::to_string(owner_pid));
  }
  return {};
}

result<region_info> region_registry::acquire_locked(entry& e, const std::string& region_id, std::int32_t owner_pid) {
  TENSORREG_TRY(check_acquire_locked(e, region_id, owner_pid));
  ++e.info.refs;
  e.info.expires_at = deadline_for(e.info.ttl_ms);
  return e.info;
}

status region_registry::acquire_all(std::span<const std::string> region_ids, std::int32_t owner_pid) {
  std::vector<entry*> found;
  found.reserve(region_ids.size());
  std::lock_guard lock(mutex_);
  for (const auto& id : region_ids) {
    auto it = regions_.find(id);
    if (it == regions_.end()) return not_found(id);
    TENSORREG_TRY(check_acquire_locked(it->second, id, owner_pid));
    found.push_back(&it->second);
  }
  for (auto* e : found) {
    ++e->info.refs;
    e->info.expires_at = deadline_for(e->info.ttl_ms);
  }
  return {};
}

status region_registry::release_locked(std::unordered_map<std::string, entry>::iterator it, released_mappings& gone) {
  auto& e = it->second;
  if (e.info.refs == 0) {
    return fail(errc::failed_precondition, "cannot release region '" + it->first + "': no reference is held");
  }
  --e.info.refs;
  if (e.info.refs == 0 && e.retiring) {
    let_go(e.info, gone);
    regions_.erase(it);
    count_.store(regions_.size(), std::memory_order_relaxed);
  }
  return {};
}

status region_registry::release(const std::string& region_id) {
  released_mappings gone;
  std::lock_guard lock(mutex_);
  auto it = regions_.find(region_id);
  if (it == regions_.end()) return not_found(region_id);
  return release_locked(it, gone);
}

std::size_t region_registry::release_all(std::span<const std::string> region_ids) {
  released_mappings gone;  // declared first: closed after the lock is let go
  std::size_t failed = 0;
  std::lock_guard lock(mutex_);
  for (const auto& id : region_ids) {
    auto it = regions_.find(id);
    if (it == regions_.end() || !release_locked(it, gone)) ++failed;
  }
  return failed;
}

result<bool> region_registry::unregister(const std::string& region_id, std::int32_t owner_pid, bool force) {
  released_mappings gone;
  std::lock_guard lock(mutex_);
  auto it = regions_.find(region_id);
  if (it == regions_.end()) return not_found(region_id);
  auto& e = it->second;
  if (owner_pid != e.info.owner_pid) {
    return fail(errc::permission_denied, "cannot unregister region '" + region_id + "': owned by pid " +
                                             std::to_string(e.info.owner_pid) + ", not " + std::to_string(owner_pid));
  }
  if (e.info.refs > 0) {
    if (!force) {
      return fail(errc::failed_precondition, "cannot unregister region '" + region_id + "': " +
                                                 std::to_string(e.info.refs) + " references are held (use force)");
    }
    e.retiring = true;
    return false;
  }
  let_go(e.info, gone);
  regions_.erase(it);
  count_.store(regions_.size(), std::memory_order_relaxed);
  return true;
}

status region_registry::poison(const std::string& region_id, const std::string& reason) {
  std::lock_guard lock(mutex_);
  auto it = regions_.find(region_id);
  if (it == regions_.end()) return not_found(region_id);
  it->second.poisoned = true;
  it->second.poison_reason = reason;
  return {};
}

result<region_info> region_registry::find(const std::string& region_id) const {
  std::lock_guard lock(mutex_);
  auto it = regions_.find(region_id);
  if (it == regions_.end()) return not_found(region_id);
  return it->second.info;
}

std::vector<std::string> region_registry::sweep() {
  const auto now = clock_.now();
  std::vector<std::string> removed;
  released_mappings gone;
  std::lock_guard lock(mutex_);
  for (auto it = regions_.begin(); it != regions_.end();) {
    auto& info = it->second.info;
    if (info.expires_at && *info.expires_at <= now) {
      if (info.refs > 0) {
        // In use: a region never expires under a registration that borrows it.
        info.expires_at = deadline_for(info.ttl_ms);
      } else {
        removed.push_back(it->first);
        let_go(info, gone);
        it = regions_.erase(it);
        continue;
      }
    }
    ++it;
  }
  count_.store(regions_.size(), std::memory_order_relaxed);
  return removed;
}

std::vector<std::string> region_registry::release_owner(std::int32_t owner_pid) {
  std::vector<std::string> removed;
  released_mappings gone;
  std::lock_guard lock(mutex_);
  for (auto it = regions_.begin(); it != regions_.end();) {
    if (it->second.info.owner_pid != owner_pid) {
      ++it;
      continue;
    }
    removed.push_back(it->first);
    let_go(it->second.info, gone);
    it = regions_.erase(it);
  }
  count_.store(regions_.size(), std::memory_order_relaxed);
  return removed;
}

std::size_t region_registry::size() const { return count_.load(std::memory_order_relaxed); }

}  // namespace tensorreg::regions
