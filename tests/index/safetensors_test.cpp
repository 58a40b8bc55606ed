#include "tensorreg/index/safetensors.hpp"

#include <stdlib.h>
#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace {

using tensorreg::errc;
using tensorreg::index::coalesce;
using tensorreg::index::parse_safetensors_header;
using tensorreg::index::read_safetensors_header;
using tensorreg::index::safetensors_file;
using tensorreg::index::safetensors_header;
using tensorreg::index::tensor_placement;
namespace fs = std::filesystem;

// A fresh directory under /tmp, removed with everything in it.
class temp_dir {
 public:
  temp_dir() {
    std::string tmpl = (fs::temp_directory_path() / "tensorreg-index-XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path_ = tmpl;
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  [[nodiscard]] std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

std::string le64(std::uint64_t v) {
  std::string out(8, '\0');
  for (std::size_t k = 0; k < 8; ++k) out[k] = static_cast<char>((v >> (8 * k)) & 0xFF);
  return out;
}

// The bytes of a safetensors file: the length field says `declared` (default: the header's
// real length), then the header text, then the data section.
std::string safetensors_bytes(const std::string& header, const std::string& data,
                              std::optional<std::uint64_t> declared = std::nullopt) {
  return le64(declared.value_or(header.size())) + header + data;
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

std::span<const std::byte> as_bytes(const std::string& s) {
  return std::as_bytes(std::span<const char>(s.data(), s.size()));
}

// One tensor's header entry.
std::string tensor_json(const std::string& name, const std::string& dtype, const std::string& shape,
                        std::uint64_t begin, std::uint64_t end) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" +
         std::to_string(begin) + "," + std::to_string(end) + "]}";
}

tensorreg::result<safetensors_header> parse_memory(const std::string& header,
                                                   const std::string& data = std::string(64, 'd')) {
  return parse_safetensors_header(as_bytes(safetensors_bytes(header, data)), "mem.safetensors");
}

void require_invalid_header(const tensorreg::result<safetensors_header>& r, const std::string& reason,
                            const std::string& label = "mem.safetensors") {
  REQUIRE_FALSE(r);
  CHECK(r.error().code == errc::invalid_argument);
  CHECK(r.error().message == "cannot parse safetensors header of '" + label + "': " + reason);
}

std::string data_of(std::size_t n, char base) {
  std::string out(n, '\0');
  for (std::size_t k = 0; k < n; ++k) out[k] = static_cast<char>(base + static_cast<char>(k % 16));
  return out;
}

}  // namespace

// ---- headers ---------------------------------------------------------------------------------------

TEST_CASE("safetensors: reads a well-formed file's header", "[index][safetensors]") {
  temp_dir dir;
  const std::string header = "{\"__metadata__\":{\"format\":\"pt\"}," + tensor_json("w", "F32", "[2,2]", 0, 16) + "," +
                             tensor_json("b", "BOOL", "[3]", 16, 19) + "}  ";  // padded, as writers do
  const std::string path = dir.file("model.safetensors");
  write_file(path, safetensors_bytes(header, data_of(19, 'a')));

  const auto file = read_safetensors_header(path);
  REQUIRE(file);
  CHECK(file->path == path);
  const safetensors_header& h = file->header;
  CHECK(h.header_bytes == header.size());
  CHECK(h.data_offset == 8 + header.size());
  CHECK(h.data_size == 19);
  CHECK(h.metadata == std::vector<std::pair<std::string, std::string>>{{"format", "pt"}});
  REQUIRE(h.tensors.size() == 2);
  CHECK(h.tensors[0].name == "b");  // sorted by name
  CHECK(h.tensors[0].dtype == "BOOL");
  CHECK(h.tensors[0].torch_dtype == "torch.uint8");
  CHECK(h.tensors[0].element_size == 1);
  CHECK(h.tensors[0].shape == std::vector<std::int64_t>{3});
  CHECK((h.tensors[0].data_begin == 16 && h.tensors[0].data_end == 19));
  CHECK(h.tensors[1].name == "w");
  CHECK(h.tensors[1].torch_dtype == "torch.float32");
  CHECK((h.tensors[1].data_begin == 0 && h.tensors[1].data_end == 16));
}

TEST_CASE("safetensors: parsing from memory agrees with reading the file", "[index][safetensors]") {
  temp_dir dir;
  const std::string bytes = safetensors_bytes("{" + tensor_json("x", "F16", "[4]", 0, 8) + "}", data_of(8, 'a'));
  write_file(dir.file("x.safetensors"), bytes);
  const auto from_file = read_safetensors_header(dir.file("x.safetensors"));
  const auto from_memory = parse_safetensors_header(as_bytes(bytes), "x.safetensors");
  REQUIRE(from_file);
  REQUIRE(from_memory);
  CHECK(from_file->header.tensors == from_memory->tensors);
  CHECK(from_file->header.data_offset == from_memory->data_offset);
  CHECK(from_file->header.data_size == from_memory->data_size);
}

TEST_CASE("safetensors: empty tensors and scalars are accepted", "[index][safetensors]") {
  const auto h =
      parse_memory("{" + tensor_json("empty", "F32", "[0,3]", 4, 4) + "," + tensor_json("empty2", "F32", "[0]", 4, 4) +
                   "," + tensor_json("scalar", "I32", "[]", 0, 4) + "}");
  REQUIRE(h);
  CHECK(h->tensors.size() == 3);
}

TEST_CASE("safetensors: a file shorter than the length field is refused", "[index][safetensors]") {
  temp_dir dir;
  write_file(dir.file("short.safetensors"), std::string("\x05\x00\x00", 3));
  require_invalid_header(read_safetensors_header(dir.file("short.safetensors")).map([](auto f) { return f.header; }),
                         "file of 3 bytes is too short for the 8-byte header length", dir.file("short.safetensors"));
  require_invalid_header(parse_safetensors_header(as_bytes(std::string("\x05\x00\x00", 3)), "mem.safetensors"),
                         "file of 3 bytes is too short for the 8-byte header length");
}

TEST_CASE("safetensors: a header length of 2^63 is refused before allocating", "[index][safetensors]") {
  temp_dir dir;
  const std::string path = dir.file("huge.safetensors");
  write_file(path, safetensors_bytes("{}", "", std::uint64_t{1} << 63));
  require_invalid_header(read_safetensors_header(path).map([](auto f) { return f.header; }),
                         "header length 9223372036854775808 exceeds the limit of 104857600 bytes", path);
  require_invalid_header(
      parse_safetensors_header(as_bytes(safetensors_bytes("{}", "", ~std::uint64_t{0})), "mem.safetensors"),
      "header length 18446744073709551615 exceeds the limit of 104857600 bytes");
}

TEST_CASE("safetensors: a header length over 100 MiB is refused", "[index][safetensors]") {
  temp_dir dir;
  const std::string path = dir.file("big.safetensors");
  write_file(path, safetensors_bytes("{}", "", (std::uint64_t{100} << 20) + 1));
  require_invalid_header(read_safetensors_header(path).map([](auto f) { return f.header; }),
                         "header length 104857601 exceeds the limit of 104857600 bytes", path);
  // Even when the file is large enough to hold it (in memory: only the claimed file size).
  const std::string prefix = le64((std::uint64_t{100} << 20) + 1);
  require_invalid_header(parse_safetensors_header(as_bytes(prefix), std::uint64_t{1} << 30, "mem.safetensors"),
                         "header length 104857601 exceeds the limit of 104857600 bytes");
}

TEST_CASE("safetensors: a header length past the end of the file is refused", "[index][safetensors]") {
  temp_dir dir;
  const std::string path = dir.file("cut.safetensors");
  write_file(path, safetensors_bytes("{}", "", 1000));
  require_invalid_header(read_safetensors_header(path).map([](auto f) { return f.header; }),
                         "header length 1000 exceeds the 2 bytes that follow the length field", path);
}

TEST_CASE("safetensors: a memory prefix that ends inside the header is refused", "[index][safetensors]") {
  const std::string bytes = safetensors_bytes("{}", std::string(100, 'd'));
  require_invalid_header(parse_safetensors_header(as_bytes(bytes).first(9), bytes.size(), "mem.safetensors"),
                         "buffer of 9 bytes ends before the 2-byte header");
}

TEST_CASE("safetensors: a header that is not json is refused", "[index][safetensors]") {
  for (const char* text : {"", "{", "not json", "{\"a\":}", "{\"x\":{\"dtype\":\"F32\",}}"}) {
    INFO(text);
    const auto r = parse_memory(text);
    REQUIRE_FALSE(r);
    CHECK(r.error().code == errc::invalid_argument);
    CHECK_THAT(r.error().message,
               Catch::StartsWith("cannot parse safetensors header of 'mem.safetensors': invalid json near byte "));
  }
  const auto utf8 = parse_memory("{\"bad\xff\":{}}");
  REQUIRE_FALSE(utf8);
  CHECK_THAT(utf8.error().message,
             Catch::StartsWith("cannot parse safetensors header of 'mem.safetensors': ill-formed utf-8"));
}

TEST_CASE("safetensors: a header that is not an object is refused", "[index][safetensors]") {
  for (const char* text : {"[]", "[{\"dtype\":\"F32\"}]", "1", "\"x\"", "null"}) {
    INFO(text);
    require_invalid_header(parse_memory(text), "top level must be a json object");
  }
}

TEST_CASE("safetensors: __metadata__ must map strings to strings", "[index][safetensors]") {
  require_invalid_header(parse_memory("{\"__metadata__\":[\"x\"]}"), "__metadata__ must be an object of strings");
  require_invalid_header(parse_memory("{\"__metadata__\":{\"n\":1}}"), "__metadata__ value of 'n' must be a string");
  const auto only_metadata = parse_memory("{\"__metadata__\":{}}");
  REQUIRE(only_metadata);
  CHECK(only_metadata->tensors.empty());
}

TEST_CASE("safetensors: an unsupported dtype is refused naming tensor and dtype", "[index][safetensors]") {
  require_invalid_header(parse_memory("{" + tensor_json("w", "C64", "[1]", 0, 8) + "}"),
                         "tensor 'w' has unsupported dtype 'C64'");
  require_invalid_header(parse_memory("{\"w\":{\"dtype\":7,\"shape\":[1],\"data_offsets\":[0,1]}}"),
                         "tensor 'w' field 'dtype' must be a string");
  require_invalid_header(parse_memory("{\"w\":{\"shape\":[1],\"data_offsets\":[0,1]}}"),
                         "tensor 'w' field 'dtype' must be a string");
}

TEST_CASE("safetensors: a shape that is not an array of non-negative integers is refused", "[index][safetensors]") {
  for (const char* shape : {"[-1]", "[1.5]", "2", "[true]", "[\"2\"]", "null", "[[1]]"}) {
    INFO(shape);
    require_invalid_header(parse_memory("{" + tensor_json("w", "U8", shape, 0, 1) + "}"),
                           "tensor 'w' field 'shape' must be an array of non-negative integers");
  }
  require_invalid_header(parse_memory("{\"w\":{\"dtype\":\"U8\",\"data_offsets\":[0,1]}}"),
                         "tensor 'w' field 'shape' must be an array of non-negative integers");
  require_invalid_header(parse_memory("{" + tensor_json("w", "U8", "[9223372036854775808]", 0, 1) + "}"),
                         "tensor 'w' field 'shape' dimension 9223372036854775808 does not fit in int64");
}

TEST_CASE("safetensors: a shape whose byte size overflows is refused", "[index][safetensors]") {
  require_invalid_header(parse_memory("{" + tensor_json("w", "F64", "[4294967296,4294967296]", 0, 8) + "}"),
                         "tensor 'w' shape [4294967296, 4294967296] of F64 holds more than 2^64 bytes");
}

TEST_CASE("safetensors: data_offsets must be two non-negative integers", "[index][safetensors]") {
  for (const char* offsets : {"[0]", "[0,1,2]", "[-1,1]", "[0,1.0]", "{}", "null", "[\"0\",\"1\"]"}) {
    INFO(offsets);
    require_invalid_header(
        parse_memory(std::string("{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":") + offsets + "}}"),
        "tensor 'w' field 'data_offsets' must be an array of two non-negative integers");
  }
}

TEST_CASE("safetensors: inverted data_offsets are refused", "[index][safetensors]") {
  require_invalid_header(parse_memory("{" + tensor_json("w", "U8", "[0]", 8, 4) + "}"),
                         "tensor 'w' data_offsets [8, 4] are inverted");
}

TEST_CASE("safetensors: data_offsets past the data section are refused", "[index][safetensors]") {
  require_invalid_header(parse_memory("{" + tensor_json("w", "U8", "[8]", 60, 68) + "}"),
                         "tensor 'w' data_offsets [60, 68] end past the data section of 64 bytes");
  require_invalid_header(
      parse_memory("{" + tensor_json("w", "U8", "[1]", 18446744073709551615ull, 18446744073709551615ull) + "}"),
      "tensor 'w' data_offsets [18446744073709551615, 18446744073709551615] end past the data "
      "section of 64 bytes");
}

TEST_CASE("safetensors: data_offsets must span exactly the shape's bytes", "[index][safetensors]") {
  require_invalid_header(parse_memory("{" + tensor_json("w", "F32", "[2,2]", 0, 12) + "}"),
                         "tensor 'w' data_offsets [0, 12] span 12 bytes but shape [2, 2] of F32 needs 16");
  require_invalid_header(parse_memory("{" + tensor_json("w", "F32", "[0]", 0, 4) + "}"),
                         "tensor 'w' data_offsets [0, 4] span 4 bytes but shape [0] of F32 needs 0");
}

TEST_CASE("safetensors: tensors overlapping in the data section are refused", "[index][safetensors]") {
  require_invalid_header(
      parse_memory("{" + tensor_json("a", "U8", "[8]", 0, 8) + "," + tensor_json("b", "U8", "[8]", 4, 12) + "}"),
      "tensors 'a' [0, 8) and 'b' [4, 12) overlap in the data section");
  require_invalid_header(
      parse_memory("{" + tensor_json("a", "U8", "[8]", 0, 8) + "," + tensor_json("b", "U8", "[8]", 0, 8) + "," +
                   tensor_json("c", "U8", "[4]", 4, 8) + "}"),
      "tensors 'b' [0, 8) and 'c' [4, 8) overlap in the data section");
}

TEST_CASE("safetensors: bad tensor names are refused", "[index][safetensors]") {
  require_invalid_header(parse_memory("{" + tensor_json("", "U8", "[1]", 0, 1) + "}"), "tensor name is empty");
  require_invalid_header(parse_memory("{" + tensor_json("a/b", "U8", "[1]", 0, 1) + "}"),
                         "tensor name 'a/b' contains a path separator");
  require_invalid_header(parse_memory("{" + tensor_json("a\\\\b", "U8", "[1]", 0, 1) + "}"),
                         "tensor name 'a\\b' contains a path separator");
  require_invalid_header(parse_memory("{" + tensor_json(".hidden", "U8", "[1]", 0, 1) + "}"),
                         "tensor name '.hidden' starts with '.'");
  // A dot elsewhere is the usual module path.
  CHECK(parse_memory("{" + tensor_json("layer.0.weight", "U8", "[1]", 0, 1) + "}"));
}

TEST_CASE("safetensors: a duplicate tensor name within a file is refused", "[index][safetensors]") {
  require_invalid_header(
      parse_memory("{" + tensor_json("a", "U8", "[1]", 0, 1) + "," + tensor_json("a", "U8", "[1]", 1, 2) + "}"),
      "duplicate tensor name 'a'");
  require_invalid_header(parse_memory("{\"a\":{\"dtype\":\"U8\",\"dtype\":\"U8\",\"shape\":[1],"
                                      "\"data_offsets\":[0,1]}}"),
                         "duplicate key 'dtype'");
}

TEST_CASE("safetensors: a tensor that is not an object is refused", "[index][safetensors]") {
  require_invalid_header(parse_memory("{\"w\":[0,1]}"), "tensor 'w' must be a json object");
}

TEST_CASE("safetensors: reading a missing file is not found", "[index][safetensors]") {
  temp_dir dir;
  const auto r = read_safetensors_header(dir.file("absent.safetensors"));
  REQUIRE_FALSE(r);
  CHECK(r.error().code == errc::not_found);
  CHECK(r.error().message ==
        "cannot open safetensors file '" + dir.file("absent.safetensors") + "': No such file or directory");
}

TEST_CASE("safetensors: reading a directory is refused", "[index][safetensors]") {
  temp_dir dir;
  fs::create_directory(dir.file("d.safetensors"));
  const auto r = read_safetensors_header(dir.file("d.safetensors"));
  REQUIRE_FALSE(r);
  CHECK(r.error().code == errc::invalid_argument);
  CHECK(r.error().message == "cannot open safetensors file '" + dir.file("d.safetensors") + "': not a regular file");
}

// ---- coalesce --------------------------------------------------------------------------------------

TEST_CASE("safetensors: coalesce lays out all files' tensors by name at 8-byte offsets", "[index][safetensors]") {
  temp_dir dir;
  // Shard 2 is listed first: file order must not change the layout.
  const std::string d1 = data_of(16 + 6, 'a');
  const std::string d2 = data_of(3 + 8, 'A');
  write_file(
      dir.file("model-00001.safetensors"),
      safetensors_bytes(
          "{" + tensor_json("w", "F32", "[2,2]", 0, 16) + "," + tensor_json("bias", "F16", "[3]", 16, 22) + "}", d1));
  write_file(
      dir.file("model-00002.safetensors"),
      safetensors_bytes(
          "{" + tensor_json("mask", "BOOL", "[3]", 0, 3) + "," + tensor_json("emb", "I64", "[1]", 3, 11) + "}", d2));
  std::vector<safetensors_file> files;
  for (const char* name : {"model-00002.safetensors", "model-00001.safetensors"}) {
    auto f = read_safetensors_header(dir.file(name));
    REQUIRE(f);
    files.push_back(std::move(*f));
  }
  const auto c = coalesce(files);
  REQUIRE(c);
  CHECK(c->index.json() == R"({"bias":[0,6,[3],[1],"torch.float16",0],"emb":[8,8,[1],[1],"torch.int64",0],)"
                           R"("mask":[16,3,[3],[1],"torch.uint8",0],"w":[24,16,[2,2],[2,1],"torch.float32",0]})");
  CHECK(c->index.total_size() == 40);
  const std::uint64_t data1 = files[1].header.data_offset;
  const std::uint64_t data2 = files[0].header.data_offset;
  CHECK(c->placements ==
        std::vector<tensor_placement>{
            {1, data1 + 16, 6, 0}, {0, data2 + 3, 8, 8}, {0, data2 + 0, 3, 16}, {1, data1 + 0, 16, 24}});

  // Assembling the canonical buffer from the placements puts each tensor's bytes in place.
  std::string canonical(c->index.total_size(), '\0');
  for (const auto& p : c->placements) {
    std::ifstream in(files[p.file_index].path, std::ios::binary);
    in.seekg(static_cast<std::streamoff>(p.file_offset));
    in.read(canonical.data() + p.canonical_offset, static_cast<std::streamsize>(p.length));
    REQUIRE(in.good());
  }
  CHECK(canonical.substr(0, 6) == d1.substr(16, 6));
  CHECK(canonical.substr(8, 8) == d2.substr(3, 8));
  CHECK(canonical.substr(16, 3) == d2.substr(0, 3));
  CHECK(canonical.substr(24, 16) == d1.substr(0, 16));
  CHECK(canonical.substr(6, 2) == std::string(2, '\0'));
}

TEST_CASE("safetensors: coalesce uses torch's contiguous strides", "[index][safetensors]") {
  const auto h = parse_memory("{" + tensor_json("t", "U8", "[2,3,4]", 0, 24) + "," +
                              tensor_json("z", "U8", "[2,0,3]", 24, 24) + "}");
  REQUIRE(h);
  const std::vector<safetensors_file> files = {{"one.safetensors", *h}};
  const auto c = coalesce(files);
  REQUIRE(c);
  CHECK(c->index.find("t")->stride == std::vector<std::int64_t>{12, 4, 1});
  CHECK(c->index.find("z")->stride == std::vector<std::int64_t>{3, 3, 1});  // torch.empty(2,0,3)
  CHECK(c->index.find("z")->size == 0);
}

TEST_CASE("safetensors: coalesce refuses strides past int64", "[index][safetensors]") {
  const auto h = parse_memory("{" + tensor_json("z", "U8", "[0,4294967296,4294967296]", 0, 0) + "," +
                              tensor_json("t", "U8", "[1]", 0, 1) + "}");
  REQUIRE(h);
  const std::vector<safetensors_file> files = {{"one.safetensors", *h}};
  const auto c = coalesce(files);
  REQUIRE_FALSE(c);
  CHECK(c.error().code == errc::invalid_argument);
  CHECK(c.error().message ==
        "cannot coalesce safetensors files: tensor 'z' of shape [0, "
        "4294967296, 4294967296] has a row-major stride past int64");
}

TEST_CASE("safetensors: coalesce refuses a tensor name found in two files", "[index][safetensors]") {
  const auto a = parse_memory("{" + tensor_json("shared", "U8", "[1]", 0, 1) + "}");
  const auto b = parse_memory("{" + tensor_json("other", "U8", "[1]", 0, 1) + "," +
                              tensor_json("shared", "U8", "[1]", 1, 2) + "}");
  REQUIRE(a);
  REQUIRE(b);
  // Filename order, not list order, decides which file is named first.
  const std::vector<safetensors_file> files = {{"dir/b.safetensors", *b}, {"dir/a.safetensors", *a}};
  const auto c = coalesce(files);
  REQUIRE_FALSE(c);
  CHECK(c.error().code == errc::invalid_argument);
  CHECK(c.error().message ==
        "cannot coalesce safetensors files: tensor 'shared' appears in both "
        "'dir/a.safetensors' and 'dir/b.safetensors'");
}

TEST_CASE("safetensors: coalesce of no tensors is an empty tensor dict", "[index][safetensors]") {
  const auto c = coalesce({});
  REQUIRE_FALSE(c);
  CHECK(c.error().code == errc::invalid_argument);
  CHECK(c.error().message == "cannot coalesce safetensors files: empty tensor dict");
  const auto h = parse_memory("{\"__metadata__\":{}}");
  REQUIRE(h);
  const std::vector<safetensors_file> files = {{"m.safetensors", *h}};
  CHECK(coalesce(files).error().message == "cannot coalesce safetensors files: empty tensor dict");
}

TEST_CASE("safetensors: coalesce refuses files whose tensors are all empty", "[index][safetensors]") {
  const auto h = parse_memory("{" + tensor_json("z", "F32", "[0]", 0, 0) + "}");
  REQUIRE(h);
  const std::vector<safetensors_file> files = {{"z.safetensors", *h}};
  const auto c = coalesce(files);
  REQUIRE_FALSE(c);
  CHECK(c.error().code == errc::invalid_argument);
  CHECK(c.error().message == "cannot coalesce safetensors files: every tensor is empty, so total_size would be 0");
}

TEST_CASE("safetensors: tensors with identical data ranges are aliases of one storage", "[index][safetensors]") {
  auto header =
      parse_memory("{" + tensor_json("embed", "U8", "[8]", 0, 8) + "," + tensor_json("lm_head", "U8", "[2,4]", 0, 8) +
                   "," + tensor_json("norm", "U8", "[3]", 8, 11) + "}");
  REQUIRE(header);
  std::vector<safetensors_file> files{{"m.safetensors", *header}};
  auto layout = coalesce(files);
  REQUIRE(layout);
  const auto& idx = layout->index;
  CHECK(idx.json() == R"({"embed":[0,8,[8],[1],"torch.uint8",0],"lm_head":[0,8,[2,4],[4,1],"torch.uint8",0],)"
                      R"("norm":[8,3,[3],[1],"torch.uint8",0]})");
  CHECK(idx.total_size() == 11);
  REQUIRE(layout->placements.size() == 3);
  CHECK(layout->placements[0].canonical_offset == layout->placements[1].canonical_offset);
  CHECK(layout->placements[0].file_offset == layout->placements[1].file_offset);
}
