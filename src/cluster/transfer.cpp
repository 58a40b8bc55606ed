// src/cluster/transfer.cpp — pulls and serves artifact leaves over UCX active messages
// (docs/cluster.md §3).
#include "tensorreg/cluster/transfer.hpp"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <netinet/in.h>
#include <poll.h>
#include <ucp/api/ucp.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <cstring>
#include <deque>
#include <future>
#include <list>
#include <mutex>
#include <numeric>
#include <optional>
#include <random>
#include <set>
#include <thread>

#include "common/log.hpp"
#include "memory/page_populator.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/identity/artifact_id.hpp"

namespace tensorreg::cluster {

namespace {

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

std::string ucx_reason(ucs_status_t status) { return ucs_status_string(status); }

result<sockaddr_in> parse_ipv4_address(std::string_view text) {
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

std::uint64_t leaf_length(std::uint64_t total_size, std::uint64_t leaf) {
  const auto start = leaf * hash::leaf_bytes;
  return std::min(hash::leaf_bytes, total_size - start);
}

}  // namespace

// ------------------------------------------------------------------------------------------
// partial_artifact

partial_artifact::partial_artifact(std::vector<hash::digest> leaves, std::span<const std::byte> bytes,
                                   std::shared_ptr<const void> keep_alive)
    : leaves_(std::move(leaves)),
      bytes_(bytes),
      keep_alive_(std::move(keep_alive)),
      verified_(new std::atomic<bool>[leaves_.size()]),
      asked_(new std::atomic<bool>[leaves_.size()]) {
  TENSORREG_ASSERT(!bytes_.empty() && leaves_.size() == hash::leaf_count(bytes_.size()));
  for (std::size_t i = 0; i < leaves_.size(); ++i) {
    verified_[i].store(false, std::memory_order_relaxed);
    asked_[i].store(false, std::memory_order_relaxed);
  }
}

void partial_artifact::mark_asked(std::uint64_t leaf, bool asked) noexcept {
  if (leaf < leaves_.size()) asked_[leaf].store(asked, std::memory_order_relaxed);
}

std::vector<std::byte> partial_artifact::holdings() const {
  const std::size_t half = (leaves_.size() + 7) / 8;
  std::vector<std::byte> bitmaps(2 * half);
  for (std::size_t i = 0; i < leaves_.size(); ++i) {
    if (verified(i)) {
      bitmaps[i / 8] |= std::byte{1} << (i % 8);
    } else if (asked_[i].load(std::memory_order_relaxed)) {
      bitmaps[half + i / 8] |= std::byte{1} << (i % 8);
    }
  }
  return bitmaps;
}

void partial_artifact::mark_verified(std::uint64_t leaf) noexcept {
  if (leaf >= leaves_.size()) return;
  // Release: a reader that sees the mark sees the leaf's bytes as they were verified.
  if (!verified_[leaf].exchange(true, std::memory_order_acq_rel)) verified_count_.fetch_add(1);
}

bool partial_artifact::verified(std::uint64_t leaf) const noexcept {
  return leaf < leaves_.size() && verified_[leaf].load(std::memory_order_acquire);
}

std::uint64_t partial_artifact::verified_count() const noexcept { return verified_count_.load(); }

std::vector<std::byte> partial_artifact::verified_bitmap() const {
  std::vector<std::byte> bitmap((leaves_.size() + 7) / 8);
  for (std::size_t i = 0; i < leaves_.size(); ++i) {
    if (verified(i)) bitmap[i / 8] |= std::byte{1} << (i % 8);
  }
  return bitmap;
}

std::span<const std::byte> partial_artifact::leaf_bytes(std::uint64_t leaf) const noexcept {
  TENSORREG_ASSERT(verified(leaf));
  return bytes_.subspan(leaf * hash::leaf_bytes, leaf_length(bytes_.size(), leaf));
}

// ------------------------------------------------------------------------------------------
// transfer_server

namespace {

struct published_artifact {
  std::uint64_t total_size = 0;
  std::shared_ptr<const std::vector<hash::digest>> leaves;  // null for a partial artifact
  std::shared_ptr<const partial_artifact> partial;
};

struct queued_request {
  ucp_ep_h reply_ep = nullptr;
  request_header header;
  std::string artifact_id;
};

// A std::vector would zero-fill a 4 MiB leaf before reading it over; this buffer is read into
// uninitialised.
class payload_buffer {
 public:
  void resize(std::size_t n) {
    data_.reset(new std::byte[n]);
    size_ = n;
  }
  [[nodiscard]] std::byte* data() const noexcept { return data_.get(); }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }

 private:
  std::unique_ptr<std::byte[]> data_;
  std::size_t size_ = 0;
};

struct send_context {
  reply_header header;
  payload_buffer payload;
  std::size_t* sends_in_flight = nullptr;
};

void send_done(void* request, ucs_status_t /*status*/, void* user_data) {
  auto* context = static_cast<send_context*>(user_data);
  --*context->sends_in_flight;
  delete context;
  ucp_request_free(request);
}

}  // namespace

struct transfer_server::state {
  transfer_server_options options;
  std::string address;
  ucx_worker ucx;
  ucp_listener_h listener = nullptr;
  std::thread thread;
  std::atomic<bool> stopping{false};

  // Held by the worker while it looks up and copies a leaf of a partial artifact, so that
  // withdraw() can wait until nothing reads one it took away.
  std::mutex reading_mutex;
  mutable std::mutex mutex;  // guards `published`, `leaf_index` and `counts`
  std::map<std::string, published_artifact, std::less<>> published;
  // The leaves of the artifacts published whole, by digest: where a pull finds what this host
  // holds already (holds_leaf, copy_leaf).
  std::multimap<hash::digest, std::pair<std::string, std::uint64_t>> leaf_index;
  counters counts;

  // With `mutex` held: `entry`, published under `id`, enters or leaves the leaf index.
  void index_leaves(const std::string& id, const published_artifact& entry) {
    if (!entry.leaves) return;
    for (std::uint64_t leaf = 0; leaf < entry.leaves->size(); ++leaf) {
      leaf_index.emplace((*entry.leaves)[leaf], std::pair{id, leaf});
    }
  }
  void unindex_leaves(const std::string& id, const published_artifact& entry) {
    if (!entry.leaves) return;
    for (const auto& digest : *entry.leaves) {
      auto [first, last] = leaf_index.equal_range(digest);
      while (first != last) first = first->second.first == id ? leaf_index.erase(first) : std::next(first);
    }
  }

  // Worker thread only.
  std::set<ucp_ep_h> endpoints;
  std::set<ucp_ep_h> failed;
  std::vector<queued_request> queue;
  std::size_t sends_in_flight = 0;

