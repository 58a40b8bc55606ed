// tensorreg/index/safetensors.hpp — reading .safetensors headers and laying their tensors out
// as one canonical buffer (registration.md §2.4, safetensors ingestion).
//
// A .safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the
// data section. This header provides:
//   - parse_safetensors_header(): the header from bytes already in memory (tests, fuzzing);
//   - read_safetensors_header(): the header of a file, read with plain POSIX I/O; only the
//     8 + N header bytes are read, and N is checked against the file size and a 100 MiB limit
//     before anything is allocated;
//   - coalesce(): the tensors of several files laid out in one canonical buffer (names in byte
//     order, each at an 8-byte-aligned offset, row-major strides, storage_offset 0), plus where
//     each tensor's bytes lie in its file, so callers can assemble the canonical bytes.
// Dtypes map as dtype.hpp says (DECISIONS §5.18).
//
// Thread-safety: the functions share no state and may run concurrently.
// Ownership: results are plain values that own their strings; nothing keeps a file open.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tensorreg/common/error.hpp"
#include "tensorreg/index/canonical_index.hpp"

namespace tensorreg::index {

/// Largest header JSON accepted, as the safetensors format itself limits it.
inline constexpr std::uint64_t safetensors_max_header_bytes = std::uint64_t{100} << 20;

/// One tensor of a safetensors header.
struct safetensors_tensor {
  std::string name;
  std::string dtype;             ///< as the file writes it ("F32")
  std::string_view torch_dtype;  ///< "torch.float32"; static storage
  std::uint32_t element_size = 0;
  std::vector<std::int64_t> shape;  ///< every dimension >= 0
  std::uint64_t data_begin = 0;     ///< relative to the data section
  std::uint64_t data_end = 0;       ///< data_end - data_begin == product(shape) * element_size

  friend bool operator==(const safetensors_tensor&, const safetensors_tensor&) = default;
};

/// A validated safetensors header.
struct safetensors_header {
  std::uint64_t header_bytes = 0;                             ///< N
  std::uint64_t data_offset = 0;                              ///< 8 + N: where the data section starts in the file
  std::uint64_t data_size = 0;                                ///< file size - data_offset
  std::vector<safetensors_tensor> tensors;                    ///< sorted by the bytes of their names
  std::vector<std::pair<std::string, std::string>> metadata;  ///< "__metadata__", sorted by key
};

/// Parses the header of a safetensors file of `file_size` bytes whose first bytes are
/// `prefix` (at least 8 + N of them; more are ignored). `label` names the file in messages.
/// Checks: N <= 100 MiB and N <= file_size - 8 before anything is allocated; the header is a
/// JSON object; "__metadata__", if present, maps strings to strings; every other key is a
/// tensor {"dtype", "shape", "data_offsets": [begin, end]} with a name that is not empty, does
/// not start with '.' and holds no '/' or '\'; its dtype is in the map; its shape holds
/// integers in [0, 2^63); begin <= end <= data size; end - begin == product(shape) × element
/// size; no two tensors share a byte of the data section; no name appears twice. Unknown keys
/// inside a tensor object are ignored, as the safetensors reference reader does.
/// Errors: INVALID_ARGUMENT for each rule above, naming the file, the tensor and the field.
[[nodiscard]] result<safetensors_header> parse_safetensors_header(std::span<const std::byte> prefix,
                                                                  std::uint64_t file_size, std::string_view label);

/// parse_safetensors_header() over a whole file held in memory. Errors: as that one.
[[nodiscard]] result<safetensors_header> parse_safetensors_header(std::span<const std::byte> file,
                                                                  std::string_view label);

/// A file's path and its parsed header.
struct safetensors_file {
  std::string path;
  safetensors_header header;
};

/// Reads and parses the header of the file at `path` (plain POSIX I/O; reads only the header).
/// Errors: NOT_FOUND when the file does not exist; PERMISSION_DENIED when it cannot be opened
/// for reading; INVALID_ARGUMENT when it is not a regular file or its header breaks a rule of
/// parse_safetensors_header(); DATA_LOSS when the file shrinks while being read; UNAVAILABLE
/// for other I/O errors (the message carries strerror).
[[nodiscard]] result<safetensors_file> read_safetensors_header(const std::string& path);

/// Where one tensor of a coalesced layout comes from and goes to.
struct tensor_placement {
  std::size_t file_index = 0;          ///< position in coalesce()'s `files`
  std::uint64_t file_offset = 0;       ///< absolute offset of the tensor's bytes in that file
  std::uint64_t length = 0;            ///< bytes to copy
  std::uint64_t canonical_offset = 0;  ///< where they go in the canonical buffer

  friend bool operator==(const tensor_placement&, const tensor_placement&) = default;
};

/// The tensors of several safetensors files as one artifact.
struct coalesced_safetensors {
  canonical_index index;
  std::vector<tensor_placement> placements;  ///< parallel to index.entries()
};

/// Lays the tensors of `files` out as one canonical buffer. Files are taken in filename order
/// (then full path), which decides which file a duplicate is reported against; the layout
/// itself depends only on tensor names. Each tensor is its own storage: dtype via the map,
/// row-major contiguous strides (as torch computes them: a zero-sized dimension counts as 1),
/// storage_offset 0, size = its bytes.
/// REQUIRES: each header came from parse_safetensors_header() or read_safetensors_header().
/// Errors: INVALID_ARGUMENT for no tensors at all ("empty tensor dict"), a tensor name found in
/// two files (naming both), a shape whose row-major strides do not fit in int64, or a layout
/// with total_size 0 (every tensor empty).
[[nodiscard]] result<coalesced_safetensors> coalesce(std::span<const safetensors_file> files);

}  // namespace tensorreg::index
