// Hostile requests to a transfer server, sent with raw UCX active messages (the puller never
// sends these): every field of a request is checked before use (docs/cluster.md §3.2).
#include "tensorreg/cluster/transfer.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <ucp/api/ucp.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <string>
#include <thread>

#include "cluster/ucx_wire.hpp"
#include "tensorreg/hash/tree_hash.hpp"

using namespace tensorreg;
using namespace tensorreg::cluster;
using namespace std::chrono_literals;

namespace {

// The wire's two headers (docs/cluster.md §3.2), written by hand as a hostile peer would.
using wire::reply_header;
using wire::request_header;

struct reply {
  reply_header header;
  std::string payload;
};

// One raw client: a UCX worker, an endpoint to the server, the replies it got.
class raw_peer {
 public:
  explicit raw_peer(const std::string& address) {
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES;
    params.features = UCP_FEATURE_AM;
    ucp_config_t* config = nullptr;
    REQUIRE(ucp_config_read(nullptr, nullptr, &config) == UCS_OK);
    REQUIRE(ucp_init(&params, config, &context_) == UCS_OK);
    ucp_config_release(config);
    ucp_worker_params_t wp{};
    REQUIRE(ucp_worker_create(context_, &wp, &worker_) == UCS_OK);
    ucp_am_handler_param_t hp{};
    hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
    hp.id = wire::am_reply;
    hp.cb = &raw_peer::on_reply;
    hp.arg = this;
    REQUIRE(ucp_worker_set_am_recv_handler(worker_, &hp) == UCS_OK);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    const auto colon = address.rfind(':');
    REQUIRE(::inet_pton(AF_INET, address.substr(0, colon).c_str(), &addr.sin_addr) == 1);
    addr.sin_port = htons(static_cast<std::uint16_t>(std::stoi(address.substr(colon + 1))));
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    ep.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;  // as the server's endpoints
    ep.sockaddr.addr = reinterpret_cast<const sockaddr*>(&addr);
    ep.sockaddr.addrlen = sizeof addr;
    REQUIRE(ucp_ep_create(worker_, &ep, &ep_) == UCS_OK);
  }
  ~raw_peer() {
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = UCP_EP_CLOSE_FLAG_FORCE;
    auto r = ucp_ep_close_nbx(ep_, &p);
    if (UCS_PTR_IS_PTR(r)) {
      while (ucp_request_check_status(r) == UCS_INPROGRESS) ucp_worker_progress(worker_);
      ucp_request_free(r);
    }
    ucp_worker_destroy(worker_);
    ucp_cleanup(context_);
  }
  raw_peer(const raw_peer&) = delete;
  raw_peer& operator=(const raw_peer&) = delete;

  void send(const std::string& header_bytes, bool ask_reply = true) {
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = ask_reply ? UCP_AM_SEND_FLAG_REPLY : 0;
    auto r = ucp_am_send_nbx(ep_, wire::am_request, header_bytes.data(), header_bytes.size(), nullptr, 0, &p);
    INFO("ucp_am_send_nbx: " << (UCS_PTR_IS_ERR(r) ? ucs_status_string(UCS_PTR_STATUS(r)) : "ok"));
    REQUIRE_FALSE(UCS_PTR_IS_ERR(r));
    if (r != nullptr) {
      while (ucp_request_check_status(r) == UCS_INPROGRESS) ucp_worker_progress(worker_);
      ucp_request_free(r);
    }
  }
  // Progresses for up to `within` or until `count` replies are in.
  const std::vector<reply>& wait(std::size_t count, std::chrono::milliseconds within) {
    const auto give_up = std::chrono::steady_clock::now() + within;
    while (replies_.size() < count && std::chrono::steady_clock::now() < give_up) {
      if (ucp_worker_progress(worker_) == 0) std::this_thread::sleep_for(1ms);
    }
    return replies_;
  }

 private:
  static ucs_status_t on_reply(void* arg, const void* header, std::size_t header_length, void* data, std::size_t length,
                               const ucp_am_recv_param_t* param) {
    auto* self = static_cast<raw_peer*>(arg);
    reply got;
    if (header_length == sizeof(reply_header)) std::memcpy(&got.header, header, sizeof(reply_header));
    if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) == 0)
      got.payload.assign(static_cast<const char*>(data), length);
    self->replies_.push_back(std::move(got));
    return UCS_OK;
  }

  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  ucp_ep_h ep_ = nullptr;
  std::vector<reply> replies_;
};

std::string request(std::uint32_t kind, std::uint64_t tag, std::uint64_t leaf, const std::string& id,
                    std::uint32_t claimed_length) {
  request_header h;
  h.kind = kind;
  h.tag = tag;
  h.leaf_index = leaf;
  h.id_length = claimed_length;
  std::string bytes(sizeof h, '\0');
  std::memcpy(bytes.data(), &h, sizeof h);
  return bytes + id;
}

}  // namespace

TEST_CASE("transfer server: out-of-range leaves, unknown ids, bad headers and lying lengths are refused",
          "[cluster][transfer]") {
  std::vector<std::byte> bytes(hash::leaf_bytes + 10, std::byte{7});
  const std::string id = "mi2:held";
  transfer_server_options options;
  options.open_bytes = [&](const std::string&) -> result<std::shared_ptr<const memory::byte_source>> {
    return std::make_shared<memory::host_bytes_view>(bytes);
  };
  auto server = transfer_server::create(std::move(options));
  REQUIRE(server);
  memory::host_bytes_view view(bytes);
  REQUIRE((*server)->publish(id, bytes.size(), *hash::leaf_digests(view)));

  raw_peer peer((*server)->address());
  peer.send(request(2, 1, 2, id, static_cast<std::uint32_t>(id.size())));                // leaf 2 of 2
  peer.send(request(2, 2, 0, "mi2:other", 9));                                           // not held
  peer.send(request(7, 3, 0, id, static_cast<std::uint32_t>(id.size())));                // unknown kind
  peer.send(request(2, 4, 0, id, 4000));                                                 // id_length lies
  peer.send(request(2, 5, 0, id, static_cast<std::uint32_t>(id.size())).substr(0, 10));  // short
  peer.send(request(2, 6, 0, id, static_cast<std::uint32_t>(id.size())), /*ask_reply=*/false);
  peer.send(request(2, 7, 1, id, static_cast<std::uint32_t>(id.size())));  // a good one, last
  const auto& got = peer.wait(4, 10s);
  REQUIRE(got.size() == 4);
  CHECK(got[0].header.tag == 1);
  CHECK(got[0].header.code == static_cast<std::int32_t>(errc::out_of_range));
  CHECK(got[0].payload == "cannot serve leaf 2 of mi2:held: it has 2 leaves");
  CHECK(got[1].header.tag == 2);
  CHECK(got[1].header.code == static_cast<std::int32_t>(errc::not_found));
  CHECK(got[1].payload == "cannot serve mi2:other: this host does not hold it");
  CHECK(got[2].header.tag == 3);
  CHECK(got[2].header.code == static_cast<std::int32_t>(errc::invalid_argument));
  CHECK(got[2].payload == "cannot serve mi2:held: unknown request kind 7");
  CHECK(got[3].header.tag == 7);
  CHECK(got[3].header.code == 0);
  CHECK(got[3].payload == std::string(10, '\x07'));
  const auto stats = (*server)->stats();
  CHECK(stats.requests_refused == 6);  // three answered, three dropped (lying, short, no reply ep)
  CHECK(stats.leaves_served == 1);
}
