#include "registration/plans/lease_in_place.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <map>
#include <span>
#include <unordered_set>
#include <utility>

#include "registration/layout_cache.hpp"
#include "registration/plans/coalesced.hpp"
#include "registration/plans/snapshot.hpp"
#include "tensorreg/index/byte_range_map.hpp"
#include "tensorreg/index/dtype.hpp"

namespace tensorreg::registration::detail {
namespace {

std::string_view kind_name(regions::memory_kind kind) {
  switch (kind) {
    case regions::memory_kind::vram: return "VRAM";
    case regions::memory_kind::host_shared: return "HOST_SHARED";
    case regions::memory_kind::unspecified: break;
  }
  return "UNSPECIFIED";
}

// §4.3.8 and DECISIONS §5.5: a region-backed entry must fit the region it names.
status check_region_fit(const storage_entry& entry, const regions::region_info& region,
                        std::optional<regions::memory_kind> claimed_kind) {
  const auto what = [&] { return "cannot use region '" + region.id + "' for storage '" + entry.storage_id + "': "; };
  if (claimed_kind && *claimed_kind != region.kind) {
    return fail(errc::failed_precondition, what() + "region is " + std::string(kind_name(region.kind)) + ", not " +
                                               std::string(kind_name(*claimed_kind)));
  }
  if (region.kind == regions::memory_kind::vram && entry.device_id != region.device_id) {
    return fail(errc::failed_precondition, what() + "region is on device " + std::to_string(region.device_id) +
                                               ", storage on device " + std::to_string(entry.device_id));
  }
  if (entry.storage_length > region.size_bytes ||
      entry.mapping_base_offset > region.size_bytes - entry.storage_length) {
    return fail(errc::failed_precondition, what() + "bytes [" + std::to_string(entry.mapping_base_offset) + ", +" +
                                               std::to_string(entry.storage_length) + ") exceed the region's " +
                                               std::to_string(region.size_bytes) + " bytes");
  }
  return {};
}

const std::string* region_id_of(const storage_entry& e, std::optional<regions::memory_kind>& claimed) {
  if (const auto* v = std::get_if<vram_region_source>(&e.source)) {
    claimed = regions::memory_kind::vram;
    return &v->region_id;
  }
  if (const auto* r = std::get_if<region_ref_source>(&e.source)) {
    if (r->kind != regions::memory_kind::unspecified) claimed = r->kind;
    return &r->region_id;
  }
  return nullptr;
}

}  // namespace

status lip_tables::add_storages(std::vector<storage_entry> entries, regions::region_registry& registry,
                                std::int32_t owner_pid) {
  // Validate the whole message before taking anything, so a bad entry leaves no reference.
  // The ids go into storage_by_id_ as they are checked (a duplicate is one that is there
  // already) and come out again if the message is refused.
  const std::size_t first_new = storages_.size();
  storage_by_id_.reserve(first_new + entries.size());
  std::size_t named = 0;  // entries named in storage_by_id_ so far
  auto unname = [&] {     // a failure path: a pass over the map is fine
    std::erase_if(storage_by_id_, [&](const auto& kv) { return kv.second >= first_new; });
  };
  for (const auto& e : entries) {
    status bad;
    if (std::holds_alternative<std::monostate>(e.source)) {
      bad = fail(errc::invalid_argument,
                 "cannot add storage '" + e.storage_id + "': storage entry must specify exactly one source");
    } else if (e.storage_id.empty()) {
      bad = fail(errc::invalid_argument, "cannot add storage: storage_id is empty");
    } else if (!storage_by_id_.emplace(e.storage_id, first_new + named).second) {
      bad = fail(errc::invalid_argument, "cannot add storage '" + e.storage_id + "': duplicate storage_id");
    }
    if (!bad) {
      unname();
      return bad;
    }
    ++named;
  }
  const std::size_t regions_before = region_order_.size();  // regions first referenced by this message follow
  auto give_back = [&] {
    (void)registry.release_all(std::span(region_order_).subspan(regions_before));
    for (std::size_t i = regions_before; i < region_order_.size(); ++i) regions_.erase(region_order_[i]);
    region_order_.resize(regions_before);
  };
  // Appended straight to storages_ and rolled back on failure: no second copy of each entry.
  storages_.reserve(first_new + entries.size());
  auto roll_back = [&] {
    give_back();
    unname();
    storages_.resize(first_new);
  };
  regions_.reserve(regions_.size() + entries.size());
  const regions::region_info* previous = nullptr;  // storages of one region usually come together
  for (auto& e : entries) {
    lip_storage s{std::move(e), nullptr};
    std::optional<regions::memory_kind> claimed;
    if (const std::string* region_id = region_id_of(s.entry, claimed)) {
      const auto what = [&] { return "cannot add storage '" + s.entry.storage_id + "'"; };
      const regions::region_info* held = previous != nullptr && previous->id == *region_id ? previous : nullptr;
      if (held == nullptr) {
        if (auto it = regions_.find(*region_id); it != regions_.end()) held = &it->second;
      }
      if (held == nullptr) {
        // §4.3.8 order: unknown region, then its fit, then the reference (owner, poison, retiring).
        auto taken = registry.acquire_checked(*region_id, owner_pid, [&](const regions::region_info& found) {
          return check_region_fit(s.entry, found, claimed);
        });
        if (!taken) {
          roll_back();
          return tl::unexpected(with_context(std::move(taken).error(), what()));
        }
        region_order_.push_back(*region_id);
        held = &regions_.emplace(*region_id, std::move(*taken)).first->second;
      } else if (auto fit = check_region_fit(s.entry, *held, claimed); !fit) {
        roll_back();
        return tl::unexpected(with_context(std::move(fit).error(), what()));
      }
      s.region = held;
      previous = held;
    }
    storages_.push_back(std::move(s));
  }
  return {};
}

void lip_tables::add_aliases(std::vector<tensor_alias> aliases) {
  if (aliases_.empty()) {
    aliases_ = std::move(aliases);  // the usual case: one message carries them all
    return;
  }
  aliases_.reserve(aliases_.size() + aliases.size());
  std::move(aliases.begin(), aliases.end(), std::back_inserter(aliases_));
}

status lip_tables::check_segments(const std::vector<leased_segment>& segments) {
  for (std::size_t i = 0; i < segments.size(); ++i) {
    if (segments[i].storage_id.empty()) {
      return fail(errc::invalid_argument, "cannot add lease segment " + std::to_string(i) + ": storage_id is empty");
    }
  }
  return {};
}

status lip_tables::add_segments(std::vector<leased_segment> segments) {
  TENSORREG_TRY(check_segments(segments));
  std::move(segments.begin(), segments.end(), std::back_inserter(segments_));
  return {};
}

status lip_tables::check_payloads() const {
  if (segments_.empty()) return fail(errc::failed_precondition, "cannot commit lease: no lease segments fed");
  if (storages_.empty()) return fail(errc::failed_precondition, "cannot commit lease: no storage entries fed");
  if (aliases_.empty()) {
    return fail(errc::failed_precondition, "cannot commit lease: registration missing tensor_aliases payload");
  }
  return {};
}

namespace {

// Fixed-width integers and length-prefixed strings: no two different tables encode alike.
void put_u64(std::string& out, std::uint64_t v) {
  char bytes[8];
  std::memcpy(bytes, &v, 8);
  out.append(bytes, 8);
}
void put_string(std::string& out, std::string_view text) {
  put_u64(out, text.size());
  out.append(text);
}
void put_ints(std::string& out, const std::vector<std::int64_t>& values) {
  put_u64(out, values.size());
  const auto at = out.size();
  out.resize(at + 8 * values.size());
  if (!values.empty()) std::memcpy(out.data() + at, values.data(), 8 * values.size());
}

}  // namespace

std::string lip_tables::layout_signature(std::uint64_t total_size) const {
  std::size_t bytes = 32;
  for (const auto& s : storages_) bytes += 24 + s.entry.storage_id.size();
  for (const auto& seg : segments_) bytes += 40 + seg.storage_id.size();
  for (const auto& a : aliases_) {
    bytes += 72 + a.name.size() + a.storage_id.size() + a.dtype.size() + 8 * (a.shape.size() + a.stride.size());
  }
  std::string out;
  out.reserve(bytes);
  put_u64(out, total_size);
  put_u64(out, storages_.size());
  for (const auto& s : storages_) {
    put_string(out, s.entry.storage_id);
    put_u64(out, s.entry.storage_length);
  }
  put_u64(out, segments_.size());
  for (const auto& seg : segments_) {
    put_string(out, seg.storage_id);
    put_u64(out, seg.storage_offset);
    put_u64(out, seg.artifact_offset);
    put_u64(out, seg.length);
  }
  put_u64(out, aliases_.size());
  for (const auto& a : aliases_) {
    put_string(out, a.name);
    put_string(out, a.storage_id);
    put_u64(out, a.storage_offset);
    put_u64(out, a.logical_length);
    put_ints(out, a.shape);
    put_ints(out, a.stride);
    put_string(out, a.dtype);
  }
  return out;
}

result<index::canonical_index> lip_tables::rebuild_index(std::uint64_t total_size) const {
  TENSORREG_TRY(check_payloads());

  // §2.3: a storage's canonical offset is its segment's artifact_offset.
  std::unordered_map<std::string_view, std::uint64_t> offset_of;
  offset_of.reserve(segments_.size());
  for (const auto& seg : segments_) {
    auto [it, inserted] = offset_of.emplace(seg.storage_id, seg.artifact_offset);
    if (!inserted && it->second != seg.artifact_offset) {
      return fail(errc::invalid_argument, "cannot rebuild index: storage_id=" + seg.storage_id +
                                              " has segments at artifact_offset " + std::to_string(it->second) +
                                              " and " + std::to_string(seg.artifact_offset));
    }
  }

  std::vector<const tensor_alias*> sorted;
  sorted.reserve(aliases_.size());
  for (const auto& a : aliases_) sorted.push_back(&a);
  std::stable_sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->name < b->name; });

  std::vector<index::entry> entries;
  entries.reserve(sorted.size());
  for (std::size_t i = 0; i < sorted.size(); ++i) {
    const auto& a = *sorted[i];
    // Built only on a failure path: this loop runs once per tensor.
    const auto what = [&] { return "cannot rebuild index: alias '" + a.name + "'"; };
    if (i > 0 && sorted[i - 1]->name == a.name) {
      return fail(errc::invalid_argument, what() + " is duplicated");
    }
    auto storage = storage_by_id_.find(a.storage_id);
    if (storage == storage_by_id_.end()) {
      return fail(errc::invalid_argument, what() + " refers to unknown storage_id=" + a.storage_id);
    }
    auto offset = offset_of.find(a.storage_id);
    if (offset == offset_of.end()) {
      return fail(errc::invalid_argument, what() + ": missing segment entry for storage_id=" + a.storage_id);
    }
    const auto storage_length = storages_[storage->second].entry.storage_length;
    if (a.storage_offset > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      return fail(errc::invalid_argument, what() + ": storage_offset " + std::to_string(a.storage_offset) +
                                              " does not fit a signed 64-bit integer");
    }
    // DECISIONS §5.2: storage_offset is in elements; the bound is checked in bytes.
    std::uint64_t start_bytes = 0;
    if (a.storage_offset != 0) {
      const auto element = index::element_size(a.dtype);
      if (!element) {
        return fail(errc::invalid_argument, what() + ": cannot bound storage_offset " +
                                                std::to_string(a.storage_offset) + " of unknown dtype '" + a.dtype +
                                                "'");
      }
      if (a.storage_offset > std::numeric_limits<std::uint64_t>::max() / *element) {
        return fail(errc::out_of_range,
                    what() + ": storage_offset " + std::to_string(a.storage_offset) + " elements overflows 64 bits");
      }
      start_bytes = a.storage_offset * *element;
    }
    if (start_bytes > storage_length || a.logical_length > storage_length - start_bytes) {
      return fail(errc::out_of_range, what() + " ends at byte " +
                                          (start_bytes > std::numeric_limits<std::uint64_t>::max() - a.logical_length
                                               ? std::string("2^64+")
                                               : std::to_string(start_bytes + a.logical_length)) +
                                          ", past storage_length " + std::to_string(storage_length) + " of storage '" +
                                          a.storage_id + "'");
    }
    entries.push_back(index::entry{a.name, offset->second, storage_length, a.shape, a.stride, a.dtype,
                                   static_cast<std::int64_t>(a.storage_offset)});
  }
  TENSORREG_TRY_ASSIGN(auto rebuilt, index::canonical_index::from_entries(std::move(entries), total_size));

  // Step 6 (DECISIONS §5.14): segments may overlap only where they read the same bytes of
  // the same storage, and none may end past total_size. Unknown storages get ids of their own
  // here; step 7 rejects them.
  std::unordered_map<std::string_view, std::uint32_t> source_ids;
  source_ids.reserve(storages_.size());
  std::vector<index::source_range> ranges;
  ranges.reserve(segments_.size());
  for (const auto& seg : segments_) {
    auto [it, inserted] = source_ids.emplace(seg.storage_id, static_cast<std::uint32_t>(source_ids.size()));
    ranges.push_back({seg.artifact_offset, seg.length, it->second, seg.storage_offset});
  }
  auto map = index::byte_range_map::from_sources(ranges, total_size, [&](std::size_t i) {
    return "segment " + std::to_string(i) + " of storage '" + segments_[i].storage_id + "'";
  });
  if (!map) return tl::unexpected(with_context(std::move(map).error(), "cannot commit lease"));
  return rebuilt;
}

