// Leases of one layout churned through a real tensorregd (#17): weight-sync producers re-register
// the same layout every version (the daemon's layout cache finds it) while consumers read the
// versions, other clients lease and release bytes of that layout, and raw clients begin and feed
// registrations of it and hang up mid-Feed, all at once. The daemon must answer everyone
// throughout, refuse only what a racing revoke or expiry explains, and hold nothing afterwards
// but the versions the producers keep. First include is the weight-sync client, the component
// most of the load goes through.
#include "tensorreg/client/weight_sync.hpp"

#include <catch2/catch.hpp>

#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "client/wire_convert.hpp"
#include "daemon/unix_socket.hpp"
#include "support/daemon_process.hpp"
#include "support/raw_wire.hpp"
#include "support/safetensors_writer.hpp"
#include "support/temp_dir.hpp"

namespace {

using namespace tensorreg;
using client::connection;
using testing::daemon_process;
namespace wc = client::wire_convert;

// Every bundle has this layout; only the bytes differ with the seed.
std::unique_ptr<index::safetensors_bundle> bundle_of(const testing::temp_dir& dir, std::uint32_t seed) {
  const auto path = dir.path() / ("churn-" + std::to_string(seed) + ".safetensors");
  testing::write_safetensors(path, {{"w", "F32", {4096}, testing::pattern_bytes(16384, seed)},
                                    {"b", "BF16", {3}, testing::pattern_bytes(6, seed + 1)},
                                    {"v", "F32", {33}, testing::pattern_bytes(132, seed + 2)}});
  return index::safetensors_bundle::open({path.string()}).value();
}

// What the workers saw, as "<what>: <CODE>: <message>" lines, checked on the main thread.
struct churn_failures {
  std::mutex mutex;
  std::vector<std::string> lines;
  std::atomic<std::size_t> done{0};
  void add(const std::string& what, const error& e) {
    std::lock_guard lock(mutex);
    lines.push_back(what + ": " + std::string(errc_name(e.code)) + ": " + e.message);
  }
};

// A registration of `bundle`'s layout over a fresh region on a raw socket, hung up mid-Feed:
// Begin (TTL 1 s), RegisterRegion, one Feed frame without end_of_stream, UnregisterRegion
// (forced) sent right behind it, then the socket closes without reading the last answers.
void hang_up_mid_feed(const std::string& socket, const index::safetensors_bundle& bundle, std::uint64_t round,
                      churn_failures& failures) {
  auto fd = daemon::connect_unix(socket);
  if (!fd) {
    failures.add("raw connect", fd.error());
    return;
  }
  const auto& idx = bundle.index();
  const auto pid = static_cast<std::int32_t>(::getpid());
  wc::region_args region_args;
  region_args.host_shared = true;
  region_args.owner_pid = pid;
  region_args.size_bytes = idx.total_size();
  auto region_request = wc::register_region_request(region_args);
  region_request.set_request_id(1);
  auto region_answer = testing::exchange(fd->get(), testing::framed(region_request));
  if (!region_answer || region_answer->status().code() != 0) {
    failures.add("raw region", error{errc::internal, region_answer ? region_answer->status().message() : "closed"});
    return;
  }
  const auto region = wc::region_of(*region_answer);

  wc::begin_args begin;
  begin.plan = wc::begin_plan::lease_in_place;
  begin.device_id = -1;
  begin.total_size = idx.total_size();
  begin.ttl_ms = 1000;
  begin.owner_pid = pid;
  auto begin_request = wc::begin_request(begin);
  begin_request.set_request_id(2);
  auto begun = testing::exchange(fd->get(), testing::framed(begin_request));
  if (!begun || begun->status().code() != 0) {
    failures.add("raw begin", error{errc::internal, begun ? begun->status().message() : "closed"});
    return;
  }
  const auto feed = wc::whole_region_lease_feed(wc::registration_id_of(*begun), idx, region);
  wc::wire::Request frame;
  frame.set_request_id(3);
  *frame.mutable_feed_register_artifact_stream() = wc::feed_frame(feed);
  auto unregister = wc::unregister_region_request(region.region_id, pid);
  unregister.set_request_id(4);
  unregister.mutable_unregister_region()->set_force(round % 2 == 0);
  // Sent and not waited for: the daemon handles them while (or after) this client is gone.
  const std::string bytes = testing::framed(frame) + testing::framed(unregister);
  if (::send(fd->get(), bytes.data(), bytes.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(bytes.size())) {
    failures.add("raw feed", error{errc::unavailable, "cannot send"});
  }
}

}  // namespace

TEST_CASE("tensorregd: one lease layout churned by producers, readers, leases and hang-ups stays sound",
          "[daemon][e2e][weight_sync][concurrency]") {
  // More workers than this machine has cores: as many requests at once as a large host runs.
  daemon_process d({"--workers", "32"});
  testing::temp_dir dir;
  constexpr int producers = 3, leasers = 3, hang_ups = 2, versions = 12;
  std::vector<std::unique_ptr<index::safetensors_bundle>> bundles;
  for (std::uint32_t i = 0; i < 8; ++i) bundles.push_back(bundle_of(dir, 10 * i + 1));
  // Each leaser leases bytes of its own: two leases of equal bytes are one mi2 id, leased once.
  std::vector<std::vector<std::unique_ptr<index::safetensors_bundle>>> own(leasers);
  for (std::uint32_t l = 0; l < leasers; ++l) {
    for (std::uint32_t j = 0; j < 4; ++j) own[l].push_back(bundle_of(dir, 1000 + 10 * (4 * l + j)));
  }
  churn_failures failures;
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;

  for (int p = 0; p < producers; ++p) {
    threads.emplace_back([&, p] {
      auto conn = connection::connect(d.socket_path());
      if (!conn) return failures.add("producer connect", conn.error());
      client::weight_sync_options o;
      o.keep_versions = 1;
      o.ttl_ms = 0;
      auto producer = client::weight_sync_producer::create(std::move(*conn), "churn" + std::to_string(p), o);
      if (!producer) return failures.add("producer", producer.error());
      for (int k = 0; k < versions; ++k) {
        auto v = producer->publish(*bundles[static_cast<std::size_t>((p + k) % bundles.size())]);
        if (!v) {
          failures.add("publish", v.error());
          continue;
        }
        if (k % 3 == 0) {
          if (auto h = producer->wait_hashed(); !h) failures.add("wait_hashed", h.error());
        }
      }
      if (auto h = producer->wait_hashed(); !h) failures.add("wait_hashed", h.error());
      // Left running: the kept version stays until the producer goes.
      failures.done.fetch_add(1);
      while (!stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    });
  }
  for (int c = 0; c < producers; ++c) {
    threads.emplace_back([&, c] {
      auto conn = connection::connect(d.socket_path());
      if (!conn) return failures.add("consumer connect", conn.error());
      auto consumer = client::weight_sync_consumer::create(std::move(*conn), "churn" + std::to_string(c));
      auto reader = connection::connect(d.socket_path());
      if (!consumer || !reader) return failures.add("consumer", error{errc::unavailable, "cannot connect"});
      while (!stop.load()) {
        auto latest = consumer->latest();
        if (!latest) {
          failures.add("latest", latest.error());
          continue;
        }
        if (!*latest) continue;
        // The version may be revoked by its producer at any point from here on.
        if (auto idx = reader->index((*latest)->cgid); !idx && idx.error().code != errc::not_found) {
          failures.add("index", idx.error());
        }
        (void)reader->list();
        (void)consumer->wait_verified(**latest, std::chrono::milliseconds(20));
      }
    });
  }
  for (int l = 0; l < leasers; ++l) {
    threads.emplace_back([&, l] {
      auto conn = connection::connect(d.socket_path());
      if (!conn) return failures.add("leaser connect", conn.error());
      for (int k = 0; k < versions; ++k) {
        auto held = conn->register_lease(*own[static_cast<std::size_t>(l)][static_cast<std::size_t>(k % 4)], 30'000);
        if (!held) {
          failures.add("lease", held.error());
          continue;
        }
        (void)conn->list();
        (void)conn->stats();
        if (auto r = held->release(); !r) failures.add("lease release", r.error());
      }
      failures.done.fetch_add(1);
    });
  }
  for (int h = 0; h < hang_ups; ++h) {
    threads.emplace_back([&, h] {
      for (std::uint64_t round = 0; round < static_cast<std::uint64_t>(versions); ++round) {
        hang_up_mid_feed(d.socket_path(), *bundles[(h + round) % bundles.size()], round, failures);
      }
      failures.done.fetch_add(1);
    });
  }
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (failures.done.load() < static_cast<std::size_t>(producers + leasers + hang_ups) &&
         std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  auto probe = connection::connect(d.socket_path());
  REQUIRE(probe);
  // The hung-up registrations expire (TTL 1 s, swept every 0.5 s) and their regions go with the
  // unregister (forced) or stay registered to this process (not forced, referenced then).
  std::optional<client::daemon_stats> s;
  const auto settle = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  do {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    auto got = probe->stats();
    REQUIRE(got);
    s = *got;
  } while (s->pending_registrations != 0 && std::chrono::steady_clock::now() < settle);
  CHECK(s->pending_registrations == 0);
  CHECK(s->leases == static_cast<std::uint64_t>(producers));  // each producer's kept version
  stop.store(true);
  for (auto& t : threads) t.join();

  std::lock_guard lock(failures.mutex);
  for (const auto& line : failures.lines) {
    INFO(line);
    CHECK(false);  // no call here fails for a reason the churn explains away
  }
  CHECK(failures.done.load() == static_cast<std::size_t>(producers + leasers + hang_ups));
  // The daemon is still whole: it answers, and stops cleanly.
  CHECK(probe->stats());
  CHECK(d.stop() == 0);
}
