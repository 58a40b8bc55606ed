#include "tensorreg/views/view_plan.hpp"

#include <algorithm>
#include <numeric>
#include <set>

#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/index/dtype.hpp"
#include "tensorreg/views/scatter.hpp"

namespace tensorreg::views {
namespace {

__extension__ using i128 = __int128;

error invalid(const std::string& reason) { return error{errc::invalid_argument, "cannot register view: " + reason}; }

std::string quoted(std::string_view name) { return "'" + std::string(name) + "'"; }

std::uint64_t align_up(std::uint64_t v, std::uint64_t a) { return (v + a - 1) / a * a; }

// One dim of an element set: n elements, `stride` elements apart.
struct dim {
  std::int64_t n = 0;
  std::int64_t stride = 0;
};

// Appends the byte ranges of the element set {base + Σ i_d s_d} (elements of `es` bytes; byte
// 0 of element 0 of the storage at `origin`) to `out`. The set does not depend on the order of
// the dims, so dims are put in canonical order (largest stride outside) and those that
// continue each other merged: a transpose covers what its canonical tensor covers, in as few
// runs. `budget` counts the runs left; INVALID_ARGUMENT when it would go below zero.
status append_coverage(std::vector<byte_range>& out, std::uint64_t origin, std::int64_t base,
                       std::span<const std::int64_t> shape, std::span<const std::int64_t> stride, std::uint32_t es,
                       std::uint64_t& budget, const std::string& what) {
  std::vector<dim> dims;
  for (std::size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 0) return {};  // no elements
    if (shape[d] == 1 || stride[d] == 0) continue;
    dim x{shape[d], stride[d]};
    if (x.stride < 0) {
      base += (x.n - 1) * x.stride;
      x.stride = -x.stride;
    }
    dims.push_back(x);
  }
  std::stable_sort(dims.begin(), dims.end(), [](const dim& a, const dim& b) { return a.stride > b.stride; });
  for (std::size_t d = dims.size(); d-- > 1;) {
    auto& outer = dims[d - 1];
    const auto& inner = dims[d];
    if (static_cast<i128>(outer.stride) == static_cast<i128>(inner.n) * inner.stride) {
      outer = dim{outer.n * inner.n, inner.stride};
      dims.erase(dims.begin() + static_cast<std::ptrdiff_t>(d));
    }
  }
  std::int64_t run = 1;
  if (!dims.empty() && dims.back().stride == 1) {
    run = dims.back().n;
    dims.pop_back();
  }
  i128 count = 1;
  for (const auto& x : dims) count = std::min<i128>(count * x.n, static_cast<i128>(max_canonical_ranges) + 1);
  if (count > static_cast<i128>(budget)) {
    return fail(errc::invalid_argument, "cannot register view: " + what + " covers more than " +
                                            std::to_string(max_canonical_ranges) + " separate canonical ranges");
  }
  budget -= static_cast<std::uint64_t>(count);
  const std::uint64_t run_bytes = static_cast<std::uint64_t>(run) * es;
  std::vector<std::int64_t> idx(dims.size(), 0);
  std::int64_t off = base;
  for (i128 k = 0; k < count; ++k) {
    out.push_back({origin + static_cast<std::uint64_t>(off) * es, run_bytes});
    for (std::size_t d = dims.size(); d-- > 0;) {
      off += dims[d].stride;
      if (++idx[d] < dims[d].n) break;
      off -= dims[d].n * dims[d].stride;
      idx[d] = 0;
    }
  }
  return {};
}

// The [min, max] element offsets of {base + Σ i_d s_d}; nullopt for an empty set. Saturates
// at ±2^120 (far past any buffer), so a hostile shape cannot overflow the sums.
std::optional<std::pair<i128, i128>> element_span(i128 base, std::span<const std::int64_t> shape,
                                                  std::span<const std::int64_t> stride) {
  constexpr i128 limit = static_cast<i128>(1) << 120;
  i128 lo = base;
  i128 hi = base;
  for (std::size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 0) return std::nullopt;
  }
  for (std::size_t d = 0; d < shape.size(); ++d) {
    const i128 reach = static_cast<i128>(shape[d] - 1) * stride[d];
    (reach < 0 ? lo : hi) += reach;
    lo = std::max(lo, -limit);
    hi = std::min(hi, limit);
  }
  return std::pair{lo, hi};
}

