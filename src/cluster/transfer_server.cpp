// src/cluster/transfer_server.cpp — serves the leaves of the artifacts this host holds, and of
// those it is still pulling, over UCX active messages (docs/cluster.md §3).
#include "tensorreg/cluster/transfer.hpp"

#include <fmt/format.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <set>
#include <thread>

#include "cluster/ucx_wire.hpp"
#include "common/log.hpp"
#include "tensorreg/hash/tree_hash.hpp"

namespace tensorreg::cluster {

using wire::am_reply;
using wire::am_request;
using wire::leaf_length;
using wire::max_id_length;
using wire::message_kind;
using wire::parse_ipv4_address;
using wire::read_header;
using wire::reply_flag_not_yet;
using wire::reply_header;
using wire::request_header;
using wire::ucx_reason;
using wire::ucx_worker;

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

}  // namespace tensorreg::cluster
