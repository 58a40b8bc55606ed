// fuzz/canonical_index_fuzz.cpp — canonical_index::parse over arbitrary bytes.
//
// The input is the client-supplied index JSON, as BeginRegisterArtifact carries it. Besides
// "no crash, no leak, no undefined behaviour", an accepted index must be a fixed point: its
// canonical JSON parses back to the same index, with and without its total_size, and its
// entries rebuild it through from_entries().
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "fuzz/fuzz_check.hpp"
#include "tensorreg/index/canonical_index.hpp"

namespace idx = tensorreg::index;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);

  // The total_size branch: the input's length is as good a claimed size as any.
  (void)idx::canonical_index::parse(text, std::optional<std::uint64_t>(size));

  auto parsed = idx::canonical_index::parse(text, std::nullopt);
  if (!parsed) {
    FUZZ_CHECK(parsed.error().code == tensorreg::errc::invalid_argument, parsed.error().message.c_str());
    FUZZ_CHECK(!parsed.error().message.empty(), "an error without a message");
    return 0;
  }
  const auto& index = *parsed;
  FUZZ_CHECK(!index.entries().empty(), "an accepted index has no entries");
  FUZZ_CHECK(index.total_size() > 0, "an accepted index has total_size 0");
  FUZZ_CHECK(idx::is_valid_utf8(index.json()), "canonical JSON is not UTF-8");
  for (std::size_t i = 0; i < index.entries().size(); ++i) {
    const auto& e = index.entries()[i];
    FUZZ_CHECK(e.size <= index.total_size() && e.offset <= index.total_size() - e.size,
               "an entry ends past total_size");
    FUZZ_CHECK(index.find(e.name) == &e, "find() does not return the entry");
    if (i > 0) FUZZ_CHECK(index.entries()[i - 1].name < e.name, "entries not sorted by unique names");
  }
  FUZZ_CHECK(idx::emit_canonical_json(index.entries()) == index.json(), "json() differs from emit_canonical_json");

  auto again = idx::canonical_index::parse(index.json(), std::nullopt);
  FUZZ_CHECK(again.has_value(), "canonical JSON does not parse back");
  FUZZ_CHECK(*again == index, "canonical JSON is not a fixed point");
  auto sized = idx::canonical_index::parse(index.json(), index.total_size());
  FUZZ_CHECK(sized.has_value() && *sized == index, "parse with its own total_size differs");
  auto rebuilt = idx::canonical_index::from_entries(index.entries(), index.total_size());
  FUZZ_CHECK(rebuilt.has_value() && *rebuilt == index, "from_entries(entries()) differs");
  return 0;
}