// The walk form of a view tensor (see view_tensor::walk_shape).
void make_walk(view_tensor& t) {
  std::vector<dim> dims;
  for (std::size_t d = 0; d < t.shape.size(); ++d) {
    if (t.shape[d] != 1) dims.push_back({t.shape[d], t.canonical_stride[d]});
  }
  for (std::size_t d = dims.size(); d-- > 1;) {
    auto& outer = dims[d - 1];
    const auto& inner = dims[d];
    if (static_cast<i128>(outer.stride) == static_cast<i128>(inner.n) * inner.stride) {
      outer = dim{outer.n * inner.n, inner.stride};
      dims.erase(dims.begin() + static_cast<std::ptrdiff_t>(d));
    }
  }
  if (dims.empty()) dims.push_back({1, 1});
  t.walk_shape.clear();
  t.walk_stride.clear();
  for (const auto& x : dims) {
    t.walk_shape.push_back(x.n);
    t.walk_stride.push_back(x.stride);
  }
}

// The canonical bytes of one canonical tensor; its whole storage when its elements cannot be
// enumerated (an unknown dtype, dims out of range, too many runs).
std::vector<byte_range> required_of(const index::entry& e) {
  std::vector<byte_range> out;
  const auto es = index::element_size(e.dtype);
  const bool shaped = e.shape.size() == e.stride.size() &&
                      std::all_of(e.shape.begin(), e.shape.end(), [](std::int64_t n) { return n >= 0; });
  if (es && shaped) {
    auto span = element_span(e.storage_offset, e.shape, e.stride);
    if (!span) return out;
    if (span->first >= 0 && (span->second + 1) * *es <= static_cast<i128>(e.size)) {
      std::uint64_t budget = max_canonical_ranges;
      if (append_coverage(out, e.offset, e.storage_offset, e.shape, e.stride, *es, budget, "")) return out;
      out.clear();
    }
  }
  if (e.size != 0) out.push_back({e.offset, e.size});
  return out;
}

// Normalizes one tensor's ops into `t` (shape, strides, base) and appends them to `normalized`.
status apply_ops(const index::entry& e, std::uint32_t es, const std::vector<identity::view_op>& ops, view_tensor& t,
                 std::vector<identity::view_op>& normalized) {
  const auto what = "tensor " + quoted(e.name);
  std::size_t narrows = 0;
  std::size_t transposes = 0;
  for (const auto& op : ops) (std::holds_alternative<identity::narrow_op>(op) ? narrows : transposes)++;
  if (narrows > 1) {
    return tl::unexpected(invalid(what + " has " + std::to_string(narrows) + " narrow ops; at most one is allowed"));
  }
  if (narrows != 0 && transposes != 0) return tl::unexpected(invalid(what + " mixes narrow and transpose ops"));
  const auto rank = e.shape.size();
  t.shape = e.shape;
  t.canonical_stride = e.stride;
  i128 base = e.storage_offset;
  for (const auto& op : ops) {
    if (const auto* n = std::get_if<identity::narrow_op>(&op)) {
      if (n->dim >= rank) {
        return tl::unexpected(invalid(what + ": narrow dim " + std::to_string(n->dim) + " is out of range for rank " +
                                      std::to_string(rank)));
      }
      if (n->length == 0) return tl::unexpected(invalid(what + ": narrow length must be > 0"));
      const std::int64_t size = t.shape[n->dim];
      std::int64_t start = n->start;
      if (start < 0) start += size;  // counted from the end, as torch does
      if (start < 0 || start >= size) {
        return tl::unexpected(invalid(what + ": narrow start " + std::to_string(n->start) +
                                      " is out of range for dim " + std::to_string(n->dim) + " of size " +
                                      std::to_string(size)));
      }
      if (n->length > static_cast<std::uint64_t>(size - start)) {
        return tl::unexpected(invalid(what + ": narrow [" + std::to_string(start) + ", +" + std::to_string(n->length) +
                                      ") runs past dim " + std::to_string(n->dim) + " of size " +
                                      std::to_string(size)));
      }
      base += static_cast<i128>(start) * t.canonical_stride[n->dim];
      t.shape[n->dim] = static_cast<std::int64_t>(n->length);
      normalized.push_back(identity::narrow_op{n->dim, start, n->length});
    } else {
      const auto& tr = std::get<identity::transpose_op>(op);
      if (tr.dim0 == tr.dim1) {
        return tl::unexpected(invalid(what + ": transpose dims must differ, got " + std::to_string(tr.dim0) + " and " +
                                      std::to_string(tr.dim1)));
      }
      if (tr.dim0 >= rank || tr.dim1 >= rank) {
        return tl::unexpected(invalid(what + ": transpose dim " + std::to_string(std::max(tr.dim0, tr.dim1)) +
                                      " is out of range for rank " + std::to_string(rank)));
      }
      std::swap(t.shape[tr.dim0], t.shape[tr.dim1]);
      std::swap(t.canonical_stride[tr.dim0], t.canonical_stride[tr.dim1]);
      t.transposed = true;
      normalized.push_back(tr);
    }
  }
  // Every element must lie inside the tensor's storage: a hostile index or spec must not make
  // a scatter write outside it.
  auto span = element_span(base, t.shape, t.canonical_stride);
  i128 numel = 1;
  for (auto n : t.shape) numel = std::min<i128>(numel * n, static_cast<i128>(1) << 64);
  if (span && (span->first < 0 || (span->second + 1) * es > static_cast<i128>(e.size))) {
    return tl::unexpected(
        invalid(what + " reads elements outside its storage of " + std::to_string(e.size) + " bytes"));
  }
  if (numel * es > static_cast<i128>(std::numeric_limits<std::int64_t>::max())) {
    return tl::unexpected(invalid(what + " is too large"));
  }
  t.nbytes = static_cast<std::uint64_t>(numel) * es;
  // base is within [0, size / es] now (the span check).
  t.canonical_base = e.offset + (span ? static_cast<std::uint64_t>(base) * es : 0);
  return {};
}

}  // namespace