result<lip_view> lip_tables::open_view(std::uint64_t total_size, std::int32_t owner_pid, device_memory* devices) const {
  std::vector<std::size_t> storage_of(segments_.size());  // each segment's storage, looked up once
  for (std::size_t i = 0; i < segments_.size(); ++i) {
    const auto& seg = segments_[i];
    const auto what = [&] {
      return "cannot commit lease: segment " + std::to_string(i) + " of storage '" + seg.storage_id + "'";
    };
    auto it = storage_by_id_.find(seg.storage_id);
    if (it == storage_by_id_.end())
      return fail(errc::invalid_argument, what() + " refers to a storage that was not fed");
    storage_of[i] = it->second;
    const auto& entry = storages_[it->second].entry;
    if (seg.length != entry.storage_length) {
      return fail(errc::invalid_argument, what() + " has length " + std::to_string(seg.length) +
                                              ", not the storage_length " + std::to_string(entry.storage_length));
    }
    if (seg.storage_offset != 0) {
      return fail(errc::invalid_argument, what() + " has storage_offset " + std::to_string(seg.storage_offset) +
                                              ": a segment must cover its whole storage");
    }
  }

  lip_view view;
  device_allocation_map allocations;
  // Each distinct handle or region is opened once per commit (registration.md §5.2).
  std::map<std::string, std::shared_ptr<const memory::byte_source>, std::less<>> opened;
  auto source_of = [&](const lip_storage& s) -> result<std::shared_ptr<const memory::byte_source>> {
    const auto& e = s.entry;
    const std::uint64_t needed = e.mapping_base_offset + e.storage_length;  // bounded by region checks or below
    if (const auto* host = std::get_if<host_storage_source>(&e.source)) {
      if (!host->bytes)
        return fail(errc::invalid_argument, "cannot open storage '" + e.storage_id + "': no host bytes");
      return host->bytes;
    }
    if (s.region && s.region->memory) return std::shared_ptr<const memory::byte_source>(s.region->memory);
    if (s.region && s.region->device_mapping) {
      // CUDA VMM memory: imported and mapped when the region was registered.
      allocations.emplace(s.region->device_mapping.get(),
                          device_allocation{s.region->device_id, s.region->size_bytes, {}, s.region->vmm});
      return s.region->device_mapping;
    }
    std::string key;
    std::string_view handle;
    std::int32_t device = e.device_id;
    if (s.region) {
      key = "r:" + s.region->id;
      handle = s.region->cuda_ipc_handle;
      device = s.region->device_id;
    } else {
      const auto& ipc = std::get<cuda_ipc_source>(e.source);
      key = "h:" + ipc.handle;
      handle = ipc.handle;
    }
    if (auto found = opened.find(key); found != opened.end()) return found->second;
    if (devices == nullptr) {
      return fail(errc::failed_precondition, "cannot open storage '" + e.storage_id + "' on device " +
                                                 std::to_string(device) +
                                                 ": CUDA memory needs a GPU and this engine has none");
    }
    const auto open = [&] { return devices->open_ipc(owner_pid, device, handle, needed); };
    // A region's mapping is the region's, kept across leases (region_registry.hpp): opened by
    // the first lease that reads the region, found by every later one.
    auto mapped = s.region && s.region->ipc_mapping ? s.region->ipc_mapping->get_or_open(open) : open();
    if (mapped && (*mapped)->size() < needed) {
      // Kept from a lease that needed fewer bytes of the region.
      mapped = fail(errc::out_of_range, "cannot open CUDA IPC handle of process " + std::to_string(owner_pid) +
                                            " on device " + std::to_string(device) + ": the allocation holds " +
                                            std::to_string((*mapped)->size()) + " bytes, fewer than the " +
                                            std::to_string(needed) + " needed");
    }
    if (!mapped)
      return tl::unexpected(with_context(std::move(mapped).error(), "cannot open storage '" + e.storage_id + "'"));
    opened.emplace(key, *mapped);
    allocations.emplace(mapped->get(), device_allocation{device, (*mapped)->size(), std::string(handle), {}});
    return *mapped;
  };

  std::vector<memory::segment> segments;
  segments.reserve(segments_.size());
  // Sources by storage index; keep_alive holds each distinct source once (10 000 storages of
  // one region share one).
  std::vector<std::shared_ptr<const memory::byte_source>> by_storage(storages_.size());
  std::unordered_set<const memory::byte_source*> kept;
  const memory::byte_source* last_kept = nullptr;  // storages of one region come together
  for (std::size_t i = 0; i < segments_.size(); ++i) {
    const auto& seg = segments_[i];
    const std::size_t index = storage_of[i];
    const auto& s = storages_[index];
    if (!by_storage[index]) {
      TENSORREG_TRY_ASSIGN(by_storage[index], source_of(s));
      const auto* source = by_storage[index].get();
      if (source != last_kept && kept.insert(source).second) view.keep_alive.push_back(by_storage[index]);
      last_kept = source;
    }
    segments.push_back(
        {seg.artifact_offset, seg.length, by_storage[index].get(), s.entry.mapping_base_offset + seg.storage_offset});
  }
  // Aliased segments (same bytes twice) are one range of the canonical buffer.
  std::sort(segments.begin(), segments.end(), [](const auto& a, const auto& b) {
    return a.offset != b.offset ? a.offset < b.offset : a.length > b.length;
  });
  std::vector<memory::segment> disjoint;
  for (const auto& s : segments) {
    if (!disjoint.empty() && s.offset < disjoint.back().offset + disjoint.back().length) {
      // Same source and delta (checked in step 6): extend the previous one if needed.
      auto& prev = disjoint.back();
      const auto end = std::max(prev.offset + prev.length, s.offset + s.length);
      prev.length = end - prev.offset;
      continue;
    }
    disjoint.push_back(s);
  }
  auto assembled = memory::segmented_view::create(total_size, std::move(disjoint));
  if (!assembled) return tl::unexpected(with_context(std::move(assembled).error(), "cannot commit lease"));
  view.bytes = std::make_shared<const memory::segmented_view>(std::move(*assembled));
  if (!allocations.empty())
    view.device_allocations = std::make_shared<const device_allocation_map>(std::move(allocations));
  return view;
}

