// cuda_client_register_bench — tensorreg::client's register_cuda() (lease in place of CUDA
// tensors): the counterpart of the Python client's Store._register_cuda
// (python/tensorreg/store.py), doing the same work on the same tensor structure, with the
// client-side parts timed apart from the waits on the daemon (the library's
// cuda_register_report).
//
//   cuda_client_register_bench --socket PATH --layout FILE [--repeats 5]
//
// FILE is the structure python_register_bench.py writes (write_layout):
//   {"allocations": [{"size": N}, ...],
//    "storages":    [{"allocation": a, "offset": o, "nbytes": n}, ...],
//    "tensors":     [{"name": "layers.0.w0", "storage": s, "shape": [..], "stride": [..],
//                     "dtype": "torch.bfloat16", "storage_offset": k}, ...]}
// (storages in any order, several on one allocation, several tensors on one storage). It is read
// and checked before the GPU is touched (a view past its storage is the library's to refuse). Set-up (not timed): one cudaMalloc per allocation,
// zeroed, each storage at allocation base + offset. Storages no tensor names are not registered.
//
// Each repeat, after one warm-up that is not counted (median over the repeats), the phases of
// register_cuda (client/cuda_register.cpp):
//   index     the tensor descriptions, the canonical layout, each storage's canonical place;
//   driver    each allocation behind a storage looked up once (cuMemGetAddressRange,
//             cuIpcGetMemHandle through the runtime's driver entry points), the region plan;
//   messages  every request built and serialised: one RegisterRegion per region, the Begin,
//             and the one Feed frame once the region refs and the registration id are known;
//   rpc       the RegisterRegion calls (one at a time: the C++ client has no pipelining, where
//             the Python client sends them at once), the Begin, the Feed stream;
//   commit    CommitRegisteredArtifact.
// Then (not timed) the lease is released: revoked and its regions unregistered (force).
//
// Prints one JSON line per measurement, a summary JSON line (client_work_ms, index_ms,
// driver_ms, messages_ms, rpc_ms, commit_ms: what python_register_bench.py reads), then a
// human line. Exits 77 with "skipped: no CUDA device" without a GPU, 1 on any error (the
// daemon's message), 2 on a bad command line. Host code only (.cu so the CPU benchmarks'
// *_bench.cpp glob does not take it).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "tensorreg/client/connection.hpp"
#include "tensorreg/devices/device_identity.hpp"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/index/dtype.hpp"

namespace {

using namespace tensorreg;
using json = nlohmann::json;

constexpr const char* program = "cuda_client_register_bench";
constexpr std::uint32_t lease_ttl_ms = 600'000;  // store.py DEFAULT_TTL_MS

// statistics.median: the middle value, or the mean of the two middle ones.
double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2.0;
}

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "%s: %s\n", program, what.c_str());
  std::exit(1);
}

// ---- the layout file ----------------------------------------------------------------------

struct allocation_spec {
  std::uint64_t size = 0;
};

struct storage_spec {
  std::size_t allocation = 0;
  std::uint64_t offset = 0;
  std::uint64_t nbytes = 0;
};

struct tensor_spec {
  std::string name;
  std::size_t storage = 0;
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> stride;
  std::string dtype;
  std::int64_t storage_offset = 0;  // elements
};

struct layout_spec {
  std::vector<allocation_spec> allocations;
  std::vector<storage_spec> storages;
  std::vector<tensor_spec> tensors;
};

struct layout_error {
  std::string message;
};

[[noreturn]] void bad(const std::string& where, const std::string& what) { throw layout_error{where + " " + what}; }

const json& member(const json& object, const char* key, const std::string& where) {
  const auto it = object.find(key);
  if (it == object.end()) bad(where, std::string("has no \"") + key + "\"");
  return *it;
}

std::uint64_t unsigned_of(const json& v, const std::string& where) {
  if (!v.is_number_unsigned()) bad(where, "must be a non-negative integer, not " + v.dump());
  return v.get<std::uint64_t>();
}

