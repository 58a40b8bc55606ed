#include "registration/plans/plan.hpp"

#include <new>
#include <variant>

#include "registration/plans/coalesced.hpp"
#include "registration/plans/lease_in_place.hpp"
#include "registration/plans/lease_repeat.hpp"
#include "registration/plans/stable_dram.hpp"
#include "registration/plans/view.hpp"
#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/index/byte_range_map.hpp"
#include "tensorreg/metrics/registry.hpp"

namespace tensorreg::registration::detail {

namespace {

result<std::unique_ptr<plan>> begin_plan_unguarded(const begin_request& request, const begin_context& ctx,
                                                   begin_response& response) {
  if (request.view || request.has_view) return view_registration::begin(request, ctx, response);
  return begin_ordinary_plan(request, ctx, response);
}

}  // namespace

result<std::unique_ptr<plan>> begin_ordinary_plan(const begin_request& request, const begin_context& ctx,
                                                  begin_response& response) {
  return std::visit(
      [&](const auto& options) -> result<std::unique_ptr<plan>> {
        using options_type = std::decay_t<decltype(options)>;
        if constexpr (std::is_same_v<options_type, lease_options>) {
          if (!options.repeat_of.empty()) {
            TENSORREG_TRY_ASSIGN(auto p, lease_repeat::begin(options, response));
            return std::unique_ptr<plan>(std::move(p));
          }
          TENSORREG_TRY_ASSIGN(auto p, lease_in_place::begin(request, options, response));
          return std::unique_ptr<plan>(std::move(p));
        } else if constexpr (std::is_same_v<options_type, stable_dram_options>) {
          TENSORREG_TRY_ASSIGN(auto p, stable_dram::begin(request, options, ctx, response));
          return std::unique_ptr<plan>(std::move(p));
        } else {
          static_assert(std::is_same_v<options_type, coalesced_options>);
          TENSORREG_TRY_ASSIGN(auto p, coalesced::begin(request, options, ctx, response));
          return std::unique_ptr<plan>(std::move(p));
        }
      },
      request.plan);
}

result<std::unique_ptr<plan>> begin_plan(const begin_request& request, const begin_context& ctx,
                                         begin_response& response) {
  // Begin allocates what the upload needs (staging memory, device buffers): out of memory is a
  // clear RESOURCE_EXHAUSTED, and every plan's members release what was made before the throw.
  try {
    return begin_plan_unguarded(request, ctx, response);
  } catch (const std::bad_alloc&) {
    return fail(errc::resource_exhausted, "cannot begin registration: out of memory");
  }
}

result<std::shared_ptr<const index::canonical_index>> begin_indexed(const begin_request& r, const begin_context& ctx) {
  if (r.device_id < 0) {
    return fail(errc::invalid_argument,
                "cannot begin registration: device_id must be >= 0, got " + std::to_string(r.device_id));
  }
  return ctx.resolve_index(r);
}

result<std::shared_ptr<const index::canonical_index>> resolve_index(
    const begin_request& r,
    const std::function<std::shared_ptr<const index::canonical_index>(const std::string& hex_key)>& lookup) {
  if (!r.tensor_index_key && !r.tensor_index_data) {
    return fail(errc::invalid_argument,
                "cannot begin registration: no tensor index: set tensor_index_key or tensor_index_data");
  }
  if (r.tensor_index_key && r.tensor_index_data) {
    return fail(errc::invalid_argument,
                "cannot begin registration: set only one of tensor_index_key and tensor_index_data");
  }
  if (r.tensor_index_data) {
    const auto& d = *r.tensor_index_data;
    if (!d.schema_version.empty() && d.schema_version != "v3") {
      return fail(errc::invalid_argument, "cannot begin registration: schema_version '" + d.schema_version +
                                              "' is not supported (only \"v3\")");
    }
    if (!d.encoding.empty() && d.encoding != "json") {
      return fail(errc::invalid_argument,
                  "cannot begin registration: index encoding '" + d.encoding + "' is not supported (only \"json\")");
    }
    TENSORREG_TRY_ASSIGN(auto parsed, index::canonical_index::parse(d.bytes, r.total_size));
    return std::make_shared<const index::canonical_index>(std::move(parsed));
  }
  auto key = hash::digest_from_hex(*r.tensor_index_key);
  if (!key)
    return fail(errc::invalid_argument,
                "cannot begin registration: tensor_index_key must be a 32-byte sha256 hex string");
  auto known = lookup(hash::to_hex(*key));
  if (!known) {
    return fail(errc::not_found, "cannot begin registration: unknown tensor_index_key " + hash::to_hex(*key));
  }
  if (known->total_size() == r.total_size) return known;
  // The same index under another total_size: validate its entries against this one.
  TENSORREG_TRY_ASSIGN(auto resized, index::canonical_index::from_entries(known->entries(), r.total_size));
  return std::make_shared<const index::canonical_index>(std::move(resized));
}

status check_feed_shape(const feed_request& r, const std::string& what, std::string_view plan_name, bool takes_tables,
                        bool takes_chunks) {
  if ((!r.storage_entries.empty() || !r.tensor_aliases.empty() || std::holds_alternative<lease_segments>(r.payload)) &&
      !takes_tables) {
    return fail(errc::failed_precondition, what +
                                               ": storage tables and lease segments need a lease-in-place "
                                               "registration, not " +
                                               std::string(plan_name));
  }
  if ((std::holds_alternative<view_chunk>(r.payload) || std::holds_alternative<stable_write_progress>(r.payload)) &&
      !takes_chunks) {
    return fail(errc::failed_precondition, what +
                                               ": view_chunk and stable_dram_write_progress need a stable_dram "
                                               "registration with stage_on_gpu=false, not " +
                                               std::string(plan_name));
  }
  return {};
}

result<memory::segmented_view> normalized_view(const memory::byte_source& raw, const index::canonical_index& idx) {
  const auto map = index::byte_range_map::from_index(idx);
  std::vector<memory::segment> data_ranges;
  for (const auto& range : map.ranges()) {
    if (range.kind == index::range_kind::data) data_ranges.push_back({range.offset, range.length, &raw, range.offset});
  }
  return memory::segmented_view::create(idx.total_size(), std::move(data_ranges));
}

result<std::shared_ptr<const normalized_source>> normalized_source::create(
    std::shared_ptr<const memory::byte_source> raw, const index::canonical_index& idx) {
  TENSORREG_TRY_ASSIGN(auto view, normalized_view(*raw, idx));
  return std::make_shared<const normalized_source>(std::move(raw), std::move(view));
}

artifact_descriptor describe(const registration_facts& facts, const index::canonical_index& idx,
                             const std::optional<hash::digest>& data, const std::string* index_multihash) {
  artifact_descriptor d;
  d.index_multihash = index_multihash != nullptr ? *index_multihash : hash::encode_multihash(hash::sha256(idx.json()));
  d.total_size = facts.total_size;
  if (!facts.cgid.empty()) {
    d.artifact_id = facts.cgid;
    d.id_kind = identity::id_kind::cgid;
  } else {
    d.data_multihash = hash::encode_multihash(*data);
    d.artifact_id = "mi2:" + d.index_multihash + ":" + d.data_multihash;
    d.id_kind = identity::id_kind::mi2;
  }
  return d;
}

result<hash::digest> hash_canonical(const memory::segmented_view& canonical, thread_pool& pool, device_memory* devices,
                                    cancel_flag cancel) {
  TENSORREG_TRY(check_cancel(cancel));
  if (devices != nullptr) {
    if (auto on_device = devices->tree_hash_on_device(canonical)) {
      TENSORREG_TRY(check_cancel(cancel));
      return std::move(*on_device);
    }
  }
  auto digest = hash::tree_hash(cancellable_source(canonical, cancel), &pool);
  if (digest) metrics::process_counters().bytes_hashed.add(canonical.size());
  return digest;
}

stable::admit_policy admit_policy_of(const policy::resolved_policy& r) {
  return r.cache.value_or(stable::admit_policy{});
}

local_stable_tier_result apply_local_stable_tier(commit_context& ctx, const std::string& artifact_id,
                                                 status* must_failure) {
  *must_failure = {};
  const auto& policy = ctx.facts.policy;
  if (policy.local_stable < policy::requirement::should) {
    return {local_stable_status::skipped, "the policy does not ask for the local stable tier"};
  }
  const auto admit = admit_policy_of(policy);
  auto attempt = [&]() -> status {
    std::shared_ptr<const memory::byte_source> source;
    std::uint64_t size = 0;
    std::optional<std::string> expected;
    {
      std::lock_guard lock(ctx.catalogue_mutex);
      auto& cache = ctx.cat.cache();
      const auto* a = ctx.cat.find(artifact_id);
      if (a == nullptr)
        return fail(errc::failed_precondition, "no replica or lease to copy from");  // revoked meanwhile
      size = a->descriptor.total_size;
      if (!a->descriptor.data_multihash.empty()) expected = a->descriptor.data_multihash;
      if (cache.contains(artifact_id)) {
        // 1. A host replica exists: upgrade its policy.
        auto admitted = cache.admit(artifact_id, size, cache.lookup(artifact_id), admit);
        if (!admitted) return tl::unexpected(std::move(admitted).error());
        return {};
      }
      if (!a->gpu_replicas.empty()) {
        source = a->gpu_replicas.begin()->second.bytes;  // 2. a GPU replica
      } else if (!a->leases.empty()) {
        source = a->leases.begin()->second.view.bytes;  // 3. a live lease
      } else {
        return fail(errc::failed_precondition, "no replica or lease to copy from");
      }
    }
    TENSORREG_TRY_ASSIGN(auto copy, materialize(*source, expected.has_value(), ctx.pool, ctx.devices, ctx.cancelled));
    if (expected && hash::encode_multihash(*copy.data_digest) != *expected) {
      return fail(errc::data_loss, "the bytes changed while they were copied (data hash " +
                                       hash::encode_multihash(*copy.data_digest) + ")");
    }
    std::lock_guard lock(ctx.catalogue_mutex);
    TENSORREG_TRY(ctx.cat.check_stable_share(ctx.facts.owner_uid, "cannot admit it"));
    auto admitted = ctx.cat.cache().admit(artifact_id, size, copy.replica, admit);
    if (!admitted) return tl::unexpected(std::move(admitted).error());
    if (!admitted->admitted) return fail(errc::resource_exhausted, admitted->skip_reason);
    if (!admitted->upgraded) ctx.cat.note_stable_entry(artifact_id, ctx.facts.owner_uid);
    return {};
  };
  auto done = attempt();
  if (done) return {local_stable_status::ready, ""};
  auto message = "cannot keep a local stable copy of " + artifact_id + ": " + done.error().message;
  if (policy.local_stable == policy::requirement::must) {
    *must_failure = tl::unexpected(error{done.error().code, message});
    return {local_stable_status::unspecified, message};
  }
  return {local_stable_status::degraded, message};
}

}  // namespace tensorreg::registration::detail
