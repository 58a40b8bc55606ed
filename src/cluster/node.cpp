// src/cluster/node.cpp — the daemon's cluster member (docs/cluster.md §5).
#include "tensorreg/cluster/node.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <fmt/ranges.h>
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include "common/log.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/identity/artifact_id.hpp"
#include "tensorreg/memory/shared_memory.hpp"

namespace tensorreg::cluster {

namespace {

// The hosts to ask to hold `size` bytes, best first (docs/cluster.md §5): those that said they
// have room for it, then those that did not say, then those that said they have not (an
// eviction may still make room); within each, more free bytes, then larger capacity, then host
// id.
void order_for_placement(std::vector<host_record>& hosts, std::uint64_t size) {
  const auto rank = [size](const host_record& h) { return !h.free_bytes ? 1 : *h.free_bytes >= size ? 0 : 2; };
  std::stable_sort(hosts.begin(), hosts.end(), [&](const host_record& x, const host_record& y) {
    if (rank(x) != rank(y)) return rank(x) < rank(y);
    if (x.free_bytes.value_or(0) != y.free_bytes.value_or(0))
      return x.free_bytes.value_or(0) > y.free_bytes.value_or(0);
    if (x.capacity_bytes != y.capacity_bytes) return x.capacity_bytes > y.capacity_bytes;
    return x.host_id < y.host_id;
  });
}

// A watch of an artifact's replica keys (a publish's, a fetch's from a volume), on a thread of
// its own: wait() returns when a key changed since the last wait, or after `at_most`. A watch
// that cannot be opened leaves only the timeout.
class replica_watch {
 public:
  replica_watch() = default;
  replica_watch(const replica_watch&) = delete;
  replica_watch& operator=(const replica_watch&) = delete;
  ~replica_watch() {
    if (watch_) watch_->stop();
    if (thread_.joinable()) thread_.join();
  }

  void start(result<std::unique_ptr<etcd_watch>> created) {
    if (!created) return;
    watch_ = std::move(*created);
    thread_ = std::thread([this] {
      (void)watch_->run([this] {
        {
          std::lock_guard lock(mutex_);
          changed_ = true;
        }
        wake_.notify_all();
      });
    });
  }

  void wait(std::chrono::steady_clock::duration at_most) {
    std::unique_lock lock(mutex_);
    wake_.wait_for(lock, at_most, [this] { return changed_; });
    changed_ = false;
  }

 private:
  std::unique_ptr<etcd_watch> watch_;
  std::thread thread_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool changed_ = false;
};

}  // namespace

struct node::state {
  registration::engine& engine;
  node_options options;
  std::unique_ptr<transfer_server> server;
  std::unique_ptr<catalogue> members;

  std::mutex mutex;  // guards the queue
  std::condition_variable wake, idle;
  std::deque<std::string> queue;
  bool busy = false;
  bool stopping = false;
  std::thread advertiser;

  std::mutex fetch_mutex;  // one fetch at a time: a second fetch of an id then finds it local
  // Pulls under way (guarded by `mutex`): advertised as partial sources, not held yet.
  struct active_pull {
    std::uint64_t total_bytes = 0;
    std::uint64_t verified_bytes = 0;
    std::set<std::string> sources;
    std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  };
  std::map<std::string, active_pull> pulling;

  // Asks addressed to this host (docs/cluster.md §5): one pull at a time, on a thread of its
  // own so that the node's thread goes on advertising and withdrawing meanwhile. `owner` is set
  // once the node exists (the pull goes through node::fetch); `wanted_busy` and `wanted_retry`
  // are guarded by `mutex`.
  std::atomic<node*> owner{nullptr};
  std::thread wanted_puller;
  bool wanted_busy = false;
  struct retry {
    std::chrono::steady_clock::time_point after;
    std::chrono::milliseconds wait{0};
  };
  std::map<std::string, retry> wanted_retry;
  // An etcd watch of those asks wakes the node's thread when one is written (`asks_changed`,
  // guarded by `mutex`), rather than at its next look; and so does the end of an ask's pull,
  // for the next ask. The looks every withdraw_check_every stay: the watch only hastens them.
  std::unique_ptr<etcd_watch> asks_watch;
  std::thread asks_watcher;
  bool asks_changed = false;

  // The copies on the shared persist volume this host has listed in the catalogue (node
  // thread only), and whether the catalogue was registered at the last look: keys written
  // before an outage may be gone with an etcd that restarted empty.
  std::set<std::string> disk_listed;
  bool was_registered = false;

  explicit state(registration::engine& e) : engine(e) {}

  [[nodiscard]] bool on_volume() const { return !options.self.persist_volume.empty(); }

  // Queues an advertisement unless one is queued already.
  void queue_advertise(const std::string& id) {
    {
      std::lock_guard lock(mutex);
      if (std::find(queue.begin(), queue.end(), id) != queue.end()) return;
      queue.push_back(id);
    }
    wake.notify_all();
  }