std::int64_t signed_of(const json& v, const std::string& where) {
  if (v.is_number_unsigned()) {
    const auto u = v.get<std::uint64_t>();
    if (u > static_cast<std::uint64_t>(INT64_MAX)) bad(where, "does not fit a signed 64-bit integer");
    return static_cast<std::int64_t>(u);
  }
  if (!v.is_number_integer()) bad(where, "must be an integer, not " + v.dump());
  return v.get<std::int64_t>();
}

const json& array_of(const json& v, const std::string& where) {
  if (!v.is_array()) bad(where, "must be an array");
  return v;
}

// Reads and checks the whole file; throws layout_error naming the field.
layout_spec parse_layout(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw layout_error{"cannot open it: " + std::string(std::strerror(errno))};
  std::stringstream text;
  text << in.rdbuf();
  json doc;
  try {
    doc = json::parse(text.str());
  } catch (const json::exception& e) {
    throw layout_error{std::string("it is not valid JSON: ") + e.what()};
  }
  if (!doc.is_object()) bad("the top level", "must be a JSON object");
  layout_spec out;

  const json& allocations = array_of(member(doc, "allocations", "the top level"), "\"allocations\"");
  if (allocations.empty()) bad("\"allocations\"", "is empty");
  for (std::size_t i = 0; i < allocations.size(); ++i) {
    const std::string where = "allocations[" + std::to_string(i) + "]";
    if (!allocations[i].is_object()) bad(where, "must be an object");
    allocation_spec a;
    a.size = unsigned_of(member(allocations[i], "size", where), where + ".size");
    if (a.size == 0) bad(where + ".size", "is 0 (cudaMalloc needs at least one byte)");
    out.allocations.push_back(a);
  }

  const json& storages = array_of(member(doc, "storages", "the top level"), "\"storages\"");
  if (storages.empty()) bad("\"storages\"", "is empty");
  for (std::size_t i = 0; i < storages.size(); ++i) {
    const std::string where = "storages[" + std::to_string(i) + "]";
    if (!storages[i].is_object()) bad(where, "must be an object");
    storage_spec s;
    const std::uint64_t a = unsigned_of(member(storages[i], "allocation", where), where + ".allocation");
    if (a >= out.allocations.size()) {
      bad(where + ".allocation",
          std::to_string(a) + " is not one of the " + std::to_string(out.allocations.size()) + " allocations");
    }
    s.allocation = static_cast<std::size_t>(a);
    s.offset = unsigned_of(member(storages[i], "offset", where), where + ".offset");
    s.nbytes = unsigned_of(member(storages[i], "nbytes", where), where + ".nbytes");
    const std::uint64_t size = out.allocations[s.allocation].size;
    std::uint64_t end = 0;
    if (__builtin_add_overflow(s.offset, s.nbytes, &end) || end > size) {
      bad(where, "[" + std::to_string(s.offset) + ", +" + std::to_string(s.nbytes) + ") runs past allocation " +
                     std::to_string(a) + " of " + std::to_string(size) +
                     " bytes (a storage over several VMM pages of expandable segments cannot be rebuilt with "
                     "cudaMalloc)");
    }
    out.storages.push_back(s);
  }

  const json& tensors = array_of(member(doc, "tensors", "the top level"), "\"tensors\"");
  if (tensors.empty()) bad("\"tensors\"", "is empty");
  std::set<std::string> names;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const std::string where = "tensors[" + std::to_string(i) + "]";
    const json& j = tensors[i];
    if (!j.is_object()) bad(where, "must be an object");
    tensor_spec t;
    const json& name = member(j, "name", where);
    if (!name.is_string()) bad(where + ".name", "must be a string");
    t.name = name.get<std::string>();
    if (!index::is_valid_utf8(t.name)) bad(where + ".name", "is not valid UTF-8");
    if (!names.insert(t.name).second) bad(where + ".name", "\"" + t.name + "\" appears twice");
    const std::uint64_t s = unsigned_of(member(j, "storage", where), where + ".storage");
    if (s >= out.storages.size()) {
      bad(where + ".storage",
          std::to_string(s) + " is not one of the " + std::to_string(out.storages.size()) + " storages");
    }
    t.storage = static_cast<std::size_t>(s);
    const json& shape = array_of(member(j, "shape", where), where + ".shape");
    for (std::size_t d = 0; d < shape.size(); ++d) {
      const std::int64_t v = signed_of(shape[d], where + ".shape[" + std::to_string(d) + "]");
      if (v < 0) bad(where + ".shape[" + std::to_string(d) + "]", "is negative");
      t.shape.push_back(v);
    }
    const json& stride = array_of(member(j, "stride", where), where + ".stride");
    for (std::size_t d = 0; d < stride.size(); ++d) {
      t.stride.push_back(signed_of(stride[d], where + ".stride[" + std::to_string(d) + "]"));
    }
    if (t.stride.size() != t.shape.size()) {
      bad(where, "has " + std::to_string(t.shape.size()) + " dimensions in shape but " +
                     std::to_string(t.stride.size()) + " in stride");
    }
    const json& dtype = member(j, "dtype", where);
    if (!dtype.is_string()) bad(where + ".dtype", "must be a string");
    t.dtype = dtype.get<std::string>();
    const auto element = index::element_size(t.dtype);
    if (!element) bad(where + ".dtype", "\"" + t.dtype + "\" is not a dtype the canonical index knows");
    const std::uint64_t storage_offset = unsigned_of(member(j, "storage_offset", where), where + ".storage_offset");
    if (storage_offset > static_cast<std::uint64_t>(INT64_MAX)) bad(where + ".storage_offset", "is too large");
    t.storage_offset = static_cast<std::int64_t>(storage_offset);
    out.tensors.push_back(std::move(t));
  }
  return out;
}

