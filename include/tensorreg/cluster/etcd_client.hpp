// tensorreg/cluster/etcd_client.hpp — a client of etcd's v3 API over its JSON gateway
// (docs/cluster.md §1).
//
// Provides `etcd_client`: put, range by key or prefix, delete by prefix, and leases (grant,
// keep-alive, revoke), each one HTTP POST with a bounded connect and total timeout. Keys and
// values are byte strings (base64 on the wire, as the gateway wants). Any failure to reach
// etcd — refused, timed out, a 5xx from the gateway — is UNAVAILABLE and names the endpoint:
// "cluster catalogue at http://127.0.0.1:2379 unreachable: <reason>".
//
// Thread-safety: every member function may be called from any thread; calls are serialised on
// one connection (etcd answers these in microseconds; the catalogue makes few of them).
// Ownership: the client owns its HTTP connection; values are copied in and out.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tensorreg/common/error.hpp"

namespace tensorreg::cluster {

/// Where the catalogue lives: `etcd://host:port/prefix`.
struct cluster_url {
  std::string host;
  std::uint16_t port = 2379;
  /// Key prefix, without a trailing '/', never empty ("/tensorreg" when the URL has none).
  std::string prefix;

  /// "http://host:port", the gateway's base URL.
  [[nodiscard]] std::string endpoint() const;
};

/// Parses "etcd://host:port/prefix" (port defaults to 2379, prefix to "/tensorreg").
/// Errors: INVALID_ARGUMENT naming the value: wrong scheme, empty host, a bad port, a prefix
/// with characters outside [A-Za-z0-9-._/].
[[nodiscard]] result<cluster_url> parse_cluster_url(std::string_view text);

struct etcd_options {
  /// "http://host:port".
  std::string endpoint;
  std::chrono::milliseconds connect_timeout{1000};
  /// Whole request, connect included.
  std::chrono::milliseconds request_timeout{3000};
};

struct key_value {
  std::string key;
  std::string value;
  /// The lease the key is attached to; 0 for none.
  std::int64_t lease = 0;
  std::int64_t mod_revision = 0;
};

class etcd_client {
 public:
  /// Errors: INVALID_ARGUMENT (endpoint not http://), INTERNAL (libcurl cannot start). Does not
  /// contact etcd.
  [[nodiscard]] static result<std::unique_ptr<etcd_client>> create(etcd_options options);

  ~etcd_client();
  etcd_client(const etcd_client&) = delete;
  etcd_client& operator=(const etcd_client&) = delete;

  [[nodiscard]] const std::string& endpoint() const noexcept;

  /// Puts `key` = `value`, attached to `lease` when non-zero.
  /// Errors: UNAVAILABLE (etcd unreachable), NOT_FOUND (the lease is gone), INTERNAL (an answer
  /// that is not etcd's).
  [[nodiscard]] status put(std::string_view key, std::string_view value, std::int64_t lease = 0);

  /// Puts `key` = `value` only if the key does not exist; returns whether it was written.
  /// Errors: as put().
  [[nodiscard]] result<bool> put_if_absent(std::string_view key, std::string_view value);

  /// The key, or nullopt. Errors: UNAVAILABLE, INTERNAL.
  [[nodiscard]] result<std::optional<key_value>> get(std::string_view key);

  /// Every key starting with `prefix`, in key order. Errors: UNAVAILABLE, INTERNAL.
  [[nodiscard]] result<std::vector<key_value>> list(std::string_view prefix);

  /// Several keys in one request (a txn of ranges, 128 keys a request: etcd's default
  /// --max-txn-ops): one answer per key, in order, nullopt where the key is absent.
  /// Errors: UNAVAILABLE, INTERNAL.
  [[nodiscard]] result<std::vector<std::optional<key_value>>> get_many(std::span<const std::string> keys);

  /// Deletes every key starting with `prefix`; returns how many. Errors: UNAVAILABLE, INTERNAL.
  [[nodiscard]] result<std::int64_t> delete_prefix(std::string_view prefix);

  /// Deletes one key; returns whether it existed. Errors: UNAVAILABLE, INTERNAL.
  [[nodiscard]] result<bool> delete_key(std::string_view key);

  /// A new lease of `ttl` (whole seconds, at least 1); returns its id.
  /// Errors: UNAVAILABLE, INVALID_ARGUMENT (ttl < 1 s), INTERNAL.
  [[nodiscard]] result<std::int64_t> grant_lease(std::chrono::seconds ttl);

  /// Renews a lease; returns its TTL now.
  /// Errors: NOT_FOUND (the lease expired or was revoked: its keys are gone), UNAVAILABLE,
  /// INTERNAL.
  [[nodiscard]] result<std::chrono::seconds> keep_alive(std::int64_t lease);

  /// Revokes a lease and deletes its keys. A lease already gone is not an error.
  /// Errors: UNAVAILABLE, INTERNAL.
  [[nodiscard]] status revoke_lease(std::int64_t lease);

  /// The seconds a lease has left, without renewing it (an observer's question: `tensorreg
  /// cluster ls` must not keep a dead host alive).
  /// Errors: NOT_FOUND (the lease expired or was revoked), UNAVAILABLE, INTERNAL.
  [[nodiscard]] result<std::chrono::seconds> lease_time_to_live(std::int64_t lease);

 private:
  struct state;
  explicit etcd_client(std::unique_ptr<state> s) noexcept;
  std::unique_ptr<state> state_;
};

/// A watch of every key under a prefix (POST /v3/watch, a stream that stays open, on a
/// connection of its own). A node watches the asks addressed to it, so that it serves one when
/// it is written rather than at its next look (docs/cluster.md §5).
class etcd_watch {
 public:
  /// Errors: INVALID_ARGUMENT (endpoint not http://), INTERNAL (libcurl).
  [[nodiscard]] static result<std::unique_ptr<etcd_watch>> create(std::string endpoint, std::string prefix,
                                                                  std::chrono::milliseconds connect_timeout);
  ~etcd_watch();
  etcd_watch(const etcd_watch&) = delete;
  etcd_watch& operator=(const etcd_watch&) = delete;

  /// Opens the stream and calls `changed` once the watch is in place (what changed before it
  /// was may need a look) and after each batch of events, on the caller's thread, until stop().
  /// Returns OK once stopped; UNAVAILABLE when etcd cannot be reached or the stream ends or
  /// fails (the caller opens it again). May be called again after it returned.
  [[nodiscard]] status run(const std::function<void()>& changed);

  /// Ends run() within moments, from any thread; run() called after stop() returns at once.
  void stop() noexcept;

 private:
  struct state;
  explicit etcd_watch(std::unique_ptr<state> s) noexcept;
  std::unique_ptr<state> state_;
};

/// Standard base64 with padding (RFC 4648 §4), as etcd's gateway carries bytes.
[[nodiscard]] std::string base64_encode(std::string_view bytes);
/// Errors: INVALID_ARGUMENT for a character outside the alphabet or a bad length.
[[nodiscard]] result<std::string> base64_decode(std::string_view text);

}  // namespace tensorreg::cluster
