// cuda_client_register_bench — the C++ client's lease-in-place register() of CUDA tensors: the
// counterpart of the Python client's Store._register_cuda (python/tensorreg/store.py), doing the
// same work on the same tensor structure through tensorreg::daemon::client, with the
// client-side parts timed apart from the waits on the daemon.
//
//   cuda_client_register_bench --socket PATH --layout FILE [--repeats 5]
//
// FILE is the structure python_register_bench.py writes (write_layout):
//   {"allocations": [{"size": N}, ...],
//    "storages":    [{"allocation": a, "offset": o, "nbytes": n}, ...],
//    "tensors":     [{"name": "layers.0.w0", "storage": s, "shape": [..], "stride": [..],
//                     "dtype": "torch.bfloat16", "storage_offset": k}, ...]}
// (storages in any order, several on one allocation, several tensors on one storage). It is read
// and checked before the GPU is touched. Set-up (not timed): one cudaMalloc per allocation,
// zeroed, each storage at allocation base + offset. Storages are identified as the Python client
// identifies them, by (device address, nbytes). Storages no tensor names are not registered.
//
// Each repeat, after one warm-up that is not counted (median over the repeats):
//   index     the tensor descriptions (name, dtype, shape, stride, storage key "ptr:nbytes",
//             storage nbytes and offset) and index::canonical_index::build (names in byte order,
//             a storage at the cursor rounded up to 8, ...), then each storage's canonical
//             position and offset (state_dict_descs + _layout.build);
//   driver    _device.plan: the storages by address, each distinct allocation behind a non-empty
//             storage looked up once (cached by base): cuMemGetAddressRange on the storage's
//             address, cuIpcGetMemHandle on the base (driver API, reached through
//             cudaGetDriverEntryPointByVersion as src/cuda does); a VRAM region for an
//             allocation behind several storages, else the handle in the storage's entry; empty
//             storages borrow the first source;
//   messages  every request, built as protobuf and serialised: one RegisterRegion (VRAM) per
//             region, the Begin (lease in place), and the one Feed frame (a storage entry, a
//             whole-storage lease segment per storage, a tensor alias per tensor); after the
//             RegisterRegion and Begin answers, the region refs and the registration id are
//             filled in and the Feed frame serialised (that part is counted here too);
//   rpc       the RegisterRegion calls (one at a time: the C++ client has no pipelining, where
//             the Python client sends them at once), the Begin, the Feed stream;
//   commit    CommitRegisteredArtifact.
// Then (not timed) the lease is revoked and the regions unregistered (force), as _release_now.
// client::call/feed serialise each request again when they send it: that second serialisation
// is inside rpc.
//
// Prints one JSON line per measurement, a summary JSON line (client_work_ms, index_ms,
// driver_ms, messages_ms, rpc_ms, commit_ms: what python_register_bench.py reads), then a
// human line. Exits 77 with "skipped: no CUDA device" without a GPU, 1 on any error (the
// daemon's message), 2 on a bad command line. Host code only (.cu so the CPU benchmarks'
// *_bench.cpp glob does not take it).
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <numeric>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cuda/driver_entry.hpp"
#include "daemon/client.hpp"
#include "tensorreg/devices/device_identity.hpp"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/index/dtype.hpp"

