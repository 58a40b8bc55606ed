#include "local_commands.hpp"

#include <fmt/core.h>

#include <charconv>
#include <fstream>
#include <iterator>
#include <optional>
#include <sstream>
#include <thread>

#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/identity/content_id.hpp"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/index/safetensors_bundle.hpp"
#include "tensorreg/memory/mapped_file.hpp"

namespace tensorreg::cli {
namespace {

// One line on stderr, then the exit code for bad input.
int usage_error(const std::string& message) {
  fmt::print(stderr, "tensorreg: {}\n", message);
  return 2;
}

int failed(const error& e) {
  fmt::print(stderr, "tensorreg: {} ({})\n", e.message, errc_name(e.code));
  return 1;
}

std::optional<std::uint64_t> parse_u64(const std::string& text) {
  std::uint64_t v = 0;
  const auto* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, v);
  if (ec != std::errc{} || ptr != end || text.empty()) return std::nullopt;
  return v;
}

result<std::string> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return fail(errc::not_found, "cannot read '" + path + "': cannot open it");
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

unsigned default_threads() { return std::max(1u, std::thread::hardware_concurrency()); }

// Shared option: --threads N (the pool gets N-1 workers; the caller is the N-th).
struct options {
  std::optional<std::string> index, data;
  std::optional<std::uint64_t> zeros;
  bool raw = false;
  unsigned threads = default_threads();
  std::vector<std::string> positional;
};

result<options> parse(const std::vector<std::string>& args, bool digest) {
  options o;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const auto& a = args[i];
    auto value = [&] { return option_value(args, i); };
    if (a == "--threads") {
      TENSORREG_TRY_ASSIGN(auto v, value());
      auto n = parse_u64(v);
      if (!n || *n == 0 || *n > 4096) return fail(errc::invalid_argument, "--threads must be 1..4096, got '" + v + "'");
      o.threads = static_cast<unsigned>(*n);
    } else if (digest && a == "--index") {
      TENSORREG_TRY_ASSIGN(o.index, value());
    } else if (digest && a == "--data") {
      TENSORREG_TRY_ASSIGN(o.data, value());
    } else if (digest && a == "--zeros") {
      TENSORREG_TRY_ASSIGN(auto v, value());
      o.zeros = parse_u64(v);
      if (!o.zeros) return fail(errc::invalid_argument, "--zeros needs a byte count, got '" + v + "'");
    } else if (digest && a == "--raw") {
      o.raw = true;
    } else if (a.starts_with("--")) {
      return fail(errc::invalid_argument, "unknown option " + a);
    } else {
      o.positional.push_back(a);
    }
  }
  return o;
}

}  // namespace

result<std::string> option_value(const std::vector<std::string>& args, std::size_t& i) {
  if (i + 1 >= args.size()) return fail(errc::invalid_argument, args[i] + " needs a value");
  return args[++i];
}

int run_digest(const std::vector<std::string>& args) {
  auto parsed = parse(args, /*digest=*/true);
  if (!parsed) return usage_error(parsed.error().message);
  auto& o = *parsed;
  if (!o.index || !o.positional.empty()) {
    return usage_error("usage: tensorreg digest --index FILE [--data FILE | --zeros N] [--raw] [--threads N]");
  }
  if (o.data && o.zeros) return usage_error("give --data or --zeros, not both");
  auto text = read_file(*o.index);
  if (!text) return failed(text.error());

  // The engine re-emits every client index canonically (DECISIONS §5.13) and hashes that;
  // --raw hashes the file's bytes as they are.
  std::string index_bytes = *text;
  if (!o.raw) {
    auto idx = index::canonical_index::parse(*text, std::nullopt);
    if (!idx) return failed(with_context(idx.error(), "cannot read index '" + *o.index + "'"));
    if (idx->json() != *text)
      fmt::print(stderr, "tensorreg: note: '{}' was re-emitted canonically before hashing\n", *o.index);
    index_bytes = idx->json();
  }
  const auto index_multihash = hash::encode_multihash(hash::sha256(index_bytes));
  fmt::print("index {}\n", index_multihash);
  if (!o.data && !o.zeros) return 0;

  thread_pool pool(o.threads - 1);
  result<hash::digest> data = fail(errc::internal, "unreachable");
  std::optional<memory::mapped_file> file;
  if (o.data) {
    auto mapped = memory::mapped_file::open(*o.data);
    if (!mapped) return failed(mapped.error());
    file = std::move(*mapped);
    data = hash::tree_hash(*file, &pool);
  } else {
    data = hash::tree_hash(memory::zero_source(*o.zeros), &pool);
  }
  if (!data) return failed(data.error());
  const auto data_multihash = hash::encode_multihash(*data);
  fmt::print("data {}\nid mi2:{}:{}\n", data_multihash, index_multihash, data_multihash);
  return 0;
}

int run_index_files(const std::vector<std::string>& args) {
  auto parsed = parse(args, /*digest=*/false);
  if (!parsed) return usage_error(parsed.error().message);
  if (parsed->positional.empty()) return usage_error("usage: tensorreg index FILES.safetensors... [--threads N]");
  auto bundle = index::safetensors_bundle::open(parsed->positional);
  if (!bundle) return failed(bundle.error());
  thread_pool pool(parsed->threads - 1);
  auto id = identity::content_id((*bundle)->index().json(), (*bundle)->canonical(), &pool);
  if (!id) return failed(id.error());
  fmt::print("{}\ntotal_size {}\nid {}\n", (*bundle)->index().json(), (*bundle)->index().total_size(), id->to_string());
  return 0;
}

}  // namespace tensorreg::cli
