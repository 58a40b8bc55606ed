// src/cluster/ucx_wire.hpp — what both ends of a transfer (docs/cluster.md §3) share: the
// active message ids and headers, the UCX worker wrapper, and small helpers. Private to the
// cluster library: transfer_server.cpp serves leaves, pull.cpp pulls them.
#pragma once

#include <arpa/inet.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <poll.h>
#include <ucp/api/ucp.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "tensorreg/common/error.hpp"
#include "tensorreg/hash/tree_hash.hpp"

namespace tensorreg::cluster::wire {

// Active message ids and the two headers (docs/cluster.md §3.2). Both ends are this code, but
// a peer is only trusted to be available: every field is checked before use.
constexpr unsigned am_request = 0x54;
constexpr unsigned am_reply = 0x55;
constexpr std::uint32_t wire_magic = 0x31475254;  // "TRG1"
constexpr std::uint32_t max_id_length = 512;

// `holdings`: which leaves the source has, as a bitmap (all of them for a complete artifact).
enum class message_kind : std::uint32_t { manifest = 1, leaf = 2, holdings = 3 };

struct request_header {
  std::uint32_t magic = wire_magic;
  std::uint32_t kind = 0;
  std::uint64_t tag = 0;
  std::uint64_t leaf_index = 0;
  std::uint32_t id_length = 0;
  std::uint32_t reserved = 0;
};

struct reply_header {
  std::uint32_t magic = wire_magic;
  std::uint32_t kind = 0;
  std::uint64_t tag = 0;
  std::uint64_t leaf_index = 0;
  std::uint64_t total_size = 0;
  std::int32_t code = 0;  // errc; 0 = the payload is the answer, else an error message
  std::uint32_t flags = 0;
};

// With code UNAVAILABLE: the leaf is not verified at this (partial) source yet; the payload is
// its verified-leaf bitmap instead of a message.
constexpr std::uint32_t reply_flag_not_yet = 1;

inline std::string ucx_reason(ucs_status_t status) { return ucs_status_string(status); }

inline result<sockaddr_in> parse_ipv4_address(std::string_view text) {
  auto colon = text.rfind(':');
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  unsigned port = 65536;
  if (colon != std::string_view::npos) {
    auto port_text = text.substr(colon + 1);
    auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
    if (ec != std::errc{} || end != port_text.data() + port_text.size()) port = 65536;
  }
  const std::string ip(text.substr(0, colon == std::string_view::npos ? 0 : colon));
  if (port > 65535 || ::inet_pton(AF_INET, ip.c_str(), &addr.sin_addr) != 1) {
    return fail(errc::invalid_argument, fmt::format("cannot use transfer address '{}': not IPv4:PORT", text));
  }
  addr.sin_port = htons(static_cast<std::uint16_t>(port));
  return addr;
}

// One UCX context and worker, with the wake-up feature so that an idle worker sleeps in poll().
struct ucx_worker {
  ucp_context_h context = nullptr;
  ucp_worker_h worker = nullptr;
  int event_fd = -1;

  ucx_worker() = default;
  ucx_worker(const ucx_worker&) = delete;
  ucx_worker& operator=(const ucx_worker&) = delete;
  ~ucx_worker() {
    if (worker != nullptr) ucp_worker_destroy(worker);
    if (context != nullptr) ucp_cleanup(context);
  }

  status start(std::string_view what) {
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES;
    params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
    ucp_config_t* config = nullptr;
    if (auto st = ucp_config_read(nullptr, nullptr, &config); st != UCS_OK) {
      return fail(errc::unavailable, fmt::format("cannot start UCX for {}: config: {}", what, ucx_reason(st)));
    }
    auto st = ucp_init(&params, config, &context);
    ucp_config_release(config);
    if (st != UCS_OK) return fail(errc::unavailable, fmt::format("cannot start UCX for {}: {}", what, ucx_reason(st)));
    ucp_worker_params_t worker_params{};
    worker_params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    worker_params.thread_mode = UCS_THREAD_MODE_SINGLE;
    if (st = ucp_worker_create(context, &worker_params, &worker); st != UCS_OK) {
      return fail(errc::unavailable, fmt::format("cannot start a UCX worker for {}: {}", what, ucx_reason(st)));
    }
    if (st = ucp_worker_get_efd(worker, &event_fd); st != UCS_OK) {
      return fail(errc::unavailable, fmt::format("cannot get the UCX event fd for {}: {}", what, ucx_reason(st)));
    }
    return {};
  }

  status set_handler(unsigned id, ucp_am_recv_callback_t callback, void* arg) {
    ucp_am_handler_param_t param{};
    param.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG |
                       UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
    param.id = id;
    param.cb = callback;
    param.arg = arg;
    param.flags = UCP_AM_FLAG_WHOLE_MSG;
    if (auto st = ucp_worker_set_am_recv_handler(worker, &param); st != UCS_OK) {
      return fail(errc::unavailable, fmt::format("cannot set a UCX message handler: {}", ucx_reason(st)));
    }
    return {};
  }

  // Progresses until idle, then sleeps until an event or `timeout`.
  void progress_or_wait(std::chrono::milliseconds timeout) {
    if (ucp_worker_progress(worker) != 0) return;
    if (ucp_worker_arm(worker) == UCS_ERR_BUSY) return;
    pollfd p{event_fd, POLLIN, 0};
    (void)::poll(&p, 1, static_cast<int>(std::max<std::int64_t>(timeout.count(), 0)));
  }

  // Closes an endpoint without a goodbye (the peer may be dead) and waits for the close.
  void close_endpoint(ucp_ep_h ep) {
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_EP_CLOSE_FLAG_FORCE;
    auto request = ucp_ep_close_nbx(ep, &param);
    if (UCS_PTR_IS_PTR(request)) {
      while (ucp_request_check_status(request) == UCS_INPROGRESS) ucp_worker_progress(worker);
      ucp_request_free(request);
    }
  }
};

template <typename Header>
bool read_header(const void* header, std::size_t length, Header& out) {
  if (length < sizeof(Header)) return false;
  std::memcpy(&out, header, sizeof(Header));
  return out.magic == wire_magic;
}

inline std::uint64_t leaf_length(std::uint64_t total_size, std::uint64_t leaf) {
  const auto start = leaf * hash::leaf_bytes;
  return std::min(hash::leaf_bytes, total_size - start);
}

}  // namespace tensorreg::cluster::wire
