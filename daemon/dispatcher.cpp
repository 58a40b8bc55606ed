#include "dispatcher.hpp"

#include <fmt/format.h>

#include <fcntl.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <exception>
#include <new>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include "src/common/log.hpp"
#include "wire_convert.hpp"

// Layout: the per-connection state; then dispatcher::impl with the policy checks, one short
// handler per RPC, the unary path, the Feed stream path and the log lines of each answer.
// Every message field the handlers turn into a library value, or fill from one, goes through
// wire_convert.

namespace tensorreg::daemon {
namespace {

namespace wire = convert::wire;
namespace v2 = convert::v2;
namespace reg = ::tensorreg::registration;

std::string fd_count(std::size_t n) { return n == 1 ? "1 file descriptor" : std::to_string(n) + " file descriptors"; }

error fds_unused(std::string_view verb, std::size_t n) {
  return error{errc::invalid_argument,
               fmt::format("cannot {}: {} arrived with a message that uses none", verb, fd_count(n))};
}

// A response on its way out. It stays a message until the RPC's log line has read its status.
struct answer {
  wire::Response response;
  std::vector<unique_fd> fds;
  std::string subject;  // for the log line, where the request itself names none (a stream's end)
};

answer error_answer(std::uint64_t request_id, const error& e) {
  return answer{convert::error_response(request_id, e), {}, {}};
}

frame_out serialize(answer a) {
  frame_out out{a.response.SerializeAsString(), std::move(a.fds)};
  out.close_after = a.response.request_id() == 0;  // docs/wire-format.md §4: id-0 answers end the connection
  return out;
}

// ---- Connections -----------------------------------------------------------------------------

// One Feed stream of a connection, by request_id (DECISIONS §4: one answer per stream).
struct feed_stream {
  std::string registration_id;  // fixed by the first frame
  bool failed = false;          // answered early; later frames are ignored
};

}  // namespace

class dispatcher::connection {
 public:
  connection(const peer_credentials& peer, std::atomic<std::size_t>& open) : peer_(peer), open_(&open) { ++*open_; }
  ~connection() { close(); }
  connection(const connection&) = delete;
  connection& operator=(const connection&) = delete;

  void close() noexcept {
    streams_.clear();
    if (open_ != nullptr) --*std::exchange(open_, nullptr);
  }

  [[nodiscard]] const peer_credentials& peer() const noexcept { return peer_; }
  [[nodiscard]] std::unordered_map<std::uint64_t, feed_stream>& streams() noexcept { return streams_; }

 private:
  peer_credentials peer_;
  std::atomic<std::size_t>* open_;
  std::unordered_map<std::uint64_t, feed_stream> streams_;
};

// ---- The handlers --------------------------------------------------------------------------

namespace {

// One unary request on its way through: the request, the fds that came with it, and what goes
// back (the body is filled into `response`; fds to send into `fds_out`).
struct call {
  const peer_credentials& peer;
  wire::Request& request;
  std::vector<unique_fd>& fds_in;
  wire::Response response;
  std::vector<unique_fd> fds_out;
};

}  // namespace

struct dispatcher::impl {
  registration::engine& engine;
  dispatcher_options options;
  logger& log;
  std::atomic<std::size_t> connections{0};

  impl(registration::engine& e, dispatcher_options o)
      : engine(e), options(std::move(o)), log(options.log != nullptr ? *options.log : null_logger()) {}

  // DECISIONS §4: owner_pid must be the peer's own pid, unless trusted. owner_pid <= 0 is left
  // to the engine, which rejects it with its own message.
  status check_owner(const peer_credentials& peer, std::int32_t owner_pid, std::string_view verb) const {
    if (owner_pid <= 0 || owner_pid == peer.pid) return {};
    if (trusted(peer)) return {};
    return fail(errc::permission_denied, fmt::format("cannot {}: owner_pid {} is not the calling process {} (start "
                                                     "tensorregd with --trust-client-pids to allow it)",
                                                     verb, owner_pid, peer.pid));
  }