  // Lists in the catalogue the copies on the shared volume that the engine knows of, and
  // unlists those it no longer has (removed here, or found gone). A copy is listed once; all
  // of them again after the catalogue registers anew.
  void list_disk_copies() {
    if (!on_volume()) return;
    const bool registered = members->registered();
    if (registered && !was_registered) disk_listed.clear();
    was_registered = registered;
    if (!registered) return;
    std::map<std::string, std::uint64_t> persisted;
    for (const auto& summary : engine.list()) {
      if (summary.shared_disk && summary.descriptor.id_kind == identity::id_kind::mi2) {
        persisted.emplace(summary.descriptor.artifact_id, summary.descriptor.total_size);
      }
    }
    for (const auto& [id, size] : persisted) {
      if (disk_listed.contains(id)) continue;
      if (auto listed = members->list_disk_copy(id, size); !listed) {
        log(*options.log, log_level::info, "cluster: persisted copy of {} not listed yet: {}", id,
            listed.error().message);
        continue;
      }
      disk_listed.insert(id);
    }
    for (auto it = disk_listed.begin(); it != disk_listed.end();) {
      if (persisted.contains(*it)) {
        ++it;
        continue;
      }
      if (auto unlisted = members->unlist_disk_copy(*it); !unlisted) {
        log(*options.log, log_level::info, "cluster: persisted copy of {} not unlisted yet: {}", *it,
            unlisted.error().message);
        ++it;
        continue;
      }
      it = disk_listed.erase(it);
    }
  }

  // Serves the asks addressed to this host: an id held here has its ask deleted; the first one
  // neither held, nor being pulled, nor waiting out a backoff is pulled on `wanted_puller`.
  void serve_wanted() {
    node* self = owner.load();
    if (self == nullptr) return;
    {
      std::lock_guard lock(mutex);
      if (wanted_busy) return;
    }
    auto asks = members->wanted();
    if (!asks) return;  // etcd away: the catalogue's keep-alive logs it
    const auto now = std::chrono::steady_clock::now();
    const auto advertising = members->advertised();
    for (const auto& ask : *asks) {
      if (auto held = engine.get(ask.artifact_id);
          held && !held->stable_replica && held->shared_disk &&
          std::find(advertising.begin(), advertising.end(), ask.artifact_id) == advertising.end()) {
        // On disk only (a shared volume's copy): the asker pulls it once this host has loaded
        // and advertised it, which the node's thread does next.
        queue_advertise(ask.artifact_id);
        continue;
      } else if (!held && held.error().code == errc::not_found && on_volume()) {
        unlist_stale(ask.artifact_id);
      }
      if (engine.get(ask.artifact_id)) {
        // Held: pulled for this ask, or put here meanwhile. The ask is answered.
        if (auto dropped = members->drop_wanted(ask.artifact_id); !dropped) {
          log(*options.log, log_level::info, "cluster: ask for {} not deleted yet: {}", ask.artifact_id,
              dropped.error().message);
        }
        std::lock_guard lock(mutex);
        wanted_retry.erase(ask.artifact_id);
        continue;
      }
      {
        std::lock_guard lock(mutex);
        if (pulling.contains(ask.artifact_id)) continue;  // a GetArtifactMemfd pulls it already
        if (auto it = wanted_retry.find(ask.artifact_id); it != wanted_retry.end() && now < it->second.after) continue;
        wanted_busy = true;
      }
      if (wanted_puller.joinable()) wanted_puller.join();  // done: it cleared wanted_busy
      log(*options.log, log_level::info, "cluster: pulling {} ({} bytes): {} asked this host to hold it",
          ask.artifact_id, ask.total_size, ask.by.empty() ? std::string("a member") : ask.by);
      wanted_puller = std::thread([this, self, ask] {
        auto fetched = self->fetch(ask.artifact_id);
        if (fetched) {
          if (auto dropped = members->drop_wanted(ask.artifact_id); !dropped) {
            log(*options.log, log_level::info, "cluster: ask for {} not deleted yet: {}", ask.artifact_id,
                dropped.error().message);
          }
        } else if (auto declined = members->decline_wanted(ask.artifact_id, fetched.error().message); !declined) {
          // The asker learns it at its next look instead: it waits for this host meanwhile.
          log(*options.log, log_level::info, "cluster: ask for {} not marked declined: {}", ask.artifact_id,
              declined.error().message);
        }
        std::lock_guard lock(mutex);
        if (fetched) {
          wanted_retry.erase(ask.artifact_id);
        } else {
          auto& r = wanted_retry[ask.artifact_id];
          r.wait =
              r.wait.count() == 0 ? options.wanted_retry_after : std::min(r.wait * 2, options.wanted_retry_after * 32);
          r.after = std::chrono::steady_clock::now() + r.wait;
          log(*options.log, log_level::warn, "cluster: cannot pull {} that {} asked for: {}; trying again in {} ms",
              ask.artifact_id, ask.by.empty() ? std::string("a member") : ask.by, fetched.error().message,
              r.wait.count());
        }
        wanted_busy = false;
        asks_changed = true;  // the next ask, if any, without waiting for the next look
        wake.notify_all();
      });
      return;  // one ask at a time
    }
  }

