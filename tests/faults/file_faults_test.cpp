// The file reads behind a safetensors index (read_safetensors_header, safetensors_bundle): each
// fault site they reach fails with the error the real call would give, and once it is gone the
// same file gives the same index.
#include "tensorreg/index/safetensors_bundle.hpp"

#include <catch2/catch.hpp>

#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include "support/engine_helpers.hpp"
#include "support/safetensors_writer.hpp"
#include "support/temp_dir.hpp"
#include "tensorreg/common/fault_injection.hpp"
#include "tensorreg/index/safetensors.hpp"

namespace {

using namespace tensorreg;
namespace t = tensorreg::testing;

struct file_fault_case {
  std::string operation_name;
  bool bundle;  // safetensors_bundle::open (header, then a mapping), else read_safetensors_header
  fault_site site;
  int error;
  std::uint64_t skip;
  errc code;
  std::string message;  // "{path}" stands for the file
};

std::string with_path(std::string message, const std::string& path) {
  if (const auto at = message.find("{path}"); at != std::string::npos) message.replace(at, 6, path);
  return message;
}

// The index, or the error, of one operation on `path`.
result<std::string> index_of(bool bundle, const std::string& path) {
  if (bundle) {
    TENSORREG_TRY_ASSIGN(auto opened, index::safetensors_bundle::open({path}));
    return std::string(opened->index().json());
  }
  TENSORREG_TRY_ASSIGN(auto header, index::read_safetensors_header(path));
  return std::to_string(header.header.tensors.size()) + " tensors, data at " +
         std::to_string(header.header.data_offset);
}

}  // namespace

TEST_CASE("file faults: reading a safetensors index answers each failed call, then reads the same index",
          "[faults][file_faults]") {
  t::temp_dir dir;
  const std::string path = (dir.path() / "model.safetensors").string();
  t::write_safetensors(path,
                       {{"w", "F32", {2, 2}, t::pattern_bytes(16, 1)}, {"b", "F32", {3}, t::pattern_bytes(12, 2)}});
  const std::string emfile = std::strerror(EMFILE);
  const std::vector<file_fault_case> rows = {
      {"header", false, fault_site::open, EMFILE, 0, errc::resource_exhausted,
       "cannot open safetensors file '{path}': " + emfile},
      {"header", false, fault_site::open, EACCES, 0, errc::permission_denied,
       "cannot open safetensors file '{path}': " + std::string(std::strerror(EACCES))},
      {"header", false, fault_site::read, EIO, 0, errc::unavailable,
       "cannot read safetensors file '{path}': " + std::string(std::strerror(EIO))},
      {"header", false, fault_site::read, ENOMEM, 1, errc::resource_exhausted,
       "cannot read safetensors file '{path}': " + std::string(std::strerror(ENOMEM))},
      // the bundle reads the header (open, read, read), then opens and maps the file
      {"bundle", true, fault_site::open, EMFILE, 1, errc::resource_exhausted, "cannot open '{path}': " + emfile},
      {"bundle", true, fault_site::open, ENOENT, 1, errc::not_found,
       "cannot open '{path}': " + std::string(std::strerror(ENOENT))},
      {"bundle", true, fault_site::mmap, ENOMEM, 0, errc::resource_exhausted,
       "cannot map '{path}': " + std::string(std::strerror(ENOMEM))},
  };
  const auto clean = index_of(false, path);
  REQUIRE_OK(clean);
  const auto clean_bundle = index_of(true, path);
  REQUIRE_OK(clean_bundle);
  for (const auto& row : rows) {
    DYNAMIC_SECTION(row.operation_name << ", " << to_string(row.site) << " fails with " << std::strerror(row.error)
                                       << " after " << row.skip) {
      {
        scoped_fault fault(row.site, row.error, row.skip, 1);
        auto failed = index_of(row.bundle, path);
        CHECK(fault.fired() == 1);
        CHECK_ERROR(failed, row.code, with_path(row.message, path));
      }
      auto again = index_of(row.bundle, path);
      REQUIRE_OK(again);
      CHECK(*again == (row.bundle ? *clean_bundle : *clean));
    }
  }
}