  // A peer that may name an owner_pid other than its own (DECISIONS §4).
  bool trusted(const peer_credentials& peer) const {
    return options.trust_client_pids && (peer.uid == 0 || peer.uid == options.daemon_uid);
  }

  // DECISIONS §8, for the calls that name a registration without an owner_pid (Feed, Commit,
  // Abort, Revoke): the peer must own it. A trusted peer's pid is not the one it registered
  // with (another PID namespace), so it is not checked. KeepAlive and UnregisterRegion carry
  // owner_pid: check_owner pins it to the peer and the engine compares it with the owner.
  status check_registration_owner(const peer_credentials& peer, const std::string& registration_id,
                                  std::string_view verb) const {
    if (trusted(peer)) return {};
    return engine.check_owner(registration_id, peer.pid, verb);
  }

  status begin(call& c) {
    auto& in = *c.request.mutable_begin_register_artifact();
    TENSORREG_TRY(check_owner(c.peer, in.owner_pid(), "begin registration"));
    TENSORREG_TRY(resolve_device(in));
    auto request = convert::to_begin(in);
    request.owner_uid = c.peer.uid;  // the uid's share of the stable cache
    TENSORREG_TRY_ASSIGN(auto begun, engine.begin(std::move(request)));
    auto* hs = std::get_if<reg::stable_dram_handshake>(&begun.handshake);
    if (hs != nullptr && hs->publish && hs->publish->memory) {
      auto fd = hs->publish->memory->duplicate_fd();
      if (!fd) {
        (void)engine.abort(begun.registration_id);
        return tl::unexpected(with_context(std::move(fd).error(), "cannot begin registration"));
      }
      c.fds_out.push_back(std::move(*fd));
    }
    convert::fill_begin(*c.response.mutable_begin_register_artifact(), begun);
    return {};
  }

  status keep_alive(call& c) {
    const auto& in = c.request.keep_alive_register_artifact();
    TENSORREG_TRY(
        check_owner(c.peer, in.owner_pid(), fmt::format("keep registration '{}' alive", in.registration_id())));
    TENSORREG_TRY(engine.keep_alive(convert::to_keep_alive(in)));
    c.response.mutable_keep_alive_register_artifact();
    return {};
  }

  status commit(call& c) {
    const auto& id = c.request.commit_registered_artifact().registration_id();
    TENSORREG_TRY(check_registration_owner(c.peer, id, "commit registration"));
    TENSORREG_TRY_ASSIGN(auto done, engine.commit(id));
    convert::fill_commit(*c.response.mutable_commit_registered_artifact(), done);
    return {};
  }

  status abort(call& c) {
    const auto& id = c.request.abort_registered_artifact().registration_id();
    TENSORREG_TRY(check_registration_owner(c.peer, id, "abort registration"));
    TENSORREG_TRY(engine.abort(id));
    c.response.mutable_abort_registered_artifact();
    return {};
  }

  status revoke(call& c) {
    const auto& in = c.request.revoke_registered_artifact();
    TENSORREG_TRY(check_registration_owner(c.peer, in.registration_id(), "revoke registration"));
    engine.revoke(in.registration_id(), in.reason());
    c.response.mutable_revoke_registered_artifact();
    return {};
  }

  status register_region(call& c) {
    auto& in = *c.request.mutable_register_region();
    TENSORREG_TRY(check_owner(c.peer, in.owner_pid(), "register region"));
    const std::size_t used = convert::fds_used(in);
    if (c.fds_in.size() > used) {
      return fail(errc::invalid_argument, fmt::format("cannot register region: {} arrived with a message that uses {}",
                                                      fd_count(c.fds_in.size()),
                                                      used == 0   ? std::string("none")
                                                      : used == 1 ? std::string("one")
                                                                  : std::to_string(used)));
    }
    TENSORREG_TRY(resolve_device(in));
    auto request = convert::to_region_request(in);
    request.owner_uid = c.peer.uid;  // the uid's share of the registry
    const auto asked = request.host_shared;
    if (in.has_cuda_vmm()) {
      TENSORREG_TRY(convert::take_vmm_chunks(in, c.fds_in, request));
    } else if (used == 1 && !c.fds_in.empty()) {
      request.memfd = std::move(c.fds_in.front());
    }
    TENSORREG_TRY_ASSIGN(auto info, engine.register_region(std::move(request)));
    if (asked && asked->daemon_managed && info.memory) {
      // The client maps the daemon's slab through this fd (docs/wire-format.md §7).
      auto fd = info.memory->duplicate_fd();
      if (!fd) {
        (void)engine.unregister_region(info.id, info.owner_pid, true);
        return tl::unexpected(with_context(std::move(fd).error(), "cannot register region"));
      }
      c.fds_out.push_back(std::move(*fd));
    }
    convert::fill_region(*c.response.mutable_register_region(), info, asked);
    return {};
  }

