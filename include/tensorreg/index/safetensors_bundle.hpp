// tensorreg/index/safetensors_bundle.hpp — one or more .safetensors files seen as one artifact.
//
// `safetensors_bundle` maps the files read-only, lays their tensors out as one canonical
// buffer (safetensors.hpp's coalesce()) and exposes that buffer as a byte_source whose pieces
// come straight from the mappings (PAD reads as zero), so the artifact is hashed or copied
// with no intermediate copy.
//
// Thread-safety: immutable after open(); concurrent reads are safe.
// Ownership: the bundle owns its mappings; canonical() is valid while the bundle lives.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "tensorreg/index/safetensors.hpp"
#include "tensorreg/memory/mapped_file.hpp"
#include "tensorreg/memory/segmented_view.hpp"

namespace tensorreg::index {

class safetensors_bundle {
 public:
  /// Opens, maps and lays out `paths`.
  /// Errors: as read_safetensors_header(), mapped_file::open() and coalesce().
  [[nodiscard]] static result<std::unique_ptr<safetensors_bundle>> open(const std::vector<std::string>& paths);

  [[nodiscard]] const canonical_index& index() const noexcept { return layout_.index; }
  [[nodiscard]] const std::vector<tensor_placement>& placements() const noexcept { return layout_.placements; }
  /// The canonical buffer [0, index().total_size()).
  [[nodiscard]] const memory::byte_source& canonical() const noexcept { return *canonical_; }

 private:
  safetensors_bundle(coalesced_safetensors layout, std::vector<memory::mapped_file> files)
      : layout_(std::move(layout)), files_(std::move(files)) {}

  coalesced_safetensors layout_;
  std::vector<memory::mapped_file> files_;
  std::unique_ptr<memory::segmented_view> canonical_;
};

}  // namespace tensorreg::index
