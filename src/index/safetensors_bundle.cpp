#include "tensorreg/index/safetensors_bundle.hpp"

#include <algorithm>

namespace tensorreg::index {

result<std::unique_ptr<safetensors_bundle>> safetensors_bundle::open(const std::vector<std::string>& paths) {
  std::vector<safetensors_file> headers;
  std::vector<memory::mapped_file> files;
  headers.reserve(paths.size());
  files.reserve(paths.size());
  for (const auto& path : paths) {
    TENSORREG_TRY_ASSIGN(auto header, read_safetensors_header(path));
    TENSORREG_TRY_ASSIGN(auto mapped, memory::mapped_file::open(path));
    if (mapped.size() != header.header.data_offset + header.header.data_size) {
      return fail(errc::data_loss, "cannot open '" + path + "': it changed size while being opened");
    }
    headers.push_back(std::move(header));
    files.push_back(std::move(mapped));
  }
  TENSORREG_TRY_ASSIGN(auto layout, coalesce(headers));
  std::unique_ptr<safetensors_bundle> bundle(new safetensors_bundle(std::move(layout), std::move(files)));
  std::vector<memory::segment> segments;
  segments.reserve(bundle->layout_.placements.size());
  for (const auto& p : bundle->layout_.placements) {
    // Aliases (tied weights) place the same bytes at the same offset: one segment serves all.
    const bool alias = std::any_of(segments.begin(), segments.end(), [&](const memory::segment& s) {
      return s.offset == p.canonical_offset && s.length == p.length;
    });
    if (alias) continue;
    segments.push_back({p.canonical_offset, p.length, &bundle->files_[p.file_index], p.file_offset});
  }
  TENSORREG_TRY_ASSIGN(auto view,
                       memory::segmented_view::create(bundle->layout_.index.total_size(), std::move(segments)));
  bundle->canonical_ = std::make_unique<memory::segmented_view>(std::move(view));
  return bundle;
}

}  // namespace tensorreg::index