std::vector<std::string> lip_tables::region_ids() const { return region_order_; }

result<commit_response> publish_lease(commit_context& ctx, const artifact_descriptor& descriptor,
                                      std::shared_ptr<const index::canonical_index> idx, lip_view view,
                                      std::vector<std::string> region_ids, bool snapshot, std::uint64_t layout_token,
                                      function_ref<void()> handed_over) {
  const auto& p = ctx.facts;
  TENSORREG_TRY(ctx.with_catalogue([&](catalogue& cat) -> status {
    if (auto* existing = cat.find(descriptor.artifact_id); existing != nullptr) {
      if (existing->quiesced) {
        return fail(errc::failed_precondition,
                    "cannot commit lease of " + descriptor.artifact_id + ": the artifact is being deregistered");
      }
      for (const auto& [id, l] : existing->leases) {
        if (l.device_id == p.device_id) {
          return fail(errc::already_exists, "cannot commit lease of " + descriptor.artifact_id +
                                                ": lease already exists for artifact on device " +
                                                std::to_string(p.device_id));
        }
      }
    }
    // Step 10: the lease takes over the registration's region references and mappings.
    auto& a = cat.add(descriptor, std::move(idx));
    lease l;
    l.registration_id = p.id;
    l.owner_pid = p.owner_pid;
    l.device_id = p.device_id;
    l.expires = ttl_deadline(ctx.time, ctx.ttl_ms());
    l.view = std::move(view);
    l.region_ids = std::move(region_ids);
    l.snapshot = snapshot;
    l.layout_token = layout_token != 0 ? layout_token : cat.new_layout_token();
    cat.add_lease(a, std::move(l));
    handed_over();
    return {};
  }));

  commit_response response;
  response.descriptor = descriptor;
  status must_failure;
  response.local_stable_tier = apply_local_stable_tier(ctx, descriptor.artifact_id, &must_failure);
  if (!must_failure) {
    ctx.with_catalogue([&](catalogue& cat) { (void)cat.revoke(p.id); });
    return tl::unexpected(must_failure.error());
  }
  return response;
}

