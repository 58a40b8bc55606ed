#include "support/engine_helpers.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <tuple>

#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/index/dtype.hpp"

namespace tensorreg::testing {

reg::engine_options deterministic_options(const fake_clock& clock) {
  reg::engine_options o;
  o.time = &clock;
  o.sweep_interval = std::chrono::milliseconds(0);
  o.watch_owners = false;
  o.hash_threads = 2;
  return o;
}

std::unique_ptr<reg::engine> make_engine(reg::engine_options options) {
  auto e = reg::engine::create(std::move(options));
  REQUIRE(e);
  return std::move(*e);
}

std::unique_ptr<reg::engine> make_engine(const fake_clock& clock) { return make_engine(deterministic_options(clock)); }

status owned_bytes::visit(std::uint64_t offset, std::uint64_t length, memory::piece_sink sink) const {
  TENSORREG_TRY(check_range(offset, length));
  if (length == 0) return {};
  return sink(std::as_bytes(std::span<const char>(bytes_)).subspan(offset, length));
}

std::string pattern(std::size_t n, std::uint32_t seed) {
  std::string out(n, '\0');
  std::uint32_t x = seed * 2654435761u + 12345u;
  for (auto& c : out) {
    x = x * 1664525u + 1013904223u;
    c = static_cast<char>((x >> 24) | 1u);  // never zero, so PAD (zero) is distinguishable
  }
  return out;
}

index::canonical_index model::index() const {
  std::vector<index::tensor_desc> descs;
  for (const auto& t : tensors) {
    descs.push_back(index::tensor_desc{t.name, t.dtype, t.shape, t.stride, t.storage, storage(t.storage).bytes.size(),
                                       t.storage_offset});
  }
  auto built = index::canonical_index::build(descs);
  TENSORREG_ASSERT(built.has_value());  // worker threads too: see storage()
  return std::move(*built);
}

std::map<std::string, std::uint64_t> model::offsets() const {
  const auto idx = index();
  std::map<std::string, std::uint64_t> out;
  for (const auto& t : tensors) out[t.storage] = idx.find(t.name)->offset;
  return out;
}

std::string model::canonical() const { return canonical_with_pad('\0'); }

std::string model::canonical_with_pad(char fill) const {
  std::string out(total_size(), fill);
  for (const auto& [id, offset] : offsets()) {
    const auto& bytes = storage(id).bytes;
    std::memcpy(out.data() + offset, bytes.data(), bytes.size());
  }
  return out;
}

const storage_spec& model::storage(const std::string& id) const {
  auto it = std::find_if(storages.begin(), storages.end(), [&](const auto& s) { return s.id == id; });
  // Not REQUIRE: these helpers also run on worker threads, and Catch2 v2's assertions are not
  // thread-safe. A model naming a storage it lacks is a broken test: abort.
  TENSORREG_ASSERT(it != storages.end());
  return *it;
}

model small_model() {
  model m;
  m.storages = {{"s0", pattern(16, 1)}, {"s1", pattern(20, 2)}};
  m.tensors = {
      {"w", "s0", {2, 2}, {2, 1}, "torch.float32", 0, 16},
      {"v", "s0", {2}, {1}, "torch.float32", 2, 8},
      {"b", "s1", {5}, {1}, "torch.float32", 0, 20},
  };
  return m;
}

std::string index_multihash_of(const std::string& index_json) {
  return hash::encode_multihash(hash::sha256(std::string_view(index_json)));
}

std::string expected_mi2(const std::string& index_json, const std::string& canonical) {
  owned_bytes data(canonical);
  auto root = hash::tree_hash(data);
  TENSORREG_ASSERT(root.has_value());  // worker threads too: see storage()
  return "mi2:" + index_multihash_of(index_json) + ":" + hash::encode_multihash(*root);
}

std::string describe(const reg::artifact_descriptor& d) {
  return d.artifact_id + " index=" + d.index_multihash + " data=" + d.data_multihash + " schema=" + d.schema_version +
         " encoding=" + d.encoding + " total_size=" + std::to_string(d.total_size) +
         " kind=" + std::string(identity::id_kind_name(d.id_kind));
}

reg::begin_request stable_begin(const model& m, std::int32_t owner_pid) {
  reg::begin_request r;
  r.owner_pid = owner_pid;
  r.total_size = m.total_size();
  r.tensor_index_data = reg::index_data{m.index().json(), "v3", "json"};
  r.plan = reg::stable_dram_options{};
  return r;
}

reg::begin_request lip_begin(std::uint64_t total_size, std::int32_t owner_pid, std::uint32_t ttl_ms) {
  reg::begin_request r;
  r.owner_pid = owner_pid;
  r.total_size = total_size;
  if (ttl_ms != 0) r.ttl_ms = ttl_ms;
  r.plan = reg::lease_options{};
  return r;
}

reg::tensor_alias alias_of(const tensor_spec& t) {
  return reg::tensor_alias{t.name,   t.storage, static_cast<std::uint64_t>(t.storage_offset), t.logical_length, t.shape,
                           t.stride, t.dtype};
}

reg::feed_request lip_feed(const std::string& registration_id, const model& m,
                           const std::map<std::string, reg::storage_entry>& entries) {
  reg::feed_request f;
  f.registration_id = registration_id;
  reg::lease_segments segs;
  const auto offsets = m.offsets();
  for (const auto& s : m.storages) {
    if (!offsets.contains(s.id)) continue;
    f.storage_entries.push_back(entries.at(s.id));
    segs.segments.push_back({s.id, 0, offsets.at(s.id), s.bytes.size()});
  }
  f.payload = std::move(segs);
  for (const auto& t : m.tensors) f.tensor_aliases.push_back(alias_of(t));
  return f;
}

regions::register_request host_region(std::int32_t owner_pid, std::uint64_t size) {
  regions::register_request r;
  r.kind = regions::memory_kind::host_shared;
  r.owner_pid = owner_pid;
  r.size_bytes = size;
  r.host_shared = regions::host_shared_spec{"", true, regions::host_shared_class::scratch};
  return r;
}

std::map<std::string, reg::storage_entry> region_entries(const regions::region_info& region) {
  std::map<std::string, reg::storage_entry> out;
  for (auto [id, length, at] : {std::tuple{"s0", 16u, 0u}, std::tuple{"s1", 20u, 64u}}) {
    reg::storage_entry s;
    s.storage_id = id;
    s.device_id = -1;
    s.storage_length = length;
    s.source = reg::region_ref_source{region.id, regions::memory_kind::host_shared, -1, region.size_bytes};
    s.mapping_base_offset = at;
    out.emplace(id, s);
  }
  return out;
}

reg::feed_request lip_feed(const std::string& registration_id, const model& m) {
  std::map<std::string, reg::storage_entry> entries;
  for (const auto& s : m.storages) {
    reg::storage_entry e;
    e.storage_id = s.id;
    e.device_id = 0;
    e.storage_length = s.bytes.size();
    e.source = reg::host_storage_source{std::make_shared<owned_bytes>(s.bytes)};
    entries.emplace(s.id, std::move(e));
  }
  return lip_feed(registration_id, m, entries);
}

status feed_chunks(reg::engine& e, const std::string& registration_id, const std::string& bytes, std::size_t chunk) {
  for (std::size_t at = 0; at < bytes.size(); at += chunk) {
    reg::feed_request f;
    f.registration_id = registration_id;
    f.payload = reg::view_chunk{at, 0, bytes.substr(at, chunk)};
    TENSORREG_TRY(e.feed(std::move(f)));
  }
  return {};
}

result<reg::commit_response> register_lip(reg::engine& e, const model& m, std::int32_t owner_pid,
                                          std::string* registration_id, std::optional<policy::store_policy> policy) {
  auto r = lip_begin(m.total_size(), owner_pid);
  r.policy = std::move(policy);
  TENSORREG_TRY_ASSIGN(auto begun, e.begin(std::move(r)));
  if (registration_id != nullptr) *registration_id = begun.registration_id;
  TENSORREG_TRY(e.feed(lip_feed(begun.registration_id, m)));
  return e.commit(begun.registration_id);
}

result<reg::commit_response> register_stable(reg::engine& e, const model& m, std::int32_t owner_pid,
                                             std::string* registration_id) {
  TENSORREG_TRY_ASSIGN(auto begun, e.begin(stable_begin(m, owner_pid)));
  if (registration_id != nullptr) *registration_id = begun.registration_id;
  // Odd-sized chunks, so that their edges fall anywhere in a tensor; small ones for small
  // models, and not millions of Feeds for a model of several leaves (minutes under ASan).
  const std::size_t chunk = m.total_size() <= (std::size_t{64} << 10) ? 7 : (std::size_t{64} << 10) + 7;
  TENSORREG_TRY(feed_chunks(e, begun.registration_id, m.canonical_with_pad('\x5a'), chunk));
  return e.commit(begun.registration_id);
}

}  // namespace tensorreg::testing
