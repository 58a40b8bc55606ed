#include "registration/plans/view.hpp"

#include <algorithm>
#include <cstring>
#include <utility>

#include "memory/system_calls.hpp"
#include "tensorreg/common/random.hpp"
#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/metrics/registry.hpp"
#include "tensorreg/views/scatter.hpp"

namespace tensorreg::registration::detail {
namespace {

constexpr const char* tier_skipped = "view registrations do not satisfy the local stable tier";

// The tree hash of linearized view bytes with the view leaf size (registration.md §3.6).
result<hash::digest> linear_hash(std::span<const std::byte> bytes, thread_pool& pool) {
  const std::uint64_t leaf = views::view_hash_leaf_bytes;
  const std::uint64_t leaves = bytes.size() / leaf + (bytes.size() % leaf != 0 ? 1 : 0);
  std::vector<hash::digest> digests(leaves);
  TENSORREG_TRY(pool.parallel_for(leaves, [&](std::size_t i) -> status {
    const auto begin = i * leaf;
    digests[i] = hash::sha256(bytes.subspan(begin, std::min<std::uint64_t>(leaf, bytes.size() - begin)));
    return {};
  }));
  return hash::tree_root(digests);
}

// Zeroes the PAD between view tensors within view bytes [offset, offset + length) of `staging`.
void zero_pad(const views::view_plan& v, std::span<std::byte> staging, std::uint64_t offset, std::uint64_t length) {
  const auto& tensors = v.tensors();
  const std::uint64_t end = offset + length;
  std::uint64_t cursor = offset;
  for (std::size_t i = v.tensor_at(offset); i < tensors.size() && tensors[i].view_offset < end; ++i) {
    if (tensors[i].view_offset > cursor) std::memset(staging.data() + cursor, 0, tensors[i].view_offset - cursor);
    cursor = std::max(cursor, tensors[i].view_offset + tensors[i].nbytes);
  }
  if (cursor < end) std::memset(staging.data() + cursor, 0, end - cursor);
}

// streamed_view_hash's reads: view bytes of the staging buffer, or read back from a stream's
// canonical bytes a block at a time.
auto from_staging(std::span<const std::byte> staging) {
  return [staging](hash::sha256_hasher& h, std::uint64_t from, std::uint64_t to) {
    h.update(staging.subspan(from, to - from));
  };
}

auto from_stream(const views::assembly_stream& stream) {
  return [&stream](hash::sha256_hasher& h, std::uint64_t from, std::uint64_t to) {
    constexpr std::uint64_t block = std::uint64_t{256} << 10;  // stays in cache until hashed
    // One per thread, kept: a block this size is malloc'd by mmap, and freeing it unmaps pages
    // under every feeding thread's feet.
    thread_local std::vector<std::byte> buffer(block);
    for (std::uint64_t at = from; at < to; at += block) {
      const auto piece = std::span(buffer).first(std::min(block, to - at));
      // In range by construction: [from, to) lies in the view, whose bytes are written.
      const auto read = stream.read_view(at, piece);
      TENSORREG_ASSERT(read.has_value());
      h.update(piece);
    }
  };
}

view_record record_of(const views::view_plan& v, const hash::digest& data) {
  view_record r;
  r.view_id = v.view_id();
  r.kind = v.kind();
  r.place = v.place();
  r.spec = v.spec();
  r.index_json = v.index_json();
  r.data_hash = hash::encode_multihash(data);
  r.view_size = v.view_size();
  r.canonical_ranges = v.canonical_ranges();
  return r;
}

using recorded_views = std::vector<std::pair<view_record, std::shared_ptr<const views::view_plan>>>;

// One view to record, its record copied once: a piece's ranges may be millions.
recorded_views one_view(const view_record& record, std::shared_ptr<const views::view_plan> plan) {
  recorded_views out;
  out.emplace_back(record, std::move(plan));
  return out;
}

// Admits `replica` to the stable DRAM cache as `d`'s replica (or joins the one there), as a
// stable_dram commit does (registration.md §4.5), and records `views` on the artifact.
result<commit_response> publish_stable(commit_context& ctx, const artifact_descriptor& d, std::uint64_t size,
                                       std::shared_ptr<const memory::byte_source> replica,
                                       const std::shared_ptr<const index::canonical_index>& idx,
                                       stable::budget_reservation* reservation, recorded_views views) {
  const auto& p = ctx.facts;
  commit_response response;
  response.descriptor = d;
  const auto admit = admit_policy_of(p.policy);
  return ctx.with_catalogue([&](catalogue& cat) -> result<commit_response> {
    auto* existing = cat.find(d.artifact_id);
    if (existing != nullptr && existing->quiesced) {
      return fail(errc::failed_precondition, "cannot commit " + d.artifact_id + ": the artifact is being deregistered");
    }
    auto& cache = cat.cache();
    const bool had_replica = cache.contains(d.artifact_id);
    if (!had_replica) TENSORREG_TRY(cat.check_stable_share(p.owner_uid, "cannot commit " + d.artifact_id));
    auto admitted = cache.admit(d.artifact_id, size, std::move(replica), admit, reservation);
    if (!admitted) return tl::unexpected(with_context(std::move(admitted).error(), "cannot commit " + d.artifact_id));
    if (!admitted->admitted) {
      return fail(errc::resource_exhausted,
                  "cannot commit " + d.artifact_id + ": the stable cache did not keep it: " + admitted->skip_reason);
    }
    if (!had_replica) cat.note_stable_entry(d.artifact_id, p.owner_uid);
    response.evicted = admitted->evicted;
    auto& a = cat.add(d, idx);
    if (had_replica) {
      response.existed = true;
      cat.add_join(a, join{p.id, p.owner_pid, ttl_deadline(ctx.time, ctx.ttl_ms())});
    }
    for (auto& v : views) a.views[v.first.view_id] = std::move(v);
    response.local_stable_tier = local_stable_tier_result{local_stable_status::skipped, tier_skipped};
    return response;
  });
}

}  // namespace

bool written_ranges::add(std::uint64_t offset, std::uint64_t length) {
  if (length == 0) return false;
  std::uint64_t end = offset + length;
  std::lock_guard lock(mutex_);
  bool again = false;
  // Merge with the range before (touching or overlapping it) and every range that starts up
  // to `end`: O(log n) plus the ranges merged, however many disjoint ranges came before.
  auto it = ends_.upper_bound(offset);
  if (it != ends_.begin()) {
    const auto before = std::prev(it);
    if (before->second >= offset) {
      again = before->second > offset;
      offset = before->first;
      end = std::max(end, before->second);
      ends_.erase(before);
    }
  }
  while (it != ends_.end() && it->first <= end) {
    again = again || it->first < end;
    end = std::max(end, it->second);
    it = ends_.erase(it);
  }
  ends_.emplace_hint(it, offset, end);
  return again;
}

std::uint64_t written_ranges::written_through(std::uint64_t offset) const {
  std::lock_guard lock(mutex_);
  auto it = ends_.upper_bound(offset);
  if (it == ends_.begin()) return offset;
  --it;
  return it->second > offset ? it->second : offset;
}

streamed_view_hash::streamed_view_hash(std::uint64_t view_size, std::uint64_t leaf_bytes)
    : size_(view_size), leaf_bytes_(leaf_bytes) {
  for (std::uint64_t at = 0; at < view_size; at += leaf_bytes) {
    leaves_.push_back(std::make_unique<leaf>());
  }
}

void streamed_view_hash::advance(bytes_into read, const written_ranges& written, std::uint64_t offset,
                                 std::uint64_t length) {
  if (spoiled_ || length == 0) return;
  const std::uint64_t leaf_bytes = leaf_bytes_;
  for (std::uint64_t i = offset / leaf_bytes; i * leaf_bytes < offset + length && i < leaves_.size(); ++i) {
    auto& l = *leaves_[i];
    const std::uint64_t begin = i * leaf_bytes;
    const std::uint64_t end = std::min(size_, begin + leaf_bytes);
    // Whoever holds the lock carries the hash on; a feed that finds it taken leaves its bytes to
    // the holder, which looks again before it lets go (`wanted`).
    l.wanted.fetch_add(1);
    while (l.mutex.try_lock()) {
      l.wanted.store(0);
      for (;;) {
        const std::uint64_t from = begin + l.hashed;
        const std::uint64_t to = std::min(end, written.written_through(from));
        if (to <= from) break;
        read(l.hasher, from, to);
        l.hashed = to - begin;
      }
      l.mutex.unlock();
      if (l.wanted.load() == 0) break;
    }
  }
}

std::optional<hash::digest> streamed_view_hash::finish(bytes_into read, thread_pool& pool) {
  if (spoiled_) return std::nullopt;
  const std::uint64_t leaf_bytes = leaf_bytes_;
  std::vector<hash::digest> digests(leaves_.size());
  const auto done = pool.parallel_for(leaves_.size(), [&](std::size_t i) -> status {
    auto& l = *leaves_[i];
    std::lock_guard lock(l.mutex);
    const std::uint64_t begin = i * leaf_bytes;
    const std::uint64_t end = std::min(size_, begin + leaf_bytes);
    read(l.hasher, begin + l.hashed, end);
    l.hashed = end - begin;
    digests[i] = l.hasher.finish();
    return {};
  });
  if (!done) return std::nullopt;
  spoiled_ = true;  // the hashers are spent
  return hash::tree_root(digests);
}

std::optional<views::byte_range> written_ranges::first_missing(std::span<const views::byte_range> required) const {
  std::vector<views::byte_range> written;
  {
    std::lock_guard lock(mutex_);
    written.reserve(ends_.size());
    for (const auto& [offset, end] : ends_) written.push_back({offset, end - offset});
  }
  return views::first_gap(required, written);
}

result<std::unique_ptr<plan>> view_registration::begin(const begin_request& r, const begin_context& ctx,
                                                       begin_response& response) {
  const views::view_request request = r.view.value_or(views::view_request{});
  TENSORREG_TRY(views::view_plan::check_required(request));  // before the index: upstream's order
  // A piece's index describes the whole artifact, of canonical_size_bytes; Begin's total_size
  // is the piece's view size (registration.md §7).
  begin_request indexed = r;
  if (request.kind == views::registration_kind::piece) {
    if (request.canonical_size_bytes == 0) {
      return fail(errc::invalid_argument, "cannot register view: a PIECE needs canonical_size_bytes > 0");
    }
    indexed.total_size = request.canonical_size_bytes;
  }
  TENSORREG_TRY_ASSIGN(auto idx, begin_indexed(indexed, ctx));
  TENSORREG_TRY_ASSIGN(
      auto normalized,
      views::view_plan::create(request, *idx, views::registration_facts{r.total_size, !r.client_artifact_id.empty()}));
  std::unique_ptr<view_registration> p(new view_registration());
  p->index_ = std::move(idx);
  p->view_ = std::make_shared<const views::view_plan>(std::move(normalized));

  if (request.staging_memfd && p->view_->place() != views::placement::server) {
    return fail(errc::invalid_argument,
                "cannot register view: staging_memfd needs placement SERVER (with CLIENT placement the plan's "
                "own buffer takes the canonical tensors)");
  }
  if (request.staging_memfd && !std::holds_alternative<stable_dram_options>(r.plan)) {
    return fail(errc::invalid_argument,
                "cannot register view: staging_memfd needs the stable_dram plan, whose handshake carries the memfd");
  }
  if (p->view_->place() == views::placement::client) {
    if (p->view_->kind() == views::registration_kind::piece) {
      return fail(errc::unimplemented,
                  "cannot register view: a PIECE with placement CLIENT is not implemented; send its view bytes "
                  "with placement SERVER");
    }
    if (std::holds_alternative<lease_options>(r.plan)) {
      return fail(errc::unimplemented,
                  "cannot register view: a view over a lease-in-place registration is not implemented; use the "
                  "coalesced or stable_dram plan");
    }
    TENSORREG_TRY_ASSIGN(p->inner_, begin_ordinary_plan(r, ctx, response));
    return std::unique_ptr<plan>(std::move(p));
  }

  // SERVER placement: the bytes arrive as view_chunk messages, on the CPU, whatever the plan
  // oneof says; the handshake names that plan but carries no buffer.
  const std::uint64_t size = r.total_size;  // CANONICAL: the canonical buffer; PIECE: the view
  if (p->view_->kind() == views::registration_kind::canonical) {
    if (ctx.stable_budget != 0 && size > ctx.stable_budget) {
      return fail(errc::resource_exhausted, "cannot begin view registration: total_size " + std::to_string(size) +
                                                " exceeds the stable budget of " + std::to_string(ctx.stable_budget) +
                                                " bytes");
    }
    if (ctx.stable_cache != nullptr) {
      auto reserved = ctx.stable_cache->reserve(size);
      if (!reserved) {
        return tl::unexpected(with_context(std::move(reserved).error(), "cannot begin view registration"));
      }
      p->reservation_ = std::move(*reserved);
    }
  }
  p->landing_.written = std::make_shared<written_ranges>();
  if (p->view_->kind() == views::registration_kind::piece) {
    p->landing_.streamed = std::make_shared<streamed_view_hash>(size);
    if (ctx.assembly_for) {
      TENSORREG_TRY_ASSIGN(auto whole, ctx.assembly_for(r.client_artifact_id, p->index_, p->view_->required_ranges()));
      p->landing_.stream = whole->claim(ctx.registration_id, p->view_, *p->index_, ctx.pool);
    }
  }
  // A piece whose stream claims all of its bytes keeps no copy of them: they are in the
  // assembly's buffer, and its view hash reads them back from there.
  if (!p->landing_.stream || !p->landing_.stream->claims_all()) {
    TENSORREG_TRY_ASSIGN(auto memory, memory::shared_memory::create(size, "tensorreg-view"));
    p->landing_.buffer = std::make_shared<memory::shared_memory>(std::move(memory));
  }
  if (p->view_->kind() == views::registration_kind::canonical) {
    p->landing_.populator = std::make_shared<memory::page_populator>(p->landing_.buffer->mutable_bytes());
  }
  p->landing_.view = p->view_;
  if (request.staging_memfd) {
    // The client's bytes land in daemon memory through this memfd; the Feed copies them out of
    // it into the daemon's own buffers, so nothing later reads what the client can still change.
    TENSORREG_TRY_ASSIGN(auto staging, memory::shared_memory::create(p->view_->view_size(), "tensorreg-view-staging"));
    p->client_staging_ = std::make_shared<memory::shared_memory>(std::move(staging));
    stable_dram_handshake hs;
    hs.publish = publish_memfd{p->client_staging_, p->view_->view_size(), 0};
    hs.publish_lease_token = "view-staging:" + random_hex(16);
    response.handshake = std::move(hs);
  } else if (std::holds_alternative<stable_dram_options>(r.plan)) {
    response.handshake = stable_dram_handshake{};
  } else if (std::holds_alternative<lease_options>(r.plan)) {
    response.handshake = lease_handshake{};
  } else {
    response.handshake = coalesced_handshake{};
  }
  return std::unique_ptr<plan>(std::move(p));
}

result<feed_work> view_registration::feed(feed_request& r, const registration_facts& facts,
                                          regions::region_registry& regions, const std::string& what) {
  if (inner_) {
    if (std::holds_alternative<view_chunk>(r.payload)) {
      return fail(errc::failed_precondition, what +
                                                 ": view_chunk needs a view registration with placement SERVER; "
                                                 "this one has placement CLIENT (upload the canonical tensors)");
    }
    return inner_->feed(r, facts, regions, what);
  }
  TENSORREG_TRY(check_feed_shape(r, what, name(), false, true));
  const auto size = view_->view_size();
  const auto in_view = [&](std::uint64_t offset, std::uint64_t length) -> status {
    if (offset > size || length > size - offset) {
      return fail(errc::out_of_range, what + ": view bytes [" + std::to_string(offset) + ", +" +
                                          std::to_string(length) + ") run past the view size " + std::to_string(size));
    }
    return {};
  };
  if (auto* progress = std::get_if<stable_write_progress>(&r.payload)) {
    if (!client_staging_) {
      return fail(errc::failed_precondition,
                  what +
                      ": stable_dram_write_progress needs a view registration with staging_memfd; this one "
                      "takes view_chunk messages");
    }
    for (const auto& range : progress->ranges) TENSORREG_TRY(in_view(range.canonical_offset, range.length));
    return feed_work([landing = landing_, staging = client_staging_, ranges = std::move(progress->ranges)]() -> status {
      for (const auto& range : ranges) {
        if (range.length == 0) continue;
        TENSORREG_TRY(
            landing.land(range.canonical_offset, staging->bytes().subspan(range.canonical_offset, range.length)));
        // Copied out: the client's pages of them are not needed any more.
        staging->discard(range.canonical_offset, range.length);
      }
      return {};
    });
  }
  auto* chunk = std::get_if<view_chunk>(&r.payload);
  TENSORREG_ASSERT(chunk != nullptr);
  const auto offset = chunk->view_offset;
  TENSORREG_TRY(in_view(offset, chunk->data.size()));
  return feed_work([landing = landing_, offset, data = std::move(chunk->data)]() -> status {
    return landing.land(offset, std::as_bytes(std::span(data.data(), data.size())));
  });
}

status view_landing::land(std::uint64_t offset, std::span<const std::byte> bytes) const {
  if (view->kind() == views::registration_kind::canonical) {
    // Four times the chunk's size: what one client's bytes make resident stays in proportion
    // to them, and the buffer is still faulted in over the first quarter of the upload.
    populator->run(4 * bytes.size());
    TENSORREG_TRY(views::scatter(*view, offset, bytes, buffer->mutable_bytes()));
    written->add(offset, bytes.size());  // after the copy: Commit checks what has landed
    return {};
  }
  if (!buffer) {
    // The stream holds every byte: written there first, then the view hash reads them back.
    TENSORREG_TRY(stream->write(offset, bytes));
    if (written->add(offset, bytes.size())) {
      streamed->spoil();  // bytes hashed already may have changed
      stream->spoil();
    } else {
      streamed->advance(from_stream(*stream), *written, offset, bytes.size());
    }
    return {};
  }
  const auto staging = buffer->mutable_bytes();
  std::memcpy(staging.data() + offset, bytes.data(), bytes.size());
  zero_pad(*view, staging, offset, bytes.size());  // PAD reads as zero in the view hash
  if (written->add(offset, bytes.size())) {
    streamed->spoil();  // bytes hashed already may have changed
    if (stream) stream->spoil();
  } else {
    streamed->advance(from_staging(staging), *written, offset, bytes.size());
  }
  // From the daemon's copy, not `bytes`: a client's staging memfd may have changed since.
  return stream ? stream->write(offset, staging.subspan(offset, bytes.size())) : status{};
}

status view_registration::check_complete(commit_context& ctx) const {
  std::vector<views::byte_range> required;
  for (const auto& t : view_->tensors()) required.push_back({t.view_offset, t.nbytes});
  required = views::merge_ranges(std::move(required));
  if (auto gap = landing_.written->first_missing(required)) {
    ctx.retryable = true;  // the client can still send them
    return fail(errc::failed_precondition, "cannot commit view registration '" + ctx.facts.id +
                                               "': view bytes incomplete: view bytes [" + std::to_string(gap->offset) +
                                               ", " + std::to_string(gap->end()) + ") were not written");
  }
  return {};
}

result<view_record> view_registration::record_over(std::span<const std::byte> canonical, thread_pool& pool) const {
  TENSORREG_TRY_ASSIGN(auto data, views::view_data_hash(*view_, canonical, views::view_hash_leaf_bytes, &pool));
  return record_of(*view_, data);
}

result<commit_response> view_registration::commit(commit_context& ctx) {
  if (inner_) return commit_client(ctx);
  TENSORREG_TRY(check_complete(ctx));
  if (view_->kind() == views::registration_kind::canonical) return commit_canonical(ctx);
  return commit_piece(ctx);
}

result<commit_response> view_registration::commit_client(commit_context& ctx) {
  TENSORREG_TRY_ASSIGN(auto response, inner_->commit(ctx));
  const auto& id = response.descriptor.artifact_id;
  std::shared_ptr<const memory::byte_source> bytes = ctx.with_catalogue([&](catalogue& cat) {
    std::shared_ptr<const memory::byte_source> out;
    if (cat.cache().contains(id)) {
      out = cat.cache().lookup(id);
    } else if (auto* a = cat.find(id); a != nullptr && !a->gpu_replicas.empty()) {
      out = a->gpu_replicas.begin()->second.bytes;
    }
    return out;
  });
  if (!bytes) return fail(errc::internal, "cannot record view over " + id + ": no replica after its commit");
  // The view hash reads host memory; a GPU replica is copied to the host first.
  std::vector<std::byte> copy;
  std::span<const std::byte> host;
  if (const auto* shared = dynamic_cast<const memory::shared_memory*>(bytes.get())) {
    host = shared->bytes();
  } else {
    copy.resize(bytes->size());
    TENSORREG_TRY(bytes->read(0, copy));
    host = copy;
  }
  TENSORREG_TRY_ASSIGN(auto record, record_over(host, ctx.pool));
  ctx.with_catalogue([&](catalogue& cat) {
    if (auto* a = cat.find(id)) a->views[record.view_id] = {record, view_};
  });
  response.view = std::move(record);
  return response;
}

result<commit_response> view_registration::commit_canonical(commit_context& ctx) {
  const auto& p = ctx.facts;
  // No Feed writes any more (Commit waited for them), and the memfd never left the daemon.
  TENSORREG_TRY(landing_.buffer->seal_read_only());
  std::optional<hash::digest> data;
  if (p.cgid.empty()) {
    TENSORREG_TRY_ASSIGN(data, hash::tree_hash(cancellable_source(*landing_.buffer, ctx.cancelled), &ctx.pool));
    metrics::process_counters().bytes_hashed.add(landing_.buffer->size());
  }
  TENSORREG_TRY_ASSIGN(auto record, record_over(landing_.buffer->bytes(), ctx.pool));
  const auto descriptor = describe(p, *index_, data);
  TENSORREG_TRY_ASSIGN(auto response, publish_stable(ctx, descriptor, p.total_size, landing_.buffer, index_,
                                                     &reservation_, one_view(record, view_)));
  response.view = std::move(record);
  return response;
}

result<commit_response> view_registration::commit_piece(commit_context& ctx) {
  const auto& p = ctx.facts;
  std::span<std::byte> staging;
  std::optional<hash::digest> view_hash;
  if (landing_.buffer) {
    // PAD between view tensors reads as zero in the view hash, whatever the client sent.
    staging = landing_.buffer->mutable_bytes();
    zero_pad(*view_, staging, 0, staging.size());
    view_hash = landing_.streamed->finish(from_staging(staging), ctx.pool);
    if (!view_hash) {
      TENSORREG_TRY_ASSIGN(view_hash, linear_hash(staging, ctx.pool));
    }
  } else {
    view_hash = landing_.streamed->finish(from_stream(*landing_.stream), ctx.pool);
    if (!view_hash) {
      TENSORREG_TRY_ASSIGN(view_hash, views::view_data_hash(*view_, landing_.stream->canonical(),
                                                            views::view_hash_leaf_bytes, &ctx.pool));
    }
  }
  auto record = record_of(*view_, *view_hash);

  // The assembly of this cgid: the one Begin claimed bytes in, or one made again since it
  // expired or failed to seal (the stream's bytes are not in that one: they are copied here).
  const auto deadline = ttl_deadline(ctx.time, ctx.ttl_ms());
  TENSORREG_TRY_ASSIGN(auto whole, ctx.with_catalogue([&](catalogue& cat) {
    return cat.assembly_for(p.cgid, index_, view_->required_ranges());
  }));
  whole->touch(deadline);
  std::vector<std::byte> gathered;
  if (!landing_.buffer && !landing_.stream->of(*whole)) {
    // Its bytes are in the buffer of an assembly that was dropped since (its seal failed):
    // this one needs them all.
    gathered.resize(view_->view_size());
    TENSORREG_TRY(landing_.stream->read_view(0, gathered));
    staging = gathered;
  }
  bool retry_later = false;
  auto added = whole->add_piece(p.id, *view_, staging, *index_, &ctx.pool, landing_.stream.get(), &retry_later);
  if (!added) {
    ctx.retryable = retry_later;  // another piece's claim: this one stays open to commit again
    return tl::unexpected(std::move(added).error());
  }
  auto after = std::move(*added);
  if (!after.complete) {
    // The leaves this piece completed, hashed now so that the seal hashes only the last piece's.
    TENSORREG_TRY_ASSIGN(const auto hashed, whole->hash_complete_leaves(&ctx.pool, ctx.cancelled));
    metrics::process_counters().bytes_hashed.add(hashed);
    // And the pages the next pieces will write, in the background, so that their commits find
    // them there.
    whole->prefault_uncovered(ctx.pool);
  }

  commit_response response;
  response.local_stable_tier = local_stable_tier_result{local_stable_status::skipped, tier_skipped};
  if (after.complete) {
    // This piece completed the canonical buffer: it gets the mi2 id a whole registration of
    // the same tensors gets, and becomes a stable replica.
    auto sealed = [&]() -> result<commit_response> {
      TENSORREG_TRY_ASSIGN(const auto leaves, whole->leaf_digests(&ctx.pool, ctx.cancelled));
      metrics::process_counters().bytes_hashed.add(leaves.bytes_hashed);
      TENSORREG_TRY_ASSIGN(auto buffer, whole->seal_buffer());
      const std::optional<hash::digest> data = hash::tree_root(leaves.digests);
      registration_facts as_whole = p;
      as_whole.cgid.clear();
      as_whole.total_size = index_->total_size();
      const auto descriptor = describe(as_whole, *index_, data);
      return publish_stable(ctx, descriptor, as_whole.total_size, buffer, index_, nullptr, one_view(record, view_));
    }();
    if (!sealed) {
      // The assembly cannot take pieces any more (its buffer is sealed or half published): drop
      // it, so that its pieces can be registered again.
      ctx.with_catalogue([&](catalogue& cat) {
        if (auto it = cat.assemblies().find(p.cgid); it != cat.assemblies().end() && it->second == whole) {
          cat.assemblies().erase(it);
        }
      });
      return sealed;
    }
    whole->mark_sealed(sealed->descriptor.artifact_id);
    after = whole->snapshot();  // no piece is added once complete: only the seal changed
    response = std::move(*sealed);
  } else {
    auto& d = response.descriptor;
    d.artifact_id = p.cgid;
    d.id_kind = identity::id_kind::cgid;
    d.index_multihash = view_->index_multihash();
    d.total_size = index_->total_size();
  }
  response.assembly = status_of(after, ctx.time.now());
  response.view = std::move(record);
  // The staging copy of the piece's view bytes is done with. Unmapping its pages (gigabytes for
  // a rank's share of a model) is left to a hashing thread rather than made part of the answer.
  if (landing_.buffer) ctx.pool.submit([staging = std::exchange(landing_.buffer, nullptr)] {});
  return response;
}

void view_registration::release(regions::region_registry& regions) noexcept {
  if (inner_) inner_->release(regions);
  landing_.buffer.reset();
  landing_.written.reset();
  landing_.stream.reset();  // its claim goes back unless the piece was added
  client_staging_.reset();
  reservation_ = stable::budget_reservation{};
}

}  // namespace tensorreg::registration::detail
