#include "tensorreg/views/scatter.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace tensorreg::views {
namespace {

// Rows of a transposed tile: T·ES ≈ 128 bytes, so a tile (T² elements, ≤ 16 KiB) sits in L1
// and each of its rows in both buffers is one or two cache lines.
template <std::size_t ES>
constexpr std::int64_t tile = std::max<std::int64_t>(16, 128 / static_cast<std::int64_t>(ES));

// Transposes `rows` × `cols` ES-byte elements one at a time: dst row j = src column j.
template <std::size_t ES>
void transpose_elements(const std::byte* src, std::size_t src_stride, std::byte* dst, std::size_t dst_stride,
                        std::size_t rows, std::size_t cols) {
  for (std::size_t i = 0; i < rows; ++i) {
    for (std::size_t j = 0; j < cols; ++j) {
      std::memcpy(dst + j * dst_stride + i * ES, src + i * src_stride + j * ES, ES);
    }
  }
}

// Transposes a B×B block of ES-byte elements, B = 16 / ES (one 16-byte register per row):
// dst row j = src column j. log2(B) rounds of interleaving row i with row i + B/2 at the
// element's own width turn rows into columns (a perfect shuffle per round).
template <std::size_t ES>
void transpose_block(const std::byte* src, std::size_t src_stride, std::byte* dst, std::size_t dst_stride) {
  constexpr std::size_t B = 16 / ES;
#if defined(__SSE2__)
  auto lo = [](__m128i a, __m128i b) {
    if constexpr (ES == 1) return _mm_unpacklo_epi8(a, b);
    if constexpr (ES == 2) return _mm_unpacklo_epi16(a, b);
    if constexpr (ES == 4) return _mm_unpacklo_epi32(a, b);
    if constexpr (ES == 8) return _mm_unpacklo_epi64(a, b);
  };
  auto hi = [](__m128i a, __m128i b) {
    if constexpr (ES == 1) return _mm_unpackhi_epi8(a, b);
    if constexpr (ES == 2) return _mm_unpackhi_epi16(a, b);
    if constexpr (ES == 4) return _mm_unpackhi_epi32(a, b);
    if constexpr (ES == 8) return _mm_unpackhi_epi64(a, b);
  };
  __m128i r[B];
  for (std::size_t i = 0; i < B; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * src_stride));
  for (std::size_t round = 1; round < B; round *= 2) {
    __m128i o[B];
    for (std::size_t i = 0; i < B / 2; ++i) {
      o[2 * i] = lo(r[i], r[i + B / 2]);
      o[2 * i + 1] = hi(r[i], r[i + B / 2]);
    }
    std::copy(o, o + B, r);
  }
  for (std::size_t i = 0; i < B; ++i) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i * dst_stride), r[i]);
#else
  transpose_elements<ES>(src, src_stride, dst, dst_stride, B, B);
#endif
}

// The canonical element offset (relative to element 0) of view element `e`.
std::int64_t offset_of(const view_tensor& t, std::uint64_t e) {
  std::int64_t off = 0;
  for (std::size_t d = t.walk_shape.size(); d-- > 0;) {
    const auto n = static_cast<std::uint64_t>(t.walk_shape[d]);
    off += static_cast<std::int64_t>(e % n) * t.walk_stride[d];
    e /= n;
  }
  return off;
}

// The odometer over a tensor's walk dims: idx, and `off` = Σ idx_d · stride_d.
struct cursor {
  const view_tensor& t;
  std::vector<std::int64_t> idx;
  std::int64_t off = 0;

