#include "client.hpp"

#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <map>
#include <cstring>
#include <random>

#include "framing.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/policy/store_policy.hpp"
#include "unix_socket.hpp"

namespace tensorreg::daemon {

std::optional<error> status_error(const wire::Status& s) {
  if (s.code() == 0) return std::nullopt;
  const auto code = s.code() > 0 && s.code() <= 16 ? static_cast<errc>(s.code()) : errc::unknown;
  return error{code, s.message()};
}

result<std::unique_ptr<client>> client::connect(std::string socket_path) {
  if (socket_path.empty()) socket_path = default_socket_path();
  std::unique_ptr<client> c(new client(std::move(socket_path)));
  std::lock_guard lock(c->mutex_);
  TENSORREG_TRY(c->ensure_connected_locked());
  return c;
}

status client::ensure_connected_locked() {
  if (socket_) return {};
  TENSORREG_TRY_ASSIGN(socket_, connect_unix(socket_path_));
  inbox_.clear();
  inbox_fds_.clear();
  return {};
}

status client::send_locked(const wire::Request& request, std::span<const int> fds) {
  std::string payload;
  if (!request.SerializeToString(&payload)) return fail(errc::internal, "cannot serialise request");
  TENSORREG_TRY_ASSIGN(auto framed, encode_frame(payload, std::numeric_limits<std::uint32_t>::max()));
  auto sent = send_all(socket_.get(), std::as_bytes(std::span(framed.data(), framed.size())), fds);
  if (!sent) socket_.reset();  // the next call reconnects
  return sent;
}

result<client::reply> client::receive_locked(std::uint64_t request_id) {
  frame_decoder decoder(std::numeric_limits<std::uint32_t>::max());
  std::vector<std::byte> buffer(64 * 1024);
  std::vector<unique_fd> fds;
  for (;;) {
    if (auto frame = decoder.next()) {
      reply out;
      if (!out.response.ParseFromString(frame->payload)) {
        socket_.reset();
        return fail(errc::data_loss, "cannot parse the daemon's answer");
      }
      if (out.response.request_id() != request_id && out.response.request_id() != 0) {
        socket_.reset();
        return fail(errc::data_loss, "cannot match the daemon's answer: request " + std::to_string(request_id) +
                                         " got the answer to " + std::to_string(out.response.request_id()));
      }
      if (!decoder.at_frame_boundary() || decoder.ready_frames() != 0) {
        socket_.reset();  // answers are one at a time: anything more is a protocol error
        return fail(errc::data_loss, "cannot read the daemon's answer: unexpected extra bytes");
      }
      out.fds = std::move(fds);
      if (out.response.request_id() == 0) socket_.reset();  // connection-level error: the daemon closes
      if (auto e = status_error(out.response.status())) return tl::unexpected(std::move(*e));
      return out;
    }
    auto got = receive_some(socket_.get(), buffer);
    if (!got || got->bytes == 0) {
      socket_.reset();
      return fail(errc::unavailable, got ? std::string("cannot read the daemon's answer: the daemon closed the connection")
                                         : got.error().message);
    }
    for (auto& fd : got->fds) fds.push_back(std::move(fd));
    if (auto fed = decoder.feed(std::span<const std::byte>(buffer.data(), got->bytes)); !fed) {
      socket_.reset();
      return tl::unexpected(fed.error());
    }
  }
}

result<client::reply> client::call(wire::Request request, std::span<const int> fds) {
  std::lock_guard lock(mutex_);
  TENSORREG_TRY(ensure_connected_locked());
  request.set_request_id(next_request_id_++);
  TENSORREG_TRY(send_locked(request, fds));
  return receive_locked(request.request_id());
}

result<client::reply> client::feed(std::vector<v2::FeedRegisterArtifactStreamRequest> frames) {
  std::lock_guard lock(mutex_);
  TENSORREG_TRY(ensure_connected_locked());
  const auto id = next_request_id_++;
  for (auto& f : frames) {
    wire::Request r;
    r.set_request_id(id);
    *r.mutable_feed_register_artifact_stream() = std::move(f);
    TENSORREG_TRY(send_locked(r, {}));
  }
  wire::Request end;
  end.set_request_id(id);
  end.set_end_of_stream(true);
  TENSORREG_TRY(send_locked(end, {}));
  return receive_locked(id);
}

// ---- store ---------------------------------------------------------------------------------

namespace {

// Copies the bundle's canonical bytes into `dst`, leaf by leaf on all cores.
status copy_canonical(const index::safetensors_bundle& bundle, std::span<std::byte> dst,
                      const std::function<void(std::uint64_t, std::uint64_t)>& progress) {
  const std::uint64_t total = bundle.canonical().size();
  thread_pool pool(std::max(1u, std::thread::hardware_concurrency()) - 1);
  std::atomic<std::uint64_t> done{0};
  std::mutex progress_mutex;
  return memory::copy_in_chunks(bundle.canonical(), dst, hash::leaf_bytes, pool,
                                [&](std::size_t, std::uint64_t, std::uint64_t length) {
                                  const auto now = done.fetch_add(length) + length;
                                  if (progress) {
                                    std::lock_guard lock(progress_mutex);
                                    progress(now, total);
                                  }
                                });
}

result<unique_fd> take_fd(client::reply& r, std::string_view what) {
  if (r.fds.empty()) return fail(errc::data_loss, "cannot " + std::string(what) + ": the daemon sent no memfd");
  return std::move(r.fds.front());
}

}  // namespace

result<registered> store::put(const index::safetensors_bundle& bundle, const std::string& profile,
                              const std::function<void(std::uint64_t, std::uint64_t)>& progress) {
  const auto started = std::chrono::steady_clock::now();
  const auto& idx = bundle.index();
  wire::Request begin;
  auto* b = begin.mutable_begin_register_artifact();
  b->set_device_id(0);
  b->set_total_size(idx.total_size());
  b->set_ttl_ms(600'000);
  b->set_owner_pid(::getpid());
  auto* data = b->mutable_tensor_index_data();
  data->set_data(idx.json());
  data->set_schema_version("v3");
  data->set_encoding("json");
  b->mutable_stable_dram();
  if (!profile.empty()) {
    TENSORREG_TRY_ASSIGN(auto p, policy::parse_profile(profile));
    b->mutable_policy()->set_profile(static_cast<tensorcast::common::v1::PolicyProfile>(p));
  }
  TENSORREG_TRY_ASSIGN(auto begun, client_->call(std::move(begin)));
  const auto& hs = begun.response.begin_register_artifact();
  const std::string registration_id = hs.registration_id();
  auto abort_on_error = [&](error e) -> tl::unexpected<error> {
    wire::Request abort;
    abort.mutable_abort_registered_artifact()->set_registration_id(registration_id);
    (void)client_->call(std::move(abort));
    return tl::unexpected(std::move(e));
  };
  TENSORREG_TRY_ASSIGN(auto fd, take_fd(begun, "put"));
  auto mapped = memory::shared_memory::adopt(std::move(fd), idx.total_size(), /*writable=*/true);
  if (!mapped) return abort_on_error(mapped.error());
  if (auto copied = copy_canonical(bundle, mapped->mutable_bytes(), progress); !copied) {
    return abort_on_error(copied.error());
  }
  v2::FeedRegisterArtifactStreamRequest written;
  written.set_registration_id(registration_id);
  auto* range = written.mutable_stable_dram_write_progress()->add_ranges();
  range->set_canonical_offset(0);
  range->set_length(idx.total_size());
  written.mutable_stable_dram_write_progress()->set_upload_complete(true);
  std::vector<v2::FeedRegisterArtifactStreamRequest> frames;
  frames.push_back(std::move(written));
  if (auto fed = client_->feed(std::move(frames)); !fed) return abort_on_error(fed.error());
  wire::Request commit;
  commit.mutable_commit_registered_artifact()->set_registration_id(registration_id);
  TENSORREG_TRY_ASSIGN(auto committed, client_->call(std::move(commit)));
  registered out;
  out.descriptor = committed.response.commit_registered_artifact().artifact_descriptor();
  out.existed = committed.response.commit_registered_artifact().existed();
  out.registration_id = registration_id;
  out.begin_to_commit_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  return out;
}

result<std::unique_ptr<lease>> store::register_lease(const index::safetensors_bundle& bundle, std::uint32_t ttl_ms) {
  const auto& idx = bundle.index();
  // 1. A daemon-managed HOST_SHARED region that will hold the canonical bytes.
  wire::Request reg;
  auto* rr = reg.mutable_register_region();
  rr->set_memory_kind(v2::REGION_MEMORY_KIND_HOST_SHARED);
  rr->set_owner_pid(::getpid());
  rr->set_size_bytes(idx.total_size());
  rr->mutable_host_shared()->set_daemon_managed(true);
  TENSORREG_TRY_ASSIGN(auto region_reply, client_->call(std::move(reg)));
  const auto region = region_reply.response.register_region().region();
  TENSORREG_TRY_ASSIGN(auto fd, take_fd(region_reply, "register a region"));
  TENSORREG_TRY_ASSIGN(auto slab, memory::shared_memory::adopt(std::move(fd), idx.total_size(), /*writable=*/true));
  auto memory = std::make_shared<memory::shared_memory>(std::move(slab));
  TENSORREG_TRY(copy_canonical(bundle, memory->mutable_bytes(), {}));

  // 2. Begin → Feed (one storage per distinct (offset, size), aliases, segments) → Commit.
  const auto started = std::chrono::steady_clock::now();
  wire::Request begin;
  auto* b = begin.mutable_begin_register_artifact();
  b->set_device_id(-1);
  b->set_total_size(idx.total_size());
  b->set_ttl_ms(ttl_ms);
  b->set_owner_pid(::getpid());
  b->mutable_lease()->set_in_place(true);
  TENSORREG_TRY_ASSIGN(auto begun, client_->call(std::move(begin)));
  const std::string registration_id = begun.response.begin_register_artifact().registration_id();

  v2::FeedRegisterArtifactStreamRequest feed;
  feed.set_registration_id(registration_id);
  std::map<std::pair<std::uint64_t, std::uint64_t>, std::string> storages;
  for (const auto& e : idx.entries()) {
    auto [it, inserted] = storages.try_emplace({e.offset, e.size}, "s" + std::to_string(storages.size()));
    if (inserted) {
      auto* s = feed.add_storage_entries();
      s->set_storage_id(it->second);
      s->set_device_id(-1);
      s->set_storage_length(e.size);
      *s->mutable_region_ref() = region;
      s->set_mapping_base_offset(e.offset);
      auto* seg = feed.mutable_lease_segments()->add_segments();
      seg->set_storage_id(it->second);
      seg->set_storage_offset(0);
      seg->set_artifact_offset(e.offset);
      seg->set_length(e.size);
    }
    auto* a = feed.add_tensor_aliases();
    a->set_name(e.name);
    a->set_storage_id(it->second);
    a->set_storage_offset(static_cast<std::uint64_t>(e.storage_offset));
    a->set_logical_length(e.size);
    for (auto d : e.shape) a->add_shape(d);
    for (auto s : e.stride) a->add_stride(s);
    a->set_dtype(e.dtype);
  }
  std::vector<v2::FeedRegisterArtifactStreamRequest> frames;
  frames.push_back(std::move(feed));
  auto fed = client_->feed(std::move(frames));
  wire::Request commit;
  commit.mutable_commit_registered_artifact()->set_registration_id(registration_id);
  auto committed = fed ? client_->call(std::move(commit)) : tl::unexpected(fed.error());
  if (!committed) {
    wire::Request revoke;
    revoke.mutable_revoke_registered_artifact()->set_registration_id(registration_id);
    (void)client_->call(std::move(revoke));
    return tl::unexpected(committed.error());
  }
  registered info;
  info.descriptor = committed->response.commit_registered_artifact().artifact_descriptor();
  info.existed = committed->response.commit_registered_artifact().existed();
  info.registration_id = registration_id;
  info.begin_to_commit_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  return std::make_unique<lease>(client_, std::move(info), region.region_id(), std::move(memory), ttl_ms);
}

// ---- lease ---------------------------------------------------------------------------------

lease::lease(std::shared_ptr<client> c, registered info, std::string region_id,
             std::shared_ptr<memory::shared_memory> region_memory, std::uint32_t ttl_ms)
    : client_(std::move(c)), info_(std::move(info)), region_id_(std::move(region_id)),
      region_memory_(std::move(region_memory)) {
  if (ttl_ms == 0) return;  // no expiry: nothing to keep alive
  // registration.md §10: every max(1 s, ttl/2), ±10 % jitter, the epoch counting up.
  const auto interval = std::max(std::chrono::milliseconds(1000), std::chrono::milliseconds(ttl_ms / 2));
  keeper_ = std::jthread([this, interval, ttl_ms](std::stop_token stop) {
    std::mt19937_64 rng(std::random_device{}());
    std::uniform_real_distribution<double> jitter(0.9, 1.1);
    std::mutex m;
    std::condition_variable_any cv;
    for (std::uint64_t epoch = 1;; ++epoch) {
      const auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(interval * jitter(rng));
      std::unique_lock lock(m);
      if (cv.wait_for(lock, stop, wait, [] { return false; })) return;
      if (stop.stop_requested()) return;
      wire::Request r;
      auto* k = r.mutable_keep_alive_register_artifact();
      k->set_registration_id(info_.registration_id);
      k->set_ttl_ms(ttl_ms);
      k->set_epoch(epoch);
      k->set_owner_pid(::getpid());
      if (client_->call(std::move(r))) keepalives_.fetch_add(1);
    }
  });
}

lease::~lease() {
  if (keeper_.joinable()) {
    keeper_.request_stop();
    keeper_.join();
  }
  wire::Request revoke;
  revoke.mutable_revoke_registered_artifact()->set_registration_id(info_.registration_id);
  revoke.mutable_revoke_registered_artifact()->set_reason("lease released by its holder");
  (void)client_->call(std::move(revoke));
  wire::Request unregister;
  auto* u = unregister.mutable_unregister_region();
  u->set_region_id(region_id_);
  u->set_owner_pid(::getpid());
  u->set_force(true);
  (void)client_->call(std::move(unregister));
}

}  // namespace tensorreg::daemon