  static void on_connect(ucp_conn_request_h request, void* arg) {
    auto* self = static_cast<state*>(arg);
    ucp_ep_params_t params{};
    params.field_mask =
        UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLER | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    params.conn_request = request;
    params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    params.err_handler.cb = &state::on_endpoint_error;
    params.err_handler.arg = self;
    ucp_ep_h ep = nullptr;
    if (auto st = ucp_ep_create(self->ucx.worker, &params, &ep); st != UCS_OK) {
      log(*self->options.log, log_level::warn, "transfer server {}: cannot accept a connection: {}", self->address,
          ucx_reason(st));
      return;
    }
    self->endpoints.insert(ep);
  }

  static void on_endpoint_error(void* arg, ucp_ep_h ep, ucs_status_t status) {
    auto* self = static_cast<state*>(arg);
    log(*self->options.log, log_level::debug, "transfer server {}: a receiver went away: {}", self->address,
        ucx_reason(status));
    self->failed.insert(ep);
  }

  static ucs_status_t on_request(void* arg, const void* header, std::size_t header_length, void* /*data*/,
                                 std::size_t /*length*/, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<state*>(arg);
    queued_request request;
    const bool has_reply = (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) != 0 && param->reply_ep != nullptr;
    if (!has_reply || !read_header(header, header_length, request.header) || request.header.id_length > max_id_length ||
        header_length != sizeof(request_header) + request.header.id_length) {
      std::lock_guard lock(self->mutex);
      ++self->counts.requests_refused;
      return UCS_OK;  // nobody to answer, or not ours: dropped (a rendezvous payload with it)
    }
    request.reply_ep = param->reply_ep;
    request.artifact_id.assign(static_cast<const char*>(header) + sizeof(request_header), request.header.id_length);
    self->queue.push_back(std::move(request));
    return UCS_OK;
  }

  void reply(ucp_ep_h ep, std::unique_ptr<send_context> context) {
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    param.cb.send = &send_done;
    param.user_data = context.get();
    auto request = ucp_am_send_nbx(ep, am_reply, &context->header, sizeof(reply_header), context->payload.data(),
                                   context->payload.size(), &param);
    if (UCS_PTR_IS_ERR(request)) {
      log(*options.log, log_level::debug, "transfer server {}: cannot answer: {}", address,
          ucx_reason(UCS_PTR_STATUS(request)));
    } else if (request != nullptr) {
      context->sends_in_flight = &sends_in_flight;
      ++sends_in_flight;
      (void)context.release();  // send_done frees it
    }
  }

  void refuse(const queued_request& request, errc code, std::string message) {
    auto context = std::make_unique<send_context>();
    context->header.kind = request.header.kind;
    context->header.tag = request.header.tag;
    context->header.leaf_index = request.header.leaf_index;
    context->header.code = static_cast<std::int32_t>(code);
    context->payload.resize(message.size());
    std::memcpy(context->payload.data(), message.data(), message.size());
    {
      std::lock_guard lock(mutex);
      ++counts.requests_refused;
    }
    reply(request.reply_ep, std::move(context));
  }

  // A leaf of an artifact still being pulled here: its bytes if verified, else "not yet" and
  // what is verified, so that the puller asks for those.
  void serve_partial(const queued_request& request, const partial_artifact& partial) {
    auto context = std::make_unique<send_context>();
    context->header.kind = request.header.kind;
    context->header.tag = request.header.tag;
    context->header.leaf_index = request.header.leaf_index;
    context->header.total_size = partial.total_size();
    const auto leaf = request.header.leaf_index;
    if (!partial.verified(leaf)) {
      const auto bitmap = partial.holdings();
      context->header.code = static_cast<std::int32_t>(errc::unavailable);
      context->header.flags = reply_flag_not_yet;
      context->payload.resize(bitmap.size());
      std::memcpy(context->payload.data(), bitmap.data(), bitmap.size());
      {
        std::lock_guard lock(mutex);
        ++counts.not_yet_answers;
      }
      return reply(request.reply_ep, std::move(context));
    }
    const auto bytes = partial.leaf_bytes(leaf);
    context->payload.resize(bytes.size());
    std::memcpy(context->payload.data(), bytes.data(), bytes.size());
    if (options.corrupt_leaves) context->payload.data()[bytes.size() / 2] ^= std::byte{0x01};
    partial.count_served();
    {
      std::lock_guard lock(mutex);
      ++counts.leaves_served;
      ++counts.partial_leaves_served;
      counts.bytes_served += bytes.size();
    }
    reply(request.reply_ep, std::move(context));
  }

  void serve(const queued_request& request) {
    std::lock_guard reading(reading_mutex);
    published_artifact artifact;
    {
      std::lock_guard lock(mutex);
      auto it = published.find(request.artifact_id);
      if (it != published.end()) artifact = it->second;
      if (options.stall_after_leaves != 0 && counts.leaves_served >= options.stall_after_leaves) {
        ++counts.requests_dropped;
        return;
      }
    }
    if (!artifact.leaves && !artifact.partial) {
      return refuse(request, errc::not_found,
                    fmt::format("cannot serve {}: this host does not hold it", request.artifact_id));
    }
    const auto& digests = artifact.partial ? artifact.partial->leaves() : *artifact.leaves;
    auto context = std::make_unique<send_context>();
    context->header.kind = request.header.kind;
    context->header.tag = request.header.tag;
    context->header.leaf_index = request.header.leaf_index;
    context->header.total_size = artifact.total_size;
    if (request.header.kind == static_cast<std::uint32_t>(message_kind::manifest)) {
      const auto& leaves = digests;
      context->payload.resize(leaves.size() * sizeof(hash::digest));
      for (std::size_t i = 0; i < leaves.size(); ++i) {
        std::memcpy(context->payload.data() + i * sizeof(hash::digest), leaves[i].data(), sizeof(hash::digest));
      }
      {
        std::lock_guard lock(mutex);
        ++counts.manifests_served;
      }
      return reply(request.reply_ep, std::move(context));
    }
    if (request.header.kind == static_cast<std::uint32_t>(message_kind::holdings)) {
      std::vector<std::byte> bitmap;
      if (artifact.partial) {
        bitmap = artifact.partial->holdings();
      } else {
        bitmap.assign((digests.size() + 7) / 8, std::byte{0xff});  // every leaf verified
        bitmap.resize(2 * bitmap.size(), std::byte{0});            // none on its way
      }
      context->payload.resize(bitmap.size());
      std::memcpy(context->payload.data(), bitmap.data(), bitmap.size());
      return reply(request.reply_ep, std::move(context));
    }
    if (request.header.kind != static_cast<std::uint32_t>(message_kind::leaf)) {
      return refuse(request, errc::invalid_argument,
                    fmt::format("cannot serve {}: unknown request kind {}", request.artifact_id, request.header.kind));
    }
    const auto leaf = request.header.leaf_index;
    if (leaf >= digests.size()) {
      return refuse(
          request, errc::out_of_range,
          fmt::format("cannot serve leaf {} of {}: it has {} leaves", leaf, request.artifact_id, digests.size()));
    }
    if (artifact.partial) return serve_partial(request, *artifact.partial);
    auto bytes = options.open_bytes(request.artifact_id);
    if (!bytes || (*bytes)->size() != artifact.total_size) {
      return refuse(request, errc::unavailable,
                    fmt::format("cannot serve {}: {}", request.artifact_id,
                                bytes ? "its bytes changed size" : bytes.error().message));
    }
    // byte_source pieces are valid only during visit(): the leaf is copied into the message.
    const auto length = leaf_length(artifact.total_size, leaf);
    context->payload.resize(length);
    if (auto read = (*bytes)->read(leaf * hash::leaf_bytes, std::span<std::byte>(context->payload.data(), length));
        !read) {
      return refuse(request, read.error().code,
                    fmt::format("cannot serve leaf {} of {}: {}", leaf, request.artifact_id, read.error().message));
    }
    if (options.corrupt_leaves) context->payload.data()[length / 2] ^= std::byte{0x01};
    {
      std::lock_guard lock(mutex);
      ++counts.leaves_served;
      counts.bytes_served += length;
    }
    reply(request.reply_ep, std::move(context));
  }