void check_cuda(cudaError_t e, const std::string& what) {
  if (e != cudaSuccess) die("cannot " + what + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}

struct round_times {
  double index = 0;
  double driver = 0;
  double messages = 0;
  double rpc = 0;
  double rpc_regions = 0;
  double rpc_begin = 0;
  double rpc_feed = 0;
  double commit = 0;
};

struct round_result {
  round_times t;
  std::string artifact_id;
  bool existed = false;
  client::cuda_register_report report;
};

// One register through the library, then (not timed) its release, as the Python client at close.
round_result run(client::connection& conn, const std::vector<client::cuda_tensor>& tensors, std::int32_t ordinal) {
  round_result out;
  auto held = conn.register_cuda(tensors, {lease_ttl_ms, ordinal, &out.report});
  if (!held) die(held.error().message);
  out.artifact_id = held->info().descriptor.artifact_id;
  out.existed = held->info().existed;
  const auto& r = out.report;
  out.t = {r.index_ms,       r.driver_ms,    r.messages_ms, r.rpc_regions_ms + r.rpc_begin_ms + r.rpc_feed_ms,
           r.rpc_regions_ms, r.rpc_begin_ms, r.rpc_feed_ms, r.commit_ms};
  if (auto released = held->release(); !released) {
    std::fprintf(stderr, "%s: warning: %s\n", program, released.error().message.c_str());
  }
  return out;
}

void usage() {
  std::fprintf(stderr, "usage: %s --socket PATH --layout FILE [--repeats 5]\n", program);
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  std::string socket_path;
  std::string layout_path;
  int repeats = 5;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") usage();
    if (i + 1 >= argc) {
      std::fprintf(stderr, "%s: %s needs a value\n", program, a.c_str());
      usage();
    }
    const std::string v = argv[++i];
    if (a == "--socket") {
      socket_path = v;
    } else if (a == "--layout") {
      layout_path = v;
    } else if (a == "--repeats") {
      char* end = nullptr;
      const long n = std::strtol(v.c_str(), &end, 10);
      if (end == v.c_str() || *end != '\0' || n < 1 || n > 100000) {
        std::fprintf(stderr, "%s: --repeats must be a positive integer, not '%s'\n", program, v.c_str());
        usage();
      }
      repeats = static_cast<int>(n);
    } else {
      std::fprintf(stderr, "%s: unknown flag %s\n", program, a.c_str());
      usage();
    }
  }
  if (layout_path.empty()) {
    std::fprintf(stderr, "%s: --layout FILE is required\n", program);
    usage();
  }

  // The layout first: a malformed file is reported with or without a GPU.
  layout_spec spec;
  try {
    spec = parse_layout(layout_path);
  } catch (const layout_error& e) {
    die("cannot read layout " + layout_path + ": " + e.message);
  }

  int devices = 0;
  if (const cudaError_t e = cudaGetDeviceCount(&devices); e != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "%s: skipped: no CUDA device (%s)\n", program,
                 e != cudaSuccess ? cudaGetErrorString(e) : "no device visible");
    return 77;
  }
  const std::int32_t ordinal = 0;
  check_cuda(cudaSetDevice(ordinal), "use CUDA device 0");
  cudaDeviceProp prop{};
  check_cuda(cudaGetDeviceProperties(&prop, ordinal), "read the properties of CUDA device 0");
  devices::gpu_uuid uuid_bytes;
  static_assert(sizeof prop.uuid.bytes == sizeof uuid_bytes.bytes);
  std::memcpy(uuid_bytes.bytes.data(), prop.uuid.bytes, sizeof uuid_bytes.bytes);
  const std::string uuid = devices::format_gpu_uuid(uuid_bytes);

  // Set-up: the allocations, zeroed; each storage's address.
  std::vector<void*> blocks;
  std::uint64_t allocated = 0;
  for (std::size_t a = 0; a < spec.allocations.size(); ++a) {
    void* p = nullptr;
    const auto size = static_cast<std::size_t>(spec.allocations[a].size);
    check_cuda(cudaMalloc(&p, size),
               "allocate allocation " + std::to_string(a) + " of " + std::to_string(size) + " bytes");
    check_cuda(cudaMemset(p, 0, size), "zero allocation " + std::to_string(a));
    blocks.push_back(p);
    allocated += size;
  }
  check_cuda(cudaDeviceSynchronize(), "synchronise CUDA device 0");

  // The tensors as torch describes them: each storage by its device address and size.
  std::vector<client::cuda_tensor> tensors;
  std::set<std::pair<std::uint64_t, std::uint64_t>> distinct;
  for (const auto& t : spec.tensors) {
    const auto& s = spec.storages[t.storage];
    const std::uint64_t ptr = reinterpret_cast<std::uint64_t>(blocks[s.allocation]) + s.offset;
    distinct.emplace(ptr, s.nbytes);
    tensors.push_back({t.name, ptr, s.nbytes, t.dtype, t.shape, t.stride, t.storage_offset});
  }
  std::set<std::size_t> named;
  for (const auto& t : spec.tensors) named.insert(t.storage);
  const std::size_t unnamed = spec.storages.size() - named.size();

  auto conn = client::connection::connect(socket_path);
  if (!conn) die(conn.error().message);

  std::printf(
      "# device %d: %s (%s); %zu tensors, %zu storages (%zu named by no tensor, not registered), %zu "
      "allocations, %.1f MiB allocated\n",
      ordinal, prop.name, uuid.c_str(), tensors.size(), distinct.size(), unnamed, spec.allocations.size(),
      static_cast<double>(allocated) / (1 << 20));

  std::vector<round_times> times;
  round_result last;
  std::string first_id;
  for (int round = 0; round <= repeats; ++round) {  // round 0 warms up
    last = run(*conn, tensors, ordinal);
    if (round == 0) {
      first_id = last.artifact_id;
      std::printf("# artifact %s%s\n", last.artifact_id.c_str(), last.existed ? " (existed)" : "");
    } else {
      times.push_back(last.t);
      if (last.artifact_id != first_id)
        die("repeat " + std::to_string(round) + " gave another id: " + last.artifact_id);
    }
  }
  std::fflush(stdout);

  const auto med = [&](double round_times::*field) {
    std::vector<double> v;
    for (const auto& t : times) v.push_back(t.*field);
    return median(v);
  };
  const double index_ms = med(&round_times::index);
  const double driver_ms = med(&round_times::driver);
  const double messages_ms = med(&round_times::messages);
  const double client_ms = index_ms + driver_ms + messages_ms;
  std::vector<double> client_sums;
  for (const auto& t : times) client_sums.push_back(t.index + t.driver + t.messages);
  const double rpc_ms = med(&round_times::rpc);
  const double commit_ms = med(&round_times::commit);

  const auto& rep = last.report;
  const std::string shape = "\"tensors\":" + std::to_string(tensors.size()) +
                            ",\"storages\":" + std::to_string(rep.storages) +
                            ",\"allocations\":" + std::to_string(rep.allocations) +
                            ",\"regions\":" + std::to_string(rep.regions) + ",\"repeats\":" + std::to_string(repeats);
  const auto line = [&](const char* what, double ms, const std::string& extra = {}) {
    std::printf("{\"bench\":\"cuda_client_register\",\"what\":\"%s\",\"ms\":%.4f,%s%s}\n", what, ms, shape.c_str(),
                extra.c_str());
  };
  line("index", index_ms, ",\"note\":\"tensor descriptions + canonical_index::build + storage placement\"");
  line("driver", driver_ms, ",\"note\":\"cuMemGetAddressRange + cuIpcGetMemHandle per allocation, plan\"");
  line("messages", messages_ms,
       ",\"request_bytes\":" + std::to_string(rep.request_bytes) + ",\"feed_bytes\":" + std::to_string(rep.feed_bytes));
  char sum[64];
  std::snprintf(sum, sizeof sum, ",\"median_of_sums_ms\":%.4f", median(client_sums));
  line("client_work", client_ms, std::string(",\"note\":\"index + driver + messages medians\"") + sum);
  line("rpc_regions", med(&round_times::rpc_regions));
  line("rpc_begin", med(&round_times::rpc_begin));
  line("rpc_feed", med(&round_times::rpc_feed));
  line("rpc", rpc_ms);
  line("commit", commit_ms, last.existed ? ",\"existed\":true" : ",\"existed\":false");
  std::printf(
      "{\"bench\":\"cuda_client_register\",\"what\":\"summary\",%s,\"lone_handles\":%zu,\"index_ms\":%.4f,"
      "\"driver_ms\":%.4f,\"messages_ms\":%.4f,\"client_work_ms\":%.4f,\"rpc_ms\":%.4f,\"rpc_regions_ms\":%.4f,"
      "\"rpc_begin_ms\":%.4f,\"rpc_feed_ms\":%.4f,\"commit_ms\":%.4f,\"feed_bytes\":%zu,\"artifact_id\":\"%s\"}\n",
      shape.c_str(), rep.lone_handles, index_ms, driver_ms, messages_ms, client_ms, rpc_ms,
      med(&round_times::rpc_regions), med(&round_times::rpc_begin), med(&round_times::rpc_feed), commit_ms,
      rep.feed_bytes, first_id.c_str());
  std::printf(
      "C++ client register of %zu tensors (%zu storages, %zu allocations, %zu regions): client work %.3f ms = "
      "index %.3f + driver %.3f + messages %.3f; rpc %.3f ms; commit %.3f ms (median of %d)\n",
      tensors.size(), rep.storages, rep.allocations, rep.regions, client_ms, index_ms, driver_ms, messages_ms, rpc_ms,
      commit_ms, repeats);

  for (void* p : blocks) static_cast<void>(cudaFree(p));
  return 0;
}