std::string_view placement_name(placement p) noexcept {
  switch (p) {
    case placement::server: return "SERVER";
    case placement::client: return "CLIENT";
    case placement::unspecified: break;
  }
  return "UNSPECIFIED";
}

std::string_view kind_name(registration_kind k) noexcept {
  switch (k) {
    case registration_kind::canonical: return "CANONICAL";
    case registration_kind::piece: return "PIECE";
    case registration_kind::unspecified: break;
  }
  return "UNSPECIFIED";
}

std::vector<byte_range> merge_ranges(std::vector<byte_range> ranges) {
  std::erase_if(ranges, [](const byte_range& r) { return r.length == 0; });
  std::sort(ranges.begin(), ranges.end(), [](const byte_range& a, const byte_range& b) { return a.offset < b.offset; });
  std::vector<byte_range> out;
  for (const auto& r : ranges) {
    if (!out.empty() && r.offset <= out.back().end()) {
      out.back().length = std::max(out.back().end(), r.end()) - out.back().offset;
    } else {
      out.push_back(r);
    }
  }
  return out;
}

std::optional<byte_range> first_gap(std::span<const byte_range> required, std::span<const byte_range> have) {
  std::size_t h = 0;
  for (const auto& r : required) {
    std::uint64_t cursor = r.offset;
    while (cursor < r.end()) {
      while (h < have.size() && have[h].end() <= cursor) ++h;
      if (h == have.size() || have[h].offset > cursor) {
        const auto gap_end = h == have.size() ? r.end() : std::min(r.end(), have[h].offset);
        return byte_range{cursor, gap_end - cursor};
      }
      cursor = have[h].end();
    }
  }
  return std::nullopt;
}

std::vector<byte_range> intersect_ranges(std::span<const byte_range> a, std::span<const byte_range> b) {
  std::vector<byte_range> out;
  std::size_t i = 0;
  std::size_t j = 0;
  while (i < a.size() && j < b.size()) {
    const auto lo = std::max(a[i].offset, b[j].offset);
    const auto hi = std::min(a[i].end(), b[j].end());
    if (lo < hi) out.push_back({lo, hi - lo});
    (a[i].end() < b[j].end() ? i : j)++;
  }
  return out;
}

std::vector<byte_range> union_ranges(std::span<const byte_range> a, std::span<const byte_range> b) {
  std::vector<byte_range> out;
  out.reserve(a.size() + b.size());
  std::size_t i = 0;
  std::size_t j = 0;
  while (i < a.size() || j < b.size()) {
    const bool from_a = j == b.size() || (i < a.size() && a[i].offset <= b[j].offset);
    const auto& r = from_a ? a[i++] : b[j++];
    if (r.length == 0) continue;
    if (!out.empty() && r.offset <= out.back().end()) {
      out.back().length = std::max(out.back().end(), r.end()) - out.back().offset;
    } else {
      out.push_back(r);
    }
  }
  return out;
}

status view_plan::check_required(const view_request& r) {
  if (r.kind != registration_kind::canonical && r.kind != registration_kind::piece) {
    return tl::unexpected(invalid("registration_kind is required (CANONICAL or PIECE), got " +
                                  std::to_string(static_cast<std::int32_t>(r.kind))));
  }
  if (r.place != placement::server && r.place != placement::client) {
    return tl::unexpected(
        invalid("placement is required (SERVER or CLIENT), got " + std::to_string(static_cast<std::int32_t>(r.place))));
  }
  if (r.spec.empty() && r.tensor_names.empty()) return tl::unexpected(invalid("set a spec or tensor_names"));
  return {};
}

