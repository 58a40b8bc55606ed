#include "tensorreg/client/connection.hpp"

#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <random>
#include <stop_token>
#include <thread>

#include "client/access.hpp"
#include "client/wire_convert.hpp"
#include "tensorreg/policy/store_policy.hpp"

namespace tensorreg::client {

held_regions::held_regions(std::shared_ptr<raw::connection> r, std::vector<std::string> i) noexcept
    : raw(std::move(r)), ids(std::move(i)) {}

held_regions::~held_regions() { release_regions(*raw, ids); }

struct lease::state {
  std::shared_ptr<raw::connection> raw;
  registered info;
  std::shared_ptr<const held_regions> regions;  // shared with the leases republished from this one
  std::shared_ptr<void> keep;
  std::atomic<std::uint64_t> keepalives{0};
  std::atomic<std::uint64_t> epoch{0};  // KeepAlive epochs, shared by the keeper and check()
  std::uint32_t ttl_ms = 0;
  bool released = false;
  std::jthread keeper;  // last: stopped and joined before the rest goes

  void stop_keeper() noexcept {
    if (keeper.joinable()) {
      keeper.request_stop();
      keeper.join();
    }
  }
};

lease::lease(std::unique_ptr<state> s) noexcept : state_(std::move(s)) {}
lease::lease(lease&&) noexcept = default;

lease& lease::operator=(lease&& other) noexcept {
  if (this != &other) {
    static_cast<void>(release());
    state_ = std::move(other.state_);
  }
  return *this;
}

lease::~lease() { static_cast<void>(release()); }

const registered& lease::info() const noexcept { return state_->info; }
std::uint64_t lease::keepalives_sent() const noexcept { return state_->keepalives.load(); }
const std::vector<std::string>& lease::region_ids() const noexcept {
  static const std::vector<std::string> none;
  return state_->regions ? state_->regions->ids : none;
}

status lease::check() {
  if (!state_ || state_->released) {
    return fail(errc::failed_precondition, "cannot check the lease: it was released by its holder");
  }
  const registration::keep_alive_request k{state_->info.registration_id, state_->ttl_ms, ++state_->epoch,
                                           static_cast<std::int32_t>(::getpid())};
  TENSORREG_TRY(state_->raw->call(wire_convert::keep_alive_request(k)));
  return {};
}

void release_regions(raw::connection& raw, const std::vector<std::string>& region_ids) noexcept {
  for (const auto& id : region_ids) {
    static_cast<void>(raw.call(wire_convert::unregister_region_request(id, ::getpid())));
  }
}

status lease::release() {
  if (!state_ || state_->released) return {};
  state_->released = true;
  state_->stop_keeper();
  auto revoked =
      state_->raw->call(wire_convert::revoke_request(state_->info.registration_id, "lease released by its holder"));
  state_->regions.reset();  // unregistered here unless a lease republished from this one reads them
  state_->keep.reset();
  if (!revoked) return tl::unexpected(revoked.error());
  return {};
}

lease lease_access::make(std::shared_ptr<raw::connection> raw, registered info, std::vector<std::string> region_ids,
                         std::shared_ptr<void> keep, std::uint32_t ttl_ms) {
  auto regions = std::make_shared<const held_regions>(raw, std::move(region_ids));
  return make(std::move(raw), std::move(info), std::move(regions), std::move(keep), ttl_ms);
}

lease lease_access::make(std::shared_ptr<raw::connection> raw, registered info,
                         std::shared_ptr<const held_regions> regions, std::shared_ptr<void> keep,
                         std::uint32_t ttl_ms) {
  auto s = std::make_unique<lease::state>();
  s->raw = std::move(raw);
  s->info = std::move(info);
  s->regions = std::move(regions);
  s->keep = std::move(keep);
  s->ttl_ms = ttl_ms;
  if (ttl_ms != 0) {
    // registration.md §10: every max(1 s, ttl/2), ±10 % jitter, the epoch counting up.
    const auto interval = std::max(std::chrono::milliseconds(1000), std::chrono::milliseconds(ttl_ms / 2));
    lease::state* st = s.get();  // lives in a unique_ptr: stable across moves of the lease
    s->keeper = std::jthread([st, interval, ttl_ms](std::stop_token stop) {
      std::mt19937_64 rng(std::random_device{}());
      std::uniform_real_distribution<double> jitter(0.9, 1.1);
      std::mutex m;
      std::condition_variable_any cv;
      for (;;) {
        const auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(interval * jitter(rng));
        std::unique_lock lock(m);
        if (cv.wait_for(lock, stop, wait, [] { return false; })) return;
        if (stop.stop_requested()) return;
        const registration::keep_alive_request k{st->info.registration_id, ttl_ms, ++st->epoch,
                                                 static_cast<std::int32_t>(::getpid())};
        if (st->raw->call(wire_convert::keep_alive_request(k))) st->keepalives.fetch_add(1);
      }
    });
  }
  return lease(std::move(s));
}

// ---- republish ---------------------------------------------------------------------------------

void lease_access::ended_by_daemon(lease& l) noexcept {
  if (!l.state_ || l.state_->released) return;
  l.state_->released = true;
  l.state_->stop_keeper();
  l.state_->regions.reset();
  l.state_->keep.reset();
}

result<lease> connection::republish(lease& previous, const republish_options& options) {
  const auto* s = lease_access::state_of(previous);
  if (s == nullptr || s->released) {
    return fail(errc::failed_precondition, "cannot republish lease" +
                                               (s == nullptr ? std::string() : " '" + s->info.registration_id + "'") +
                                               ": it was released by its holder");
  }
  const auto started = std::chrono::steady_clock::now();
  wire_convert::republish_args args;
  args.previous_registration_id = s->info.registration_id;
  args.client_artifact_id = options.client_artifact_id;
  args.owner_pid = static_cast<std::int32_t>(::getpid());
  args.ttl_ms = options.ttl_ms;
  if (!options.profile.empty()) {
    TENSORREG_TRY_ASSIGN(args.policy, policy::parse_policy(options.profile));
  }
  args.hash_in_background = options.hash_in_background;
  args.revoke_previous = options.revoke_previous;
  TENSORREG_TRY_ASSIGN(auto reply, raw_->call(wire_convert::republish_request(args)));
  auto answer = wire_convert::republish_of(reply.response);
  registered info{answer.commit.descriptor, answer.commit.existed, answer.registration_id,
                  std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count(),
                  answer.commit.evicted};
  info.hash = answer.commit.hash;
  info.remote_stable_tier = answer.commit.remote_stable_tier;
  // The new lease reads the previous one's memory: it shares its regions and what it keeps.
  auto next = lease_access::make(raw_, std::move(info), s->regions, s->keep, options.ttl_ms);
  if (answer.revoked_previous) lease_access::ended_by_daemon(previous);  // no Revoke of its own
  return next;
}

}  // namespace tensorreg::client