  status unregister_region(call& c) {
    const auto& in = c.request.unregister_region();
    TENSORREG_TRY(check_owner(c.peer, in.owner_pid(), fmt::format("unregister region '{}'", in.region_id())));
    TENSORREG_TRY_ASSIGN(bool released, engine.unregister_region(in.region_id(), in.owner_pid(), in.force()));
    convert::fill_unregister(*c.response.mutable_unregister_region(), released);
    return {};
  }

  status register_vram_region(call& c) {
    auto& in = *c.request.mutable_register_vram_region();
    TENSORREG_TRY(check_owner(c.peer, in.owner_pid(), "register VRAM region"));
    TENSORREG_TRY(resolve_device(in));
    auto request = convert::to_region_request(in);
    request.owner_uid = c.peer.uid;
    TENSORREG_TRY_ASSIGN(auto info, engine.register_region(std::move(request)));
    convert::fill_vram_region(*c.response.mutable_register_vram_region(), info);
    return {};
  }

  status unregister_vram_region(call& c) {
    const auto& in = c.request.unregister_vram_region();
    TENSORREG_TRY(check_owner(c.peer, in.owner_pid(), fmt::format("unregister VRAM region '{}'", in.region_id())));
    TENSORREG_TRY_ASSIGN(bool released, engine.unregister_region(in.region_id(), in.owner_pid(), in.force()));
    convert::fill_unregister(*c.response.mutable_unregister_vram_region(), released);
    return {};
  }

  status get_server_config(call& c) {
    convert::fill_config(*c.response.mutable_get_server_config(), options.socket_path, engine.stats());
    return {};
  }

  status get_artifact_index(call& c) {
    const auto& id = c.request.get_artifact_index_by_id().artifact_id();
    TENSORREG_TRY_ASSIGN(auto index, engine.index_of(id));
    TENSORREG_TRY_ASSIGN(auto summary, engine.get(id));
    convert::fill_index(*c.response.mutable_get_artifact_index_by_id(), *index, summary.descriptor);
    return {};
  }

  status deregister(call& c) {
    const auto& in = c.request.deregister_artifact();
    if (in.has_owner_pid()) {
      TENSORREG_TRY(check_owner(c.peer, in.owner_pid(), fmt::format("deregister {}", in.artifact_id())));
    }
    auto request = convert::to_deregister(in);
    // DECISIONS §8: the call acts for the peer, which must hold every lease and join. A trusted
    // peer acts for the owner_pid it names, or, naming none, for the daemon.
    if (request.owner_pid <= 0) request.owner_pid = trusted(c.peer) ? 0 : c.peer.pid;
    TENSORREG_TRY_ASSIGN(auto done, engine.deregister(request));
    convert::fill_deregister(*c.response.mutable_deregister_artifact(), done);
    return {};
  }

