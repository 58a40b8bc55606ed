// fuzz/dispatcher_fuzz.cpp — whole client conversations through the dispatcher into a real
// registration engine (fake clock, no sockets, no GPU).
//
// The input is read as a sequence of requests, each picked and filled from the next input
// bytes: Begin (stable_dram, lease, coalesced, by key, with views, CGIDs and policies),
// Feed streams (view chunks, lease segments over registered regions, publish progress,
// storage entries, aliases, interleaved streams, end_of_stream), Commit, Abort, KeepAlive,
// Revoke, RegisterRegion over daemon slabs and client memfds, Unregister, Deregister,
// List/GetStats/GetServerConfig, index and memfd reads, persistence RPCs, raw envelope bytes,
// stray fds and clock steps with a sweep. Registration, artifact and region ids from earlier
// answers are kept so that later requests name them. The peer is this process (its own pid and
// uid), as a local client would be.
//
// Checked on every answer: it parses; it answers this request (or is a connection-level
// request_id 0 answer, which then closes); the status is a gRPC code, OK exactly when a body
// is set and the message empty; fds come only with OK answers. After the conversation the
// connection, dispatcher and engine are torn down and every fd of this process is as before.
#include <fuzzer/FuzzedDataProvider.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <google/protobuf/stubs/logging.h>

#include "daemon/dispatcher.hpp"
#include "fuzz/fuzz_check.hpp"
#include "support/fake_clock.hpp"
#include "tensorcast/common/v1/common.pb.h"
#include "tensorcast/daemon/v2/store_daemon.pb.h"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/registration/engine.hpp"
#include "tensorreg/wire/v1/frame.pb.h"