  cursor(const view_tensor& tensor, std::uint64_t e) : t(tensor), idx(tensor.walk_shape.size()) {
    for (std::size_t d = idx.size(); d-- > 0;) {
      const auto n = static_cast<std::uint64_t>(t.walk_shape[d]);
      idx[d] = static_cast<std::int64_t>(e % n);
      off += idx[d] * t.walk_stride[d];
      e /= n;
    }
  }
  // From column `idx.back()` of a row to column 0 of the next row.
  void next_row() {
    const auto last = idx.size() - 1;
    off -= idx[last] * t.walk_stride[last];
    idx[last] = 0;
    for (std::size_t d = last; d-- > 0;) {
      off += t.walk_stride[d];
      if (++idx[d] < t.walk_shape[d]) return;
      off -= t.walk_shape[d] * t.walk_stride[d];
      idx[d] = 0;
    }
  }
};

// Walks view elements [e0, e1) of `t`, whose view bytes start at `view`, calling
// op(view_ptr, canonical_element_offset, bytes) once per run that is contiguous in both
// buffers: a whole row slice when the innermost dim is contiguous in the canonical buffer,
// else one element at a time, in L1-sized tiles over the two innermost dims.
// Staged (scatter only): where the canonical side is contiguous along the second innermost dim,
// a tile is first transposed from the view into a small buffer (whole tiles in register-sized
// blocks, see transpose_block), then written to the canonical buffer one contiguous line per
// column: no strided reads of the view, whose rows are often a power of two apart and would
// evict each other from the cache within a tile.
template <std::size_t ES, bool Staged, typename View, typename Op>
void walk_elements(const view_tensor& t, std::uint64_t e0, std::uint64_t e1, View* view, Op&& op) {
  const std::size_t rank = t.walk_shape.size();
  const std::int64_t q_len = t.walk_shape[rank - 1];
  const std::int64_t sq = t.walk_stride[rank - 1];
  cursor c(t, e0);
  std::uint64_t e = e0;
  if (sq == 1) {
    while (e < e1) {
      const auto j = c.idx[rank - 1];
      const auto n = std::min<std::uint64_t>(static_cast<std::uint64_t>(q_len - j), e1 - e);
      op(view, c.off, n * ES);
      view += n * ES;
      e += n;
      if (e < e1) c.next_row();
    }
    return;
  }
  auto one_by_one = [&](std::uint64_t count) {
    for (std::uint64_t k = 0; k < count; ++k) {
      op(view, c.off, ES);
      view += ES;
      c.off += sq;
      ++c.idx[rank - 1];
    }
    e += count;
  };
  if (rank == 1) {
    one_by_one(e1 - e);
    return;
  }
  // Head: the rest of the row the range starts in.
  if (c.idx[rank - 1] != 0) {
    const auto n = std::min<std::uint64_t>(static_cast<std::uint64_t>(q_len - c.idx[rank - 1]), e1 - e);
    one_by_one(n);
    if (e == e1) return;
    c.next_row();
  }
  // Whole rows: each run of rows consecutive along the second innermost dim (the others fixed)
  // is copied in T×T tiles, the tiles of one column band (T columns of every row of the run)
  // one after the other: in the canonical buffer that writes (or reads) T lines of whole-run
  // length, a few pages, instead of revisiting every page of the run once per row block.
  const std::int64_t p_len = t.walk_shape[rank - 2];
  const std::int64_t sp = t.walk_stride[rank - 2];
  constexpr std::int64_t T = tile<ES>;
  std::uint64_t rows = (e1 - e) / static_cast<std::uint64_t>(q_len);
  while (rows > 0) {
    const auto run =
        static_cast<std::int64_t>(std::min<std::uint64_t>(static_cast<std::uint64_t>(p_len - c.idx[rank - 2]), rows));
    for (std::int64_t jt = 0; jt < q_len; jt += T) {
      const std::int64_t jn = std::min(T, q_len - jt);
      for (std::int64_t kt = 0; kt < run; kt += T) {
        const std::int64_t kn = std::min(T, run - kt);
        if constexpr (Staged) {
          if (sp == 1) {
            alignas(64) std::byte staged[static_cast<std::size_t>(T * T) * ES];
            const View* corner = view + static_cast<std::uint64_t>(kt * q_len + jt) * ES;
            const auto row_bytes = static_cast<std::size_t>(q_len) * ES;
            if (kn == T && jn == T) {
              constexpr std::int64_t B = 16 / ES;
              for (std::int64_t k = 0; k < T; k += B) {
                for (std::int64_t j = 0; j < T; j += B) {
                  transpose_block<ES>(
                      corner + static_cast<std::size_t>(k) * row_bytes + static_cast<std::size_t>(j) * ES, row_bytes,
                      staged + static_cast<std::size_t>(j * T + k) * ES, T * ES);
                }
              }
            } else {
              transpose_elements<ES>(corner, row_bytes, staged, T * ES, static_cast<std::size_t>(kn),
                                     static_cast<std::size_t>(jn));
            }
            for (std::int64_t j = 0; j < jn; ++j) {
              op(staged + static_cast<std::size_t>(j * T) * ES, c.off + kt + (jt + j) * sq,
                 static_cast<std::uint64_t>(kn) * ES);
            }
            continue;
          }
        }
        for (std::int64_t j = jt; j < jt + jn; ++j) {
          for (std::int64_t k = kt; k < kt + kn; ++k) {
            op(view + static_cast<std::uint64_t>(k * q_len + j) * ES, c.off + k * sp + j * sq, ES);
          }
        }
      }
    }
    const auto done = static_cast<std::uint64_t>(run * q_len);
    view += done * ES;
    e += done;
    rows -= static_cast<std::uint64_t>(run);
    for (std::int64_t k = 0; k < run; ++k) c.next_row();
  }
  // Tail: the start of the row the range ends in.
  if (e < e1) one_by_one(e1 - e);
}