  // registration.md §1.6, DECISIONS §5.11: one unsharded copy in --persist-dir, written on
  // the engine's persistence threads; Wait blocks this worker, never the I/O thread.
  status persistence(call& c) {
    if (c.request.has_start_persistence()) {
      const auto& in = c.request.start_persistence();
      TENSORREG_TRY_ASSIGN(auto cache, convert::to_persist_cache_policy(in));
      TENSORREG_TRY_ASSIGN(auto task, engine.start_persistence(in.artifact_id(), std::move(cache)));
      convert::fill_persistence(*c.response.mutable_start_persistence(), task);
      return {};
    }
    if (c.request.has_query_persistence_status()) {
      const auto& in = c.request.query_persistence_status();
      TENSORREG_TRY_ASSIGN(auto task, engine.persistence_status(in.task_id(), in.artifact_id()));
      convert::fill_persistence(*c.response.mutable_query_persistence_status(), task);
      return {};
    }
    const auto& in = c.request.wait_persistence_status();
    TENSORREG_TRY_ASSIGN(auto task, engine.wait_persistence(in.task_id(), std::chrono::milliseconds(in.timeout_ms())));
    convert::fill_persistence(*c.response.mutable_wait_persistence_status()->mutable_status(), task);
    return {};
  }

  status activate_stable_local_backing(call& c) {
    const auto& in = c.request.activate_stable_local_backing();
    TENSORREG_TRY(check_owner(c.peer, in.owner_pid(), "activate stable local backing"));
    return fail(errc::unimplemented, "cannot activate stable local backing: it is not implemented yet");
  }

  // RPCs that hand another process an artifact's memory (GetArtifactMemfd, OpenArtifactDevice)
  // answer only peers of the daemon's own uid and root: any artifact held becomes readable.
  status check_reader(const peer_credentials& peer, const std::string& verb) const {
    if (peer.uid == 0 || peer.uid == options.daemon_uid) return {};
    return fail(errc::permission_denied, fmt::format("cannot {}: uid {} is neither root nor the daemon's uid {}", verb,
                                                     peer.uid, options.daemon_uid));
  }

  // Ours: the stable DRAM replica's memfd, read-only, for zero-copy readers. The bytes of every
  // artifact held are visible through it, so only the daemon's own uid and root may ask.
  status get_artifact_memfd(call& c) {
    const auto& id = c.request.get_artifact_memfd().artifact_id();
    TENSORREG_TRY(check_reader(c.peer, "open the stable replica of " + id));
    TENSORREG_TRY_ASSIGN(auto replica, engine.stable_replica_fd(id));
    TENSORREG_TRY_ASSIGN(auto summary, engine.get(id));
    convert::fill_memfd(*c.response.mutable_get_artifact_memfd(), *replica.first, summary.descriptor);
    c.fds_out.push_back(std::move(replica.second));
    return {};
  }

  // Ours: the GPU memory behind an artifact, for a reader in another process to map zero-copy
  // (docs/wire-format.md §13). The reader can read and write the producer's memory through it,
  // so only the daemon's own uid and root may ask, as for GetArtifactMemfd.
  status open_artifact_device(call& c) {
    const auto& id = c.request.open_artifact_device().artifact_id();
    TENSORREG_TRY(check_reader(c.peer, "open the GPU memory of " + id));
    TENSORREG_TRY_ASSIGN(auto layout, engine.device_layout_of(id));
    // Paging: this answer carries the VMM fds of allocations [first, end), at most
    // max_vmm_chunks of them (a region never has more, so every page makes progress).
    const std::size_t first = c.request.open_artifact_device().first_allocation();
    if (first > 0 && first >= layout.allocations.size()) {
      return fail(errc::invalid_argument,
                  fmt::format("cannot open the GPU memory of {}: first_allocation {} is past its "
                              "{} allocations",
                              id, first, layout.allocations.size()));
    }
    std::size_t end = first, fds = 0;
    while (end < layout.allocations.size()) {
      const auto& vmm = layout.allocations[end].vmm;
      const std::size_t n = vmm ? vmm->fds.size() : 0;
      if (fds + n > convert::max_vmm_chunks && end > first) break;
      fds += n;
      ++end;
    }
    // The page's fds, in the order fill_device_layout numbers them.
    for (std::size_t k = first; k < end; ++k) {
      const auto& vmm = layout.allocations[k].vmm;
      if (!vmm) continue;
      for (const auto& fd : vmm->fds) {
        unique_fd dup(::fcntl(fd.get(), F_DUPFD_CLOEXEC, 0));
        if (!dup) {
          return fail(errc::resource_exhausted, fmt::format("cannot open the GPU memory of {}: cannot duplicate a CUDA "
                                                            "VMM fd: {}",
                                                            id, std::strerror(errno)));
        }
        c.fds_out.push_back(std::move(dup));
      }
    }
    std::vector<std::string> device_uuids;
    device_uuids.reserve(layout.allocations.size());
    for (const auto& a : layout.allocations) device_uuids.push_back(engine.device_uuid(a.device_id));
    convert::fill_device_layout(*c.response.mutable_open_artifact_device(), layout, first, end, device_uuids);
    return {};
  }

