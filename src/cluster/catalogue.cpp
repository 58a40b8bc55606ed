// src/cluster/catalogue.cpp — the cluster catalogue's layout on etcd (docs/cluster.md §2).
#include "tensorreg/cluster/catalogue.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <condition_variable>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>
#include <tuple>

#include "common/log.hpp"

namespace tensorreg::cluster {

namespace {

using json = nlohmann::json;

bool id_char(char c) noexcept {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_';
}

status check_artifact_key(std::string_view artifact_id) {
  // The id becomes a key segment: a '/' would let it name another host's replica key.
  if (artifact_id.empty() || artifact_id.find('/') != std::string_view::npos || artifact_id.size() > 256) {
    return fail(
        errc::invalid_argument,
        fmt::format("cannot use artifact id '{}' in the catalogue: empty, longer than 256 or has '/'", artifact_id));
  }
  return {};
}

status check_index_hash(std::string_view hex) {
  bool ok = hex.size() == 64;
  for (char c : hex) ok = ok && ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'));
  if (!ok) {
    return fail(errc::invalid_argument, fmt::format("cannot use index hash '{}': not 64 lower-case hex digits", hex));
  }
  return {};
}

bool key_segment(std::string_view text, std::size_t max) {
  return !text.empty() && text.size() <= max && std::all_of(text.begin(), text.end(), id_char);
}

std::string host_value(const host_record& host) {
  json value{{"host_name", host.host_name},
             {"transfer_address", host.transfer_address},
             {"capacity_bytes", host.capacity_bytes}};
  if (!host.persist_volume.empty()) value["persist_volume"] = host.persist_volume;
  if (host.free_bytes) value["free_bytes"] = *host.free_bytes;
  return value.dump();
}

result<host_record> parse_host(std::string_view host_id, std::string_view value) {
  auto parsed = json::parse(value, nullptr, false);
  // A member's word: every field's type is checked before it is read (json::value throws on a
  // host_name that is a number).
  if (parsed.is_discarded() || !parsed.is_object() || !parsed.contains("transfer_address") ||
      !parsed["transfer_address"].is_string() || (parsed.contains("host_name") && !parsed["host_name"].is_string()) ||
      (parsed.contains("capacity_bytes") && !parsed["capacity_bytes"].is_number_unsigned()) ||
      (parsed.contains("persist_volume") && !parsed["persist_volume"].is_string()) ||
      (parsed.contains("free_bytes") && !parsed["free_bytes"].is_number_unsigned())) {
    return fail(errc::internal, fmt::format("cannot read host record of '{}': not a host record", host_id));
  }
  host_record host;
  host.host_id = std::string(host_id);
  host.host_name = parsed.value("host_name", std::string());
  host.transfer_address = parsed["transfer_address"].get<std::string>();
  host.capacity_bytes = parsed.value("capacity_bytes", std::uint64_t{0});
  host.persist_volume = parsed.value("persist_volume", std::string());
  if (parsed.contains("free_bytes")) host.free_bytes = parsed["free_bytes"].get<std::uint64_t>();
  return host;
}

// <prefix>/replicas/<id>/<host_id> → {"total_size": N}, plus "partial": true while the host is
// still pulling (docs/cluster.md §2). Values written before the flag existed have no "partial".
std::string replica_value(std::uint64_t total_size, replica_state progress) {
  json value{{"total_size", total_size}};
  if (progress == replica_state::pulling) value["partial"] = true;
  return value.dump();
}

struct replica_reading {
  std::uint64_t total_size = 0;
  replica_state state = replica_state::complete;
};

// Never throws, whatever a member wrote: a total_size that is not an unsigned integer reads as 0
// (not a usable source of a size), and only the literal `true` reads as pulling. The flag informs
// observers only; a puller learns that a source is partial from the source itself (§3.3).
replica_reading parse_replica(std::string_view value) {
  replica_reading out;
  auto parsed = json::parse(value, nullptr, false);
  if (parsed.is_discarded() || !parsed.is_object()) return out;
  if (auto it = parsed.find("total_size"); it != parsed.end() && it->is_number_unsigned()) {
    out.total_size = it->get<std::uint64_t>();
  }
  if (auto it = parsed.find("partial"); it != parsed.end() && it->is_boolean() && it->get<bool>()) {
    out.state = replica_state::pulling;
  }
  return out;
}

// <prefix>/wanted/<host_id>/<artifact_id> → {"total_size": N, "by": "<asking host id>"}.
// `declined`: set by the host asked when its pull failed (docs/cluster.md §2.6).
std::string wanted_value(std::uint64_t total_size, std::string_view by, std::string_view declined = {}) {
  json value{{"total_size", total_size}, {"by", by}};
  if (!declined.empty()) value["declined"] = declined;
  return value.dump();
}

// A member's word, read like a replica value: never throws; a mistyped field reads as unset.
wanted_replica parse_wanted(std::string_view artifact_id, std::string_view value) {
  wanted_replica out;
  out.artifact_id = std::string(artifact_id);
  auto parsed = json::parse(value, nullptr, false);
  if (parsed.is_discarded() || !parsed.is_object()) return out;
  if (auto it = parsed.find("total_size"); it != parsed.end() && it->is_number_unsigned()) {
    out.total_size = it->get<std::uint64_t>();
  }
  if (auto it = parsed.find("by"); it != parsed.end() && it->is_string()) out.by = it->get<std::string>();
  if (auto it = parsed.find("declined"); it != parsed.end() && it->is_string()) {
    out.declined = it->get<std::string>();
  }
  return out;
}

// <prefix>/disk/<artifact_id>/<volume> → {"total_size": N, "by": "<host id>"}; read like an ask.
disk_copy parse_disk_copy(std::string_view volume, std::string_view value) {
  const auto read = parse_wanted("", value);
  return disk_copy{std::string(volume), read.total_size, read.by};
}

}  // namespace

struct catalogue::state {
  catalogue_options options;
  std::unique_ptr<etcd_client> etcd;
  std::string hosts_prefix, replicas_prefix, index_prefix, wanted_prefix, disk_prefix;