result<view_plan> view_plan::create(const view_request& r, const index::canonical_index& canonical,
                                    const registration_facts& facts) {
  TENSORREG_TRY(check_required(r));
  view_plan plan;
  plan.kind_ = r.kind;
  plan.place_ = r.place;
  plan.canonical_size_ = canonical.total_size();
  // tensor_names name tensors taken as they are: the same as a spec entry without ops.
  identity::view_spec wanted = r.spec;
  std::set<std::string, std::less<>> named;
  for (const auto& name : r.tensor_names) {
    if (!named.insert(name).second) return tl::unexpected(invalid("tensor " + quoted(name) + " is named twice"));
    wanted.try_emplace(name);
  }

  std::uint64_t cursor = 0;
  std::uint64_t budget = max_canonical_ranges;
  std::vector<byte_range> covered;
  for (const auto& [name, ops] : wanted) {
    const auto* e = canonical.find(name);
    if (e == nullptr) return tl::unexpected(invalid("tensor " + quoted(name) + " is not in the canonical index"));
    const auto es = index::element_size(e->dtype);
    if (!es) {
      return tl::unexpected(invalid("tensor " + quoted(name) + " has dtype " + quoted(e->dtype) +
                                    ", whose element size is unknown (DECISIONS §5.12)"));
    }
    if (e->shape.size() != e->stride.size() ||
        std::any_of(e->shape.begin(), e->shape.end(), [](std::int64_t n) { return n < 0; })) {
      return tl::unexpected(invalid("tensor " + quoted(name) + " has a negative dim or a stride per dim missing"));
    }
    view_tensor t;
    t.name = name;
    t.dtype = e->dtype;
    t.element_size = *es;
    auto& normalized = plan.spec_[name];
    TENSORREG_TRY(apply_ops(*e, *es, ops, t, normalized));
    t.view_offset = align_up(cursor, index::canonical_alignment);
    cursor = t.view_offset + t.nbytes;
    make_walk(t);
    plan.tensors_.push_back(std::move(t));
  }
  plan.view_size_ = cursor;
  if (plan.view_size_ == 0) return tl::unexpected(invalid("the view has no bytes (every tensor is empty)"));

  plan.index_multihash_ = hash::encode_multihash(hash::sha256(canonical.json()));
  if (r.view_id.empty()) {
    auto id = identity::compute_view_id(plan.spec_, plan.index_multihash_);
    if (!id) return tl::unexpected(with_context(std::move(id).error(), "cannot register view"));
    plan.view_id_ = std::move(*id);
  } else {
    if (auto ok = identity::check_view_id(r.view_id, plan.spec_, plan.index_multihash_); !ok) {
      return tl::unexpected(with_context(std::move(ok).error(), "cannot register view"));
    }
    plan.view_id_ = r.view_id;
  }

  // Coverage: where the view's elements lie in the canonical buffer.
  covered.clear();
  for (const auto& t : plan.tensors_) {
    const auto* e = canonical.find(t.name);
    const auto base_elem = static_cast<std::int64_t>((t.canonical_base - e->offset) / t.element_size);
    TENSORREG_TRY(append_coverage(covered, e->offset, base_elem, t.shape, t.canonical_stride, t.element_size, budget,
                                  "the view"));
  }
  plan.canonical_ranges_ = merge_ranges(std::move(covered));
  for (const auto& c : plan.canonical_ranges_) plan.covered_bytes_ += c.length;
  std::vector<byte_range> required;
  for (const auto& e : canonical.entries()) {
    auto mine = required_of(e);
    required.insert(required.end(), mine.begin(), mine.end());
  }
  plan.required_ranges_ = merge_ranges(std::move(required));
  const auto gap = first_gap(plan.required_ranges_, plan.canonical_ranges_);
  plan.full_ = !gap.has_value();

  const std::uint64_t canonical_size = r.canonical_size_bytes != 0 ? r.canonical_size_bytes : canonical.total_size();
  if (plan.covered_bytes_ > canonical_size) {
    return tl::unexpected(invalid("the view covers " + std::to_string(plan.covered_bytes_) +
                                  " canonical bytes, more than canonical_size_bytes " +
                                  std::to_string(canonical_size)));
  }
  if (r.kind == registration_kind::canonical) {
    if (r.canonical_size_bytes != 0 && r.canonical_size_bytes != facts.total_size) {
      return tl::unexpected(invalid("canonical_size_bytes " + std::to_string(r.canonical_size_bytes) +
                                    " of a CANONICAL view differs from total_size " +
                                    std::to_string(facts.total_size)));
    }
    if (gap) {
      return tl::unexpected(invalid("a CANONICAL view must cover every byte of every canonical tensor; bytes [" +
                                    std::to_string(gap->offset) + ", " + std::to_string(gap->end()) +
                                    ") are not covered (register a PIECE instead)"));
    }
    if (!r.ranges.empty() && merge_ranges(r.ranges) != plan.canonical_ranges_) {
      return tl::unexpected(invalid("ranges do not match the view's canonical coverage (" +
                                    std::to_string(plan.canonical_ranges_.size()) + " merged ranges, " +
                                    std::to_string(plan.covered_bytes_) + " bytes)"));
    }
  } else {
    if (r.canonical_size_bytes == 0) return tl::unexpected(invalid("a PIECE needs canonical_size_bytes > 0"));
    if (!r.ranges.empty()) {
      return tl::unexpected(invalid("a PIECE takes no client ranges (" + std::to_string(r.ranges.size()) +
                                    " sent): the daemon computes its coverage"));
    }
    if (!facts.has_cgid) {
      return tl::unexpected(invalid("a PIECE needs a client_artifact_id (the cgid of its assembly)"));
    }
    if (facts.total_size != plan.view_size_) {
      return tl::unexpected(invalid("total_size " + std::to_string(facts.total_size) +
                                    " of a PIECE must equal its view size " + std::to_string(plan.view_size_)));
    }
    if (plan.full_) {
      return tl::unexpected(invalid("a PIECE must not cover the whole canonical buffer (register it as CANONICAL)"));
    }
  }

  std::vector<index::entry> entries;
  for (const auto& t : plan.tensors_) {
    std::vector<std::int64_t> stride(t.shape.size(), 1);
    for (std::size_t d = t.shape.size(); d-- > 1;) stride[d - 1] = stride[d] * std::max<std::int64_t>(t.shape[d], 1);
    entries.push_back(index::entry{t.name, t.view_offset, t.nbytes, t.shape, stride, t.dtype, 0});
  }
  plan.index_json_ = index::emit_canonical_json(entries);
  return plan;
}

