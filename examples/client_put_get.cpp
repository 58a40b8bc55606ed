// client_put_get — tensorreg::client against a running tensorregd, no CUDA needed.
//
// Puts one or more .safetensors files into the daemon's stable DRAM (the memfd publish path),
// reads the artifact back (get: the daemon's replica, mapped read-only here) and checks it
// byte for byte against the files' canonical bytes, lists what the daemon holds, and removes
// the artifact again. A daemon that is not there is reported with its code and exit status 1.
//
// Usage: client_put_get SOCKET FILE.safetensors...
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "tensorreg/client/connection.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/index/safetensors_bundle.hpp"

namespace {

using namespace tensorreg;

int failed(const char* what, const error& e) {
  std::fprintf(stderr, "client_put_get: %s: %s (%s)\n", what, e.message.c_str(),
               std::string(errc_name(e.code)).c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: client_put_get SOCKET FILE.safetensors...\n");
    return 2;
  }
  auto conn = client::connection::connect(argv[1]);
  if (!conn) return failed("connect", conn.error());
  auto bundle = index::safetensors_bundle::open(std::vector<std::string>(argv + 2, argv + argc));
  if (!bundle) return failed("open", bundle.error());

  auto put = conn->put(**bundle, {"cache", {}});
  if (!put) return failed("put", put.error());
  std::printf("put %s (%llu bytes%s)\n", put->descriptor.artifact_id.c_str(),
              static_cast<unsigned long long>(put->descriptor.total_size), put->existed ? ", existed" : "");

  auto replica = conn->get(put->descriptor.artifact_id);
  if (!replica) return failed("get", replica.error());
  std::vector<std::byte> expected((*bundle)->canonical().size());
  thread_pool pool(1);
  if (auto copied = memory::copy_in_chunks((*bundle)->canonical(), expected, 1 << 20, pool,
                                           [](std::size_t, std::uint64_t, std::uint64_t) {});
      !copied) {
    return failed("read the files", copied.error());
  }
  const auto got = replica->memory.bytes();
  if (got.size() != expected.size() || std::memcmp(got.data(), expected.data(), expected.size()) != 0) {
    std::fprintf(stderr, "client_put_get: the daemon's replica differs from the files' canonical bytes\n");
    return 1;
  }
  std::printf("get: %zu bytes, identical to the files' canonical bytes\n", got.size());

  auto listed = conn->list();
  if (!listed) return failed("list", listed.error());
  for (const auto& a : *listed) {
    std::string tiers;
    for (const auto t : a.tiers) tiers += (tiers.empty() ? "" : ",") + std::string(client::tier_name(t));
    std::printf("holds %s [%s]\n", a.descriptor.artifact_id.c_str(), tiers.c_str());
  }

  auto removed = conn->deregister(put->descriptor.artifact_id);
  if (!removed) return failed("deregister", removed.error());
  std::printf("deregistered (removed %s)\n", removed->removed ? "true" : "false");
  return 0;
}