namespace {

using namespace tensorreg;
namespace wire = ::tensorreg::wire::v1;
namespace v2 = ::tensorcast::daemon::v2;
using clock_type = std::chrono::steady_clock;
using json = nlohmann::json;

constexpr const char* program = "cuda_client_register_bench";
constexpr std::uint32_t lease_ttl_ms = 600'000;  // store.py DEFAULT_TTL_MS

double ms_between(clock_type::time_point a, clock_type::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

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
  std::uint64_t logical_length = 0; // bytes from the first element to the end of the last
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

// _layout.extent_bytes: bytes from a view's first element to the end of its last (0 if empty).
bool extent_bytes(const std::vector<std::int64_t>& shape, const std::vector<std::int64_t>& stride,
                  std::uint64_t element, std::uint64_t& out) {
  std::uint64_t last = 0;
  for (std::size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 0) {
      out = 0;
      return true;
    }
    const std::int64_t st = stride[d];
    const std::uint64_t magnitude = st >= 0 ? static_cast<std::uint64_t>(st) : 0 - static_cast<std::uint64_t>(st);
    std::uint64_t step = 0;
    if (__builtin_mul_overflow(static_cast<std::uint64_t>(shape[d] - 1), magnitude, &step)) return false;
    if (__builtin_add_overflow(last, step, &last)) return false;
  }
  return !__builtin_mul_overflow(last + 1, element, &out) && last + 1 != 0;
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
      bad(where + ".allocation", std::to_string(a) + " is not one of the " + std::to_string(out.allocations.size()) +
                                     " allocations");
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
      bad(where + ".storage", std::to_string(s) + " is not one of the " + std::to_string(out.storages.size()) +
                                  " storages");
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
    std::uint64_t first = 0;
    std::uint64_t end = 0;
    if (!extent_bytes(t.shape, t.stride, *element, t.logical_length) ||
        __builtin_mul_overflow(storage_offset, std::uint64_t{*element}, &first) ||
        __builtin_add_overflow(first, t.logical_length, &end) || end > out.storages[t.storage].nbytes) {
      bad(where, "(\"" + t.name + "\") reaches past its storage " + std::to_string(t.storage) + " of " +
                     std::to_string(out.storages[t.storage].nbytes) + " bytes");
    }
    out.tensors.push_back(std::move(t));
  }
  return out;
}

// ---- the driver entry points (src/cuda/driver_entry.hpp: through the runtime, no libcuda.so) -

struct driver_api {
  PFN_cuMemGetAddressRange_v3020 get_address_range = nullptr;
  PFN_cuIpcGetMemHandle_v4010 ipc_get_mem_handle = nullptr;
  PFN_cuGetErrorName_v6000 error_name = nullptr;

  template <typename Fn>
  static void find(Fn& out, const char* name, int version, bool required) {
    if (!tensorreg::cuda::detail::find_driver_entry(out, name, version) && required) {
      die(std::string("the CUDA driver has no ") + name);
    }
  }

  static driver_api load() {
    driver_api d;
    find(d.get_address_range, "cuMemGetAddressRange", 3020, true);
    find(d.ipc_get_mem_handle, "cuIpcGetMemHandle", 4010, true);
    find(d.error_name, "cuGetErrorName", 6000, false);
    return d;
  }

  std::string describe(CUresult r) const {
    const char* name = nullptr;
    if (error_name != nullptr && error_name(r, &name) == CUDA_SUCCESS && name != nullptr) return name;
    return "CUresult " + std::to_string(static_cast<int>(r));
  }
};

void check_cuda(cudaError_t e, const std::string& what) {
  if (e != cudaSuccess) die("cannot " + what + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}

std::string hex(std::uint64_t v) {
  char buffer[24];
  std::snprintf(buffer, sizeof buffer, "%#llx", static_cast<unsigned long long>(v));
  return buffer;
}

// ---- one register -------------------------------------------------------------------------

// One storage as the client holds it (identified by address and size, as store.py).
struct held_storage {
  std::uint64_t ptr = 0;
  std::uint64_t nbytes = 0;
};

// Where a storage's entry points (_device.Source): a region, or the allocation's IPC handle.
struct source {
  int region = -1;
  const std::string* ipc_handle = nullptr;
  std::uint64_t mapping_base_offset = 0;
};

struct allocation_found {
  std::uint64_t base = 0;
  std::uint64_t size = 0;
  std::string ipc_handle;  // CU_IPC_HANDLE_SIZE bytes
};

struct region_plan {
  std::uint64_t base = 0;
  std::uint64_t size = 0;
  const std::string* ipc_handle = nullptr;
  std::vector<std::size_t> storages;  // held storages (found order) that reference it
};

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
  std::size_t storages = 0;
  std::size_t allocations = 0;
  std::size_t regions = 0;
  std::size_t lone_handles = 0;
  std::size_t request_bytes = 0;
  std::size_t feed_bytes = 0;
};