template <bool Staged, typename View, typename Op>
void walk_dispatch(const view_tensor& t, std::uint64_t e0, std::uint64_t e1, View* view, Op&& op) {
  switch (t.element_size) {
    case 1: walk_elements<1, Staged>(t, e0, e1, view, op); return;
    case 2: walk_elements<2, Staged>(t, e0, e1, view, op); return;
    case 4: walk_elements<4, Staged>(t, e0, e1, view, op); return;
    case 8: walk_elements<8, Staged>(t, e0, e1, view, op); return;
    default: TENSORREG_ASSERT(false && "element sizes are 1, 2, 4 or 8");
  }
}

// Walks view bytes [a, b) of tensor `t` (offsets inside the tensor), `view` pointing at byte a:
// partial elements at either end byte by byte, whole ones through walk_dispatch.
// op(view_ptr, canonical byte offset relative to t.canonical_base, bytes).
template <bool Staged = false, typename View, typename Op>
void walk_bytes(const view_tensor& t, std::uint64_t a, std::uint64_t b, View* view, Op&& op) {
  const std::uint64_t es = t.element_size;
  if (a % es != 0) {
    const auto n = std::min(es - a % es, b - a);
    op(view, offset_of(t, a / es) * static_cast<std::int64_t>(es) + static_cast<std::int64_t>(a % es), n);
    view += n;
    a += n;
  }
  if (a >= b) return;
  const auto e0 = a / es;
  const auto e1 = b / es;
  if (e1 > e0) {
    walk_dispatch<Staged>(t, e0, e1, view, [&](View* v, std::int64_t off, std::uint64_t n) {
      op(v, off * static_cast<std::int64_t>(es), n);
    });
    view += (e1 - e0) * es;
  }
  if (b % es != 0 && e1 * es >= a) op(view, offset_of(t, e1) * static_cast<std::int64_t>(es), b % es);
}

// A scatter's canonical lines are written whole and not read before the Commit hashes the
// buffer: non-temporal stores skip reading each destination line in before it is overwritten.
// scatter() fences them before it returns.
void stream_copy(std::byte* dst, const std::byte* src, std::uint64_t n) {
#if defined(__SSE2__)
  if (n >= 64) {
    const auto head = (16 - reinterpret_cast<std::uintptr_t>(dst) % 16) % 16;
    std::memcpy(dst, src, head);
    dst += head;
    src += head;
    n -= head;
    for (; n >= 16; n -= 16, dst += 16, src += 16) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    }
  }