// ---- the plan ---------------------------------------------------------------------------------

result<std::unique_ptr<lease_in_place>> lease_in_place::begin(const begin_request& /*request*/,
                                                              const lease_options& options, begin_response& response) {
  if (options.publish_copy && options.in_place) {
    return fail(errc::invalid_argument,
                "cannot begin lease registration: publish_copy needs in_place = false (a lease in place makes no copy "
                "to publish)");
  }
  // §4.2.7: the lease plan checks neither index nor device at Begin; the index is rebuilt
  // from the fed metadata at Commit.
  response.handshake = lease_handshake{};
  return std::unique_ptr<lease_in_place>(new lease_in_place(!options.in_place, options.publish_copy));
}

result<feed_work> lease_in_place::feed(feed_request& r, const registration_facts& facts,
                                       regions::region_registry& regions, const std::string& what) {
  TENSORREG_TRY(check_feed_shape(r, what, name(), true, false));
  // Check the segments before taking the storages, so a rejected message records nothing
  // (a storage kept from a failed message made the client's retry a duplicate storage_id).
  auto* segs = std::get_if<lease_segments>(&r.payload);
  if (segs != nullptr) TENSORREG_TRY(lip_tables::check_segments(segs->segments));
  TENSORREG_TRY(tables_.add_storages(std::move(r.storage_entries), regions, facts.owner_pid));
  if (segs != nullptr) TENSORREG_TRY(tables_.add_segments(std::move(segs->segments)));
  tables_.add_aliases(std::move(r.tensor_aliases));
  return feed_work{};
}