  mutable std::mutex mutex;  // guards what follows
  std::int64_t lease = 0;
  bool registered = false;
  bool unreachable_logged = false;
  std::map<std::string, replica_reading, std::less<>> advertised;   // artifact id → what it says
  std::map<std::string, std::string, std::less<>> pending_indexes;  // key → bytes not yet written
  std::optional<std::uint64_t> written_free;                        // free_bytes last written

  std::mutex thread_mutex;
  std::condition_variable wake;
  bool stopping = false;
  std::thread keeper;

  // The keys under <kind_prefix><artifact_id>/, as (their last segment, their value): what each
  // host (replicas) or volume (disk copies) says of the artifact. A segment `keep` refuses is
  // skipped: no member of ours wrote it.
  result<std::vector<std::pair<std::string, std::string>>> under_artifact(std::string_view kind_prefix,
                                                                          std::string_view artifact_id,
                                                                          bool (*keep)(std::string_view)) const {
    TENSORREG_TRY(check_artifact_key(artifact_id));
    const auto prefix = fmt::format("{}{}/", kind_prefix, artifact_id);
    TENSORREG_TRY_ASSIGN(auto kvs, etcd->list(prefix));
    std::vector<std::pair<std::string, std::string>> out;
    for (auto& kv : kvs) {
      const auto segment = std::string_view(kv.key).substr(prefix.size());
      if (keep(segment)) out.emplace_back(std::string(segment), std::move(kv.value));
    }
    return out;
  }

  std::string replica_key(std::string_view artifact_id) const {
    return fmt::format("{}{}/{}", replicas_prefix, artifact_id, options.self.host_id);
  }

  // The host record as it is now: its free bytes asked again. Called with `mutex` held.
  host_record current_self_locked() {
    host_record out = options.self;
    if (options.free_bytes) out.free_bytes = options.free_bytes();
    written_free = out.free_bytes;
    return out;
  }

