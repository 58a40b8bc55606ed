// tensorreg/views/view_plan.hpp — a view over a canonical artifact, normalized (registration.md §7).
//
// Provides `view_request` (the library mirror of ViewRegistrationOptions), `view_plan` (a
// request normalized against a canonical index: every rule of §7 checked, the view layout,
// where each view element lies in the canonical buffer, the canonical coverage and the view's
// own index), and `view_data_hash` (the tree hash of the view bytes, §3.6).
//
// A view is a set of canonical tensors, each narrowed once or transposed any number of times,
// laid out one after the other: names in byte order, each at an 8-byte-aligned view offset,
// each linearized row-major in its view shape. Element i of view tensor t lies at canonical
// byte `t.canonical_base + (Σ_d i_d · t.canonical_stride[d]) · t.element_size`.
//
// Scatter (view bytes → canonical buffer) and gather (canonical → view bytes) are in
// tensorreg/views/scatter.hpp.
//
// Thread-safety: a view_plan is immutable after create(); const access from any number of
// threads is safe. Ownership: values own everything; a plan keeps no reference to the index it
// was made from.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tensorreg/common/error.hpp"
#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/identity/view_id.hpp"
#include "tensorreg/index/canonical_index.hpp"

namespace tensorreg {
class thread_pool;
}

namespace tensorreg::views {

/// TransformPlacement: who turns view bytes into canonical bytes. Numbers as on the wire.
enum class placement : std::int32_t { unspecified = 0, server = 1, client = 2 };

/// ViewRegistrationKind. Numbers as on the wire.
enum class registration_kind : std::int32_t { unspecified = 0, canonical = 1, piece = 2 };

/// "SERVER", "CLIENT", "UNSPECIFIED" / "CANONICAL", "PIECE", "UNSPECIFIED".
[[nodiscard]] std::string_view placement_name(placement p) noexcept;
[[nodiscard]] std::string_view kind_name(registration_kind k) noexcept;

/// CanonicalRange: [offset, offset + length) of a buffer.
struct byte_range {
  std::uint64_t offset = 0;
  std::uint64_t length = 0;

  [[nodiscard]] std::uint64_t end() const noexcept { return offset + length; }
  friend bool operator==(const byte_range&, const byte_range&) = default;
};

/// ViewRegistrationOptions (registration.md §1.7).
struct view_request {
  std::string view_id;  ///< empty = computed; else checked against the spec
  identity::view_spec spec;
  /// Tensors of the view without ops; an alternative to (or completion of) `spec`.
  std::vector<std::string> tensor_names;
  placement place = placement::unspecified;
  std::uint64_t canonical_size_bytes = 0;  ///< 0 = the Begin's total_size (CANONICAL only)
  std::vector<byte_range> ranges;          ///< the client's coverage, checked when given
  registration_kind kind = registration_kind::unspecified;
  /// SERVER: the view bytes come through a staging memfd the daemon hands out, not as chunks.
  bool staging_memfd = false;
};

/// What the Begin that carries the view says besides it.
struct registration_facts {
  std::uint64_t total_size = 0;  ///< Begin's total_size
  bool has_cgid = false;         ///< Begin carries a client_artifact_id
};

/// One tensor of the view.
struct view_tensor {
  std::string name;  ///< the canonical tensor's name
  std::string dtype;
  std::uint32_t element_size = 0;
  std::vector<std::int64_t> shape;             ///< view shape
  std::vector<std::int64_t> canonical_stride;  ///< per view dim, in elements of the canonical buffer
  std::uint64_t canonical_base = 0;            ///< canonical byte of view element 0
  std::uint64_t view_offset = 0;               ///< 8-byte aligned
  std::uint64_t nbytes = 0;                    ///< elements × element_size
  bool transposed = false;                     ///< any transpose op (the CPU transposes it)
  /// The shape and strides the copy loops walk: dims of size 1 dropped, dims that continue
  /// each other in both buffers merged; at least one dim.
  std::vector<std::int64_t> walk_shape;
  std::vector<std::int64_t> walk_stride;
};

/// Most merged canonical ranges one view may cover; beyond, INVALID_ARGUMENT (a hostile spec
/// could otherwise make the daemon enumerate billions of one-element ranges).
inline constexpr std::uint64_t max_canonical_ranges = std::uint64_t{1} << 24;

/// Leaf size of view_data_hash: GetServerConfig's artifact_chunk_bytes (registration.md §3.6).
inline constexpr std::uint64_t view_hash_leaf_bytes = std::uint64_t{256} << 20;

class view_plan {
 public:
  /// Normalizes `request` against `canonical` (registration.md §7), in this order, each
  /// INVALID_ARGUMENT "cannot register view: …" naming the value: registration_kind and
  /// placement set; a spec or tensor_names; no name twice in tensor_names; every tensor in the
  /// index, of a known dtype (DECISIONS §5.12), with non-negative dims; per tensor at most one
  /// narrow, no narrow with transpose, transpose dims distinct and below the rank, narrow dim
  /// below the rank, length > 0, a negative start counted from the end, [start, +length)
  /// inside the dim; every element inside its storage; a view of at least one byte; the view_id
  /// (computed over the normalized spec, or checked: "view_id does not match view spec");
  /// the coverage (at most max_canonical_ranges ranges, at most canonical_size_bytes bytes),
  /// then the kind's rules:
  ///   CANONICAL: canonical_size_bytes 0 or the Begin's total_size; every byte of every
  ///   canonical tensor covered; client ranges, when given, equal to the coverage.
  ///   PIECE: canonical_size_bytes > 0; no client ranges; a cgid; total_size = the view size;
  ///   not every canonical tensor byte covered.
  /// REQUIRES: canonical.total_size() is the canonical buffer's size (for a PIECE,
  /// canonical_size_bytes).
  [[nodiscard]] static result<view_plan> create(const view_request& request, const index::canonical_index& canonical,
                                                const registration_facts& facts);

