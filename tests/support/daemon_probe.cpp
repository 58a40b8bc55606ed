#include "support/daemon_probe.hpp"

#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/identity/content_id.hpp"

namespace tensorreg::testing {

std::size_t open_fds(pid_t pid) {
  std::error_code ec;
  std::size_t n = 0;
  for (std::filesystem::directory_iterator it("/proc/" + std::to_string(pid) + "/fd", ec), end; !ec && it != end;
       it.increment(ec)) {
    ++n;
  }
  return n;
}

std::string describe_fds(pid_t pid) {
  std::error_code ec;
  std::string out;
  for (std::filesystem::directory_iterator it("/proc/" + std::to_string(pid) + "/fd", ec), end; !ec && it != end;
       it.increment(ec)) {
    std::error_code link_ec;
    const auto target = std::filesystem::read_symlink(it->path(), link_ec);
    out += it->path().filename().string() + " -> " + (link_ec ? "?" : target.string()) + "\n";
  }
  return out;
}

std::uint64_t resident_bytes(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) {
      std::istringstream fields(line.substr(6));
      std::uint64_t kib = 0;
      fields >> kib;
      return kib * 1024;
    }
  }
  return 0;
}

std::string daemon_snapshot::describe() const {
  std::ostringstream s;
  s << "fds " << fds << ", rss " << (rss_bytes >> 20) << " MiB, artifacts " << stats.artifacts << ", pending "
    << stats.pending_registrations << ", leases " << stats.leases << ", regions " << stats.regions << ", mappings "
    << stats.open_mappings << ", connections " << stats.connections << ", stable " << stable_bytes << " bytes in "
    << stable_artifacts << " artifacts";
  return s.str();
}

result<daemon_snapshot> snapshot(pid_t pid, client::connection& c) {
  daemon_snapshot s;
  TENSORREG_TRY_ASSIGN(s.stats, c.stats());
  // After GetStats, so that the connection it used (perhaps reopened) is counted in both.
  s.fds = open_fds(pid);
  s.rss_bytes = resident_bytes(pid);
  for (const auto& t : s.stats.tiers) {
    if (t.where == client::tier::stable_dram) {
      s.stable_bytes = t.bytes;
      s.stable_artifacts = t.artifacts;
    }
  }
  return s;
}

std::string leaks(const daemon_snapshot& baseline, const daemon_snapshot& now) {
  std::string out;
  auto compare = [&](const char* what, std::uint64_t before, std::uint64_t after) {
    if (before == after) return;
    if (!out.empty()) out += "; ";
    out += std::string(what) + " " + std::to_string(before) + " -> " + std::to_string(after);
  };
  compare("fds", baseline.fds, now.fds);
  compare("pending", baseline.stats.pending_registrations, now.stats.pending_registrations);
  compare("leases", baseline.stats.leases, now.stats.leases);
  compare("regions", baseline.stats.regions, now.stats.regions);
  compare("mappings", baseline.stats.open_mappings, now.stats.open_mappings);
  compare("artifacts", baseline.stats.artifacts, now.stats.artifacts);
  compare("stable bytes", baseline.stable_bytes, now.stable_bytes);
  return out;
}

result<std::string> rehash(client::connection& c, std::string_view artifact_id) {
  TENSORREG_TRY_ASSIGN(auto replica, c.get(artifact_id));
  thread_pool pool(2);
  TENSORREG_TRY_ASSIGN(auto id, identity::content_id(replica.index_json, replica.memory, &pool));
  return id.to_string();
}

bool eventually(const std::function<bool()>& done, std::chrono::milliseconds within) {
  const auto give_up = std::chrono::steady_clock::now() + within;
  for (;;) {
    if (done()) return true;
    if (std::chrono::steady_clock::now() >= give_up) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
}

}  // namespace tensorreg::testing