  // device_uuid (ours, docs/wire-format.md §12) names the device when set: the message's
  // device_id becomes this daemon's ordinal of it.
  template <class Message>
  status resolve_device(Message& in) {
    if (in.device_uuid().empty()) return {};
    TENSORREG_TRY_ASSIGN(auto device, engine.resolve_device(in.device_id(), in.device_uuid()));
    in.set_device_id(device);
    return {};
  }

  status list_artifacts(call& c) {
    convert::fill_list(*c.response.mutable_list_artifacts(), engine.list());
    return {};
  }

  status get_stats(call& c) {
    convert::fill_stats(*c.response.mutable_get_stats(), engine.stats(), engine.list(), connections.load());
    return {};
  }

  status route(call& c) {
    using R = wire::Request;
    switch (c.request.body_case()) {
      case R::kBeginRegisterArtifact: return begin(c);
      case R::kKeepAliveRegisterArtifact: return keep_alive(c);
      case R::kCommitRegisteredArtifact: return commit(c);
      case R::kAbortRegisteredArtifact: return abort(c);
      case R::kRevokeRegisteredArtifact: return revoke(c);
      case R::kRegisterRegion: return register_region(c);
      case R::kUnregisterRegion: return unregister_region(c);
      case R::kRegisterVramRegion: return register_vram_region(c);
      case R::kUnregisterVramRegion: return unregister_vram_region(c);
      case R::kGetServerConfig: return get_server_config(c);
      case R::kGetArtifactIndexById: return get_artifact_index(c);
      case R::kDeregisterArtifact: return deregister(c);
      case R::kStartPersistence:
      case R::kQueryPersistenceStatus:
      case R::kWaitPersistenceStatus: return persistence(c);
      case R::kActivateStableLocalBacking: return activate_stable_local_backing(c);
      case R::kListArtifacts: return list_artifacts(c);
      case R::kGetStats: return get_stats(c);
      case R::kGetArtifactMemfd: return get_artifact_memfd(c);
      case R::kOpenArtifactDevice: return open_artifact_device(c);
      case R::kFeedRegisterArtifactStream:
      case R::BODY_NOT_SET: break;
    }
    return tl::unexpected(convert::bodiless(c.request));
  }

  answer unary(connection& conn, wire::Request& request, std::vector<unique_fd> fds) {
    const auto body = request.body_case();
    call c{conn.peer(), request, fds, {}, {}};
    c.response.set_request_id(request.request_id());
    status done;
    if (request.end_of_stream()) {
      done = fail(errc::invalid_argument, fmt::format("cannot handle {} request {}: end_of_stream is only for Feed "
                                                      "streams",
                                                      convert::rpc_name(body), request.request_id()));
    } else if (!fds.empty() && body != wire::Request::kRegisterRegion) {
      done = tl::unexpected(
          fds_unused(fmt::format("handle {} request {}", convert::rpc_name(body), request.request_id()), fds.size()));
    } else {
      done = route(c);
    }
    if (!done) {
      convert::set_status(c.response, done.error());
      c.fds_out.clear();
    } else {
      c.response.mutable_status();
    }
    return answer{std::move(c.response), std::move(c.fds_out), {}};
  }

  // ---- Feed streams ----