  void run() {
    while (!stopping.load()) {
      while (ucp_worker_progress(ucx.worker) != 0) {
      }
      auto work = std::move(queue);
      queue.clear();
      for (const auto& request : work) {
        if (!failed.contains(request.reply_ep)) serve(request);
      }
      for (auto* ep : failed) {
        if (endpoints.erase(ep) != 0) ucx.close_endpoint(ep);
      }
      failed.clear();
      // While sends are under way, keep progressing: UCX's TCP transport moves a rendezvous
      // only when progressed, and its event fd does not wake a sleeping worker for all of it.
      if (queue.empty()) ucx.progress_or_wait(std::chrono::milliseconds(sends_in_flight != 0 ? 1 : 200));
    }
    for (auto* ep : endpoints) ucx.close_endpoint(ep);
    endpoints.clear();
    // Sends of the closed endpoints complete (with an error) on later progress; their buffers
    // are freed then.
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while (sends_in_flight != 0 && std::chrono::steady_clock::now() < give_up) ucp_worker_progress(ucx.worker);
  }
};

result<std::unique_ptr<transfer_server>> transfer_server::create(transfer_server_options options) {
  TENSORREG_TRY_ASSIGN(auto addr, parse_ipv4_address(options.listen_address));
  if (!options.open_bytes) return fail(errc::invalid_argument, "cannot start transfer server: no open_bytes");
  auto s = std::make_unique<state>();
  s->options = std::move(options);
  TENSORREG_TRY(s->ucx.start("the transfer server"));
  TENSORREG_TRY(s->ucx.set_handler(am_request, &state::on_request, s.get()));
  ucp_listener_params_t params{};
  params.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
  params.sockaddr.addr = reinterpret_cast<const sockaddr*>(&addr);
  params.sockaddr.addrlen = sizeof addr;
  params.conn_handler.cb = &state::on_connect;
  params.conn_handler.arg = s.get();
  if (auto st = ucp_listener_create(s->ucx.worker, &params, &s->listener); st != UCS_OK) {
    return fail(errc::unavailable,
                fmt::format("cannot listen for transfers on {}: {}", s->options.listen_address, ucx_reason(st)));
  }
  ucp_listener_attr_t attr{};
  attr.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
  if (auto st = ucp_listener_query(s->listener, &attr); st != UCS_OK) {
    ucp_listener_destroy(s->listener);
    return fail(errc::unavailable, fmt::format("cannot query the transfer listener: {}", ucx_reason(st)));
  }
  const auto* bound = reinterpret_cast<const sockaddr_in*>(&attr.sockaddr);
  char ip[INET_ADDRSTRLEN] = {};
  ::inet_ntop(AF_INET, &addr.sin_addr, ip, sizeof ip);
  s->address = fmt::format("{}:{}", ip, ntohs(bound->sin_port));
  auto* raw = s.get();
  s->thread = std::thread([raw] { raw->run(); });
  log(*raw->options.log, log_level::info, "transfer server listening on {}", raw->address);
  return std::unique_ptr<transfer_server>(new transfer_server(std::move(s)));
}

transfer_server::transfer_server(std::unique_ptr<state> s) noexcept : state_(std::move(s)) {}

transfer_server::~transfer_server() {
  state_->stopping.store(true);
  ucp_worker_signal(state_->ucx.worker);
  if (state_->thread.joinable()) state_->thread.join();
  if (state_->listener != nullptr) ucp_listener_destroy(state_->listener);
}

const std::string& transfer_server::address() const noexcept { return state_->address; }

status transfer_server::publish(const std::string& artifact_id, std::uint64_t total_size,
                                std::vector<hash::digest> leaves) {
  if (total_size == 0 || leaves.size() != hash::leaf_count(total_size)) {
    return fail(errc::invalid_argument,
                fmt::format("cannot publish {}: {} leaf digests for total_size {} (expected {})", artifact_id,
                            leaves.size(), total_size, hash::leaf_count(total_size)));
  }
  published_artifact complete{total_size, std::make_shared<const std::vector<hash::digest>>(std::move(leaves)), {}};
  std::shared_ptr<const partial_artifact> replaced;  // released outside the lock
  {
    std::lock_guard lock(state_->mutex);
    auto& entry = state_->published[artifact_id];
    state_->unindex_leaves(artifact_id, entry);
    replaced = std::move(entry.partial);
    entry = std::move(complete);
    state_->index_leaves(artifact_id, entry);
  }
  return {};
}

void transfer_server::publish_partial(const std::string& artifact_id, std::shared_ptr<const partial_artifact> partial) {
  TENSORREG_ASSERT(partial != nullptr);
  published_artifact pulling{partial->total_size(), nullptr, std::move(partial)};
  published_artifact replaced;  // released outside the lock
  {
    std::lock_guard lock(state_->mutex);
    auto& entry = state_->published[artifact_id];
    state_->unindex_leaves(artifact_id, entry);
    replaced = std::move(entry);
    entry = std::move(pulling);
  }
}

void transfer_server::withdraw(const std::string& artifact_id) {
  std::shared_ptr<const partial_artifact> dropped;  // released after the wait below
  {
    std::lock_guard lock(state_->mutex);
    auto it = state_->published.find(artifact_id);
    if (it == state_->published.end()) return;
    state_->unindex_leaves(artifact_id, it->second);
    dropped = std::move(it->second.partial);
    state_->published.erase(it);
  }
  // The worker reads a partial leaf only while it holds reading_mutex and found the entry;
  // once it is free, nothing reads this one any more.
  std::lock_guard reading(state_->reading_mutex);
}

bool transfer_server::serves(const std::string& artifact_id) const {
  std::lock_guard lock(state_->mutex);
  return state_->published.contains(artifact_id);
}

bool transfer_server::holds_leaf(const hash::digest& leaf) const {
  std::lock_guard lock(state_->mutex);
  return state_->leaf_index.contains(leaf);
}

bool transfer_server::copy_leaf(const hash::digest& leaf, std::span<std::byte> into) const {
  std::vector<std::pair<std::string, std::uint64_t>> where;
  {
    std::lock_guard lock(state_->mutex);
    auto [first, last] = state_->leaf_index.equal_range(leaf);
    for (; first != last; ++first) where.push_back(first->second);
  }
  // Read outside the lock; an artifact withdrawn meanwhile fails to open or read, and the next
  // holder of the digest is tried.
  for (const auto& [id, index] : where) {
    auto bytes = state_->options.open_bytes(id);
    if (!bytes || *bytes == nullptr) continue;
    const auto offset = index * hash::leaf_bytes;
    if (offset >= (*bytes)->size() || leaf_length((*bytes)->size(), index) != into.size()) continue;
    if ((*bytes)->read(offset, into)) return true;
  }
  return false;
}

transfer_server::counters transfer_server::stats() const {
  std::lock_guard lock(state_->mutex);
  return state_->counts;
}

// ------------------------------------------------------------------------------------------
// pull_artifact

namespace {

struct pull_state;

struct source_state {
  pull_source source;
  pull_state* owner = nullptr;
  std::size_t index = 0;
  ucp_ep_h ep = nullptr;
  // A second connection for holdings requests of a partial source: their answers would
  // otherwise wait behind the leaves queued on `ep` and tell of holdings long gone stale.
  ucp_ep_h control_ep = nullptr;
  bool dropped = false;
  unsigned in_flight = 0;
  // Said "not yet" once: a host still pulling. Asked only for the leaves `has` says it holds,
  // and every partial_refresh_every which those are (a holdings request).
  bool partial = false;
  // Served a leaf without saying "not yet" first: it holds the whole artifact.
  bool complete = false;
  std::vector<bool> has;
  std::vector<bool> pending;  // what it has asked for and not verified yet
  bool holdings_asked = false;
  std::chrono::steady_clock::time_point next_holdings{};
};

struct outstanding {
  std::size_t source = 0;
  message_kind kind = message_kind::leaf;
  std::uint64_t leaf = 0;
  std::chrono::steady_clock::time_point sent;
  std::vector<std::byte> header;  // kept until the request is answered
  bool receiving = false;         // a rendezvous receive into the destination is under way
  bool abandoned = false;         // its source was dropped while receiving
};

// What the message handler saw, for the pull loop to act on outside UCX's callbacks.
struct arrival {
  std::uint64_t tag = 0;
  std::int32_t code = 0;
  bool ok = false;
  bool corrupt = false;            // the answer itself proves the source wrong
  bool not_yet = false;            // a partial source lacks the leaf; payload: its bitmap
  std::string detail;              // error message from the source, or what was wrong
  std::vector<std::byte> payload;  // manifest bytes
};

struct rendezvous {
  std::uint64_t tag = 0;
  void* descriptor = nullptr;
  std::size_t length = 0;
};

struct recv_context {
  pull_state* owner = nullptr;
  std::uint64_t tag = 0;
};

struct pull_state {
  std::string artifact_id;
  ucx_worker ucx;
  std::deque<source_state> sources;  // a deque: UCX holds pointers to its elements
  std::map<std::uint64_t, outstanding> in_flight;
  std::uint64_t next_tag = 1;
  std::uint64_t total_size = 0;
  std::vector<hash::digest> leaves;
  std::span<std::byte> destination;
  std::vector<arrival> arrivals;
  std::vector<rendezvous> pending_rendezvous;
  std::set<std::size_t> endpoint_errors;
  std::map<std::size_t, std::string> endpoint_error_reasons;