  // A disk key of this host's volume for an id the engine did not find there (it looked on the
  // volume when get() missed): the copy was removed by a member that had not listed it.
  void unlist_stale(const std::string& id) {
    auto copies = members->disk_copies(id);
    if (!copies) return;
    const bool listed = std::any_of(copies->begin(), copies->end(),
                                    [&](const disk_copy& c) { return c.volume == options.self.persist_volume; });
    if (!listed) return;
    if (auto unlisted = members->unlist_disk_copy(id); unlisted) {
      disk_listed.erase(id);
      log(*options.log, log_level::info, "cluster: {} is no longer on persist volume {}: unlisted", id,
          options.self.persist_volume);
    }
  }

  // The members to pull `id` from when no member holds it in memory but a shared persist
  // volume lists it: a member on that volume is asked to hold it (it loads the volume's copy
  // and advertises it), and the catalogue is read until it does. This host is not asked: had
  // its volume the copy, the engine would have found it there before the cluster was asked.
  result<catalogue::holders_answer> from_volume(const std::string& id) {
    TENSORREG_TRY_ASSIGN(auto copies, members->disk_copies(id));
    if (copies.empty()) {
      return fail(errc::not_found, fmt::format("artifact {} not found here nor on any member of the cluster", id));
    }
    TENSORREG_TRY_ASSIGN(auto hosts, members->hosts());
    std::vector<host_record> candidates;
    std::vector<std::string> volumes;
    std::uint64_t total_size = 0;
    for (const auto& copy : copies) {
      volumes.push_back(copy.volume);
      total_size = std::max(total_size, copy.total_size);
    }
    for (const auto& h : hosts) {
      if (h.host_id == options.self.host_id || h.persist_volume.empty()) continue;
      if (std::find(volumes.begin(), volumes.end(), h.persist_volume) != volumes.end()) candidates.push_back(h);
    }
    if (candidates.empty()) {
      return fail(errc::unavailable,
                  fmt::format("cannot fetch {}: only persist volume {} holds it, and no member using it is up", id,
                              fmt::join(volumes, ", ")));
    }
    // As a publish asks: the copy must fit in its stable memory. A member that cannot load it
    // declines its ask (its error), and the next one is asked.
    order_for_placement(candidates, total_size);
    std::size_t asking = 0;
    std::vector<std::string> declines;
    const auto ask_next = [&]() -> status {
      const auto& next = candidates[asking];
      TENSORREG_TRY(members->ask(next.host_id, id, total_size));
      log(*options.log, log_level::info, "cluster: {} is on persist volume {} only: asked {} to load it", id,
          next.persist_volume, next.host_id);
      return {};
    };
    TENSORREG_TRY(ask_next());
    const auto deadline = std::chrono::steady_clock::now() + options.disk_load_wait;
    replica_watch watched;
    watched.start(members->watch_replicas(id));
    for (;;) {
      const auto& asked = candidates[asking];
      TENSORREG_TRY_ASSIGN(auto holding, members->holders(id));
      if (!holding.hosts.empty() && holding.total_size != 0) return holding;
      const std::vector<std::string> asked_host{asked.host_id};
      if (auto asks = members->asks_of(asked_host, id);
          asks && asks->size() == 1 && (*asks)[0] && !(*asks)[0]->declined.empty()) {
        declines.push_back(fmt::format("{}: {}", asked.host_id, (*asks)[0]->declined));
        if (++asking == candidates.size()) {
          return fail(errc::unavailable, fmt::format("cannot fetch {}: no member on persist volume {} could load it "
                                                     "({})",
                                                     id, fmt::join(volumes, ", "), fmt::join(declines, "; ")));
        }
        TENSORREG_TRY(ask_next());
        continue;
      }
      // The member asked found the listing stale (the copy was removed) and unlisted it.
      TENSORREG_TRY_ASSIGN(auto still, members->disk_copies(id));
      if (still.empty()) {
        return fail(errc::not_found, fmt::format("artifact {} not found: the copy on persist volume {} was removed", id,
                                                 asked.persist_volume));
      }
      const auto now = std::chrono::steady_clock::now();
      bool stopped = false;
      {
        std::lock_guard lock(mutex);
        stopped = stopping;
      }
      if (stopped || now >= deadline) {
        return fail(errc::unavailable,
                    fmt::format("cannot fetch {}: {} did not load it from persist volume {} within {} ms", id,
                                asked.host_id, asked.persist_volume, options.disk_load_wait.count()));
      }
      watched.wait(std::min<std::chrono::steady_clock::duration>(options.publish_poll_every, deadline - now));
    }
  }

