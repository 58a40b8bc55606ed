// tensorreg/client/weight_sync.hpp — the weight-sync loop over tensorregd, for C++ callers.
//
// A training process publishes each new version of its weights in place and readers take the
// newest (docs/registration.md §4.8). Every version is a lease-in-place registration with a
// cgid, `cgid:weight-sync~<name>~<k>` (k = 1, 2, ...), committed with hash_in_background: it is
// usable by its cgid as soon as publish() returns, and its mi2 id follows.
//
//   producer: publish(tensors) → version {cgid, k}; wait_hashed() before writing the weights
//             again (the mi2 id is of the bytes at hash time); keeps the newest `keep_versions`
//             leases and revokes older ones. publish_again() → the next version over the same
//             tensors, written in place: one RepublishLease instead of registering them again.
//   consumer: latest() / wait_for(k) → version, then connection::open_device(version.cgid);
//             wait_verified(version) → its mi2 id.
//
// Thread-safety: a producer or consumer is used by one thread at a time. Ownership: a producer
// owns the leases of the versions it keeps (released when it is destroyed); both share their
// connection's socket.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "tensorreg/client/connection.hpp"
#include "tensorreg/client/types.hpp"
#include "tensorreg/common/error.hpp"
#include "tensorreg/index/safetensors_bundle.hpp"

namespace tensorreg::client {

/// One published version of a weight-sync stream.
struct weight_version {
  std::string cgid;     ///< `cgid:weight-sync~<name>~<k>`: Get, Open and open_device take it
  std::uint64_t k = 0;  ///< 1 for the first publish, then +1 each
};

/// The cgid of version `k` of stream `name`. Errors: INVALID_ARGUMENT (a name outside
/// [A-Za-z0-9-._] or empty, or too long for a cgid).
[[nodiscard]] result<std::string> weight_version_id(std::string_view name, std::uint64_t k);

struct weight_sync_options {
  std::uint32_t ttl_ms = default_ttl_ms;  ///< each version's lease; 0: no expiry
  std::size_t keep_versions = 2;          ///< leases kept; older ones are revoked (≥ 1)
  std::int32_t device = -1;               ///< register_cuda's device
};

class weight_sync_producer {
 public:
  /// Errors: INVALID_ARGUMENT (bad name, keep_versions 0).
  [[nodiscard]] static result<weight_sync_producer> create(connection conn, std::string name,
                                                           weight_sync_options options = {});

  /// Publishes the tensors' current bytes as the next version: leases them in place (CUDA) and
  /// commits with hash_in_background. Then revokes the versions beyond keep_versions.
  /// REQUIRES: the previous version's hash is done (wait_hashed()) if the weights were written
  /// since, else its mi2 id will not match what its readers saw.
  /// Errors: register_cuda's.
  [[nodiscard]] result<weight_version> publish(std::span<const cuda_tensor> tensors);
  /// The same for host bytes (a HOST_SHARED copy of `bundle`, connection::register_lease).
  [[nodiscard]] result<weight_version> publish(const index::safetensors_bundle& bundle);

  /// Publishes the next version over the tensors of the newest kept version, their new bytes
  /// written in place: one RepublishLease of its lease (docs/wire-format.md §20), the tensors
  /// neither sent nor checked again. With keep_versions 1 the daemon revokes the version before
  /// in the same call; otherwise the versions beyond keep_versions are revoked as by publish().
  /// REQUIRES: every tensor is where that version's publish found it (the same memory, shape,
  /// stride and dtype), and its hash is done (wait_hashed()) if the weights were written since.
  /// Errors: FAILED_PRECONDITION (nothing published yet; a region of the newest version's
  /// lease was unregistered or failed), NOT_FOUND (that lease was revoked or expired, or its
  /// owner exited): in either case publish(tensors) registers them afresh; the daemon's others.
  [[nodiscard]] result<weight_version> publish_again();

  /// Waits until the newest version's background hash ended; call it before writing the
  /// weights in place again. Returns its mi2 id. Errors: ABORTED (the hash failed: its message),
  /// FAILED_PRECONDITION (nothing published yet), the daemon's.
  [[nodiscard]] result<std::string> wait_hashed();

  [[nodiscard]] const std::optional<weight_version>& last() const noexcept { return last_; }

 private:
  weight_sync_producer(connection conn, std::string name, weight_sync_options options);
  [[nodiscard]] result<weight_version> keep(result<lease> leased, std::uint64_t k);

  connection conn_;
  std::string name_;
  weight_sync_options options_;
  std::uint64_t next_k_ = 1;
  std::deque<lease> leases_;  // oldest first
  std::optional<weight_version> last_;
};

class weight_sync_consumer {
 public:
  /// Errors: INVALID_ARGUMENT (bad name).
  [[nodiscard]] static result<weight_sync_consumer> create(connection conn, std::string name);

  /// The newest version the daemon holds, or nullopt when none. Errors: the daemon's.
  [[nodiscard]] result<std::optional<weight_version>> latest();
  /// Waits up to `timeout` (0 = no limit) for version `k` or a newer one; returns the newest.
  /// Errors: DEADLINE_EXCEEDED (none in time), the daemon's.
  [[nodiscard]] result<weight_version> wait_for(std::uint64_t k, std::chrono::milliseconds timeout = {});
  /// Waits up to `timeout` (0 = no limit) for the mi2 id of `v`.
  /// Errors: DEADLINE_EXCEEDED (still hashing), ABORTED (the hash failed: its message),
  /// NOT_FOUND (v is gone), the daemon's.
  [[nodiscard]] result<std::string> wait_verified(const weight_version& v, std::chrono::milliseconds timeout = {});

 private:
  weight_sync_consumer(connection conn, std::string name) : conn_(std::move(conn)), name_(std::move(name)) {}
  connection conn_;
  std::string name_;
};

}  // namespace tensorreg::client