  // Writes the host record again when its free bytes moved by more than the step since it was
  // last written. Called with `mutex` held and a lease.
  status rewrite_host_if_moved_locked() {
    if (!options.free_bytes) return {};
    const auto before = written_free;
    const auto now = options.free_bytes();
    const auto moved = before.has_value() != now.has_value() ||
                       (now && (*now > *before ? *now - *before : *before - *now) > options.free_bytes_step);
    if (!moved) return {};
    host_record record = options.self;
    record.free_bytes = now;
    TENSORREG_TRY(etcd->put(hosts_prefix + options.self.host_id, host_value(record), lease));
    written_free = now;
    return {};
  }

  // Grants a lease and writes the host and every advertised replica under it. Called with
  // `mutex` held, so that an advertise() racing a re-registration is not lost.
  status register_locked() {
    TENSORREG_TRY_ASSIGN(auto id, etcd->grant_lease(options.lease_ttl));
    lease = id;
    TENSORREG_TRY(etcd->put(hosts_prefix + options.self.host_id, host_value(current_self_locked()), lease));
    for (const auto& [artifact, replica] : advertised) {
      TENSORREG_TRY(etcd->put(replica_key(artifact), replica_value(replica.total_size, replica.state), lease));
    }
    log(*options.log, log_level::info, "cluster: host {} registered at {} (lease {:x}, {} replicas)",
        options.self.host_id, etcd->endpoint(), lease, advertised.size());
    return {};
  }