result<commit_response> lease_in_place::commit(commit_context& ctx) {
  const auto& p = ctx.facts;
  // Steps 3–6: payloads, index rebuild, segment rules — all before any mapping is opened.
  if (auto fed = tables_.check_payloads(); !fed) {
    ctx.retryable = true;  // the client may feed what is missing
    return tl::unexpected(std::move(fed).error());
  }
  // Steps 4–6 depend on the tables alone: the same tables as a commit before (a trainer
  // re-registering its weights) find that commit's outcome.
  std::string signature;
  std::shared_ptr<const lease_layout> layout;
  if (ctx.layouts != nullptr) {
    signature = tables_.layout_signature(p.total_size);
    layout = ctx.layouts->find(signature);
  }
  if (!layout) {
    auto rebuilt = tables_.rebuild_index(p.total_size);
    if (!rebuilt) {
      // rebuild_index answers FAILED_PRECONDITION only for payloads not fed yet (step 3).
      ctx.retryable = rebuilt.error().code == errc::failed_precondition;
      return tl::unexpected(std::move(rebuilt).error());
    }
    layout = make_lease_layout(std::make_shared<const index::canonical_index>(std::move(*rebuilt)));
    if (ctx.layouts != nullptr) ctx.layouts->insert(std::move(signature), layout);
  }
  const auto& idx = layout->index;
  // Step 7: open the storages' memory, once per handle or region.
  TENSORREG_TRY_ASSIGN(auto view, tables_.open_view(p.total_size, p.owner_pid, ctx.devices));
  {
    // DECISIONS §5.1: the data hash is over the normalized canonical buffer, DATA ranges of the
    // rebuilt index as read from the segments and PAD as zero. A segment of a storage that no
    // alias names is not in the index, so it is PAD: its bytes must reach neither the hash nor
    // the lease's readers (the local stable tier re-hashes what it copies from the lease).
    std::vector<memory::segment> data;
    data.reserve(layout->data_ranges.size());
    for (const auto& [offset, length] : layout->data_ranges) data.push_back({offset, length, view.bytes.get(), offset});
    TENSORREG_TRY_ASSIGN(auto normalized, memory::segmented_view::create(idx->total_size(), std::move(data)));
    view.keep_alive.push_back(view.bytes);  // the normalized view reads through it
    view.bytes = std::make_shared<const memory::segmented_view>(std::move(normalized));
  }
  if (publish_copy_) return commit_copy(ctx, *layout, std::move(view));
  if (snapshot_) {
    // §5.4: the copy, then the client's memory is the client's again (the trainer may write it
    // while the hash below reads the copy): its mappings go with the old view, and its region
    // references now rather than with the lease.
    TENSORREG_TRY_ASSIGN(view, snapshot_view(*view.bytes, ctx.devices, ctx.pool));
    if (ctx.regions != nullptr) release(*ctx.regions);
  }
  // Step 8: hash, outside every lock: on the GPU when the bytes live there and it is faster.
  std::optional<hash::digest> data;
  if (p.cgid.empty()) {
    TENSORREG_TRY_ASSIGN(data, hash_canonical(*view.bytes, ctx.pool, ctx.devices, ctx.cancelled));
  }
  auto descriptor = describe(p, *idx, data, &layout->index_multihash);
  lip_tables spent;  // freed when commit returns, not under the engine mutex
  return publish_lease(ctx, descriptor, idx, std::move(view), tables_.region_ids(), snapshot_, 0, [&] {
    spent = std::exchange(tables_, lip_tables{});  // references now belong to the lease
  });
}