  pull_state() = default;
  pull_state(const pull_state&) = delete;
  pull_state& operator=(const pull_state&) = delete;
  ~pull_state() {
    for (auto& source : sources) {
      if (source.ep != nullptr) ucx.close_endpoint(source.ep);
      if (source.control_ep != nullptr) ucx.close_endpoint(source.control_ep);
    }
  }

  static void on_endpoint_error(void* arg, ucp_ep_h /*ep*/, ucs_status_t status) {
    auto* source = static_cast<source_state*>(arg);
    source->owner->endpoint_errors.insert(source->index);
    source->owner->endpoint_error_reasons[source->index] = ucx_reason(status);
  }

  static ucs_status_t on_reply(void* arg, const void* header, std::size_t header_length, void* data, std::size_t length,
                               const ucp_am_recv_param_t* param) {
    auto* self = static_cast<pull_state*>(arg);
    const bool rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    reply_header reply;
    if (!read_header(header, header_length, reply) || header_length != sizeof(reply_header)) return UCS_OK;
    auto it = self->in_flight.find(reply.tag);
    if (it == self->in_flight.end() || it->second.receiving ||
        reply.kind != static_cast<std::uint32_t>(it->second.kind) || reply.leaf_index != it->second.leaf) {
      return UCS_OK;  // late (its source was dropped) or not a request of ours: dropped
    }
    arrival got;
    got.tag = reply.tag;
    got.code = reply.code;
    if (reply.code != 0 || it->second.kind != message_kind::leaf) {
      // An error message or a manifest: small, bounded, copied out. A manifest never exceeds
      // 32 bytes per leaf of the largest artifact a Begin accepts (2^40 B → 8 MiB).
      constexpr std::size_t most = std::size_t{8} << 20;
      if (length > most) {
        got.detail =
            fmt::format("answered {} bytes for a {}", length, reply.code != 0 ? "message" : "manifest or bitmap");
      } else if (rndv) {
        got.detail = "sent its manifest by rendezvous";  // sent eagerly by our servers
      } else {
        got.ok = true;
        got.payload.resize(length);
        if (length != 0) std::memcpy(got.payload.data(), data, length);
        got.not_yet = reply.code == static_cast<std::int32_t>(errc::unavailable) &&
                      (reply.flags & reply_flag_not_yet) != 0 && it->second.kind == message_kind::leaf;
        if (reply.code != 0 && !got.not_yet) got.detail.assign(static_cast<const char*>(data), length);
        self->total_size = it->second.kind == message_kind::manifest ? reply.total_size : self->total_size;
      }
      self->arrivals.push_back(std::move(got));
      return UCS_OK;
    }
    const auto leaf = it->second.leaf;
    const auto expected = leaf_length(self->total_size, leaf);
    if (length != expected) {
      got.detail = fmt::format("sent {} bytes for leaf {} of {} bytes", length, leaf, expected);
      got.corrupt = true;
      self->arrivals.push_back(std::move(got));
      return UCS_OK;
    }
    if (rndv) {
      it->second.receiving = true;
      self->pending_rendezvous.push_back({reply.tag, data, length});
      return UCS_INPROGRESS;
    }
    std::memcpy(self->destination.data() + leaf * hash::leaf_bytes, data, length);
    got.ok = true;
    self->arrivals.push_back(std::move(got));
    return UCS_OK;
  }