  // Applies one feed frame of a stream; any error ends the stream.
  status feed_frame(const peer_credentials& peer, feed_stream& stream, bool first, wire::Request& request,
                    std::size_t fds) {
    auto& in = *request.mutable_feed_register_artifact_stream();
    const std::string verb = fmt::format("feed registration '{}'", in.registration_id());
    if (first) stream.registration_id = in.registration_id();
    if (in.registration_id() != stream.registration_id) {
      return fail(errc::invalid_argument, fmt::format("cannot {}: stream {} feeds registration '{}'", verb,
                                                      request.request_id(), stream.registration_id));
    }
    if (fds != 0) return tl::unexpected(fds_unused(verb, fds));
    TENSORREG_TRY(check_registration_owner(peer, in.registration_id(), "feed registration"));
    for (auto& entry : *in.mutable_storage_entries()) {
      if (auto resolved = resolve_device(entry); !resolved) {
        return tl::unexpected(with_context(std::move(resolved).error(),
                                           fmt::format("cannot {}: storage '{}'", verb, entry.storage_id())));
      }
    }
    return engine.feed(convert::to_feed(in));
  }

  std::optional<answer> feed(connection& conn, wire::Request& request, std::size_t fds) {
    const auto id = request.request_id();
    auto [it, first] = conn.streams().try_emplace(id);
    if (it->second.failed) return std::nullopt;  // answered already
    auto applied = feed_frame(conn.peer(), it->second, first, request, fds);
    if (applied) return std::nullopt;
    it->second.failed = true;
    return error_answer(id, applied.error());
  }

  answer end_stream(connection& conn, std::uint64_t id) {
    auto it = conn.streams().find(id);
    if (it == conn.streams().end()) {
      return error_answer(id, error{errc::invalid_argument, fmt::format("cannot end feed stream {}: missing feed "
                                                                        "payload (no feed frame came before "
                                                                        "end_of_stream)",
                                                                        id)});
    }
    answer out;
    out.subject = fmt::format("registration '{}'", it->second.registration_id);
    conn.streams().erase(it);
    out.response.set_request_id(id);
    out.response.mutable_status();
    out.response.mutable_feed_register_artifact_stream();
    return out;
  }

  // A frame of a Feed stream: a feed message, or the end-of-stream marker.
  std::optional<answer> stream_frame(connection& conn, wire::Request& request, std::vector<unique_fd> fds) {
    const auto id = request.request_id();
    auto it = conn.streams().find(id);
    if (it != conn.streams().end() && it->second.failed) {
      if (request.end_of_stream()) conn.streams().erase(it);  // its answer went out with the error
      return std::nullopt;
    }
    if (!request.end_of_stream()) return feed(conn, request, fds.size());
    const bool has_body = request.has_feed_register_artifact_stream();
    if (has_body || !fds.empty()) {
      if (it != conn.streams().end()) conn.streams().erase(it);
      const auto why = has_body ? std::string("the end_of_stream frame carries a body")
                                : fd_count(fds.size()) + " arrived with the end_of_stream frame";
      return error_answer(id, error{errc::invalid_argument, fmt::format("cannot end feed stream {}: {}", id, why)});
    }
    return end_stream(conn, id);
  }

  // ---- One frame, start to end ----

  std::optional<answer> dispatch(connection& conn, wire::Request& request, frame_in frame) {
    if (!request.ParseFromString(frame.payload)) {
      return error_answer(0, error{errc::invalid_argument,
                                   fmt::format("cannot parse request: {} bytes are not a tensorreg.wire.v1.Request",
                                               frame.payload.size())});
    }
    std::string().swap(frame.payload);  // the request holds its own copy (view chunks are large)
    if (request.request_id() == 0) {
      return error_answer(0, error{errc::invalid_argument, "cannot handle request: request_id 0 is reserved"});
    }
    const auto id = request.request_id();
    if (request.has_feed_register_artifact_stream() || is_end_marker(request)) {
      return stream_frame(conn, request, std::move(frame.fds));
    }
    if (conn.streams().contains(id)) {
      // A connection-level error (docs/wire-format.md §4): the id is still outstanding.
      return error_answer(0, error{errc::invalid_argument,
                                   fmt::format("cannot handle {} request {}: request_id {} is in use by an open feed "
                                               "stream",
                                               convert::rpc_name(request.body_case()), id, id)});
    }
    return unary(conn, request, std::move(frame.fds));
  }

