// fuzz/safetensors_fuzz.cpp — parse_safetensors_header over an arbitrary file image.
//
// The input is a whole .safetensors file (8-byte length, header JSON, data). An accepted
// header must keep every promise the header file makes (sorted unique names, byte ranges
// inside the data section, sizes matching shapes, no overlaps), agree with the prefix form,
// and coalesce into a canonical index that parses back to itself.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "fuzz/fuzz_check.hpp"
#include "tensorreg/index/safetensors.hpp"

namespace idx = tensorreg::index;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto file = std::as_bytes(std::span<const std::uint8_t>(data, size));
  // The prefix form with a file that claims to go on past what we hold: the header must still
  // be checked against what is there, never read beyond it.
  (void)idx::parse_safetensors_header(file, std::uint64_t{size} + 4096, "fuzz.safetensors");

  auto parsed = idx::parse_safetensors_header(file, "fuzz.safetensors");
  if (!parsed) {
    FUZZ_CHECK(parsed.error().code == tensorreg::errc::invalid_argument, parsed.error().message.c_str());
    return 0;
  }
  const auto& h = *parsed;
  FUZZ_CHECK(h.data_offset == 8 + h.header_bytes, "data_offset is not 8 + N");
  FUZZ_CHECK(h.data_offset <= size && h.data_size == size - h.data_offset, "data section outside the file");
  std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;
  for (std::size_t i = 0; i < h.tensors.size(); ++i) {
    const auto& t = h.tensors[i];
    if (i > 0) FUZZ_CHECK(h.tensors[i - 1].name < t.name, "tensors not sorted by unique names");
    FUZZ_CHECK(!t.name.empty() && t.name.front() != '.', "a forbidden tensor name was accepted");
    FUZZ_CHECK(t.name.find_first_of("/\\") == std::string::npos, "a tensor name with a path separator");
    FUZZ_CHECK(t.element_size > 0 && !t.torch_dtype.empty(), "a dtype without a size or torch name");
    FUZZ_CHECK(t.data_begin <= t.data_end && t.data_end <= h.data_size, "a tensor outside the data section");
    unsigned __int128 elements = 1;
    for (auto d : t.shape) {
      FUZZ_CHECK(d >= 0, "a negative dimension was accepted");
      elements *= static_cast<std::uint64_t>(d);
      if (elements > (static_cast<unsigned __int128>(1) << 64)) elements = static_cast<unsigned __int128>(1) << 64;
    }
    FUZZ_CHECK(elements * t.element_size == t.data_end - t.data_begin, "byte length does not match the shape");
    if (t.data_end > t.data_begin) ranges.emplace_back(t.data_begin, t.data_end);
  }
  std::sort(ranges.begin(), ranges.end());
  // Identical ranges are one tensor's bytes under two names (a tied weight), which the parser
  // accepts as an alias (DECISIONS §5.15); any other overlap is a sharing it must refuse.
  ranges.erase(std::unique(ranges.begin(), ranges.end()), ranges.end());
  for (std::size_t i = 1; i < ranges.size(); ++i) {
    FUZZ_CHECK(ranges[i - 1].second <= ranges[i].first, "two tensors share bytes");
  }

  auto prefixed = idx::parse_safetensors_header(file.first(h.data_offset), size, "fuzz.safetensors");
  FUZZ_CHECK(prefixed.has_value() && prefixed->tensors == h.tensors && prefixed->metadata == h.metadata,
             "the prefix form disagrees with the whole-file form");

  std::vector<idx::safetensors_file> files{{"fuzz.safetensors", h}};
  auto laid = idx::coalesce(files);
  if (!laid) {
    FUZZ_CHECK(laid.error().code == tensorreg::errc::invalid_argument, laid.error().message.c_str());
    return 0;
  }
  FUZZ_CHECK(laid->placements.size() == laid->index.entries().size(), "placements not parallel to entries");
  for (std::size_t i = 0; i < laid->placements.size(); ++i) {
    const auto& p = laid->placements[i];
    const auto& e = laid->index.entries()[i];
    FUZZ_CHECK(p.file_index == 0, "a placement names a file that was not given");
    FUZZ_CHECK(p.file_offset >= h.data_offset && p.file_offset - h.data_offset + p.length <= h.data_size,
               "a placement reads outside the data section");
    FUZZ_CHECK(p.canonical_offset == e.offset && p.length == e.size, "a placement disagrees with its entry");
  }
  auto again = idx::canonical_index::parse(laid->index.json(), laid->index.total_size());
  FUZZ_CHECK(again.has_value() && *again == laid->index, "the coalesced index does not parse back to itself");
  return 0;
}