  static void on_received(void* request, ucs_status_t status, std::size_t /*length*/, void* user_data) {
    auto* context = static_cast<recv_context*>(user_data);
    context->owner->finish_receive(context->tag, status);
    delete context;
    ucp_request_free(request);
  }

  void finish_receive(std::uint64_t tag, ucs_status_t status) {
    arrival got;
    got.tag = tag;
    got.ok = status == UCS_OK;
    if (!got.ok) got.detail = fmt::format("leaf transfer failed: {}", ucx_reason(status));
    arrivals.push_back(std::move(got));
  }

  void start_rendezvous() {
    auto work = std::move(pending_rendezvous);
    pending_rendezvous.clear();
    for (const auto& r : work) {
      auto it = in_flight.find(r.tag);
      auto* target = destination.data() + it->second.leaf * hash::leaf_bytes;
      auto* context = new recv_context{this, r.tag};
      ucp_request_param_t param{};
      param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
      param.cb.recv_am = &pull_state::on_received;
      param.user_data = context;
      auto request = ucp_am_recv_data_nbx(ucx.worker, r.descriptor, target, r.length, &param);
      if (request == nullptr) {
        delete context;
        finish_receive(r.tag, UCS_OK);
      } else if (UCS_PTR_IS_ERR(request)) {
        delete context;
        finish_receive(r.tag, UCS_PTR_STATUS(request));
      }
    }
  }

  status connect(source_state& source) { return open_endpoint(source, source.ep); }

  status open_endpoint(source_state& source, ucp_ep_h& ep) {
    TENSORREG_TRY_ASSIGN(auto addr, parse_ipv4_address(source.source.address));
    ucp_ep_params_t params{};
    params.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR | UCP_EP_PARAM_FIELD_ERR_HANDLER |
                        UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    params.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
    params.sockaddr.addr = reinterpret_cast<const sockaddr*>(&addr);
    params.sockaddr.addrlen = sizeof addr;
    params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    params.err_handler.cb = &pull_state::on_endpoint_error;
    params.err_handler.arg = &source;
    if (auto st = ucp_ep_create(ucx.worker, &params, &ep); st != UCS_OK) {
      ep = nullptr;
      return fail(errc::unavailable, fmt::format("cannot connect to {}: {}", source.source.address, ucx_reason(st)));
    }
    return {};
  }