  // Publishes, stores the index, advertises. Errors are logged: the artifact stays local.
  void advertise(const std::string& id) {
    auto parsed = identity::parse_mi2(id);
    if (!parsed) return;
    if (!server->serves(id)) {
      auto bytes = engine.open_bytes(id);
      if (!bytes) {
        log(*options.log, log_level::info, "cluster: {} is not advertised: {}", id, bytes.error().message);
        // A member asked to load it from a shared volume says why it cannot (a no-op unasked).
        if (on_volume()) (void)members->decline_wanted(id, bytes.error().message);
        return;
      }
      auto leaves = hash::leaf_digests(**bytes);
      const auto total = (*bytes)->size();
      bytes->reset();  // holding the source would keep the artifact from draining
      if (!leaves) {
        log(*options.log, log_level::warn, "cluster: {} is not advertised: {}", id, leaves.error().message);
        return;
      }
      if (hash::tree_root(*leaves) != parsed->data) {
        log(*options.log, log_level::error, "cluster: {} is not advertised: its bytes no longer hash to its id", id);
        return;
      }
      if (auto published = server->publish(id, total, std::move(*leaves)); !published) {
        log(*options.log, log_level::warn, "cluster: {}", published.error().message);
        return;
      }
    }
    if (auto index = engine.index_of(id); index) {
      if (auto put = members->put_index(hash::to_hex(parsed->index), (*index)->json()); !put) {
        log(*options.log, log_level::info, "cluster: index of {} not stored yet: {}", id, put.error().message);
      }
    }
    auto summary = engine.get(id);
    const auto total = summary ? summary->descriptor.total_size : 0;
    if (auto advertised = members->advertise(id, total); !advertised) {
      log(*options.log, log_level::info, "cluster: {}", advertised.error().message);
    }
  }

  // Withdraws what this host advertises but no longer holds: an artifact removed, evicted or
  // expired here. Otherwise pullers would keep asking this host for it in vain.
  void withdraw_gone() {
    for (const auto& id : members->advertised()) {
      {
        std::lock_guard lock(mutex);
        if (pulling.contains(id)) continue;
      }
      if (engine.get(id)) continue;
      server->withdraw(id);
      if (auto withdrawn = members->withdraw(id); !withdrawn) {
        log(*options.log, log_level::info, "cluster: {} not withdrawn yet: {}", id, withdrawn.error().message);
        continue;
      }
      log(*options.log, log_level::info, "cluster: {} withdrawn: no longer held here", id);
    }
  }

  // The watch of this host's asks, opened again a second after it fails (etcd away).
  void watch_asks() {
    const std::function<void()> changed = [this] {
      {
        std::lock_guard lock(mutex);
        asks_changed = true;
      }
      wake.notify_all();
    };
    for (;;) {
      auto watched = asks_watch->run(changed);
      std::unique_lock lock(mutex);
      if (stopping) return;
      if (!watched) {
        log(*options.log, log_level::debug, "cluster: {}", watched.error().message);
        wake.wait_for(lock, std::chrono::seconds(1), [this] { return stopping; });
        if (stopping) return;
      }
    }
  }

  // Runs `work` with the lock released, marked busy so that drain() waits for it.
  template <typename Work>
  void while_busy(std::unique_lock<std::mutex>& lock, Work&& work) {
    busy = true;
    lock.unlock();
    work();
    lock.lock();
    busy = false;
  }

