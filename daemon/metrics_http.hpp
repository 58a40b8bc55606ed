// daemon/metrics_http.hpp — tensorregd's opt-in HTTP listener for Prometheus (--metrics-addr).
//
// Serves `GET /metrics` (the Prometheus text format 0.0.4 that `render` returns) on a TCP
// address, and 404 for every other method or path; each answer closes its connection. It has
// its own io_context and thread, so a slow or hostile scraper never holds the daemon's socket
// I/O: requests are read up to max_request_bytes (more: 431 and close) within request_timeout
// (else closed), at most max_connections at once (more are closed at accept).
//
// Thread-safety: create() and the destructor from one thread; `render` is called on the
// listener's thread and must be safe there. Ownership: the listener owns its thread and
// sockets; the destructor stops them and joins. asio appears only in metrics_http.cpp.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "tensorreg/common/error.hpp"
#include "tensorreg/common/logger.hpp"

namespace tensorreg::daemon {

struct metrics_http_options {
  /// "HOST:PORT" (an IPv4 address or a name that resolves to one, or "[v6]:PORT"); port 0
  /// picks a free port (port() says which).
  std::string address;
  std::size_t max_connections = 16;
  std::size_t max_request_bytes = 8192;
  std::chrono::milliseconds request_timeout{5000};
  /// Refused connections and bad requests at debug; must outlive the listener; null = none.
  logger* log = &null_logger();
};

class metrics_http {
 public:
  /// Binds and starts serving. Errors: INVALID_ARGUMENT (address not HOST:PORT, a port out of
  /// range, a host that does not resolve), UNAVAILABLE (cannot bind, e.g. the port is taken).
  [[nodiscard]] static result<std::unique_ptr<metrics_http>> create(metrics_http_options options,
                                                                    std::function<std::string()> render);
  ~metrics_http();
  metrics_http(const metrics_http&) = delete;
  metrics_http& operator=(const metrics_http&) = delete;

  /// The port bound (the one asked for, or the one picked for port 0).
  [[nodiscard]] std::uint16_t port() const noexcept;
  /// "http://HOST:PORT/metrics" as bound.
  [[nodiscard]] std::string url() const;

 private:
  struct impl;
  explicit metrics_http(std::unique_ptr<impl> i) noexcept;
  std::unique_ptr<impl> impl_;
};

/// Splits "HOST:PORT" / "[V6]:PORT". Errors: INVALID_ARGUMENT naming the text.
[[nodiscard]] result<std::pair<std::string, std::uint16_t>> parse_host_port(const std::string& text);

}  // namespace tensorreg::daemon