  // Sends a request; false when the source cannot take it (dropped by the caller).
  bool send_request(source_state& source, message_kind kind, std::uint64_t leaf) {
    outstanding entry;
    entry.source = source.index;
    entry.kind = kind;
    entry.leaf = leaf;
    entry.sent = std::chrono::steady_clock::now();
    request_header header;
    header.kind = static_cast<std::uint32_t>(kind);
    header.tag = next_tag++;
    header.leaf_index = leaf;
    header.id_length = static_cast<std::uint32_t>(artifact_id.size());
    entry.header.resize(sizeof header + artifact_id.size());
    std::memcpy(entry.header.data(), &header, sizeof header);
    std::memcpy(entry.header.data() + sizeof header, artifact_id.data(), artifact_id.size());
    auto [it, inserted] = in_flight.emplace(header.tag, std::move(entry));
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_AM_SEND_FLAG_REPLY;
    auto request =
        ucp_am_send_nbx(kind == message_kind::holdings && source.control_ep != nullptr ? source.control_ep : source.ep,
                        am_request, it->second.header.data(), it->second.header.size(), nullptr, 0, &param);
    if (UCS_PTR_IS_ERR(request)) {
      in_flight.erase(it);
      return false;
    }
    if (request != nullptr) ucp_request_free(request);  // completes on its own; the header lives in `it`
    ++source.in_flight;
    return true;
  }
};

}  // namespace

result<pull_report> pull_artifact(const std::string& artifact_id, std::span<const pull_source> sources,
                                  pull_destination destination, const pull_options& options) {
  TENSORREG_TRY_ASSIGN(auto id, identity::parse_mi2(artifact_id));
  if (sources.empty())
    return fail(errc::invalid_argument, fmt::format("cannot pull {}: no source holds it", artifact_id));
  for (const auto& s : sources) TENSORREG_TRY(parse_ipv4_address(s.address));

  pull_state st;
  st.artifact_id = artifact_id;
  if (auto started = st.ucx.start("a pull"); !started) return fail(errc::internal, started.error().message);
  TENSORREG_TRY(st.ucx.set_handler(am_reply, &pull_state::on_reply, &st));
  pull_report report;
  std::vector<std::string> reasons;

  auto add_source = [&](const pull_source& from) -> source_state& {
    auto& added = st.sources.emplace_back();
    added.source = from;
    added.owner = &st;
    added.index = st.sources.size() - 1;
    return added;
  };
  for (const auto& from : sources) add_source(from);
  // How many partial sources say they hold each leaf, and how many that they are fetching it
  // (filled once the manifest is known).
  std::vector<std::uint32_t> peers_holding, peers_pending;
  auto forget_holdings = [&](source_state& source) {
    for (std::size_t leaf = 0; leaf < source.has.size(); ++leaf) {
      if (source.has[leaf]) --peers_holding[leaf];
      if (source.pending[leaf]) --peers_pending[leaf];
    }
    source.has.clear();
    source.pending.clear();
  };
  auto drop = [&](std::size_t index, std::string why, bool corrupt) {
    auto& source = st.sources[index];
    if (source.dropped) return;
    source.dropped = true;
    forget_holdings(source);
    log(*options.log, log_level::warn, "pull {}: source {} ({}) dropped: {}", artifact_id, source.source.name,
        source.source.address, why);
    auto line = fmt::format("{} ({}): {}", source.source.name, source.source.address, why);
    (corrupt ? report.corrupt_sources : report.failed_sources).push_back(line);
    reasons.push_back(std::move(line));
    for (auto* ep : {&source.ep, &source.control_ep}) {
      if (*ep != nullptr) st.ucx.close_endpoint(*ep);
      *ep = nullptr;
    }
  };
  for (auto& source : st.sources) {
    if (auto connected = st.connect(source); !connected) drop(source.index, connected.error().message, false);
  }
  auto alive = [&] {
    return std::any_of(st.sources.begin(), st.sources.end(), [](const source_state& s) { return !s.dropped; });
  };
  auto unavailable = [&] {
    return fail(errc::unavailable,
                fmt::format("cannot pull {}: every source failed ({})", artifact_id, fmt::join(reasons, "; ")));
  };
  auto handle_endpoint_errors = [&] {
    auto errors = std::exchange(st.endpoint_errors, {});
    for (auto index : errors) drop(index, "connection failed: " + st.endpoint_error_reasons[index], false);
  };

  // 1. The manifest, from the first source that gives one that folds to the id's data hash.
  for (auto& source : st.sources) {
    if (source.dropped) continue;
    if (!st.send_request(source, message_kind::manifest, 0)) {
      drop(source.index, "cannot send a request", false);
      continue;
    }
    const auto tag = st.next_tag - 1;
    const auto deadline = std::chrono::steady_clock::now() + options.request_timeout;
    std::optional<arrival> answer;
    while (!answer && !source.dropped) {
      st.ucx.progress_or_wait(std::chrono::milliseconds(20));
      handle_endpoint_errors();
      for (auto& a : st.arrivals) {
        if (a.tag == tag) answer = std::move(a);
      }
      st.arrivals.clear();
      if (!answer && std::chrono::steady_clock::now() > deadline) {
        drop(source.index, fmt::format("no manifest within {} ms", options.request_timeout.count()), false);
      }
    }
    st.in_flight.erase(tag);
    source.in_flight = 0;
    if (!answer) continue;
    if (!answer->ok || answer->code != 0) {
      drop(source.index, answer->detail.empty() ? "refused the manifest" : answer->detail, false);
      continue;
    }
    const auto count = hash::leaf_count(st.total_size);
    if (st.total_size == 0 || answer->payload.size() != count * sizeof(hash::digest)) {
      drop(source.index,
           fmt::format("manifest of {} bytes does not match total_size {}", answer->payload.size(), st.total_size),
           true);
      continue;
    }
    std::vector<hash::digest> leaves(count);
    for (std::size_t i = 0; i < count; ++i) {
      std::memcpy(leaves[i].data(), answer->payload.data() + i * sizeof(hash::digest), sizeof(hash::digest));
    }
    if (hash::tree_root(leaves) != id.data) {
      drop(source.index, "manifest leaves do not fold to the id's data hash", true);
      continue;
    }
    st.leaves = std::move(leaves);
    break;
  }
  if (st.leaves.empty()) return unavailable();
  report.total_size = st.total_size;
  TENSORREG_TRY_ASSIGN(st.destination, destination(st.total_size));
  if (st.destination.size() != st.total_size) {
    return fail(errc::internal, fmt::format("cannot pull {}: destination of {} bytes for total_size {}", artifact_id,
                                            st.destination.size(), st.total_size));
  }
  if (options.manifest_verified) options.manifest_verified(st.leaves);

  // 2. The leaves, in an order of this pull's own (pullers that start together then ask the
  // origin for different leaves, and take from each other what one of them has), each verified
  // as it lands.
  const std::uint64_t count = st.leaves.size();
  std::vector<std::uint64_t> order(count);
  std::iota(order.begin(), order.end(), std::uint64_t{0});
  std::mt19937_64 shuffle_bits(options.order_seed != 0 ? options.order_seed : std::random_device{}());
  std::shuffle(order.begin(), order.end(), shuffle_bits);
  enum class leaf_phase : std::uint8_t { wanted, asked, verified };  // asked: in flight or being hashed
  std::vector<leaf_phase> phase(count, leaf_phase::wanted);
  peers_holding.assign(count, 0);
  peers_pending.assign(count, 0);
  std::uint64_t verified = 0;
  const auto per_source = std::max(1U, options.leaves_in_flight_per_source);
  auto set_wanted = [&](std::uint64_t leaf) {
    phase[leaf] = leaf_phase::wanted;
    if (options.leaf_asked) options.leaf_asked(leaf, false);
  };
  auto want_again = [&](std::uint64_t leaf) {
    set_wanted(leaf);
    ++report.leaves_refetched;
  };
  auto requeue_source = [&](std::size_t index) {
    for (auto it = st.in_flight.begin(); it != st.in_flight.end();) {
      if (it->second.source == index && !it->second.receiving) {
        if (it->second.kind == message_kind::leaf) want_again(it->second.leaf);
        it = st.in_flight.erase(it);
      } else {
        if (it->second.source == index) it->second.abandoned = true;
        ++it;
      }
    }
    st.sources[index].holdings_asked = false;
  };
  auto note_pending = [&](source_state& source, std::uint64_t leaf, bool pending) {
    if (source.pending[leaf] == pending) return;
    source.pending[leaf] = pending;
    if (pending) {
      ++peers_pending[leaf];
    } else {
      --peers_pending[leaf];
    }
  };
  auto note_has = [&](source_state& source, std::uint64_t leaf, bool has) {
    if (source.has[leaf] == has) return;
    source.has[leaf] = has;
    if (has) {
      ++peers_holding[leaf];
    } else {
      --peers_holding[leaf];
    }
  };
  // The next leaf to ask of `source`. A partial source is asked for the rarest of what it has
  // (held by the fewest partial sources; this pull's order among equals): a leaf only it holds
  // can come from nowhere else, and once copied here it has one more source for the others. A
  // source not known to be partial gets only leaves no partial source holds or is fetching: the
  // origin's link is what every puller shares, so it sends what nobody else has or will have
  // soon.
  auto pick = [&](const source_state& source) -> std::optional<std::uint64_t> {
    std::optional<std::uint64_t> rarest;
    for (auto leaf : order) {
      if (phase[leaf] != leaf_phase::wanted) continue;
      if (!source.partial) {
        if (peers_holding[leaf] == 0 && peers_pending[leaf] == 0) return leaf;
      } else if (source.has[leaf] && (!rarest || peers_holding[leaf] < peers_holding[*rarest])) {
        rarest = leaf;
        if (peers_holding[leaf] <= 1) break;
      }
    }
    return rarest;
  };
  const auto per_complete_source_with_peers =
      std::clamp(options.complete_source_leaves_in_flight_with_peers, 1U, per_source);
  bool peers_known = false;  // some source is known to be partial
  bool first_look_done = !options.find_sources;
  // Whether `source`, not known to be partial, may be an origin that other pullers share: until
  // the first look for sources has answered, while a source has not yet shown whether it is
  // partial, and once one is. Pullers that start together otherwise queue leaves_in_flight_per_source
  // requests each at the origin before they learn of each other, and the origin's link then
  // spends seconds on leaves its pullers cannot pass on to each other until they all land.
  auto origin_may_be_shared = [&](const source_state& source) {
    return !first_look_done || peers_known ||
           std::any_of(st.sources.begin(), st.sources.end(), [&](const source_state& other) {
             return &other != &source && !other.dropped && !other.partial && !other.complete;
           });
  };
  // Partial sources share leaves_in_flight_per_source between them, at least one each: a leaf
  // asked of a partial source waits behind every request other pullers queued there, and the
  // leaves queued deepest are the ones the others wait for at the end of a fan-out.
  auto per_partial_source = [&] {
    const auto partial = std::count_if(st.sources.begin(), st.sources.end(),
                                       [](const source_state& s) { return s.partial && !s.dropped; });
    return std::max(1U, per_source / static_cast<unsigned>(std::max<std::ptrdiff_t>(1, partial)));
  };
  auto ask = [&](source_state& source, std::chrono::steady_clock::time_point now) {
    if (source.dropped) return;
    // A partial source's holdings grow while it pulls: asked again every partial_refresh_every,
    // so that this pull takes new leaves from it rather than from the origin. Not a leaf slot.
    if (source.partial && !source.holdings_asked && now >= source.next_holdings) {
      if (source.control_ep == nullptr) {
        if (auto opened = st.open_endpoint(source, source.control_ep); !opened) {
          drop(source.index, opened.error().message, false);
          requeue_source(source.index);
          return;
        }
      }
      if (!st.send_request(source, message_kind::holdings, 0)) {
        drop(source.index, "cannot send a request", false);
        requeue_source(source.index);
        return;
      }
      --source.in_flight;
      source.holdings_asked = true;
    }
    const auto most = source.partial                 ? per_partial_source()
                      : origin_may_be_shared(source) ? per_complete_source_with_peers
                                                     : per_source;
    while (!source.dropped && source.in_flight < most) {
      auto next = pick(source);
      if (!next) return;
      // A fresh memfd page faults on its first write, and the receive would fault the leaf's
      // 1 024 pages one by one; populated in one call it costs a fraction (RESULTS.md, pull).
      (void)memory::populate_for_write(st.destination.data() + *next * hash::leaf_bytes,
                                       leaf_length(st.total_size, *next));
      if (!st.send_request(source, message_kind::leaf, *next)) {
        drop(source.index, "cannot send a request", false);
        requeue_source(source.index);
        return;
      }
      phase[*next] = leaf_phase::asked;
      if (options.leaf_asked) options.leaf_asked(*next, true);
    }
  };
  // Merges `source`'s holdings (its verified leaves, then those it is fetching); false when
  // they have the wrong length.
  auto merge_holdings = [&](source_state& source, std::span<const std::byte> bitmaps) {
    const std::size_t half = (count + 7) / 8;
    if (bitmaps.size() != 2 * half) return false;
    if (source.has.empty()) source.has.assign(count, false);
    if (source.pending.empty()) source.pending.assign(count, false);
    const auto bit = [&](std::size_t at, std::uint64_t leaf) {
      return (bitmaps[at + leaf / 8] & (std::byte{1} << (leaf % 8))) != std::byte{0};
    };
    for (std::uint64_t leaf = 0; leaf < count; ++leaf) {
      if (bit(0, leaf)) note_has(source, leaf, true);
      note_pending(source, leaf, !source.has[leaf] && bit(half, leaf));
    }
    return true;
  };

  std::future<result<std::vector<pull_source>>> finding;
  auto next_find = std::chrono::steady_clock::now() + options.find_sources_every;
  auto add_found = [&](const std::vector<pull_source>& found) {
    for (const auto& from : found) {
      const bool known = std::any_of(st.sources.begin(), st.sources.end(), [&](const source_state& s) {
        return s.source.name == from.name || s.source.address == from.address;
      });
      if (known || !parse_ipv4_address(from.address)) continue;
      auto& added = add_source(from);
      report.sources_added.push_back(from.name);
      log(*options.log, log_level::info, "pull {}: source {} ({}) added", artifact_id, from.name, from.address);
      if (auto connected = st.connect(added); !connected) drop(added.index, connected.error().message, false);
    }
  };

  // When the last source was dropped (time_point{} while one is alive), and since when nothing
  // but holdings requests to partial sources was under way (none of them has a missing leaf).
  std::chrono::steady_clock::time_point all_dropped_at{};
  std::chrono::steady_clock::time_point waiting_since{};
  struct verification {
    std::uint64_t leaf = 0;
    std::size_t source = 0;
    std::future<hash::digest> digest;
  };
  std::list<verification> verifying;
  // Leaves this host holds under other artifacts are copied here rather than fetched, a few at
  // a time on threads of their own, and checked against their digest like the others. Until
  // its copy is checked a leaf counts as asked, so no source is asked for it; one that cannot
  // be copied or does not match is wanted from the sources again.
  constexpr std::size_t local_copies_at_once = 4;
  std::deque<std::uint64_t> local_queue;
  struct local_copy {
    std::uint64_t leaf = 0;
    std::future<bool> matched;
  };
  std::list<local_copy> local_copies;
  if (options.holds_local_leaf && options.copy_local_leaf) {
    for (auto leaf : order) {
      if (!options.holds_local_leaf(st.leaves[leaf])) continue;
      phase[leaf] = leaf_phase::asked;
      local_queue.push_back(leaf);
    }
  }
  while (verified < count) {
    while (!local_queue.empty() && local_copies.size() < local_copies_at_once) {
      const auto leaf = local_queue.front();
      local_queue.pop_front();
      const auto bytes = st.destination.subspan(leaf * hash::leaf_bytes, leaf_length(st.total_size, leaf));
      local_copies.push_back(
          {leaf, std::async(std::launch::async, [&copy = options.copy_local_leaf, bytes, want = st.leaves[leaf]] {
             return copy(want, bytes) && hash::sha256(bytes) == want;
           })});
    }
    auto now = std::chrono::steady_clock::now();
    // Partial sources first: what they hold is taken from them, the rest from the others.
    for (auto& source : st.sources) {
      if (source.partial) ask(source, now);
    }
    for (auto& source : st.sources) {
      if (!source.partial) ask(source, now);
    }
    // Spin while leaves are under way (see the server's loop); sleep only when nothing is.
    st.ucx.progress_or_wait(
        std::chrono::milliseconds(st.in_flight.empty() && verifying.empty() && local_copies.empty() ? 20 : 1));
    st.start_rendezvous();
    now = std::chrono::steady_clock::now();
    for (auto index : std::exchange(st.endpoint_errors, {})) {
      if (!st.sources[index].dropped) {
        drop(index, "connection failed: " + st.endpoint_error_reasons[index], false);
        requeue_source(index);
      }
    }
    auto arrivals = std::move(st.arrivals);
    st.arrivals.clear();
    for (auto& a : arrivals) {
      auto it = st.in_flight.find(a.tag);
      if (it == st.in_flight.end()) continue;
      const auto entry = std::move(it->second);
      st.in_flight.erase(it);
      auto& source = st.sources[entry.source];
      if (entry.kind == message_kind::holdings) {
        source.holdings_asked = false;
        source.next_holdings = now + options.partial_refresh_every;
        if (source.dropped || entry.abandoned) continue;
        if (!a.ok || a.code != 0) {
          drop(entry.source, a.detail.empty() ? "refused to say which leaves it has" : a.detail, a.corrupt);
          requeue_source(entry.source);
        } else if (!merge_holdings(source, a.payload)) {
          drop(entry.source, fmt::format("sent a bitmap of {} bytes for {} leaves", a.payload.size(), count), true);
          requeue_source(entry.source);
        }
        continue;
      }
      if (source.in_flight > 0) --source.in_flight;
      if (entry.abandoned || source.dropped) {
        want_again(entry.leaf);
        continue;
      }
      if (a.ok && a.not_yet) {
        set_wanted(entry.leaf);
        ++report.leaves_not_yet;
        // A host still pulling: from now on asked for what it has (verified leaves stay
        // verified, so its bitmaps only grow) and, every partial_refresh_every, which that is.
        if (!merge_holdings(source, a.payload)) {
          drop(entry.source,
               fmt::format("answered not yet with a bitmap of {} bytes for {} leaves", a.payload.size(), count), true);
          requeue_source(entry.source);
          continue;
        }
        if (!source.partial) source.next_holdings = now + options.partial_refresh_every;
        source.partial = true;
        peers_known = true;
        note_has(source, entry.leaf, false);  // whatever its bitmap says, it did not have this one
        note_pending(source, entry.leaf, false);
        continue;
      }
      if (!a.ok || a.code != 0) {
        drop(entry.source, a.detail.empty() ? fmt::format("failed leaf {}", entry.leaf) : a.detail, a.corrupt);
        want_again(entry.leaf);
        requeue_source(entry.source);
        continue;
      }
      if (source.partial) {
        note_has(source, entry.leaf, true);
        note_pending(source, entry.leaf, false);
      } else {
        source.complete = true;
      }
      // Hashed off this thread, so that the next leaves arrive meanwhile; the source's slot is
      // free already. At most sources × leaves_in_flight_per_source hashes run at once.
      const auto bytes = st.destination.subspan(entry.leaf * hash::leaf_bytes, leaf_length(st.total_size, entry.leaf));
      verifying.push_back(
          {entry.leaf, entry.source, std::async(std::launch::async, [bytes] { return hash::sha256(bytes); })});
    }
    for (auto it = verifying.begin(); it != verifying.end();) {
      if (it->digest.wait_for(std::chrono::seconds(0)) != std::future_status::ready) {
        ++it;
        continue;
      }
      const auto got = it->digest.get();
      const auto leaf = it->leaf;
      const auto from = it->source;
      it = verifying.erase(it);
      if (got != st.leaves[leaf]) {
        drop(from, fmt::format("leaf {} does not match its digest", leaf), true);
        want_again(leaf);
        requeue_source(from);
        continue;
      }
      phase[leaf] = leaf_phase::verified;
      ++verified;
      ++report.leaves_by_source[st.sources[from].source.name];
      if (options.leaf_verified) options.leaf_verified(leaf);
    }
    for (auto it = local_copies.begin(); it != local_copies.end();) {
      if (it->matched.wait_for(std::chrono::seconds(0)) != std::future_status::ready) {
        ++it;
        continue;
      }
      const auto leaf = it->leaf;
      const bool matched = it->matched.get();
      it = local_copies.erase(it);
      if (!matched) {
        ++report.leaves_local_failed;
        set_wanted(leaf);
        continue;
      }
      phase[leaf] = leaf_phase::verified;
      ++verified;
      ++report.leaves_local;
      if (options.leaf_verified) options.leaf_verified(leaf);
    }
    for (auto& [tag, entry] : st.in_flight) {
      if (!st.sources[entry.source].dropped && !entry.receiving && now - entry.sent > options.request_timeout) {
        drop(entry.source,
             fmt::format("leaf {} not answered within {} ms", entry.leaf, options.request_timeout.count()), false);
      }
    }
    for (auto& source : st.sources) {
      if (source.dropped && source.in_flight > 0) {
        requeue_source(source.index);
        source.in_flight = 0;
      }
    }
    if (options.find_sources) {
      if (finding.valid() && finding.wait_for(std::chrono::seconds(0)) == std::future_status::ready) {
        first_look_done = true;
        if (auto found = finding.get(); found) {
          add_found(*found);
        } else {
          log(*options.log, log_level::debug, "pull {}: cannot look for more sources: {}", artifact_id,
              found.error().message);
        }
        next_find = now + options.find_sources_every;
      } else if (!finding.valid() && now >= next_find) {
        finding = std::async(std::launch::async, options.find_sources);
      }
    }
    if (alive()) {
      all_dropped_at = {};
    } else if (all_dropped_at == std::chrono::steady_clock::time_point{}) {
      all_dropped_at = now;
    } else if ((st.in_flight.empty() && verifying.empty() && local_copies.empty() && local_queue.empty()) ||
               now - all_dropped_at > options.request_timeout) {
      // Nothing left to ask, and what was under way from the dropped sources has settled (or
      // never will).
      return unavailable();
    }
    const bool only_holdings = verifying.empty() && local_copies.empty() && local_queue.empty() &&
                               std::all_of(st.in_flight.begin(), st.in_flight.end(),
                                           [](const auto& kv) { return kv.second.kind == message_kind::holdings; });
    if (!only_holdings) {
      waiting_since = {};
    } else if (waiting_since == std::chrono::steady_clock::time_point{}) {
      waiting_since = now;
    } else if (alive() && now - waiting_since > options.request_timeout) {
      std::vector<std::string> live;
      for (const auto& source : st.sources) {
        if (!source.dropped) live.push_back(source.source.name);
      }
      const auto missing = std::find(phase.begin(), phase.end(), leaf_phase::wanted) - phase.begin();
      return fail(
          errc::unavailable,
          fmt::format("cannot pull {}: for {} ms no source had leaf {} (live sources, all still pulling it: "
                      "{}){}",
                      artifact_id, options.request_timeout.count(), missing, fmt::join(live, ", "),
                      reasons.empty() ? std::string() : fmt::format("; dropped: {}", fmt::join(reasons, "; "))));
    }
  }

  // Each leaf matched its digest and the digests fold to the id: the bytes are the id's.
  if (hash::tree_root(st.leaves) != id.data) {
    return fail(errc::data_loss, fmt::format("cannot pull {}: leaves do not fold to its data hash", artifact_id));
  }
  for (auto& source : st.sources) {
    for (auto* ep : {&source.ep, &source.control_ep}) {
      if (*ep != nullptr) st.ucx.close_endpoint(*ep);
      *ep = nullptr;
    }
  }
  return report;
}

}  // namespace tensorreg::cluster
