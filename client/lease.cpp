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

namespace tensorreg::client {

struct lease::state {
  std::shared_ptr<raw::connection> raw;
  registered info;
  std::vector<std::string> region_ids;
  std::shared_ptr<void> keep;
  std::atomic<std::uint64_t> keepalives{0};
  std::atomic<std::uint64_t> epoch{0};  // KeepAlive epochs, shared by the keeper and check()
  std::uint32_t ttl_ms = 0;
  bool released = false;
  std::jthread keeper;  // last: stopped and joined before the rest goes
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
const std::vector<std::string>& lease::region_ids() const noexcept { return state_->region_ids; }

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
  if (state_->keeper.joinable()) {
    state_->keeper.request_stop();
    state_->keeper.join();
  }
  auto revoked =
      state_->raw->call(wire_convert::revoke_request(state_->info.registration_id, "lease released by its holder"));
  release_regions(*state_->raw, state_->region_ids);
  state_->keep.reset();
  if (!revoked) return tl::unexpected(revoked.error());
  return {};
}

lease lease_access::make(std::shared_ptr<raw::connection> raw, registered info, std::vector<std::string> region_ids,
                         std::shared_ptr<void> keep, std::uint32_t ttl_ms) {
  auto s = std::make_unique<lease::state>();
  s->raw = std::move(raw);
  s->info = std::move(info);
  s->region_ids = std::move(region_ids);
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

}  // namespace tensorreg::client