result<commit_response> lease_in_place::commit_copy(commit_context& ctx, const lease_layout& layout, lip_view leased) {
  const auto& p = ctx.facts;
  const std::string what = "cannot commit " + p.id + " as a copy on its GPU";
  auto copied = snapshot_on_device(*leased.bytes, ctx.devices);
  if (!copied) {
    return fail(errc::failed_precondition,
                what +
                    ": its bytes are not device memory of one GPU that this daemon reaches (publish_copy copies "
                    "device to device; put host tensors through the stable_dram plan)");
  }
  if (!*copied) return tl::unexpected(with_context(std::move(*copied).error(), what));
  auto replica = std::move(**copied);
  // The client's memory is the client's again: its mappings go with the view, its region
  // references now.
  leased = lip_view{};
  if (ctx.regions != nullptr) release(*ctx.regions);
  std::optional<hash::digest> data;
  if (p.cgid.empty()) {
    TENSORREG_TRY_ASSIGN(const auto copy, view_over(replica.bytes));
    TENSORREG_TRY_ASSIGN(data, hash_canonical(*copy.bytes, ctx.pool, ctx.devices, ctx.cancelled));
  }
  const auto descriptor = describe(p, *layout.index, data, &layout.index_multihash);
  const std::int32_t device = replica.device_id;
  return publish_gpu_replica(ctx, descriptor, layout.index, device, std::move(replica));
}

void lease_in_place::release(regions::region_registry& regions) noexcept {
  (void)regions.release_all(tables_.region_ids());
  tables_ = lip_tables{};
}

}  // namespace tensorreg::registration::detail
