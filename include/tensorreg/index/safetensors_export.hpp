// tensorreg/index/safetensors_export.hpp — an artifact written back as a .safetensors file
// (`tensorreg export`).
//
// Provides `safetensors_export_header()` (the header a canonical index becomes) and
// `export_safetensors()` (header and tensor bytes written to a path through a temporary file,
// fsynced and renamed, so a reader never sees half a file). Each tensor's bytes are copied out
// of the canonical buffer contiguously, in name order; aliases become separate copies, as the
// format allows no shared bytes. An artifact made from safetensors files (each tensor its own
// storage, row-major, storage_offset 0) exports to a file whose `tensorreg index` is the same
// mi2 id.
//
// Thread-safety: the functions share no state. Ownership: nothing is kept after a call.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "tensorreg/common/error.hpp"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/memory/byte_source.hpp"

namespace tensorreg::index {

/// The safetensors header (8-byte length + JSON padded with spaces to 8 bytes) of `index`, and
/// where each entry's bytes go in the data section.
/// Errors: FAILED_PRECONDITION naming the tensor for a dtype safetensors has no name for, or a
/// tensor that is not row-major contiguous, or one that does not lie inside its storage.
[[nodiscard]] result<std::string> safetensors_export_header(const canonical_index& index);

/// Writes `bytes` (the canonical buffer of `index`) as a safetensors file at `path`, through
/// `path` + ".tmp-<random>" and a rename; a `path` that exists and is no regular file
/// (/dev/null, a FIFO) is written into directly instead. Errors: as safetensors_export_header();
/// INVALID_ARGUMENT (bytes of another size; a directory); UNAVAILABLE / RESOURCE_EXHAUSTED (I/O,
/// naming the file); the source's read errors.
/// `progress`, when given, is called after each piece is written (bytes written, file size).
[[nodiscard]] status export_safetensors(const canonical_index& index, const memory::byte_source& bytes,
                                        const std::string& path,
                                        const std::function<void(std::uint64_t, std::uint64_t)>& progress = {});

}  // namespace tensorreg::index
