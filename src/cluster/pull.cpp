// src/cluster/pull.cpp — pulls an artifact's leaves from the hosts that hold it, striped over
// them and each checked against its digest on arrival (docs/cluster.md §3).
#include "tensorreg/cluster/transfer.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <future>
#include <list>
#include <numeric>
#include <optional>
#include <random>
#include <set>

#include "cluster/ucx_wire.hpp"
#include "common/log.hpp"
#include "memory/page_populator.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/identity/artifact_id.hpp"

namespace tensorreg::cluster {

using wire::am_reply;
using wire::am_request;
using wire::leaf_length;
using wire::message_kind;
using wire::parse_ipv4_address;
using wire::read_header;
using wire::reply_flag_not_yet;
using wire::reply_header;
using wire::request_header;
using wire::ucx_reason;
using wire::ucx_worker;

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
