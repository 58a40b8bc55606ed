// embed_engine — an inference server's view of tensorreg: link the library, no daemon.
//
// Loads one or more .safetensors files, registers them in place (lease-in-place over the
// process's own memory: the file mappings are the storages), prints the mi2 id, checks it
// against the offline id of the same files, then keeps a stable DRAM copy through the
// stable_dram plan and shows that the engine recognises the same content (existed=true).
//
// Usage: embed_engine FILE.safetensors...
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "tensorreg/identity/content_id.hpp"
#include "tensorreg/index/safetensors_bundle.hpp"
#include "tensorreg/registration/engine.hpp"

namespace {

using namespace tensorreg;

// One storage per tensor storage of the index (aliases share one), each a window of the
// canonical bytes at its canonical offset; so the rebuilt index equals the files' index.
registration::feed_request lease_feed(const std::string& registration_id, const index::safetensors_bundle& bundle,
                                      const std::shared_ptr<const memory::byte_source>& bytes) {
  registration::feed_request f;
  f.registration_id = registration_id;
  registration::lease_segments segments;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> seen;  // (offset, size) of each storage
  for (const auto& e : bundle.index().entries()) {
    const auto key = std::make_pair(e.offset, e.size);
    auto it = std::find(seen.begin(), seen.end(), key);
    const std::string storage_id = "s" + std::to_string(it - seen.begin());
    if (it == seen.end()) {
      seen.push_back(key);
      registration::storage_entry storage;
      storage.storage_id = storage_id;
      storage.device_id = -1;
      storage.storage_length = e.size;
      storage.source = registration::host_storage_source{bytes};
      storage.mapping_base_offset = e.offset;
      f.storage_entries.push_back(storage);
      segments.segments.push_back({storage_id, 0, e.offset, e.size});
    }
    registration::tensor_alias a;
    a.name = e.name;
    a.storage_id = storage_id;
    a.storage_offset = static_cast<std::uint64_t>(e.storage_offset);
    a.logical_length = e.size;
    a.shape = e.shape;
    a.stride = e.stride;
    a.dtype = e.dtype;
    f.tensor_aliases.push_back(a);
  }
  f.payload = std::move(segments);
  return f;
}

int fail_with(const error& e) {
  std::fprintf(stderr, "embed_engine: %s (%s)\n", e.message.c_str(), std::string(errc_name(e.code)).c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: embed_engine FILE.safetensors...\n");
    return 2;
  }
  auto bundle = index::safetensors_bundle::open(std::vector<std::string>(argv + 1, argv + argc));
  if (!bundle) return fail_with(bundle.error());
  registration::engine_options options;
  auto engine = registration::engine::create(options);
  if (!engine) return fail_with(engine.error());

  // The stable_dram plan: the canonical bytes streamed in chunks into the engine's memory.
  registration::begin_request put;
  put.total_size = (*bundle)->index().total_size();
  put.owner_pid = ::getpid();
  put.tensor_index_data = registration::index_data{(*bundle)->index().json(), "v3", "json"};
  put.plan = registration::stable_dram_options{};
  auto begun = (*engine)->begin(put);
  if (!begun) return fail_with(begun.error());
  const auto& canonical = (*bundle)->canonical();
  std::string chunk(4 << 20, '\0');
  for (std::uint64_t at = 0; at < canonical.size(); at += chunk.size()) {
    const auto n = std::min<std::uint64_t>(chunk.size(), canonical.size() - at);
    if (auto r = canonical.read(at, std::as_writable_bytes(std::span(chunk.data(), n))); !r)
      return fail_with(r.error());
    registration::feed_request f;
    f.registration_id = begun->registration_id;
    f.payload = registration::view_chunk{at, 0, chunk.substr(0, n)};
    if (auto fed = (*engine)->feed(std::move(f)); !fed) return fail_with(fed.error());
  }
  auto stored = (*engine)->commit(begun->registration_id);
  if (!stored) return fail_with(stored.error());
  std::printf("stable_dram     %s\n", stored->descriptor.artifact_id.c_str());

  // Lease-in-place: the engine reads the files' mappings directly (a byte_source over them).
  // The bundle must outlive the lease; a no-op deleter says the engine does not own it.
  std::shared_ptr<const memory::byte_source> bytes(&canonical, [](const memory::byte_source*) {});
  registration::begin_request lease;
  lease.total_size = canonical.size();
  lease.owner_pid = ::getpid();
  lease.ttl_ms = 60'000;
  lease.plan = registration::lease_options{};
  auto leased_begin = (*engine)->begin(lease);
  if (!leased_begin) return fail_with(leased_begin.error());
  if (auto fed = (*engine)->feed(lease_feed(leased_begin->registration_id, **bundle, bytes)); !fed) {
    return fail_with(fed.error());
  }
  auto leased = (*engine)->commit(leased_begin->registration_id);
  if (!leased) return fail_with(leased.error());
  std::printf("lease-in-place  %s\n", leased->descriptor.artifact_id.c_str());

  thread_pool pool(3);
  auto offline = identity::content_id((*bundle)->index().json(), canonical, &pool);
  if (!offline) return fail_with(offline.error());
  std::printf("offline         %s\n", offline->to_string().c_str());
  const bool same = offline->to_string() == stored->descriptor.artifact_id &&
                    stored->descriptor.artifact_id == leased->descriptor.artifact_id;
  std::printf("%s\n", same ? "all three ids agree" : "the ids differ");
  (*engine)->revoke(leased_begin->registration_id, "example done");
  return same ? 0 : 1;
}