namespace {

namespace wire = tensorreg::wire::v1;
namespace v2 = tensorcast::daemon::v2;
namespace reg = tensorreg::registration;
using tensorreg::unique_fd;
using tensorreg::daemon::dispatcher;
using tensorreg::daemon::frame_in;
using tensorreg::daemon::frame_out;
using namespace std::chrono_literals;

constexpr std::uint64_t artifact_size = 24;  // tensor "a": 16 bytes at 0, "b": 8 bytes at 16
constexpr std::size_t max_steps = 64;

const std::string& index_json() {
  static const std::string json = [] {
    std::vector<tensorreg::index::entry> entries{{"a", 0, 16, {4}, {1}, "torch.float32", 0},
                                                 {"b", 16, 8, {2}, {1}, "torch.float32", 0}};
    return tensorreg::index::canonical_index::from_entries(std::move(entries), artifact_size)->json();
  }();
  return json;
}

std::string artifact_bytes() {
  std::string bytes(artifact_size, '\0');
  for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<char>(i * 7 + 3);
  return bytes;
}

// TENSORREG_FUZZ_TRACE=1 prints each request and its answer (for reading a crash input).
bool trace() {
  static const bool on = std::getenv("TENSORREG_FUZZ_TRACE") != nullptr;
  return on;
}

int my_pid() { return static_cast<int>(::getpid()); }

// Sizes and offsets: mostly the interesting ones, sometimes anything.
std::uint64_t pick_u64(FuzzedDataProvider& in) {
  static constexpr std::array<std::uint64_t, 12> table{
      0, 1, 7, 8, 16, 24, 25, 64, 4096, 1u << 20, std::uint64_t{1} << 63, ~std::uint64_t{0}};
  if (in.ConsumeIntegralInRange<int>(0, 7) == 0) return in.ConsumeIntegral<std::uint64_t>();
  return table[in.ConsumeIntegralInRange<std::size_t>(0, table.size() - 1)];
}

// A size that is always safe to commit: the engine hashes every byte of total_size, and a
// fuzzer that commits a terabyte of padding only finds its own timeout.
std::uint64_t pick_total(FuzzedDataProvider& in) {
  switch (in.ConsumeIntegralInRange<int>(0, 5)) {
    case 0: return 0;
    case 1: return in.ConsumeIntegralInRange<std::uint64_t>(1, 4096);
    case 2: return 1u << 16;
    default: return artifact_size;
  }
}

std::uint32_t pick_ttl(FuzzedDataProvider& in) {
  static constexpr std::array<std::uint32_t, 5> table{0, 1, 1000, 60'000, 0xffffffffu};
  return table[in.ConsumeIntegralInRange<std::size_t>(0, table.size() - 1)];
}

std::int32_t pick_pid(FuzzedDataProvider& in) {
  switch (in.ConsumeIntegralInRange<int>(0, 9)) {
    case 0: return 0;
    case 1: return -1;
    case 2: return my_pid() + 1;
    default: return my_pid();
  }
}

std::string pick_id(FuzzedDataProvider& in, const std::vector<std::string>& known) {
  if (!known.empty() && in.ConsumeIntegralInRange<int>(0, 7) != 0) {
    return known[in.ConsumeIntegralInRange<std::size_t>(0, known.size() - 1)];
  }
  return in.ConsumeRandomLengthString(48);
}

class conversation {
 public:
  explicit conversation(FuzzedDataProvider& in) : in_(in) {
    reg::engine_options options;
    options.time = &clock_;
    options.hash_threads = 1;
    options.sweep_interval = 0ms;
    options.watch_owners = false;
    options.stable_bytes = 1u << 18;
    options.default_drain_timeout = 1ms;
    options.region_capacity = 8;
    auto e = reg::engine::create(std::move(options));
    FUZZ_CHECK(e.has_value(), "cannot create the engine");
    engine_ = std::move(*e);
    tensorreg::daemon::dispatcher_options d;
    d.trust_client_pids = in.ConsumeBool();
    d.daemon_uid = ::getuid();
    d.socket_path = "/fuzz/tensorreg.sock";
    dispatch_ = std::make_unique<dispatcher>(*engine_, std::move(d));
    conn_ = dispatch_->open_connection({::getpid(), ::getuid(), ::getgid()});
  }

  ~conversation() {
    if (conn_) dispatch_->close_connection(*conn_);
    conn_.reset();
    dispatch_.reset();
    engine_.reset();
  }

  void run() {
    for (std::size_t step = 0; step < max_steps && in_.remaining_bytes() > 0; ++step) one_step();
  }

 private:
  void one_step() {
    switch (in_.ConsumeIntegralInRange<int>(0, 19)) {
      case 0:
      case 1: return begin_stable();
      case 2: return begin_lease();
      case 3: return begin_other();
      case 4:
      case 5: return feed();
      case 6: return end_stream();
      case 7:
      case 8: return unary_with_registration();
      case 9: return register_region();
      case 10: return unregister_region();
      case 11: return deregister();
      case 12: return catalogue_reads();
      case 13: return artifact_reads();
      case 14: return unimplemented_rpcs();
      case 15: return raw_payload();
      case 16: return step_clock();
      case 17: return write_publish();
      case 18: return keep_alive();
      default: return register_region();
    }
  }

  wire::Request request() {
    wire::Request r;
    r.set_request_id(in_.ConsumeIntegralInRange<int>(0, 31) == 0 ? in_.ConsumeIntegral<std::uint64_t>() : next_id_++);
    return r;
  }

  // Stray fds (dup'd /dev/null) on a request that may or may not use them.
  std::vector<unique_fd> stray_fds() {
    std::vector<unique_fd> fds;
    if (in_.ConsumeIntegralInRange<int>(0, 15) != 0) return fds;
    const int n = in_.ConsumeIntegralInRange<int>(1, 3);
    for (int i = 0; i < n; ++i) fds.emplace_back(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    return fds;
  }

  std::optional<wire::Response> send(const std::string& payload, std::vector<unique_fd> fds, std::uint64_t id,
                                     bool may_be_silent) {
    auto out = dispatch_->handle(*conn_, frame_in{payload, std::move(fds)});
    if (trace()) {
      wire::Request shown;
      (void)shown.ParseFromString(payload);
      wire::Response answer;
      if (out) (void)answer.ParseFromString(out->payload);
      std::fprintf(stderr, "> %s< %s\n", shown.ShortDebugString().c_str(),
                   out ? answer.ShortDebugString().c_str() : "(no answer)");
    }
    if (!out) {
      FUZZ_CHECK(may_be_silent, "a request that is not a Feed frame got no answer");
      return std::nullopt;
    }
    wire::Response response;
    FUZZ_CHECK(response.ParseFromString(out->payload), "an answer that does not parse");
    FUZZ_CHECK(response.has_status(), "an answer without a status");
    const auto code = response.status().code();
    FUZZ_CHECK(code >= 0 && code <= 16, "a status code outside gRPC's");
    FUZZ_CHECK((code == 0) == response.status().message().empty(), "OK with a message, or an error without one");
    FUZZ_CHECK((code == 0) == (response.body_case() != wire::Response::BODY_NOT_SET),
               "a body on an error, or none on OK");
    FUZZ_CHECK(code == 0 || out->fds.empty(), "fds on an error answer");
    FUZZ_CHECK(out->close_after == (response.request_id() == 0), "close_after is not request_id 0");
    FUZZ_CHECK(response.request_id() == id || (response.request_id() == 0 && code != 0),
               "an answer to another request");
    for (auto& fd : out->fds) FUZZ_CHECK(fd.get() >= 0, "an invalid fd in an answer");
    last_fds_ = std::move(out->fds);
    if (out->close_after) reconnect();
    return response;
  }

  // A request_id 0 answer ends the connection (docs/wire-format.md §4): the client connects
  // again, with no streams open.
  void reconnect() {
    dispatch_->close_connection(*conn_);
    conn_ = dispatch_->open_connection({::getpid(), ::getuid(), ::getgid()});
    streams_.clear();
    failed_streams_.clear();
  }

  std::optional<wire::Response> call(const wire::Request& r) {
    return send(r.SerializeAsString(), stray_fds(), r.request_id(), false);
  }

  void keep(std::vector<std::string>& ids, const std::string& id) {
    if (!id.empty() && ids.size() < 16) ids.push_back(id);
  }

  void set_index(v2::BeginRegisterArtifactRequest& b) {
    switch (in_.ConsumeIntegralInRange<int>(0, 7)) {
      case 0: break;  // no index
      case 1: b.set_tensor_index_key(in_.ConsumeBool() ? index_key_ : in_.ConsumeRandomLengthString(70)); break;
      case 2: {
        auto* d = b.mutable_tensor_index_data();
        d->set_data(in_.ConsumeRandomLengthString(256));
        d->set_schema_version(in_.ConsumeBool() ? "v3" : in_.ConsumeRandomLengthString(4));
        d->set_encoding(in_.ConsumeBool() ? "json" : "");
        break;
      }
      default: {
        auto* d = b.mutable_tensor_index_data();
        d->set_data(index_json());
        d->set_schema_version("v3");
        d->set_encoding("json");
      }
    }
  }

  void set_common(v2::BeginRegisterArtifactRequest& b) {
    b.set_device_id(in_.ConsumeIntegralInRange<int>(0, 15) == 0 ? in_.ConsumeIntegral<std::int32_t>() : 0);
    b.set_total_size(pick_total(in_));
    if (in_.ConsumeBool()) b.set_ttl_ms(pick_ttl(in_));
    b.set_owner_pid(pick_pid(in_));
    set_index(b);
    if (in_.ConsumeIntegralInRange<int>(0, 7) == 0) {
      b.set_client_artifact_id(in_.ConsumeBool() ? "cgid:fuzz-" + std::to_string(in_.ConsumeIntegral<std::uint8_t>())
                                                 : in_.ConsumeRandomLengthString(64));
    }
    if (in_.ConsumeIntegralInRange<int>(0, 7) == 0) {
      (void)b.mutable_policy()->ParseFromString(in_.ConsumeRandomLengthString(32));
    }
    if (in_.ConsumeIntegralInRange<int>(0, 15) == 0) b.mutable_view()->set_view_id(in_.ConsumeRandomLengthString(16));
    if (in_.ConsumeIntegralInRange<int>(0, 15) == 0) b.set_device_uuid(in_.ConsumeRandomLengthString(48));
  }

  void begun(const std::optional<wire::Response>& a) {
    if (!a || a->status().code() != 0) return;
    const auto& b = a->begin_register_artifact();
    keep(registrations_, b.registration_id());
    if (b.has_stable_dram() && !last_fds_.empty() && publish_.size() < 4) {
      publish_.push_back(
          {b.registration_id(), std::move(last_fds_.front()), b.stable_dram().publish_cpu_memfd().size_bytes()});
    }
  }

  void begin_stable() {
    auto r = request();
    auto* b = r.mutable_begin_register_artifact();
    set_common(*b);
    b->mutable_stable_dram()->set_stage_on_gpu(in_.ConsumeIntegralInRange<int>(0, 15) == 0);
    begun(call(r));
  }

  void begin_lease() {
    auto r = request();
    auto* b = r.mutable_begin_register_artifact();
    set_common(*b);
    auto* l = b->mutable_lease();
    l->set_in_place(in_.ConsumeIntegralInRange<int>(0, 7) != 0);
    if (in_.ConsumeBool()) l->set_min_tensor_bytes(pick_u64(in_));
    if (in_.ConsumeBool()) l->set_max_tensor_count(in_.ConsumeIntegral<std::uint32_t>());
    if (in_.ConsumeBool()) l->set_lease_bytes_limit(pick_u64(in_));
    begun(call(r));
  }

  void begin_other() {
    auto r = request();
    auto* b = r.mutable_begin_register_artifact();
    set_common(*b);
    if (in_.ConsumeBool()) b->mutable_coalesced()->set_max_inflight_bytes(pick_u64(in_));
    begun(call(r));
  }

  void fill_feed(v2::FeedRegisterArtifactStreamRequest& f) {
    switch (in_.ConsumeIntegralInRange<int>(0, 4)) {
      case 0:
      case 1: {  // a view chunk: the right bytes, or anything anywhere
        auto* c = f.mutable_view_chunk();
        const auto bytes = artifact_bytes();
        if (in_.ConsumeBool()) {
          const auto at = in_.ConsumeIntegralInRange<std::size_t>(0, bytes.size() - 1);
          c->set_canonical_offset(at);
          c->set_data(bytes.substr(at, in_.ConsumeIntegralInRange<std::size_t>(1, bytes.size() - at)));
        } else {
          c->set_canonical_offset(pick_u64(in_));
          c->set_data(in_.ConsumeRandomLengthString(64));
        }
        if (in_.ConsumeIntegralInRange<int>(0, 7) == 0) c->set_view_offset(pick_u64(in_));
        break;
      }
      case 2: {  // lease segments over the storages named below
        auto* segments = f.mutable_lease_segments();
        const int n = in_.ConsumeIntegralInRange<int>(0, 3);
        for (int i = 0; i < n; ++i) {
          auto* s = segments->add_segments();
          s->set_storage_id(in_.ConsumeBool() ? "s0" : in_.ConsumeRandomLengthString(4));
          s->set_storage_offset(in_.ConsumeBool() ? 0 : pick_u64(in_));
          s->set_artifact_offset(in_.ConsumeBool() ? 0 : pick_u64(in_));
          s->set_length(in_.ConsumeBool() ? artifact_size : pick_u64(in_));
        }
        break;
      }
      case 3: {  // the client says what it wrote into the publish memfd
        auto* p = f.mutable_stable_dram_write_progress();
        const int n = in_.ConsumeIntegralInRange<int>(0, 3);
        for (int i = 0; i < n; ++i) {
          auto* range = p->add_ranges();
          range->set_canonical_offset(in_.ConsumeBool() ? 0 : pick_u64(in_));
          range->set_length(in_.ConsumeBool() ? artifact_size : pick_u64(in_));
        }
        p->set_upload_complete(in_.ConsumeBool());
        break;
      }
      default: break;  // no feed oneof: storages and aliases only
    }
    const int storages = in_.ConsumeIntegralInRange<int>(0, 2);
    for (int i = 0; i < storages; ++i) {
      auto* s = f.add_storage_entries();
      s->set_storage_id(in_.ConsumeBool() ? "s0" : in_.ConsumeRandomLengthString(4));
      s->set_device_id(in_.ConsumeBool() ? -1 : in_.ConsumeIntegralInRange<int>(-2, 2));
      s->set_storage_length(in_.ConsumeBool() ? 64 : pick_u64(in_));
      switch (in_.ConsumeIntegralInRange<int>(0, 3)) {
        case 0: s->set_cuda_ipc_handle(in_.ConsumeRandomLengthString(64)); break;
        case 1: s->set_vram_region_id(pick_id(in_, regions_)); break;
        case 2: break;
        default: {
          auto* ref = s->mutable_region_ref();
          ref->set_region_id(pick_id(in_, regions_));
          ref->set_memory_kind(in_.ConsumeBool()
                                   ? v2::REGION_MEMORY_KIND_HOST_SHARED
                                   : static_cast<v2::RegionMemoryKind>(in_.ConsumeIntegralInRange<int>(0, 3)));
          ref->set_device_id(in_.ConsumeBool() ? -1 : in_.ConsumeIntegralInRange<int>(-2, 2));
          ref->set_size_bytes(in_.ConsumeBool() ? 64 : pick_u64(in_));
        }
      }
      if (in_.ConsumeIntegralInRange<int>(0, 7) == 0) s->set_mapping_base_offset(pick_u64(in_));
    }
    const int aliases = in_.ConsumeIntegralInRange<int>(0, 2);
    for (int i = 0; i < aliases; ++i) {
      auto* a = f.add_tensor_aliases();
      a->set_name(in_.ConsumeBool() ? "a" : in_.ConsumeRandomLengthString(8));
      a->set_storage_id(in_.ConsumeBool() ? "s0" : in_.ConsumeRandomLengthString(4));
      a->set_storage_offset(in_.ConsumeBool() ? 0 : pick_u64(in_));
      a->set_logical_length(in_.ConsumeBool() ? 16 : pick_u64(in_));
      const int dims = in_.ConsumeIntegralInRange<int>(0, 3);
      for (int d = 0; d < dims; ++d) {
        a->add_shape(in_.ConsumeIntegralInRange<std::int64_t>(-2, 8));
        a->add_stride(in_.ConsumeIntegralInRange<std::int64_t>(-2, 8));
      }
      a->set_dtype(in_.ConsumeBool() ? "torch.float32" : in_.ConsumeRandomLengthString(16));
    }
  }

  void feed() {
    // A frame of an open stream, or the first frame of a new one.
    std::uint64_t id;
    if (!streams_.empty() && in_.ConsumeBool()) {
      id = streams_[in_.ConsumeIntegralInRange<std::size_t>(0, streams_.size() - 1)];
    } else {
      id = next_id_++;
      if (streams_.size() < 8) streams_.push_back(id);
    }
    wire::Request r;
    r.set_request_id(id);
    auto* f = r.mutable_feed_register_artifact_stream();
    f->set_registration_id(pick_id(in_, registrations_));
    fill_feed(*f);
    // The first error of a stream is answered at once; its later frames are ignored.
    auto a = send(r.SerializeAsString(), stray_fds(), id, true);
    if (a && a->request_id() == id) failed_streams_.insert(id);
  }

  void end_stream() {
    std::uint64_t id = next_id_++;
    if (!streams_.empty() && in_.ConsumeIntegralInRange<int>(0, 7) != 0) {
      const auto at = in_.ConsumeIntegralInRange<std::size_t>(0, streams_.size() - 1);
      id = streams_[at];
      streams_.erase(streams_.begin() + static_cast<std::ptrdiff_t>(at));
    }
    wire::Request r;
    r.set_request_id(id);
    r.set_end_of_stream(true);
    if (in_.ConsumeIntegralInRange<int>(0, 15) == 0) r.mutable_get_stats();  // not a stream frame
    // A stream answered early gets no second answer (DECISIONS §4: one answer per stream).
    const bool silent = !r.has_get_stats() && failed_streams_.erase(id) > 0;
    auto a = send(r.SerializeAsString(), stray_fds(), id, silent);
    FUZZ_CHECK(!silent || !a, "a stream answered early got a second answer");
  }

  void unary_with_registration() {
    auto r = request();
    const auto id = pick_id(in_, registrations_);
    switch (in_.ConsumeIntegralInRange<int>(0, 2)) {
      case 0: {
        r.mutable_commit_registered_artifact()->set_registration_id(id);
        // registration.md §4.8: INVALID_ARGUMENT without a cgid, else a hash after the answer.
        if (in_.ConsumeBool()) r.mutable_commit_registered_artifact()->set_hash_in_background(true);
        auto a = call(r);
        if (a && a->status().code() == 0) {
          const auto& d = a->commit_registered_artifact().artifact_descriptor();
          keep(artifacts_, d.artifact_id());
          if (index_key_.empty()) index_key_ = d.index_multihash();
        }
        return;
      }
      case 1: r.mutable_abort_registered_artifact()->set_registration_id(id); break;
      default:
        r.mutable_revoke_registered_artifact()->set_registration_id(id);
        r.mutable_revoke_registered_artifact()->set_reason(in_.ConsumeRandomLengthString(16));
    }
    (void)call(r);
  }

  void keep_alive() {
    auto r = request();
    auto* k = r.mutable_keep_alive_register_artifact();
    k->set_registration_id(pick_id(in_, registrations_));
    k->set_ttl_ms(pick_ttl(in_));
    k->set_epoch(in_.ConsumeIntegral<std::uint8_t>());
    k->set_owner_pid(pick_pid(in_));
    (void)call(r);
  }

  void register_region() {
    auto r = request();
    std::vector<unique_fd> fds;
    if (in_.ConsumeIntegralInRange<int>(0, 7) == 0) {
      auto* g = r.mutable_register_vram_region();
      g->set_device_id(in_.ConsumeIntegralInRange<int>(-1, 1));
      g->set_cuda_ipc_handle(in_.ConsumeRandomLengthString(64));
      g->set_size_bytes(pick_u64(in_));
      g->set_ttl_ms(pick_ttl(in_));
      g->set_owner_pid(pick_pid(in_));
    } else {
      auto* g = r.mutable_register_region();
      g->set_memory_kind(in_.ConsumeIntegralInRange<int>(0, 7) == 0
                             ? static_cast<v2::RegionMemoryKind>(in_.ConsumeIntegralInRange<int>(0, 3))
                             : v2::REGION_MEMORY_KIND_HOST_SHARED);
      g->set_owner_pid(pick_pid(in_));
      const auto size = in_.ConsumeBool() ? std::uint64_t{64} : pick_total(in_);
      g->set_size_bytes(in_.ConsumeIntegralInRange<int>(0, 7) == 0 ? pick_u64(in_) : size);
      g->set_ttl_ms(pick_ttl(in_));
      if (in_.ConsumeIntegralInRange<int>(0, 7) == 0) g->set_region_name(in_.ConsumeRandomLengthString(16));
      switch (in_.ConsumeIntegralInRange<int>(0, 4)) {
        case 0: g->set_cuda_ipc_handle(in_.ConsumeRandomLengthString(64)); break;
        case 1: g->mutable_cuda_vmm()->add_chunk_bytes(pick_u64(in_)); break;
        case 2: {
          auto* h = g->mutable_host_shared();
          h->set_daemon_managed(true);
          h->set_region_class(static_cast<v2::HostSharedRegionClass>(in_.ConsumeIntegralInRange<int>(0, 2)));
          break;
        }
        default: {  // client memory: a sealed memfd holding the artifact bytes at 0
          auto* h = g->mutable_host_shared();
          if (in_.ConsumeBool()) h->set_attach_token(in_.ConsumeRandomLengthString(16));
          h->set_region_class(v2::HOST_SHARED_REGION_CLASS_ALLOCATOR);
          const int n = in_.ConsumeIntegralInRange<int>(0, 7) == 0 ? 2 : 1;
          for (int i = 0; i < n; ++i) fds.push_back(client_memfd(size));
        }
      }
    }
    auto a = send(r.SerializeAsString(), std::move(fds), r.request_id(), false);
    if (!a || a->status().code() != 0) return;
    if (a->has_register_region()) keep(regions_, a->register_region().region().region_id());
    if (a->has_register_vram_region()) keep(regions_, a->register_vram_region().region_id());
  }

  unique_fd client_memfd(std::uint64_t size) {
    unique_fd fd(::memfd_create("fuzz-region", MFD_CLOEXEC | MFD_ALLOW_SEALING));
    FUZZ_CHECK(fd, "cannot create a memfd");
    const auto bytes = artifact_bytes();
    const auto length = static_cast<off_t>(std::min<std::uint64_t>(size, 1u << 16));
    FUZZ_CHECK(::ftruncate(fd.get(), length) == 0, "cannot size a memfd");
    (void)::pwrite(fd.get(), bytes.data(), std::min<std::size_t>(bytes.size(), static_cast<std::size_t>(length)), 0);
    (void)::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW);
    return fd;
  }

  void unregister_region() {
    auto r = request();
    if (in_.ConsumeBool()) {
      auto* u = r.mutable_unregister_region();
      u->set_region_id(pick_id(in_, regions_));
      u->set_owner_pid(pick_pid(in_));
      if (in_.ConsumeBool()) u->set_force(in_.ConsumeBool());
    } else {
      auto* u = r.mutable_unregister_vram_region();
      u->set_region_id(pick_id(in_, regions_));
      u->set_owner_pid(pick_pid(in_));
      if (in_.ConsumeBool()) u->set_force(in_.ConsumeBool());
    }
    (void)call(r);
  }

  void deregister() {
    auto r = request();
    auto* d = r.mutable_deregister_artifact();
    d->set_artifact_id(pick_id(in_, artifacts_));
    if (in_.ConsumeBool()) d->set_wait_for_drain(in_.ConsumeBool());
    if (in_.ConsumeBool()) d->set_drain_timeout_ms(in_.ConsumeIntegralInRange<std::uint32_t>(0, 2));
    if (in_.ConsumeBool()) d->set_owner_pid(pick_pid(in_));
    if (in_.ConsumeIntegralInRange<int>(0, 7) == 0) d->set_release_regions(true);
    (void)call(r);
  }

  void catalogue_reads() {
    auto r = request();
    switch (in_.ConsumeIntegralInRange<int>(0, 2)) {
      case 0: r.mutable_list_artifacts(); break;
      case 1: r.mutable_get_stats(); break;
      default: r.mutable_get_server_config();
    }
    (void)call(r);
  }

  void artifact_reads() {
    auto r = request();
    const auto id = pick_id(in_, artifacts_);
    switch (in_.ConsumeIntegralInRange<int>(0, 3)) {
      case 0: r.mutable_get_artifact_index_by_id()->set_artifact_id(id); break;
      case 1: r.mutable_get_artifact_memfd()->set_artifact_id(id); break;
      case 2:
        // A short timeout: a hash in progress answers HASH_PENDING, never blocks the run.
        r.mutable_wait_artifact_hash()->set_artifact_id(id);
        r.mutable_wait_artifact_hash()->set_timeout_ms(in_.ConsumeIntegralInRange<std::uint32_t>(1, 5));
        break;
      default:
        r.mutable_open_artifact_device()->set_artifact_id(id);
        r.mutable_open_artifact_device()->set_first_allocation(in_.ConsumeIntegralInRange<std::uint32_t>(0, 2));
    }
    (void)call(r);
  }

  void unimplemented_rpcs() {
    auto r = request();
    switch (in_.ConsumeIntegralInRange<int>(0, 3)) {
      case 0: r.mutable_start_persistence()->set_artifact_id(pick_id(in_, artifacts_)); break;
      case 1: r.mutable_query_persistence_status()->set_artifact_id(pick_id(in_, artifacts_)); break;
      case 2: r.mutable_wait_persistence_status(); break;
      default: r.mutable_activate_stable_local_backing()->set_region_id(pick_id(in_, regions_));
    }
    (void)call(r);
  }

  // Envelope bytes straight from the input: the dispatcher must answer anything at all.
  void raw_payload() {
    auto payload = in_.ConsumeRandomLengthString(256);
    if (payload.empty()) payload = "\x08";
    wire::Request probe;
    const bool parses = probe.ParseFromString(payload);
    const bool feed_frame = parses && (probe.has_feed_register_artifact_stream() || probe.end_of_stream());
    auto a = send(payload, stray_fds(), parses ? probe.request_id() : 0, feed_frame);
    if (!feed_frame) return;
    if (probe.end_of_stream()) {
      failed_streams_.erase(probe.request_id());
    } else if (a && a->request_id() == probe.request_id()) {
      failed_streams_.insert(probe.request_id());
    } else if (streams_.size() < 8) {
      streams_.push_back(probe.request_id());
    }
  }

  void step_clock() {
    static constexpr std::array<std::chrono::milliseconds, 4> steps{1ms, 999ms, 61s, 24h};
    clock_.advance(steps[in_.ConsumeIntegralInRange<std::size_t>(0, steps.size() - 1)]);
    engine_->sweep();
  }

  // The client writes the artifact's bytes into a stable_dram publish memfd.
  void write_publish() {
    if (publish_.empty()) return;
    auto& p = publish_[in_.ConsumeIntegralInRange<std::size_t>(0, publish_.size() - 1)];
    const auto bytes = artifact_bytes();
    const auto n = std::min<std::uint64_t>(bytes.size(), p.size);
    (void)::pwrite(p.fd.get(), bytes.data(), static_cast<std::size_t>(n), 0);
  }

  struct publish_buffer {
    std::string registration_id;
    unique_fd fd;
    std::uint64_t size = 0;
  };

  FuzzedDataProvider& in_;
  tensorreg::testing::fake_clock clock_;
  std::unique_ptr<reg::engine> engine_;
  std::unique_ptr<dispatcher> dispatch_;
  dispatcher::connection_ptr conn_;
  std::uint64_t next_id_ = 1;
  std::vector<std::uint64_t> streams_;
  std::set<std::uint64_t> failed_streams_;
  std::vector<std::string> registrations_, artifacts_, regions_;
  std::string index_key_;
  std::vector<publish_buffer> publish_;
  std::vector<unique_fd> last_fds_;
};

// The fds open in this process (up to a bound well above what a conversation opens).
std::vector<int> open_fds() {
  std::vector<int> fds;
  for (int fd = 0; fd < 512; ++fd) {
    if (::fcntl(fd, F_GETFD) != -1) fds.push_back(fd);
  }
  return fds;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Fuzzed strings are often not UTF-8; protobuf logs each such field, which is noise here.
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto before = open_fds();
  {
    FuzzedDataProvider in(data, size);
    conversation c(in);
    c.run();
  }
  FUZZ_CHECK(open_fds() == before, "the conversation left fds open after the engine was destroyed");
  return 0;
}