#endif
  std::memcpy(dst, src, n);
}

status check(const view_plan& plan, std::uint64_t offset, std::uint64_t length, std::size_t canonical_size) {
  if (offset > plan.view_size() || length > plan.view_size() - offset) {
    return fail(errc::out_of_range, "cannot move view bytes [" + std::to_string(offset) + ", +" +
                                        std::to_string(length) + "): past the view size " +
                                        std::to_string(plan.view_size()));
  }
  if (canonical_size < plan.canonical_size()) {
    return fail(errc::out_of_range, "cannot move view bytes: the canonical buffer has " +
                                        std::to_string(canonical_size) + " bytes, not " +
                                        std::to_string(plan.canonical_size()));
  }
  return {};
}

// Calls f(tensor, a, b, pos) for each tensor slice [a, b) (tensor-relative) of view bytes
// [offset, offset + length), pos = its position in the range; pad(pos, n) for PAD.
template <typename F, typename Pad>
void for_each_slice(const view_plan& plan, std::uint64_t offset, std::uint64_t length, F&& f, Pad&& pad) {
  const auto end = offset + length;
  std::uint64_t at = offset;
  for (auto i = plan.tensor_at(offset); i < plan.tensors().size() && at < end; ++i) {
    const auto& t = plan.tensors()[i];
    if (t.view_offset > at) {
      const auto n = std::min(t.view_offset, end) - at;
      pad(at - offset, n);
      at += n;
      if (at >= end) break;
    }
    const auto stop = std::min(end, t.view_offset + t.nbytes);
    if (stop > at) {
      f(t, at - t.view_offset, stop - t.view_offset, at - offset);
      at = stop;
    }
  }
  if (at < end) pad(at - offset, end - at);
}

// Calls fn(lo, hi) for each part [lo, hi) of [c, c + n) that lies in `only` (merged ranges), in
// order, until fn returns false.
template <typename F>
void for_each_part_within(std::span<const byte_range> only, std::uint64_t c, std::uint64_t n, F&& fn) {
  auto it =
      std::upper_bound(only.begin(), only.end(), c, [](std::uint64_t x, const byte_range& r) { return x < r.offset; });
  if (it != only.begin()) --it;
  for (; it != only.end() && it->offset < c + n; ++it) {
    const auto lo = std::max(c, it->offset);
    const auto hi = std::min(c + n, it->end());
    if (lo < hi && !fn(lo, hi)) return;
  }
}

}  // namespace

status scatter(const view_plan& plan, std::uint64_t view_offset, std::span<const std::byte> bytes,
               std::span<std::byte> canonical) {
  TENSORREG_TRY(check(plan, view_offset, bytes.size(), canonical.size()));
  for_each_slice(
      plan, view_offset, bytes.size(),
      [&](const view_tensor& t, std::uint64_t a, std::uint64_t b, std::uint64_t pos) {
        std::byte* c0 = canonical.data() + t.canonical_base;
        walk_bytes<true>(t, a, b, bytes.data() + pos,
                         [c0](const std::byte* v, std::int64_t off, std::uint64_t n) { stream_copy(c0 + off, v, n); });
      },
      [](std::uint64_t, std::uint64_t) {});
#if defined(__SSE2__)
  _mm_sfence();
#endif
  return {};
}