  static bool is_end_marker(const wire::Request& request) {
    return request.end_of_stream() && request.body_case() == wire::Request::BODY_NOT_SET;
  }

  // Each RPC at debug; each non-OK answer again at info, with its message, for whoever reads
  // the log to see what a client got wrong. A feed frame that is not answered (the stream goes
  // on) is a trace line.
  void log_rpc(const peer_credentials& peer, const wire::Request& request, const std::optional<answer>& out,
               std::chrono::steady_clock::time_point started) const {
    const bool rejected = out && out->response.status().code() != 0;
    const auto level = !out ? log_level::trace : log_level::debug;
    if (!log.enabled(level) && !(rejected && log.enabled(log_level::info))) return;
    const auto us =
        std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - started).count();
    const auto method = is_end_marker(request) ? std::string_view("FeedRegisterArtifactStream")
                                               : convert::rpc_name(request.body_case());
    std::string subject;
    if (out && !out->subject.empty()) {
      subject = ", " + out->subject;
    } else if (auto s = convert::subject_of(request, out ? out->response : wire::Response::default_instance());
               !s.empty()) {
      subject = ", " + s;
    }
    if (!out) {
      tensorreg::log(log, log_level::trace, "rpc {} request {} from pid {} uid {}{}: frame taken in {} us", method,
                     request.request_id(), peer.pid, peer.uid, subject, us);
      return;
    }
    const auto& status = out->response.status();
    const auto code = errc_name(static_cast<errc>(status.code()));
    tensorreg::log(log, log_level::debug, "rpc {} request {} from pid {} uid {}{}: {} in {} us", method,
                   request.request_id(), peer.pid, peer.uid, subject, code, us);
    if (rejected) {
      tensorreg::log(log, log_level::info, "rejected {} request {} from pid {} uid {}{}: {}: {}", method,
                     request.request_id(), peer.pid, peer.uid, subject, code, status.message());
    }
  }
};

// ---- dispatcher ------------------------------------------------------------------------------

dispatcher::dispatcher(registration::engine& engine, dispatcher_options options)
    : impl_(std::make_unique<impl>(engine, std::move(options))) {}

dispatcher::~dispatcher() = default;

void dispatcher::connection_deleter::operator()(connection* c) const noexcept { delete c; }

dispatcher::connection_ptr dispatcher::open_connection(const peer_credentials& peer) {
  return connection_ptr(new connection(peer, impl_->connections));
}

std::optional<frame_out> dispatcher::handle(connection& conn, frame_in frame) {
  const auto started = std::chrono::steady_clock::now();
  wire::Request request;
  std::optional<answer> out;
  // The session boundary: whatever a handler throws is answered, never lost with the client
  // left waiting (an id-0 answer when the request could not even be read).
  try {
    out = impl_->dispatch(conn, request, std::move(frame));
  } catch (const std::bad_alloc&) {
    out = error_answer(request.request_id(), error{errc::resource_exhausted, "cannot handle request: out of memory"});
  } catch (const std::exception& e) {
    out = error_answer(request.request_id(), error{errc::internal, fmt::format("cannot handle request: {}", e.what())});
  }
  if (out && out->response.status().code() != 0) {
    // A stream answered with an error takes no more frames (as a handler's own error does).
    if (auto it = conn.streams().find(request.request_id()); it != conn.streams().end()) it->second.failed = true;
  }
  impl_->log_rpc(conn.peer(), request, out, started);
  if (!out) return std::nullopt;
  return serialize(std::move(*out));
}

frame_out dispatcher::reject(const error& e) const { return serialize(error_answer(0, e)); }

void dispatcher::close_connection(connection& conn) { conn.close(); }

}  // namespace tensorreg::daemon
