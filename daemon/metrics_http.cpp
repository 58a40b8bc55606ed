#include "metrics_http.hpp"

#include <fmt/core.h>

#include <array>
#include <asio.hpp>
#include <charconv>
#include <exception>
#include <memory>
#include <string_view>
#include <thread>

#include "src/common/log.hpp"

namespace tensorreg::daemon {
namespace {

using tcp = asio::ip::tcp;

std::string http_answer(std::string_view status, std::string_view content_type, std::string_view body) {
  return fmt::format("HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}", status,
                     content_type, body.size(), body);
}

}  // namespace

result<std::pair<std::string, std::uint16_t>> parse_host_port(const std::string& text) {
  const auto bad = [&](std::string_view why) {
    return fail(errc::invalid_argument, fmt::format("cannot use metrics address '{}': {}", text, why));
  };
  std::string host;
  std::string_view port_text;
  if (text.starts_with('[')) {
    const auto close = text.find("]:");
    if (close == std::string::npos) return bad("expected [IPV6]:PORT");
    host = text.substr(1, close - 1);
    port_text = std::string_view(text).substr(close + 2);
  } else {
    const auto colon = text.rfind(':');
    if (colon == std::string::npos || colon == 0) return bad("expected HOST:PORT, as in 127.0.0.1:9464");
    host = text.substr(0, colon);
    port_text = std::string_view(text).substr(colon + 1);
  }
  unsigned port = 0;
  const auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (ec != std::errc{} || end != port_text.data() + port_text.size() || port_text.empty() || port > 65535) {
    return bad(fmt::format("the port '{}' is not a number from 0 to 65535", port_text));
  }
  return std::pair{host, static_cast<std::uint16_t>(port)};
}

struct metrics_http::impl {
  metrics_http_options options;
  std::function<std::string()> render;
  logger& log;
  asio::io_context io{1};
  tcp::acceptor acceptor{io};
  std::size_t open = 0;  // connections being served; only the listener's thread touches it
  std::thread thread;

  impl(metrics_http_options o, std::function<std::string()> r)
      : options(std::move(o)), render(std::move(r)), log(options.log != nullptr ? *options.log : null_logger()) {}

  asio::awaitable<void> accept_loop() {
    for (;;) {
      asio::error_code ec;
      tcp::socket socket = co_await acceptor.async_accept(asio::redirect_error(asio::use_awaitable, ec));
      if (ec == asio::error::operation_aborted) co_return;
      if (ec) {
        // Out of fds and the like: wait a little rather than spin on the backlog.
        tensorreg::log(log, log_level::debug, "metrics listener cannot accept: {}", ec.message());
        asio::steady_timer pause(io, std::chrono::milliseconds(100));
        co_await pause.async_wait(asio::redirect_error(asio::use_awaitable, ec));
        continue;
      }
      if (open >= options.max_connections) {
        tensorreg::log(log, log_level::debug, "metrics listener refused a connection: {} are open", open);
        socket.close(ec);
        continue;
      }
      ++open;
      asio::co_spawn(io, serve(std::move(socket)), [this](const std::exception_ptr& e) {
        --open;
        if (!e) return;
        try {
          std::rethrow_exception(e);
        } catch (const std::exception& x) {
          tensorreg::log(log, log_level::warn, "metrics listener: a connection ended by an exception: {}", x.what());
        } catch (...) {
        }
      });
    }
  }

  asio::awaitable<void> serve(tcp::socket socket) {
    asio::steady_timer deadline(io, options.request_timeout);
    deadline.async_wait([&socket](const asio::error_code& ec) {
      if (!ec) {
        asio::error_code ignored;
        socket.close(ignored);  // too slow: the pending read ends with an error
      }
    });
    std::string request;
    std::array<char, 1024> chunk{};
    std::string answer;
    for (;;) {
      asio::error_code ec;
      const std::size_t n =
          co_await socket.async_read_some(asio::buffer(chunk), asio::redirect_error(asio::use_awaitable, ec));
      if (ec) co_return;  // closed, or the deadline passed
      request.append(chunk.data(), n);
      if (request.find("\r\n\r\n") != std::string::npos) break;
      if (request.size() > options.max_request_bytes) {
        answer = http_answer("431 Request Header Fields Too Large", "text/plain; charset=utf-8",
                             fmt::format("requests are limited to {} bytes\n", options.max_request_bytes));
        break;
      }
    }
    if (answer.empty()) {
      const auto line_end = request.find("\r\n");
      const std::string_view line = std::string_view(request).substr(0, line_end);
      if (line == "GET /metrics HTTP/1.1" || line == "GET /metrics HTTP/1.0") {
        answer = http_answer("200 OK", "text/plain; version=0.0.4; charset=utf-8", render());
      } else {
        tensorreg::log(log, log_level::debug, "metrics listener: 404 for '{}'", line.substr(0, 200));
        answer = http_answer("404 Not Found", "text/plain; charset=utf-8", "only GET /metrics is served here\n");
      }
    }
    asio::error_code ec;
    co_await asio::async_write(socket, asio::buffer(answer), asio::redirect_error(asio::use_awaitable, ec));
    deadline.cancel();
    socket.shutdown(tcp::socket::shutdown_both, ec);
    socket.close(ec);
  }
};

metrics_http::metrics_http(std::unique_ptr<impl> i) noexcept : impl_(std::move(i)) {}

metrics_http::~metrics_http() {
  asio::post(impl_->io, [i = impl_.get()] {
    asio::error_code ignored;
    i->acceptor.close(ignored);
    i->io.stop();
  });
  if (impl_->thread.joinable()) impl_->thread.join();
}

result<std::unique_ptr<metrics_http>> metrics_http::create(metrics_http_options options,
                                                           std::function<std::string()> render) {
  TENSORREG_TRY_ASSIGN(auto host_port, parse_host_port(options.address));
  auto i = std::make_unique<impl>(std::move(options), std::move(render));
  asio::error_code ec;
  tcp::resolver resolver(i->io);
  const auto found =
      resolver.resolve(host_port.first, std::to_string(host_port.second), tcp::resolver::numeric_service, ec);
  if (ec || found.empty()) {
    return fail(errc::invalid_argument,
                fmt::format("cannot use metrics address '{}': {}", i->options.address,
                            ec ? ec.message() : std::string("the host resolves to no address")));
  }
  const tcp::endpoint endpoint = *found.begin();
  i->acceptor.open(endpoint.protocol(), ec);
  if (!ec) i->acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) i->acceptor.bind(endpoint, ec);
  if (!ec) i->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    return fail(errc::unavailable,
                fmt::format("cannot listen for metrics on '{}': {}", i->options.address, ec.message()));
  }
  auto* raw = i.get();
  asio::co_spawn(raw->io, raw->accept_loop(), asio::detached);
  raw->thread = std::thread([raw] {
    try {
      raw->io.run();
    } catch (const std::exception& e) {
      tensorreg::log(raw->log, log_level::error, "metrics listener stopped: {}", e.what());
    }
  });
  return std::unique_ptr<metrics_http>(new metrics_http(std::move(i)));
}

std::uint16_t metrics_http::port() const noexcept {
  asio::error_code ec;
  return impl_->acceptor.local_endpoint(ec).port();
}

std::string metrics_http::url() const {
  asio::error_code ec;
  const auto endpoint = impl_->acceptor.local_endpoint(ec);
  const auto address = endpoint.address();
  return address.is_v6() ? fmt::format("http://[{}]:{}/metrics", address.to_string(), endpoint.port())
                         : fmt::format("http://{}:{}/metrics", address.to_string(), endpoint.port());
}

}  // namespace tensorreg::daemon
