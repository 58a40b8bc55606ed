// Implements two_tensor_artifact.hpp.
#include "support/two_tensor_artifact.hpp"

#include <catch2/catch.hpp>

#include <utility>
#include <vector>

#include "tensorreg/index/canonical_index.hpp"

namespace tensorreg::testing::two_tensors {

std::string index_json() {
  std::vector<index::entry> entries{{"a", 0, 16, {4}, {1}, "torch.float32", 0},
                                    {"b", 16, 8, {2}, {1}, "torch.float32", 0}};
  auto built = index::canonical_index::from_entries(std::move(entries), total);
  REQUIRE(built);
  return built->json();
}

std::string bytes(char salt) {
  std::string out(total, '\0');
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = static_cast<char>(i * 7 + salt);
  return out;
}

}  // namespace tensorreg::testing::two_tensors