  // Writes the indexes that could not be written while etcd was away. Called with `mutex` held.
  status flush_indexes_locked() {
    while (!pending_indexes.empty()) {
      auto it = pending_indexes.begin();
      TENSORREG_TRY(etcd->put_if_absent(it->first, it->second));
      pending_indexes.erase(it);
    }
    return {};
  }
};

result<std::unique_ptr<catalogue>> catalogue::create(catalogue_options options) {
  if (!key_segment(options.self.host_id, 128)) {
    return fail(errc::invalid_argument,
                fmt::format("cannot join cluster: host id '{}' is empty or has characters outside [A-Za-z0-9-._]",
                            options.self.host_id));
  }
  if (options.self.transfer_address.empty()) {
    return fail(errc::invalid_argument, "cannot join cluster: empty transfer address");
  }
  if (!options.self.persist_volume.empty() && !key_segment(options.self.persist_volume, 64)) {
    return fail(errc::invalid_argument,
                fmt::format("cannot join cluster: persist volume '{}' is longer than 64 or has characters outside "
                            "[A-Za-z0-9-._]",
                            options.self.persist_volume));
  }
  if (options.lease_ttl < std::chrono::seconds(2)) {
    return fail(errc::invalid_argument,
                fmt::format("cannot join cluster: lease ttl {} s is below 2 s", options.lease_ttl.count()));
  }
  auto s = std::make_unique<state>();
  TENSORREG_TRY_ASSIGN(s->etcd, etcd_client::create(etcd_options{options.url.endpoint(), options.connect_timeout,
                                                                 options.request_timeout}));
  s->hosts_prefix = options.url.prefix + "/hosts/";
  s->replicas_prefix = options.url.prefix + "/replicas/";
  s->index_prefix = options.url.prefix + "/index/";
  s->wanted_prefix = options.url.prefix + "/wanted/";
  s->disk_prefix = options.url.prefix + "/disk/";
  s->options = std::move(options);
  return std::unique_ptr<catalogue>(new catalogue(std::move(s)));
}

catalogue::catalogue(std::unique_ptr<state> s) noexcept : state_(std::move(s)) {}

catalogue::~catalogue() {
  {
    std::lock_guard lock(state_->thread_mutex);
    state_->stopping = true;
  }
  state_->wake.notify_all();
  if (state_->keeper.joinable()) state_->keeper.join();
  std::lock_guard lock(state_->mutex);
  if (state_->lease != 0) (void)state_->etcd->revoke_lease(state_->lease);
}

const host_record& catalogue::self() const noexcept { return state_->options.self; }
const cluster_url& catalogue::url() const noexcept { return state_->options.url; }

status catalogue::refresh() {
  auto& s = *state_;
  std::lock_guard lock(s.mutex);
  status outcome;
  if (s.lease != 0) {
    auto alive = s.etcd->keep_alive(s.lease);
    if (alive) {
      if (!s.registered) {
        // Back after an outage with the lease intact: etcd may still have lost writes made
        // before it stopped, so write everything again (idempotent).
        s.lease = 0;
        outcome = s.register_locked();
      } else {
        outcome = s.rewrite_host_if_moved_locked();
      }
    } else if (alive.error().code == errc::not_found) {
      log(*s.options.log, log_level::warn, "cluster: lease {:x} of host {} lost; registering again", s.lease,
          s.options.self.host_id);
      s.lease = 0;
      outcome = s.register_locked();
    } else {
      outcome = tl::unexpected(alive.error());
    }
  } else {
    outcome = s.register_locked();
  }
  if (outcome) outcome = s.flush_indexes_locked();
  s.registered = outcome.has_value();
  if (!outcome) {
    if (!s.unreachable_logged) {
      log(*s.options.log, log_level::warn, "cluster: {}", outcome.error().message);
      s.unreachable_logged = true;
    }
  } else {
    s.unreachable_logged = false;
  }
  return outcome;
}

void catalogue::start() {
  std::lock_guard lock(state_->thread_mutex);
  if (state_->keeper.joinable()) return;
  state_->keeper = std::thread([s = state_.get(), this] {
    const auto period = std::chrono::duration_cast<std::chrono::milliseconds>(s->options.lease_ttl) / 3;
    std::unique_lock guard(s->thread_mutex);
    while (!s->stopping) {
      guard.unlock();
      (void)refresh();
      guard.lock();
      s->wake.wait_for(guard, period, [s] { return s->stopping; });
    }
  });
}

bool catalogue::registered() const {
  std::lock_guard lock(state_->mutex);
  return state_->registered;
}

status catalogue::advertise(std::string_view artifact_id, std::uint64_t total_size, replica_state progress) {
  TENSORREG_TRY(check_artifact_key(artifact_id));
  auto& s = *state_;
  std::lock_guard lock(s.mutex);
  s.advertised.insert_or_assign(std::string(artifact_id), replica_reading{total_size, progress});
  if (!s.registered || s.lease == 0) {
    return fail(errc::unavailable,
                fmt::format("cannot advertise {} yet: host {} is not registered at {} (written when it is)",
                            artifact_id, s.options.self.host_id, s.etcd->endpoint()));
  }
  auto put = s.etcd->put(s.replica_key(artifact_id), replica_value(total_size, progress), s.lease);
  // The lease gone or etcd away, maybe only for a moment between two refreshes: the next
  // refresh writes everything again.
  if (!put) s.registered = false;
  return put;
}

status catalogue::withdraw(std::string_view artifact_id) {
  TENSORREG_TRY(check_artifact_key(artifact_id));
  auto& s = *state_;
  std::lock_guard lock(s.mutex);
  s.advertised.erase(std::string(artifact_id));
  TENSORREG_TRY(s.etcd->delete_key(s.replica_key(artifact_id)));
  return {};
}

result<bool> catalogue::put_index(std::string_view index_hash_hex, std::string_view index_bytes) {
  TENSORREG_TRY(check_index_hash(index_hash_hex));
  auto key = state_->index_prefix + std::string(index_hash_hex);
  auto put = state_->etcd->put_if_absent(key, index_bytes);
  if (!put && put.error().code == errc::unavailable) {
    // Remembered, and written by the refresh that finds etcd back.
    std::lock_guard lock(state_->mutex);
    state_->pending_indexes.insert_or_assign(std::move(key), std::string(index_bytes));
    state_->registered = false;
  }
  return put;
}

result<std::optional<std::string>> catalogue::get_index(std::string_view index_hash_hex) {
  TENSORREG_TRY(check_index_hash(index_hash_hex));
  TENSORREG_TRY_ASSIGN(auto kv, state_->etcd->get(state_->index_prefix + std::string(index_hash_hex)));
  if (!kv) return std::optional<std::string>{};
  return std::optional<std::string>{std::move(kv->value)};
}

result<std::vector<host_record>> catalogue::hosts() {
  TENSORREG_TRY_ASSIGN(auto kvs, state_->etcd->list(state_->hosts_prefix));
  std::vector<host_record> out;
  for (const auto& kv : kvs) {
    TENSORREG_TRY_ASSIGN(auto host, parse_host(std::string_view(kv.key).substr(state_->hosts_prefix.size()), kv.value));
    out.push_back(std::move(host));
  }
  return out;
}

result<catalogue::holders_answer> catalogue::holders(std::string_view artifact_id) {
  TENSORREG_TRY(check_artifact_key(artifact_id));
  const auto prefix = fmt::format("{}{}/", state_->replicas_prefix, artifact_id);
  TENSORREG_TRY_ASSIGN(auto replicas, state_->etcd->list(prefix));
  holders_answer answer;
  if (replicas.empty()) return answer;
  TENSORREG_TRY_ASSIGN(auto all, hosts());
  for (const auto& kv : replicas) {
    auto host_id = std::string_view(kv.key).substr(prefix.size());
    if (host_id == state_->options.self.host_id) continue;
    if (answer.total_size == 0) answer.total_size = parse_replica(kv.value).total_size;
    for (const auto& host : all) {
      if (host.host_id == host_id) answer.hosts.push_back(host);
    }
  }
  return answer;
}

std::vector<std::string> catalogue::advertised() const {
  std::lock_guard lock(state_->mutex);
  std::vector<std::string> out;
  for (const auto& [id, replica] : state_->advertised) out.push_back(id);
  return out;
}

result<std::vector<replica_holder>> catalogue::replicas_of(std::string_view artifact_id) {
  TENSORREG_TRY_ASSIGN(auto kvs, state_->under_artifact(state_->replicas_prefix, artifact_id, [](std::string_view h) {
    return !h.empty() && h.find('/') == std::string_view::npos;
  }));
  std::vector<replica_holder> out;
  for (const auto& [host_id, value] : kvs) {
    const auto replica = parse_replica(value);
    out.push_back(replica_holder{host_id, replica.total_size, replica.state});
  }
  std::sort(out.begin(), out.end(), [](const auto& x, const auto& y) { return x.host_id < y.host_id; });
  return out;
}

status catalogue::ask(std::string_view host_id, std::string_view artifact_id, std::uint64_t total_size) {
  TENSORREG_TRY(check_artifact_key(artifact_id));
  // The host id becomes a key segment too: one with '/' would address another key.
  if (!key_segment(host_id, 128)) {
    return fail(errc::invalid_argument,
                fmt::format("cannot ask host '{}' for {}: a host id is [A-Za-z0-9-._], 1 to 128 characters", host_id,
                            artifact_id));
  }
  auto& s = *state_;
  std::lock_guard lock(s.mutex);
  if (!s.registered || s.lease == 0) {
    return fail(errc::unavailable, fmt::format("cannot ask host {} for {}: host {} is not registered at {}", host_id,
                                               artifact_id, s.options.self.host_id, s.etcd->endpoint()));
  }
  auto put = s.etcd->put(fmt::format("{}{}/{}", s.wanted_prefix, host_id, artifact_id),
                         wanted_value(total_size, s.options.self.host_id), s.lease);
  if (!put) s.registered = false;  // the next refresh registers again
  return put;
}

result<std::vector<wanted_replica>> catalogue::wanted() {
  const auto prefix = state_->wanted_prefix + state_->options.self.host_id + "/";
  TENSORREG_TRY_ASSIGN(auto kvs, state_->etcd->list(prefix));
  std::vector<wanted_replica> out;
  for (const auto& kv : kvs) {
    const auto artifact_id = std::string_view(kv.key).substr(prefix.size());
    if (!check_artifact_key(artifact_id)) continue;  // no one of ours wrote it
    out.push_back(parse_wanted(artifact_id, kv.value));
  }
  return out;
}

result<std::unique_ptr<etcd_watch>> catalogue::watch_wanted() const {
  return etcd_watch::create(state_->options.url.endpoint(), state_->wanted_prefix + state_->options.self.host_id + "/",
                            state_->options.connect_timeout);
}

result<std::unique_ptr<etcd_watch>> catalogue::watch_replicas(std::string_view artifact_id) const {
  TENSORREG_TRY(check_artifact_key(artifact_id));
  return etcd_watch::create(state_->options.url.endpoint(), fmt::format("{}{}/", state_->replicas_prefix, artifact_id),
                            state_->options.connect_timeout);
}

result<bool> catalogue::decline_wanted(std::string_view artifact_id, std::string_view reason) {
  TENSORREG_TRY(check_artifact_key(artifact_id));
  const auto key = fmt::format("{}{}/{}", state_->wanted_prefix, state_->options.self.host_id, artifact_id);
  TENSORREG_TRY_ASSIGN(auto current, state_->etcd->get(key));
  if (!current || current->lease == 0) return false;
  auto ask = parse_wanted(artifact_id, current->value);
  if (ask.declined == reason) return true;
  // Under the asker's lease, which this host did not grant: the ask still goes with its asker.
  auto put = state_->etcd->put(key, wanted_value(ask.total_size, ask.by, reason), current->lease);
  if (!put && put.error().code == errc::not_found) return false;  // that lease is gone
  TENSORREG_TRY(put);
  return true;
}

result<std::vector<std::optional<wanted_replica>>> catalogue::asks_of(std::span<const std::string> host_ids,
                                                                      std::string_view artifact_id) {
  TENSORREG_TRY(check_artifact_key(artifact_id));
  std::vector<std::string> keys;
  for (const auto& host_id : host_ids) {
    if (!key_segment(host_id, 128)) {
      return fail(errc::invalid_argument,
                  fmt::format("cannot read the ask of host '{}' for {}: a host id is [A-Za-z0-9-._], 1 to 128 "
                              "characters",
                              host_id, artifact_id));
    }
    keys.push_back(fmt::format("{}{}/{}", state_->wanted_prefix, host_id, artifact_id));
  }
  TENSORREG_TRY_ASSIGN(auto kvs, state_->etcd->get_many(keys));
  std::vector<std::optional<wanted_replica>> out;
  for (const auto& kv : kvs) {
    out.push_back(kv ? std::optional<wanted_replica>{parse_wanted(artifact_id, kv->value)} : std::nullopt);
  }
  return out;
}

result<bool> catalogue::drop_wanted(std::string_view artifact_id) {
  TENSORREG_TRY(check_artifact_key(artifact_id));
  return state_->etcd->delete_key(
      fmt::format("{}{}/{}", state_->wanted_prefix, state_->options.self.host_id, artifact_id));
}

status catalogue::list_disk_copy(std::string_view artifact_id, std::uint64_t total_size) {
  TENSORREG_TRY(check_artifact_key(artifact_id));
  const auto& self = state_->options.self;
  if (self.persist_volume.empty()) {
    return fail(
        errc::invalid_argument,
        fmt::format("cannot list the persisted copy of {}: host {} has no persist volume", artifact_id, self.host_id));
  }
  return state_->etcd->put(fmt::format("{}{}/{}", state_->disk_prefix, artifact_id, self.persist_volume),
                           wanted_value(total_size, self.host_id), 0);
}

result<bool> catalogue::unlist_disk_copy(std::string_view artifact_id) {
  TENSORREG_TRY(check_artifact_key(artifact_id));
  const auto& self = state_->options.self;
  if (self.persist_volume.empty()) return false;
  return state_->etcd->delete_key(fmt::format("{}{}/{}", state_->disk_prefix, artifact_id, self.persist_volume));
}

result<std::vector<disk_copy>> catalogue::disk_copies(std::string_view artifact_id) {
  TENSORREG_TRY_ASSIGN(auto kvs, state_->under_artifact(state_->disk_prefix, artifact_id,
                                                        [](std::string_view v) { return key_segment(v, 64); }));
  std::vector<disk_copy> out;
  for (const auto& [volume, value] : kvs) out.push_back(parse_disk_copy(volume, value));
  return out;
}

result<std::vector<listed_host>> list_cluster(etcd_client& etcd, const cluster_url& url) {
  const auto hosts_prefix = url.prefix + "/hosts/";
  const auto replicas_prefix = url.prefix + "/replicas/";
  TENSORREG_TRY_ASSIGN(auto host_kvs, etcd.list(hosts_prefix));
  TENSORREG_TRY_ASSIGN(auto replica_kvs, etcd.list(replicas_prefix));
  std::map<std::string, listed_host, std::less<>> by_id;
  for (const auto& kv : host_kvs) {
    const auto host_id = std::string_view(kv.key).substr(hosts_prefix.size());
    TENSORREG_TRY_ASSIGN(auto host, parse_host(host_id, kv.value));
    listed_host listed{std::move(host), kv.lease, std::nullopt, {}};
    if (kv.lease != 0) {
      auto left = etcd.lease_time_to_live(kv.lease);
      if (left) {
        listed.lease_left = *left;
      } else if (left.error().code != errc::not_found) {
        return tl::unexpected(left.error());
      }
    }
    by_id.emplace(listed.host.host_id, std::move(listed));
  }
  // <prefix>/replicas/<artifact_id>/<host_id>: artifact ids hold no '/' (check_artifact_key).
  for (const auto& kv : replica_kvs) {
    const auto rest = std::string_view(kv.key).substr(replicas_prefix.size());
    const auto slash = rest.rfind('/');
    if (slash == std::string_view::npos || slash == 0 || slash + 1 == rest.size()) continue;
    const auto artifact_id = std::string(rest.substr(0, slash));
    const auto host_id = std::string(rest.substr(slash + 1));
    const auto replica = parse_replica(kv.value);
    auto it = by_id.find(host_id);
    if (it == by_id.end()) {
      listed_host orphan;
      orphan.host.host_id = host_id;
      orphan.lease = kv.lease;
      it = by_id.emplace(host_id, std::move(orphan)).first;
    }
    it->second.replicas.push_back(listed_replica{artifact_id, replica.total_size, replica.state});
  }
  std::vector<listed_host> out;
  out.reserve(by_id.size());
  for (auto& [id, host] : by_id) out.push_back(std::move(host));
  return out;
}

result<std::vector<listed_disk_copy>> list_disk_copies(etcd_client& etcd, const cluster_url& url) {
  const auto prefix = url.prefix + "/disk/";
  TENSORREG_TRY_ASSIGN(auto kvs, etcd.list(prefix));
  std::vector<listed_disk_copy> out;
  // <prefix>/disk/<artifact_id>/<volume>: artifact ids hold no '/' (check_artifact_key).
  for (const auto& kv : kvs) {
    const auto rest = std::string_view(kv.key).substr(prefix.size());
    const auto slash = rest.rfind('/');
    if (slash == std::string_view::npos || slash == 0 || !key_segment(rest.substr(slash + 1), 64)) continue;
    out.push_back(
        listed_disk_copy{std::string(rest.substr(0, slash)), parse_disk_copy(rest.substr(slash + 1), kv.value)});
  }
  std::sort(out.begin(), out.end(), [](const auto& x, const auto& y) {
    return std::tie(x.artifact_id, x.copy.volume) < std::tie(y.artifact_id, y.copy.volume);
  });
  return out;
}

}  // namespace tensorreg::cluster