  void run() {
    std::unique_lock lock(mutex);
    auto next_check = std::chrono::steady_clock::now() + options.withdraw_check_every;
    for (;;) {
      wake.wait_until(lock, next_check, [this] { return stopping || !queue.empty() || asks_changed; });
      if (stopping) return;
      if (queue.empty()) {
        // A watched ask between two looks is served at once; the look itself comes on time.
        const bool look = !asks_changed || std::chrono::steady_clock::now() >= next_check;
        asks_changed = false;
        while_busy(lock, [this, look] {
          if (look) {
            withdraw_gone();
            list_disk_copies();
          }
          serve_wanted();
        });
        if (look) next_check = std::chrono::steady_clock::now() + options.withdraw_check_every;
        idle.notify_all();
        continue;
      }
      auto id = std::move(queue.front());
      queue.pop_front();
      while_busy(lock, [this, &id] { advertise(id); });
      if (queue.empty()) idle.notify_all();
    }
  }
};

result<std::unique_ptr<node>> node::create(registration::engine& engine, node_options options) {
  auto s = std::make_unique<state>(engine);
  s->options = std::move(options);
  s->options.pull.log = s->options.log;
  transfer_server_options so;
  so.listen_address = s->options.self.transfer_address;
  so.log = s->options.log;
  so.corrupt_leaves = s->options.corrupt_leaves;
  so.open_bytes = [&engine](const std::string& id) { return engine.open_bytes(id); };
  TENSORREG_TRY_ASSIGN(s->server, transfer_server::create(std::move(so)));
  catalogue_options co;
  co.url = s->options.url;
  co.self = s->options.self;
  co.self.transfer_address = s->server->address();
  co.lease_ttl = s->options.lease_ttl;
  co.log = s->options.log;
  // The room the stable budget has, evictions counted, for the members that place replicas
  // (none said without a budget: room is then only the host's memory).
  co.free_bytes = [&engine] { return engine.stable_room(); };
  TENSORREG_TRY_ASSIGN(s->members, catalogue::create(std::move(co)));
  TENSORREG_TRY_ASSIGN(s->asks_watch, s->members->watch_wanted());
  s->members->start();
  auto* raw = s.get();
  s->advertiser = std::thread([raw] { raw->run(); });
  s->asks_watcher = std::thread([raw] { raw->watch_asks(); });
  // What this engine already holds (adopted at a takeover, restored from the persist directory)
  // is advertised as well.
  {
    std::lock_guard lock(raw->mutex);
    for (const auto& summary : engine.list()) {
      if (summary.descriptor.id_kind != identity::id_kind::mi2) continue;
      // A shared volume's copies are listed as such, not each loaded into this host's memory.
      if (raw->on_volume() && !summary.stable_replica && summary.leases == 0) continue;
      raw->queue.push_back(summary.descriptor.artifact_id);
    }
  }
  raw->wake.notify_all();
  auto made = std::unique_ptr<node>(new node(std::move(s)));
  raw->owner.store(made.get());
  return made;
}

node::node(std::unique_ptr<state> s) noexcept : state_(std::move(s)) {}

std::vector<pull_status> node::pulls() const {
  std::vector<pull_status> out;
  std::lock_guard lock(state_->mutex);
  const auto now = std::chrono::steady_clock::now();
  for (const auto& [id, p] : state_->pulling) {
    out.push_back({id,
                   p.total_bytes,
                   p.verified_bytes,
                   {p.sources.begin(), p.sources.end()},
                   std::chrono::duration<double>(now - p.started).count()});
  }
  return out;
}

node::~node() {
  {
    std::lock_guard lock(state_->mutex);
    state_->stopping = true;
  }
  state_->wake.notify_all();
  state_->asks_watch->stop();
  if (state_->asks_watcher.joinable()) state_->asks_watcher.join();
  if (state_->advertiser.joinable()) state_->advertiser.join();
  // The advertiser starts no pull any more; one under way ends by its own timeouts.
  if (state_->wanted_puller.joinable()) state_->wanted_puller.join();
}

void node::committed(const std::string& artifact_id) {
  if (identity::classify_artifact_id(artifact_id) != identity::id_kind::mi2) return;
  {
    std::lock_guard lock(state_->mutex);
    state_->queue.push_back(artifact_id);
  }
  state_->wake.notify_all();
}

void node::drain() {
  std::unique_lock lock(state_->mutex);
  state_->idle.wait(lock, [this] { return state_->stopping || (state_->queue.empty() && !state_->busy); });
}

catalogue& node::members() noexcept { return *state_->members; }
transfer_server& node::server() noexcept { return *state_->server; }

status node::fetch(const std::string& artifact_id) {
  auto& s = *state_;
  auto id = identity::parse_mi2(artifact_id);
  if (!id) {
    return fail(errc::not_found,
                fmt::format("artifact {} not found: only mi2 ids can be fetched from the cluster", artifact_id));
  }
  std::lock_guard serial(s.fetch_mutex);
  if (s.engine.get(artifact_id)) return {};  // fetched meanwhile
  {
    std::lock_guard lock(s.mutex);
    s.pulling[artifact_id] = {};
  }
  auto noted = [&s, &artifact_id](auto&& change) {
    std::lock_guard lock(s.mutex);
    change(s.pulling.at(artifact_id));
  };
  struct done_pulling {
    state& s;
    const std::string& id;
    ~done_pulling() {
      std::lock_guard lock(s.mutex);
      s.pulling.erase(id);
    }
  } done{s, artifact_id};

  auto holders = s.members->holders(artifact_id);
  if (!holders) {
    return fail(holders.error().code == errc::unavailable ? errc::unavailable : holders.error().code,
                fmt::format("cannot fetch {} from the cluster: {}", artifact_id, holders.error().message));
  }
  if (holders->hosts.empty() || holders->total_size == 0) {
    // Held by no member's memory: a member on a shared volume that lists it may load it.
    TENSORREG_TRY_ASSIGN(holders, s.from_volume(artifact_id));
  }
  const auto index_hex = hash::to_hex(id->index);
  auto index = s.members->get_index(index_hex);
  if (!index) return fail(index.error().code, fmt::format("cannot fetch {}: {}", artifact_id, index.error().message));
  if (!index->has_value()) {
    return fail(errc::unavailable,
                fmt::format("cannot fetch {}: the catalogue has no index {}", artifact_id, index_hex));
  }
  // The catalogue is not trusted for content: the index must hash to the id's index hash.
  if (hash::sha256(std::string_view(**index)) != id->index) {
    return fail(errc::data_loss,
                fmt::format("cannot fetch {}: the catalogue's index {} does not hash to it", artifact_id, index_hex));
  }

  registration::begin_request begin;
  begin.owner_pid = static_cast<std::int32_t>(::getpid());
  begin.total_size = holders->total_size;
  begin.tensor_index_data = registration::index_data{std::move(**index), "v3", "json"};
  begin.plan = registration::stable_dram_options{};
  TENSORREG_TRY_ASSIGN(auto begun, s.engine.begin(std::move(begin)));
  auto abort = [&](error e) {
    (void)s.engine.abort(begun.registration_id);
    return tl::unexpected(std::move(e));
  };
  const auto* handshake = std::get_if<registration::stable_dram_handshake>(&begun.handshake);
  if (handshake == nullptr || !handshake->publish) {
    return abort(error{errc::internal, fmt::format("cannot fetch {}: no publish buffer for the pull", artifact_id)});
  }
  const auto& staging = *handshake->publish->memory;
  auto fd = staging.duplicate_fd();
  if (!fd) return abort(fd.error());
  auto adopted = memory::shared_memory::adopt(std::move(*fd), handshake->publish->size_bytes, true);
  if (!adopted) return abort(adopted.error());
  std::optional<memory::shared_memory> writable(std::move(*adopted));
  // Leaves verified so far are served to other hosts from a read-only mapping, through a
  // read-only open of the memfd: unlike the writable one it does not keep the commit from
  // sealing the memfd and keeping it as the replica.
  unique_fd reader_fd(::open(fmt::format("/proc/self/fd/{}", staging.fd()).c_str(), O_RDONLY | O_CLOEXEC));
  if (!reader_fd) {
    return abort(error{errc::internal, fmt::format("cannot fetch {}: cannot reopen its buffer read-only: {}",
                                                   artifact_id, std::strerror(errno))});
  }
  auto reader_or = memory::shared_memory::adopt(std::move(reader_fd), handshake->publish->size_bytes, false);
  if (!reader_or) return abort(reader_or.error());
  auto reader = std::make_shared<const memory::shared_memory>(std::move(*reader_or));

  // While it pulls, this host is a source of what it has verified (fan-out as a pipeline,
  // docs/cluster.md §3.3): listed in the catalogue as soon as the manifest is verified, under
  // its lease, and served from the pull's buffer.
  std::shared_ptr<partial_artifact> partial;
  bool listed = false;
  auto unlist = [&] {
    s.server->withdraw(artifact_id);
    if (listed) (void)s.members->withdraw(artifact_id);
  };
  pull_options options = s.options.pull;
  options.manifest_verified = [&](std::span<const hash::digest> leaves) {
    partial = std::make_shared<partial_artifact>(std::vector<hash::digest>(leaves.begin(), leaves.end()),
                                                 reader->bytes().subspan(0, begun.total_size), reader);
    s.server->publish_partial(artifact_id, partial);
    noted([&](state::active_pull& p) { p.total_bytes = begun.total_size; });
    listed = true;
    // Listed as pulling; the commit's advertisement (committed() below) rewrites it complete.
    if (auto advertised = s.members->advertise(artifact_id, begun.total_size, replica_state::pulling); !advertised) {
      log(*s.options.log, log_level::info, "cluster: {}", advertised.error().message);
    }
  };
  options.leaf_verified = [&](std::uint64_t leaf) {
    if (partial) partial->mark_verified(leaf);
    const auto at = leaf * hash::leaf_bytes;
    noted([&](state::active_pull& p) { p.verified_bytes += std::min(hash::leaf_bytes, begun.total_size - at); });
  };
  options.leaf_asked = [&](std::uint64_t leaf, bool asked) {
    if (partial) partial->mark_asked(leaf, asked);
  };
  // Leaves of artifacts this host serves already (another version sharing most of its bytes)
  // are copied from there, not fetched.
  options.holds_local_leaf = [&s](const hash::digest& leaf) { return s.server->holds_leaf(leaf); };
  options.copy_local_leaf = [&s](const hash::digest& leaf, std::span<std::byte> into) {
    return s.server->copy_leaf(leaf, into);
  };
  // Hosts that start pulling it after this pull began are partial sources too.
  options.find_sources = [&s, &artifact_id, noted]() -> result<std::vector<pull_source>> {
    TENSORREG_TRY_ASSIGN(auto now_holding, s.members->holders(artifact_id));
    std::vector<pull_source> found;
    for (const auto& host : now_holding.hosts) found.push_back({host.host_id, host.transfer_address});
    noted([&](state::active_pull& p) {
      for (const auto& f : found) p.sources.insert(f.name);
    });
    return found;
  };

  std::vector<pull_source> sources;
  for (const auto& host : holders->hosts) sources.push_back({host.host_id, host.transfer_address});
  noted([&](state::active_pull& p) {
    for (const auto& from : sources) p.sources.insert(from.name);
  });
  const auto t0 = std::chrono::steady_clock::now();
  auto pulled = pull_artifact(
      artifact_id, sources,
      [&](std::uint64_t total) -> result<std::span<std::byte>> {
        if (total != begun.total_size || writable->mutable_bytes().size() < total) {
          return fail(errc::unavailable, fmt::format("cannot fetch {}: the sources say {} bytes, the catalogue {}",
                                                     artifact_id, total, begun.total_size));
        }
        return writable->mutable_bytes().subspan(0, total);
      },
      options);
  if (!pulled) {
    unlist();
    return abort(pulled.error());
  }
  writable.reset();  // the commit seals the memfd: no writable mapping of it may remain
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::vector<std::string> by_source;
  for (const auto& [name, leaves] : pulled->leaves_by_source) by_source.push_back(fmt::format("{} {}", name, leaves));
  log(*s.options.log, log_level::info,
      "cluster: pulled {} ({} bytes) in {:.3f} s ({:.2f} GiB/s), leaves by source: {}; served {} leaves to "
      "other hosts while pulling; {} not-yet answers; {} leaves copied from artifacts held here{}{}{}",
      artifact_id, pulled->total_size, seconds, static_cast<double>(pulled->total_size) / seconds / (1 << 30),
      fmt::join(by_source, ", "), partial ? partial->leaves_served() : 0, pulled->leaves_not_yet, pulled->leaves_local,
      pulled->sources_added.empty() ? std::string()
                                    : fmt::format("; sources added: {}", fmt::join(pulled->sources_added, ", ")),
      pulled->corrupt_sources.empty() ? std::string()
                                      : fmt::format("; corrupt: {}", fmt::join(pulled->corrupt_sources, "; ")),
      pulled->failed_sources.empty() ? std::string()
                                     : fmt::format("; failed: {}", fmt::join(pulled->failed_sources, "; ")));

  registration::feed_request feed;
  feed.registration_id = begun.registration_id;
  feed.payload = registration::stable_write_progress{{{0, begun.total_size}}, true};
  if (auto fed = s.engine.feed(std::move(feed)); !fed) {
    unlist();
    return abort(fed.error());
  }
  // Every leaf in the buffer matched the manifest, which folds to the id: the engine need not
  // hash it again (it still checks that the commit gives the asked id).
  registration::commit_options commit_how;
  commit_how.verified_leaf_digests = std::make_shared<const std::vector<hash::digest>>(partial->leaves());
  auto committed_or = s.engine.commit(begun.registration_id, commit_how);
  if (!committed_or) {
    unlist();
    return tl::unexpected(committed_or.error());
  }
  if (committed_or->descriptor.artifact_id != artifact_id) {
    // Cannot happen with every leaf verified; never serve it under the asked id.
    unlist();
    return fail(errc::data_loss, fmt::format("cannot fetch {}: the pulled bytes committed as {}", artifact_id,
                                             committed_or->descriptor.artifact_id));
  }
  // From now on served from the engine's replica, with the digests the pull verified (no
  // second hash), and advertised as a replica like any other.
  if (auto published = s.server->publish(artifact_id, begun.total_size, partial->leaves()); !published) {
    log(*s.options.log, log_level::warn, "cluster: {}", published.error().message);
  }
  committed(artifact_id);
  return {};
}

result<publish_status> node::publish(const std::string& artifact_id, std::uint32_t replicas, bool all,
                                     std::chrono::milliseconds timeout) {
  auto& s = *state_;
  if (identity::classify_artifact_id(artifact_id) != identity::id_kind::mi2) {
    return fail(errc::invalid_argument,
                fmt::format("cannot publish {}: only mi2 ids are pulled by members (a cgid names no content they "
                            "can check)",
                            artifact_id));
  }
  if (!all && replicas == 0) {
    return fail(errc::invalid_argument,
                fmt::format("cannot publish {}: replicas is 0 (give 1 or more, or all)", artifact_id));
  }
  auto held = s.engine.get(artifact_id);
  if (!held) {
    if (held.error().code == errc::not_found) {
      return fail(errc::not_found, fmt::format("cannot publish {}: not held here", artifact_id));
    }
    return tl::unexpected(held.error());
  }
  const auto total_size = held->descriptor.total_size;
  auto failed = [&artifact_id](const error& e) {
    return tl::unexpected(error{e.code, fmt::format("cannot publish {}: {}", artifact_id, e.message)});
  };
  auto complete_holders = [&s, &artifact_id]() -> result<std::set<std::string>> {
    TENSORREG_TRY_ASSIGN(auto listed, s.members->replicas_of(artifact_id));
    std::set<std::string> out;
    for (const auto& r : listed) {
      if (r.state == replica_state::complete) out.insert(r.host_id);
    }
    return out;
  };

  // The members pull from this host: it must advertise a complete replica first (one committed
  // a moment ago may still wait in the node's queue).
  auto holding = complete_holders();
  if (!holding) return failed(holding.error());
  if (!holding->contains(s.options.self.host_id)) {
    committed(artifact_id);
    drain();
    holding = complete_holders();
    if (!holding) return failed(holding.error());
    if (!holding->contains(s.options.self.host_id)) {
      return fail(errc::unavailable,
                  fmt::format("cannot publish {}: this host does not advertise it in the catalogue yet (the "
                              "daemon's log says why)",
                              artifact_id));
    }
  }
  auto hosts = s.members->hosts();
  if (!hosts) return failed(hosts.error());

  // The members are read again at every poll: with `all` a member that joins is asked too and
  // one that leaves is no longer waited for, and an asked member that leaves before it holds a
  // replica is replaced by another.
  publish_status out;
  std::set<std::string> members;
  std::set<std::string> asked;
  std::set<std::string> declined;
  auto follow_members = [&](const std::vector<host_record>& now_listed) -> status {
    members.clear();
    for (const auto& h : now_listed) members.insert(h.host_id);
    out.members = static_cast<std::uint32_t>(members.size());
    out.target = all ? out.members : replicas;
    out.holders.clear();
    for (const auto& id : *holding) {
      if (members.contains(id)) out.holders.push_back(id);
    }
    // An asked member whose pull failed marks its ask declined: it no longer counts toward the
    // target, and the next candidate is asked (it goes on trying, and may still hold it).
    std::vector<std::string> pending;
    for (const auto& id : asked) {
      if (members.contains(id) && !holding->contains(id) && !declined.contains(id)) pending.push_back(id);
    }
    // One request for all of them; a read that fails is tried again at the next poll.
    auto asks = pending.empty() ? result<std::vector<std::optional<wanted_replica>>>{}
                                : s.members->asks_of(pending, artifact_id);
    if (asks) {
      for (std::size_t i = 0; i < asks->size(); ++i) {
        const auto& ask = (*asks)[i];
        if (!ask || ask->declined.empty()) continue;
        declined.insert(pending[i]);
        out.declined.push_back({pending[i], ask->declined});
        log(*s.options.log, log_level::info, "cluster: publishing {}: {} cannot hold it: {}", artifact_id, pending[i],
            ask->declined);
      }
    }
    const auto still_asked = static_cast<std::size_t>(std::count_if(asked.begin(), asked.end(), [&](const auto& id) {
      return members.contains(id) && !holding->contains(id) && !declined.contains(id);
    }));
    // Hosts with room first: they are likelier to keep it.
    std::vector<host_record> candidates;
    for (const auto& h : now_listed) {
      if (!holding->contains(h.host_id) && !asked.contains(h.host_id)) candidates.push_back(h);
    }
    order_for_placement(candidates, total_size);
    std::vector<std::string> now_asked;
    for (const auto& h : candidates) {
      if (out.holders.size() + still_asked + now_asked.size() >= out.target) break;
      TENSORREG_TRY(s.members->ask(h.host_id, artifact_id, total_size));
      asked.insert(h.host_id);
      now_asked.push_back(h.host_id);
      out.asked.push_back(h.host_id);
    }
    if (!now_asked.empty()) {
      log(*s.options.log, log_level::info, "cluster: publishing {}: asked {} to hold it ({} of {} hold it)",
          artifact_id, fmt::join(now_asked, ", "), out.holders.size(), out.target);
    }
    return {};
  };
  if (auto followed = follow_members(*hosts); !followed) return failed(followed.error());

  const auto deadline = std::chrono::steady_clock::now() + timeout;
  // The catalogue is read when a replica key of the artifact changes (a watch), and every
  // publish_poll_every in any case: the members are followed at that pace, and a watch that
  // cannot be opened costs only the wait for the next read.
  replica_watch watched;
  auto ready = [&] { return out.holders.size() >= out.target || out.holders.size() >= members.size(); };
  if (!ready()) watched.start(s.members->watch_replicas(artifact_id));
  // Until the target, or until every member holds it (a target beyond the members is not
  // waited for: a commit of a should tier then answers DEGRADED at once).
  while (!ready()) {
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) break;
    {
      std::lock_guard lock(s.mutex);
      if (s.stopping) break;
    }
    watched.wait(std::min<std::chrono::steady_clock::duration>(s.options.publish_poll_every, deadline - now));
    // A read that fails (etcd away for a moment) keeps what the last one said.
    if (auto now_holding = complete_holders(); now_holding) holding = std::move(now_holding);
    if (auto now_listed = s.members->hosts(); now_listed) hosts = std::move(now_listed);
    if (auto followed = follow_members(*hosts); !followed) {
      log(*s.options.log, log_level::info, "cluster: publishing {}: {}", artifact_id, followed.error().message);
    }
  }
  out.reached = out.holders.size() >= out.target;
  return out;
}

}  // namespace tensorreg::cluster