struct bench {
  daemon::client& conn;
  const driver_api& drv;
  const std::vector<tensor_spec>& tensors;  // storage: position in `held`
  const std::vector<held_storage>& held;    // in the order the tensors first name them
  std::int32_t ordinal = 0;
  std::string uuid;
  std::int32_t pid = 0;

  // store.py _release_now: revoke (when begun), then unregister the regions; errors are
  // reported, not fatal (the Python client swallows them).
  void release(const std::string& registration_id, const std::vector<std::string>& region_ids) {
    if (!registration_id.empty()) {
      wire::Request revoke;
      auto* r = revoke.mutable_revoke_registered_artifact();
      r->set_registration_id(registration_id);
      r->set_reason("lease released by its holder");
      if (auto done = conn.call(std::move(revoke)); !done) {
        std::fprintf(stderr, "%s: warning: %s\n", program, done.error().message.c_str());
      }
    }
    for (const auto& id : region_ids) {
      wire::Request unregister;
      auto* u = unregister.mutable_unregister_region();
      u->set_region_id(id);
      u->set_owner_pid(pid);
      u->set_force(true);
      if (auto done = conn.call(std::move(unregister)); !done) {
        std::fprintf(stderr, "%s: warning: %s\n", program, done.error().message.c_str());
      }
    }
  }

  [[noreturn]] void fail_round(const std::string& message, const std::string& registration_id,
                               const std::vector<std::string>& region_ids) {
    release(registration_id, region_ids);
    die(message);
  }

