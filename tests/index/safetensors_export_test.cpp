#include "tensorreg/index/safetensors_export.hpp"

#include <sys/stat.h>
#include <sys/sysmacros.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <future>
#include <iterator>

#include "support/engine_helpers.hpp"
#include "support/safetensors_writer.hpp"
#include "support/temp_dir.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/identity/content_id.hpp"
#include "tensorreg/index/safetensors.hpp"
#include "tensorreg/index/safetensors_bundle.hpp"

namespace {
namespace fs = std::filesystem;
namespace index = tensorreg::index;
using tensorreg::errc;
using tensorreg::testing::temp_dir;

std::string id_of(const index::safetensors_bundle& b) {
  tensorreg::thread_pool pool(1);
  return tensorreg::identity::content_id(b.index().json(), b.canonical(), &pool).value().to_string();
}
}  // namespace

TEST_CASE("safetensors_export: an artifact from safetensors exports to a file with the same mi2 id",
          "[index][safetensors_export]") {
  temp_dir dir;
  const auto in = dir.path() / "in.safetensors";
  tensorreg::testing::write_safetensors(in, {{"w", "F32", {3, 5}, tensorreg::testing::pattern_bytes(60, 1)},
                                             {"b", "BF16", {3}, tensorreg::testing::pattern_bytes(6, 2)},
                                             {"ids", "I64", {2}, tensorreg::testing::pattern_bytes(16, 3)},
                                             {"mask", "BOOL", {5}, tensorreg::testing::pattern_bytes(5, 4)},
                                             {"empty", "F16", {0, 4}, ""}});
  auto original = index::safetensors_bundle::open({in.string()});
  REQUIRE(original);
  const auto out = (dir.path() / "out.safetensors").string();
  REQUIRE(index::export_safetensors((*original)->index(), (*original)->canonical(), out));
  for (const auto& e : fs::directory_iterator(dir.path())) {
    CHECK_FALSE(e.path().filename().string().starts_with("out.safetensors.tmp-"));
  }
  auto header = index::read_safetensors_header(out);  // our parser accepts it
  REQUIRE(header);
  CHECK(header->header.data_offset % 8 == 0);
  CHECK(header->header.tensors.size() == 5);
  auto back = index::safetensors_bundle::open({out});
  REQUIRE(back);
  CHECK((*back)->index().json() == (*original)->index().json());
  CHECK(id_of(**back) == id_of(**original));
}

TEST_CASE("safetensors_export: tensors safetensors cannot hold are refused naming the tensor",
          "[index][safetensors_export]") {
  auto strided = index::canonical_index::parse(R"({"t":[0,16,[2,2],[1,2],"torch.float32",0]})", 16);
  REQUIRE(strided);
  auto h = index::safetensors_export_header(*strided);
  REQUIRE_FALSE(h);
  CHECK(h.error().code == errc::failed_precondition);
  CHECK(h.error().message == "cannot export tensor 't' as safetensors: it is not row-major contiguous");

  auto opaque = index::canonical_index::parse(R"({"q":[0,4,[4],[1],"torch.quint8",0]})", 4);
  REQUIRE(opaque);
  auto o = index::safetensors_export_header(*opaque);
  REQUIRE_FALSE(o);
  CHECK(o.error().message ==
        "cannot export tensor 'q' as safetensors: safetensors has no name for dtype 'torch.quint8'");

  temp_dir dir;
  const auto out = (dir.path() / "x.safetensors").string();
  tensorreg::testing::owned_bytes bytes(std::string(16, 'x'));
  auto refused = index::export_safetensors(*strided, bytes, out);
  REQUIRE_FALSE(refused);
  CHECK(refused.error().message ==
        "cannot export to '" + out + "': cannot export tensor 't' as safetensors: it is not row-major contiguous");
  CHECK(fs::is_empty(dir.path()));
}

TEST_CASE("safetensors_export: an alias and a storage_offset view export as their own bytes",
          "[index][safetensors_export]") {
  const auto m = tensorreg::testing::small_model();
  const auto idx = m.index();
  const auto canonical = m.canonical();
  temp_dir dir;
  const auto out = (dir.path() / "m.safetensors").string();
  REQUIRE(index::export_safetensors(idx, tensorreg::testing::owned_bytes(canonical), out));
  auto back = index::safetensors_bundle::open({out});
  REQUIRE(back);
  // v is w's storage from element 2: its 8 bytes are w's last 8.
  const auto* v = (*back)->index().find("v");
  REQUIRE(v != nullptr);
  std::string got(8, '\0');
  REQUIRE((*back)->canonical().read(v->offset, std::as_writable_bytes(std::span(got.data(), got.size()))));
  CHECK(got == canonical.substr(24 + 8, 8));
}

TEST_CASE("safetensors_export: /dev/null and a FIFO are written into, not replaced; a directory is refused",
          "[index][safetensors_export]") {
  temp_dir dir;
  const auto in = dir.path() / "in.safetensors";
  tensorreg::testing::write_safetensors(in, {{"w", "F32", {1024}, tensorreg::testing::pattern_bytes(4096, 7)}});
  auto original = index::safetensors_bundle::open({in.string()});
  REQUIRE(original);
  const auto& idx = (*original)->index();
  const auto& bytes = (*original)->canonical();

  // A null device of the test's own (a regression must not replace the machine's /dev/null).
  const auto null_device = dir.path() / "null";
  if (::mknod(null_device.c_str(), S_IFCHR | 0666, makedev(1, 3)) == 0) {
    REQUIRE(index::export_safetensors(idx, bytes, null_device.string()));
    CHECK(fs::is_character_file(null_device));
  } else {
    WARN("no null device of the test's own (mknod needs root): that part skipped");
  }

  const auto file = (dir.path() / "as_file.safetensors").string();
  REQUIRE(index::export_safetensors(idx, bytes, file));
  const auto fifo = dir.path() / "pipe";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  auto reading = std::async(std::launch::async, [&] {
    std::ifstream pipe(fifo, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(pipe), {});
  });
  REQUIRE(index::export_safetensors(idx, bytes, fifo.string()));
  CHECK(fs::is_fifo(fifo));
  std::ifstream written(file, std::ios::binary);
  CHECK(reading.get() == std::string(std::istreambuf_iterator<char>(written), {}));

  auto to_dir = index::export_safetensors(idx, bytes, dir.path().string());
  REQUIRE_FALSE(to_dir);
  CHECK(to_dir.error().code == errc::invalid_argument);
  CHECK(to_dir.error().message == "cannot export to '" + dir.path().string() + "': it is a directory");
}
