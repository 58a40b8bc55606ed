// tests/support/temp_dir.hpp — a fresh directory under $TMPDIR, removed with its contents.
#pragma once

#include <filesystem>

namespace tensorreg::testing {

class temp_dir {
 public:
  temp_dir();
  ~temp_dir();
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;

  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }

 private:
  std::filesystem::path path_;
};

}  // namespace tensorreg::testing