  round_result run() {
    round_result out;

    // 1. index: the descriptions, the canonical layout, each storage's canonical place.
    const auto t_index = clock_type::now();
    std::vector<std::string> keys(held.size());
    for (std::size_t s = 0; s < held.size(); ++s) {
      keys[s] = std::to_string(held[s].ptr) + ":" + std::to_string(held[s].nbytes);
    }
    std::vector<index::tensor_desc> descs;
    descs.reserve(tensors.size());
    for (const auto& t : tensors) {
      descs.push_back({t.name, t.dtype, t.shape, t.stride, keys[t.storage], held[t.storage].nbytes, t.storage_offset});
    }
    auto built = index::canonical_index::build(descs);
    if (!built) die(built.error().message);
    const auto& entries = built->entries();
    std::vector<std::size_t> by_name(tensors.size());  // tensor positions in the entries' order
    std::iota(by_name.begin(), by_name.end(), std::size_t{0});
    std::sort(by_name.begin(), by_name.end(),
              [&](std::size_t a, std::size_t b) { return tensors[a].name < tensors[b].name; });
    std::vector<int> canonical_of(held.size(), -1);  // held storage -> canonical position
    std::vector<std::size_t> canonical_storages;     // canonical position -> held storage
    std::vector<std::uint64_t> canonical_offsets;
    std::vector<std::size_t> alias_storage(entries.size());  // entry i -> canonical position
    for (std::size_t i = 0; i < entries.size(); ++i) {
      const std::size_t s = tensors[by_name[i]].storage;
      if (entries[i].name != tensors[by_name[i]].name) die("the canonical index put tensors in another order");
      if (canonical_of[s] < 0) {
        canonical_of[s] = static_cast<int>(canonical_storages.size());
        canonical_storages.push_back(s);
        canonical_offsets.push_back(entries[i].offset);
      }
      alias_storage[i] = static_cast<std::size_t>(canonical_of[s]);
    }
    const std::uint64_t total_size = built->total_size();
    out.storages = canonical_storages.size();

    // 2. driver: _device.plan over the storages in the order found.
    const auto t_driver = clock_type::now();
    std::map<std::uint64_t, allocation_found> found;  // by base
    std::vector<const allocation_found*> cover(held.size(), nullptr);
    std::vector<std::size_t> by_address(held.size());
    std::iota(by_address.begin(), by_address.end(), std::size_t{0});
    std::stable_sort(by_address.begin(), by_address.end(),
                     [&](std::size_t a, std::size_t b) { return held[a].ptr < held[b].ptr; });
    for (const std::size_t k : by_address) {
      const auto& s = held[k];
      if (s.nbytes == 0) continue;
      const allocation_found* a = nullptr;
      if (auto it = found.upper_bound(s.ptr); it != found.begin()) {
        --it;
        if (s.ptr < it->second.base + it->second.size) a = &it->second;
      }
      if (a == nullptr) {
        CUdeviceptr base = 0;
        std::size_t size = 0;
        if (const CUresult r = drv.get_address_range(&base, &size, static_cast<CUdeviceptr>(s.ptr)); r != CUDA_SUCCESS) {
          die("cannot find the allocation of device address " + hex(s.ptr) + ": " + drv.describe(r));
        }
        CUipcMemHandle h{};
        if (const CUresult r = drv.ipc_get_mem_handle(&h, base); r != CUDA_SUCCESS) {
          die("cannot export an IPC handle for the allocation at " + hex(base) + ": " + drv.describe(r));
        }
        allocation_found f;
        f.base = base;
        f.size = size;
        f.ipc_handle.assign(h.reserved, sizeof h.reserved);
        a = &found.emplace(f.base, std::move(f)).first->second;
      }
      if (s.ptr + s.nbytes > a->base + a->size) {
        die("cannot register state dict: storage " + std::to_string(k) + " at " + hex(s.ptr) + " of " +
            std::to_string(s.nbytes) + " bytes ends past its allocation [" + hex(a->base) + ", " +
            hex(a->base + a->size) + ")");
      }
      cover[k] = a;
    }
    std::map<std::uint64_t, std::vector<std::size_t>> users;  // base -> storages, in found order
    for (std::size_t k = 0; k < held.size(); ++k) {
      if (cover[k] != nullptr) users[cover[k]->base].push_back(k);
    }
    std::vector<source> sources(held.size());
    std::vector<region_plan> regions;
    for (const auto& [base, a] : found) {  // allocations by base
      const auto& ks = users[base];
      if (ks.size() > 1) {
        for (const std::size_t k : ks) sources[k] = {static_cast<int>(regions.size()), nullptr, held[k].ptr - base};
        regions.push_back({base, a.size, &a.ipc_handle, ks});
      } else {
        sources[ks[0]] = {-1, &a.ipc_handle, held[ks[0]].ptr - base};
        ++out.lone_handles;
      }
    }
    {
      const source* borrowed = nullptr;
      for (std::size_t k = 0; k < held.size() && borrowed == nullptr; ++k) {
        if (cover[k] != nullptr) borrowed = &sources[k];
      }
      if (borrowed == nullptr) die("cannot register state dict: every storage is empty");
      const source lent = *borrowed;
      for (std::size_t k = 0; k < held.size(); ++k) {
        if (cover[k] == nullptr) sources[k] = lent;
      }
    }
    out.allocations = found.size();
    out.regions = regions.size();

    // 3. messages: RegisterRegion per region, Begin, the Feed frame; serialised.
    const auto t_messages = clock_type::now();
    std::vector<wire::Request> region_requests(regions.size());
    for (std::size_t r = 0; r < regions.size(); ++r) {
      auto* rr = region_requests[r].mutable_register_region();
      rr->set_memory_kind(v2::REGION_MEMORY_KIND_VRAM);
      rr->set_owner_pid(pid);
      rr->set_size_bytes(regions[r].size);
      rr->set_device_id(ordinal);
      rr->set_device_uuid(uuid);
      rr->set_cuda_ipc_handle(*regions[r].ipc_handle);
    }
    wire::Request begin;
    {
      auto* b = begin.mutable_begin_register_artifact();
      b->set_device_id(ordinal);
      b->set_device_uuid(uuid);
      b->set_total_size(total_size);
      b->set_ttl_ms(lease_ttl_ms);
      b->set_owner_pid(pid);
      b->mutable_lease()->set_in_place(true);
    }
    wire::Request frame;
    auto* feed = frame.mutable_feed_register_artifact_stream();
    {
      auto* entries_out = feed->mutable_storage_entries();
      auto* segments = feed->mutable_lease_segments()->mutable_segments();
      entries_out->Reserve(static_cast<int>(canonical_storages.size()));
      segments->Reserve(static_cast<int>(canonical_storages.size()));
      std::vector<std::string> ids(canonical_storages.size());
      for (std::size_t c = 0; c < canonical_storages.size(); ++c) {
        const std::size_t k = canonical_storages[c];
        ids[c] = "s" + std::to_string(c);
        auto* e = entries_out->Add();
        e->set_storage_id(ids[c]);
        e->set_storage_length(held[k].nbytes);
        e->set_device_id(ordinal);
        e->set_device_uuid(uuid);
        if (sources[k].region < 0) e->set_cuda_ipc_handle(*sources[k].ipc_handle);
        e->set_mapping_base_offset(sources[k].mapping_base_offset);
        auto* seg = segments->Add();
        seg->set_storage_id(ids[c]);
        seg->set_artifact_offset(canonical_offsets[c]);
        seg->set_length(held[k].nbytes);
      }
      auto* aliases = feed->mutable_tensor_aliases();
      aliases->Reserve(static_cast<int>(entries.size()));
      for (std::size_t i = 0; i < entries.size(); ++i) {
        const auto& t = tensors[by_name[i]];
        auto* a = aliases->Add();
        a->set_name(t.name);
        a->set_storage_id(ids[alias_storage[i]]);
        if (t.storage_offset != 0) a->set_storage_offset(static_cast<std::uint64_t>(t.storage_offset));
        a->set_logical_length(t.logical_length);
        a->mutable_shape()->Add(t.shape.begin(), t.shape.end());
        a->mutable_stride()->Add(t.stride.begin(), t.stride.end());
        a->set_dtype(t.dtype);
      }
    }
    std::vector<std::string> serialised(region_requests.size() + 1);
    for (std::size_t r = 0; r < region_requests.size(); ++r) {
      if (!region_requests[r].SerializeToString(&serialised[r])) die("cannot serialise a RegisterRegion request");
    }
    if (!begin.SerializeToString(&serialised.back())) die("cannot serialise the Begin request");
    for (const auto& s : serialised) out.request_bytes += s.size();
    const auto t_rpc = clock_type::now();

    // 4. rpc: the regions (each answer's ref goes with regions[r].storages), then Begin.
    std::vector<v2::RegionRef> refs;
    std::vector<std::string> region_ids;
    std::string registration_id;
    for (auto& request : region_requests) {
      auto answer = conn.call(std::move(request));
      if (!answer) fail_round(answer.error().message, registration_id, region_ids);
      refs.push_back(answer->response.register_region().region());
      region_ids.push_back(refs.back().region_id());
    }
    const auto t_begin = clock_type::now();
    {
      auto answer = conn.call(std::move(begin));
      if (!answer) fail_round(answer.error().message, registration_id, region_ids);
      registration_id = answer->response.begin_register_artifact().registration_id();
    }
    const auto t_patch = clock_type::now();

    // (messages, continued) the region refs and the registration id, then the Feed serialised.
    feed->set_registration_id(registration_id);
    for (std::size_t c = 0; c < canonical_storages.size(); ++c) {
      const auto& src = sources[canonical_storages[c]];
      if (src.region >= 0) {
        feed->mutable_storage_entries(static_cast<int>(c))->mutable_region_ref()->CopyFrom(
            refs[static_cast<std::size_t>(src.region)]);
      }
    }
    std::string feed_bytes;
    if (!frame.SerializeToString(&feed_bytes)) die("cannot serialise the Feed frame");
    out.feed_bytes = feed_bytes.size();
    std::vector<v2::FeedRegisterArtifactStreamRequest> frames;
    frames.push_back(std::move(*feed));
    const auto t_feed = clock_type::now();

    // (rpc, continued) the Feed stream.
    if (auto fed = conn.feed(std::move(frames)); !fed) fail_round(fed.error().message, registration_id, region_ids);
    const auto t_commit = clock_type::now();

    // 5. commit.
    wire::Request commit;
    commit.mutable_commit_registered_artifact()->set_registration_id(registration_id);
    auto committed = conn.call(std::move(commit));
    const auto t_done = clock_type::now();
    if (!committed) fail_round(committed.error().message, registration_id, region_ids);
    out.artifact_id = committed->response.commit_registered_artifact().artifact_descriptor().artifact_id();
    out.existed = committed->response.commit_registered_artifact().existed();

    out.t.index = ms_between(t_index, t_driver);
    out.t.driver = ms_between(t_driver, t_messages);
    out.t.messages = ms_between(t_messages, t_rpc) + ms_between(t_patch, t_feed);
    out.t.rpc_regions = ms_between(t_rpc, t_begin);
    out.t.rpc_begin = ms_between(t_begin, t_patch);
    out.t.rpc_feed = ms_between(t_feed, t_commit);
    out.t.rpc = out.t.rpc_regions + out.t.rpc_begin + out.t.rpc_feed;
    out.t.commit = ms_between(t_commit, t_done);

    // 6. cleanup (not timed), as the Python client at close.
    release(registration_id, region_ids);
    return out;
  }
};

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
  const driver_api drv = driver_api::load();

  // Set-up: the allocations, zeroed; each storage's address.
  std::vector<void*> blocks;
  std::uint64_t allocated = 0;
  for (std::size_t a = 0; a < spec.allocations.size(); ++a) {
    void* p = nullptr;
    const auto size = static_cast<std::size_t>(spec.allocations[a].size);
    check_cuda(cudaMalloc(&p, size), "allocate allocation " + std::to_string(a) + " of " + std::to_string(size) + " bytes");
    check_cuda(cudaMemset(p, 0, size), "zero allocation " + std::to_string(a));
    blocks.push_back(p);
    allocated += size;
  }
  check_cuda(cudaDeviceSynchronize(), "synchronise CUDA device 0");

  // Storages as the Python client knows them: by (address, nbytes), in the order the tensors
  // first name them; the tensors then point at those.
  std::vector<held_storage> held;
  std::map<std::pair<std::uint64_t, std::uint64_t>, std::size_t> held_of;
  std::vector<tensor_spec> tensors = spec.tensors;
  for (auto& t : tensors) {
    const auto& s = spec.storages[t.storage];
    const held_storage h{reinterpret_cast<std::uint64_t>(blocks[s.allocation]) + s.offset, s.nbytes};
    const auto [it, inserted] = held_of.emplace(std::make_pair(h.ptr, h.nbytes), held.size());
    if (inserted) held.push_back(h);
    t.storage = it->second;
  }
  std::set<std::size_t> named;
  for (const auto& t : spec.tensors) named.insert(t.storage);
  const std::size_t unnamed = spec.storages.size() - named.size();

  auto conn = daemon::client::connect(socket_path);
  if (!conn) die(conn.error().message);

  std::printf("# device %d: %s (%s); %zu tensors, %zu storages (%zu named by no tensor, not registered), %zu "
              "allocations, %.1f MiB allocated\n",
              ordinal, prop.name, uuid.c_str(), tensors.size(), held.size(), unnamed, spec.allocations.size(),
              static_cast<double>(allocated) / (1 << 20));

  bench b{**conn, drv, tensors, held, ordinal, uuid, static_cast<std::int32_t>(::getpid())};
  std::vector<round_times> times;
  round_result last;
  std::string first_id;
  for (int round = 0; round <= repeats; ++round) {  // round 0 warms up
    last = b.run();
    if (round == 0) {
      first_id = last.artifact_id;
      std::printf("# artifact %s%s\n", last.artifact_id.c_str(), last.existed ? " (existed)" : "");
    } else {
      times.push_back(last.t);
      if (last.artifact_id != first_id) die("repeat " + std::to_string(round) + " gave another id: " + last.artifact_id);
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

  const std::string shape = "\"tensors\":" + std::to_string(tensors.size()) + ",\"storages\":" +
                            std::to_string(last.storages) + ",\"allocations\":" + std::to_string(last.allocations) +
                            ",\"regions\":" + std::to_string(last.regions) + ",\"repeats\":" + std::to_string(repeats);
  const auto line = [&](const char* what, double ms, const std::string& extra = {}) {
    std::printf("{\"bench\":\"cuda_client_register\",\"what\":\"%s\",\"ms\":%.4f,%s%s}\n", what, ms, shape.c_str(),
                extra.c_str());
  };
  line("index", index_ms, ",\"note\":\"tensor descriptions + canonical_index::build + storage placement\"");
  line("driver", driver_ms, ",\"note\":\"cuMemGetAddressRange + cuIpcGetMemHandle per allocation, plan\"");
  line("messages", messages_ms,
       ",\"request_bytes\":" + std::to_string(last.request_bytes) + ",\"feed_bytes\":" + std::to_string(last.feed_bytes));
  char sum[64];
  std::snprintf(sum, sizeof sum, ",\"median_of_sums_ms\":%.4f", median(client_sums));
  line("client_work", client_ms, std::string(",\"note\":\"index + driver + messages medians\"") + sum);
  line("rpc_regions", med(&round_times::rpc_regions));
  line("rpc_begin", med(&round_times::rpc_begin));
  line("rpc_feed", med(&round_times::rpc_feed));
  line("rpc", rpc_ms);
  line("commit", commit_ms, last.existed ? ",\"existed\":true" : ",\"existed\":false");
  std::printf("{\"bench\":\"cuda_client_register\",\"what\":\"summary\",%s,\"lone_handles\":%zu,\"index_ms\":%.4f,"
              "\"driver_ms\":%.4f,\"messages_ms\":%.4f,\"client_work_ms\":%.4f,\"rpc_ms\":%.4f,\"rpc_regions_ms\":%.4f,"
              "\"rpc_begin_ms\":%.4f,\"rpc_feed_ms\":%.4f,\"commit_ms\":%.4f,\"feed_bytes\":%zu,\"artifact_id\":\"%s\"}\n",
              shape.c_str(), last.lone_handles, index_ms, driver_ms, messages_ms, client_ms, rpc_ms,
              med(&round_times::rpc_regions), med(&round_times::rpc_begin), med(&round_times::rpc_feed), commit_ms,
              last.feed_bytes, first_id.c_str());
  std::printf("C++ client register of %zu tensors (%zu storages, %zu allocations, %zu regions): client work %.3f ms = "
              "index %.3f + driver %.3f + messages %.3f; rpc %.3f ms; commit %.3f ms (median of %d)\n",
              tensors.size(), last.storages, last.allocations, last.regions, client_ms, index_ms, driver_ms,
              messages_ms, rpc_ms, commit_ms, repeats);

  for (void* p : blocks) static_cast<void>(cudaFree(p));
  return 0;
}