bool view_plan::transposes() const noexcept {
  return std::any_of(tensors_.begin(), tensors_.end(), [](const view_tensor& t) { return t.transposed; });
}

std::size_t view_plan::tensor_at(std::uint64_t offset) const noexcept {
  auto it = std::upper_bound(tensors_.begin(), tensors_.end(), offset,
                             [](std::uint64_t o, const view_tensor& t) { return o < t.view_offset; });
  if (it == tensors_.begin()) return 0;
  auto prev = std::prev(it);
  if (offset < prev->view_offset + prev->nbytes) return static_cast<std::size_t>(prev - tensors_.begin());
  return static_cast<std::size_t>(it - tensors_.begin());
}

result<hash::digest> view_data_hash(const view_plan& plan, std::span<const std::byte> canonical,
                                    std::uint64_t leaf_bytes, thread_pool* pool) {
  TENSORREG_ASSERT(leaf_bytes > 0);
  const std::uint64_t size = plan.view_size();
  const std::uint64_t leaves = size / leaf_bytes + (size % leaf_bytes != 0 ? 1 : 0);
  std::vector<hash::digest> digests(leaves);
  auto one = [&](std::size_t leaf) -> status {
    constexpr std::uint64_t block = std::uint64_t{4} << 20;
    std::vector<std::byte> buffer(std::min(block, size));
    hash::sha256_hasher hasher;
    const std::uint64_t begin = leaf * leaf_bytes;
    const std::uint64_t end = std::min(size, begin + leaf_bytes);
    for (std::uint64_t at = begin; at < end; at += block) {
      const auto n = std::min(block, end - at);
      TENSORREG_TRY(gather(plan, canonical, at, std::span(buffer).first(n)));
      hasher.update(std::span<const std::byte>(buffer).first(n));
    }
    digests[leaf] = hasher.finish();
    return {};
  };
  if (pool != nullptr) {
    TENSORREG_TRY(pool->parallel_for(leaves, one));
  } else {
    for (std::size_t i = 0; i < leaves; ++i) TENSORREG_TRY(one(i));
  }
  return hash::tree_root(digests);
}

}  // namespace tensorreg::views