  /// The first checks of create(), which need no index: registration_kind and placement set, a
  /// spec or tensor_names. Errors: INVALID_ARGUMENT as create().
  [[nodiscard]] static status check_required(const view_request& request);

  [[nodiscard]] const std::string& view_id() const noexcept { return view_id_; }
  /// The normalized spec (negative starts counted from the end; tensor_names as tensors with
  /// no ops): what the view_id is computed over.
  [[nodiscard]] const identity::view_spec& spec() const noexcept { return spec_; }
  [[nodiscard]] registration_kind kind() const noexcept { return kind_; }
  [[nodiscard]] placement place() const noexcept { return place_; }
  /// By name, in byte order; view offsets increase.
  [[nodiscard]] const std::vector<view_tensor>& tensors() const noexcept { return tensors_; }
  /// Bytes of the linearized view: the end of its last tensor.
  [[nodiscard]] std::uint64_t view_size() const noexcept { return view_size_; }
  [[nodiscard]] std::uint64_t canonical_size() const noexcept { return canonical_size_; }
  /// The canonical bytes the view's elements occupy, merged and sorted.
  [[nodiscard]] const std::vector<byte_range>& canonical_ranges() const noexcept { return canonical_ranges_; }
  /// Sum of canonical_ranges' lengths.
  [[nodiscard]] std::uint64_t covered_bytes() const noexcept { return covered_bytes_; }
  /// The canonical bytes every canonical tensor occupies (merged): what a view, or the pieces
  /// of an assembly together, must cover for the canonical buffer to be complete.
  [[nodiscard]] const std::vector<byte_range>& required_ranges() const noexcept { return required_ranges_; }
  /// Whether canonical_ranges covers required_ranges.
  [[nodiscard]] bool full_coverage() const noexcept { return full_; }
  /// The view tensors' own v3 index (offset = view offset, row-major strides, storage_offset 0),
  /// written by the canonical emitter (DECISIONS §5.13).
  [[nodiscard]] const std::string& index_json() const noexcept { return index_json_; }
  /// The canonical index's multihash (the view_id's suffix).
  [[nodiscard]] const std::string& index_multihash() const noexcept { return index_multihash_; }
  /// Whether any tensor is transposed.
  [[nodiscard]] bool transposes() const noexcept;
  /// The tensor whose bytes contain view byte `offset`, or the first one after it (PAD);
  /// tensors().size() when past the last. Errors: none.
  [[nodiscard]] std::size_t tensor_at(std::uint64_t offset) const noexcept;

 private:
  view_plan() = default;

  std::string view_id_;
  identity::view_spec spec_;
  registration_kind kind_ = registration_kind::unspecified;
  placement place_ = placement::unspecified;
  std::vector<view_tensor> tensors_;
  std::uint64_t view_size_ = 0;
  std::uint64_t canonical_size_ = 0;
  std::vector<byte_range> canonical_ranges_;
  std::uint64_t covered_bytes_ = 0;
  std::vector<byte_range> required_ranges_;
  bool full_ = false;
  std::string index_json_;
  std::string index_multihash_;
};

/// Sorts and merges `ranges` (overlapping or touching ranges become one); empty ones dropped.
[[nodiscard]] std::vector<byte_range> merge_ranges(std::vector<byte_range> ranges);

/// The first byte range of `required` that `have` (both merged) does not cover; nullopt when
/// all is covered. Errors: none.
[[nodiscard]] std::optional<byte_range> first_gap(std::span<const byte_range> required,
                                                  std::span<const byte_range> have);

/// The ranges of `a` that `b` also covers (both merged). Errors: none.
[[nodiscard]] std::vector<byte_range> intersect_ranges(std::span<const byte_range> a, std::span<const byte_range> b);

/// The bytes `a` or `b` covers (both merged), merged: merge_ranges of both, in one linear pass
/// instead of a sort. Errors: none.
[[nodiscard]] std::vector<byte_range> union_ranges(std::span<const byte_range> a, std::span<const byte_range> b);

/// The tree hash of the view bytes (PAD between tensors as zero) read from `canonical`:
/// SHA-256 leaves of `leaf_bytes` (the last may be short), a binary tree whose odd last node
/// is promoted, as registration.md §3.3 but with its own leaf size (§3.6). Leaves are hashed
/// over `pool` (null: the calling thread).
/// REQUIRES: canonical.size() >= plan.canonical_size(), leaf_bytes > 0.
/// Errors: the pool's.
[[nodiscard]] result<hash::digest> view_data_hash(const view_plan& plan, std::span<const std::byte> canonical,
                                                  std::uint64_t leaf_bytes = view_hash_leaf_bytes,
                                                  thread_pool* pool = nullptr);

}  // namespace tensorreg::views
