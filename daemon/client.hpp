// daemon/client.hpp — the blocking C++ client of tensorregd.
//
// `client` speaks docs/wire-format.md over the daemon's Unix socket: one request, one answer,
// with file descriptors both ways; Feed streams as one call. A daemon error comes back as an
// `error` with the daemon's status code and message. After a broken connection, the next call
// reconnects (a call that was cut off is not retried: it reports UNAVAILABLE).
//
// `store` builds on it the two ways of registering a safetensors artifact:
//   put()           — stable_dram through the memfd publish path (the bytes are written once,
//                     straight into the daemon's memory);
//   register_lease() — lease-in-place over a daemon-managed HOST_SHARED region (the bytes
//                     stay in shared memory the client owns), kept alive by a thread that
//                     sends KeepAlive every max(1 s, ttl/2) ±10 % and revoked when the
//                     lease object goes away.
//
// Thread-safety: every member function may be called from any thread; calls on one client
// are serialised by an internal mutex (open several clients for parallel calls).
// Protobuf types appear here, in the daemon shell, never under include/.
#pragma once

#include <atomic>
#include <functional>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "tensorreg/common/error.hpp"
#include "tensorreg/common/unique_fd.hpp"
#include "tensorreg/index/safetensors_bundle.hpp"
#include "tensorreg/memory/shared_memory.hpp"
#include "tensorreg/wire/v1/frame.pb.h"

namespace tensorreg::daemon {

namespace wire = ::tensorreg::wire::v1;
namespace v2 = ::tensorcast::daemon::v2;

class client {
 public:
  struct reply {
    wire::Response response;
    std::vector<unique_fd> fds;
  };

  /// Connects to `socket_path` (default: default_socket_path()).
  /// Errors: UNAVAILABLE (no daemon there).
  [[nodiscard]] static result<std::unique_ptr<client>> connect(std::string socket_path = {});

  /// Sends `request` (its request_id is assigned here) with `fds`, waits for its answer.
  /// A non-OK status comes back as an error with the daemon's code and message.
  /// Errors: the daemon's status; UNAVAILABLE (connection lost); DATA_LOSS (malformed answer).
  [[nodiscard]] result<reply> call(wire::Request request, std::span<const int> fds = {});

  /// Sends a whole Feed stream (the frames, then end-of-stream) and waits for its one answer.
  [[nodiscard]] result<reply> feed(std::vector<v2::FeedRegisterArtifactStreamRequest> frames);

  [[nodiscard]] const std::string& socket_path() const noexcept { return socket_path_; }

 private:
  explicit client(std::string path) : socket_path_(std::move(path)) {}
  [[nodiscard]] status ensure_connected_locked();
  [[nodiscard]] status send_locked(const wire::Request& request, std::span<const int> fds);
  [[nodiscard]] result<reply> receive_locked(std::uint64_t request_id);

  std::string socket_path_;
  std::mutex mutex_;
  unique_fd socket_;
  std::uint64_t next_request_id_ = 1;
  std::string inbox_;  // bytes received past the last answer
  std::vector<unique_fd> inbox_fds_;
};

/// The result of put() / register_lease().
struct registered {
  tensorcast::common::v1::ArtifactDescriptor descriptor;
  bool existed = false;
  std::string registration_id;
  double begin_to_commit_seconds = 0;
};

class lease;

/// High-level registration of safetensors artifacts through a client.
class store {
 public:
  explicit store(std::shared_ptr<client> c) : client_(std::move(c)) {}

  /// stable_dram put through the memfd publish path; `profile` is a policy profile name
  /// ("cache", "warm", "pinned", "durable", ...; empty = the daemon's default).
  /// `progress(done, total)` is called as bytes are written, if set.
  [[nodiscard]] result<registered> put(const index::safetensors_bundle& bundle, const std::string& profile,
                                       const std::function<void(std::uint64_t, std::uint64_t)>& progress = {});

  /// Lease-in-place over a daemon-managed HOST_SHARED region holding the canonical bytes.
  [[nodiscard]] result<std::unique_ptr<lease>> register_lease(const index::safetensors_bundle& bundle,
                                                              std::uint32_t ttl_ms = 600'000);

  [[nodiscard]] client& connection() noexcept { return *client_; }

 private:
  std::shared_ptr<client> client_;
};

/// A live lease: keeps itself alive and is revoked (and its region unregistered) on destruction.
class lease {
 public:
  lease(std::shared_ptr<client> c, registered info, std::string region_id,
        std::shared_ptr<memory::shared_memory> region_memory, std::uint32_t ttl_ms);
  ~lease();
  lease(const lease&) = delete;
  lease& operator=(const lease&) = delete;

  [[nodiscard]] const registered& info() const noexcept { return info_; }
  [[nodiscard]] std::uint64_t keepalives_sent() const noexcept { return keepalives_; }

 private:
  std::shared_ptr<client> client_;
  registered info_;
  std::string region_id_;
  std::shared_ptr<memory::shared_memory> region_memory_;
  std::atomic<std::uint64_t> keepalives_{0};
  std::jthread keeper_;
};

/// Converts a daemon status to an error (OK → nullopt).
[[nodiscard]] std::optional<error> status_error(const wire::Status& s);

}  // namespace tensorreg::daemon