status scatter_within(const view_plan& plan, std::uint64_t view_offset, std::span<const std::byte> bytes,
                      std::span<std::byte> canonical, std::span<const byte_range> only,
                      function_ref<void(std::uint64_t, std::uint64_t)> written) {
  TENSORREG_TRY(check(plan, view_offset, bytes.size(), canonical.size()));
  if (only.empty()) return {};
  std::vector<byte_range> runs;  // told once they are fenced
  for_each_slice(
      plan, view_offset, bytes.size(),
      [&](const view_tensor& t, std::uint64_t a, std::uint64_t b, std::uint64_t pos) {
        std::byte* c0 = canonical.data() + t.canonical_base;
        walk_bytes<true>(t, a, b, bytes.data() + pos, [&](const std::byte* v, std::int64_t off, std::uint64_t n) {
          const std::uint64_t c = t.canonical_base + static_cast<std::uint64_t>(off);
          for_each_part_within(only, c, n, [&](std::uint64_t lo, std::uint64_t hi) {
            stream_copy(c0 + off + static_cast<std::int64_t>(lo - c), v + (lo - c), hi - lo);
            if (!runs.empty() && runs.back().end() == lo) {
              runs.back().length += hi - lo;
            } else {
              runs.push_back({lo, hi - lo});
            }
            return true;
          });
        });
      },
      [](std::uint64_t, std::uint64_t) {});
#if defined(__SSE2__)
  _mm_sfence();
#endif
  for (const auto& r : runs) written(r.offset, r.length);
  return {};
}

status gather(const view_plan& plan, std::span<const std::byte> canonical, std::uint64_t view_offset,
              std::span<std::byte> out) {
  TENSORREG_TRY(check(plan, view_offset, out.size(), canonical.size()));
  for_each_slice(
      plan, view_offset, out.size(),
      [&](const view_tensor& t, std::uint64_t a, std::uint64_t b, std::uint64_t pos) {
        const std::byte* c0 = canonical.data() + t.canonical_base;
        walk_bytes(t, a, b, out.data() + pos,
                   [c0](std::byte* v, std::int64_t off, std::uint64_t n) { std::memcpy(v, c0 + off, n); });
      },
      [&](std::uint64_t pos, std::uint64_t n) { std::memset(out.data() + pos, 0, n); });
  return {};
}

result<std::optional<byte_pair>> compare(const view_plan& plan, std::uint64_t view_offset,
                                         std::span<const std::byte> bytes, std::span<const std::byte> canonical,
                                         std::span<const byte_range> only) {
  TENSORREG_TRY(check(plan, view_offset, bytes.size(), canonical.size()));
  std::optional<byte_pair> first;
  if (only.empty()) return first;
  for_each_slice(
      plan, view_offset, bytes.size(),
      [&](const view_tensor& t, std::uint64_t a, std::uint64_t b, std::uint64_t pos) {
        if (first) return;
        walk_bytes(t, a, b, bytes.data() + pos, [&](const std::byte* v, std::int64_t off, std::uint64_t n) {
          if (first) return;
          const std::uint64_t c = t.canonical_base + static_cast<std::uint64_t>(off);
          for_each_part_within(only, c, n, [&](std::uint64_t lo, std::uint64_t hi) {
            const std::byte* mine = v + (lo - c);
            const std::byte* theirs = canonical.data() + lo;
            if (std::memcmp(mine, theirs, hi - lo) == 0) return true;
            std::uint64_t k = 0;
            while (mine[k] == theirs[k]) ++k;
            first = byte_pair{view_offset + static_cast<std::uint64_t>(mine + k - bytes.data()), lo + k};
            return false;
          });
        });
      },
      [](std::uint64_t, std::uint64_t) {});
  return first;
}

status gathered_view::visit(std::uint64_t offset, std::uint64_t length, memory::piece_sink sink) const {
  TENSORREG_TRY(check_range(offset, length));
  constexpr std::uint64_t block = std::uint64_t{1} << 20;
  std::vector<std::byte> buffer(std::min(block, length));
  for (std::uint64_t at = 0; at < length; at += block) {
    const auto n = std::min(block, length - at);
    auto piece = std::span(buffer).first(n);
    TENSORREG_TRY(gather(*plan_, canonical_, offset + at, piece));
    TENSORREG_TRY(sink(piece));
  }
  return {};
}

}  // namespace tensorreg::views
