#include "daemon_commands.hpp"

#include <fmt/core.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <nlohmann/json.hpp>
#include <set>

#include "local_commands.hpp"
#include "tensorreg/client/connection.hpp"
#include "tensorreg/index/safetensors_bundle.hpp"
#include "tensorreg/index/safetensors_export.hpp"

namespace tensorreg::cli {
namespace {

using client::connection;
using json = nlohmann::ordered_json;

struct options {
  std::string socket;
  bool json = false;
  std::string policy;
  std::uint32_t ttl_ms = 600'000;
  std::string out;  ///< export's --out
  std::vector<std::string> positional;
};

int fail_with(const error& e) {
  fmt::print(stderr, "tensorreg: {} ({})\n", e.message, errc_name(e.code));
  return 1;
}

int usage(const std::string& message) {
  fmt::print(stderr, "tensorreg: {}\n", message);
  return 2;
}

result<options> parse(const std::vector<std::string>& args) {
  options o;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const auto& a = args[i];
    auto value = [&] { return option_value(args, i); };
    if (a == "--json") {
      o.json = true;
    } else if (a == "--socket") {
      TENSORREG_TRY_ASSIGN(o.socket, value());
    } else if (a == "--policy") {
      TENSORREG_TRY_ASSIGN(o.policy, value());
    } else if (a == "--out") {
      TENSORREG_TRY_ASSIGN(o.out, value());
    } else if (a == "--ttl-ms") {
      TENSORREG_TRY_ASSIGN(auto v, value());
      try {
        o.ttl_ms = static_cast<std::uint32_t>(std::stoul(v));
      } catch (const std::exception&) {
        return fail(errc::invalid_argument, "--ttl-ms needs a number, got '" + v + "'");
      }
    } else if (a.starts_with("--")) {
      return fail(errc::invalid_argument, "unknown option " + a);
    } else {
      o.positional.push_back(a);
    }
  }
  return o;
}

std::string human_bytes(std::uint64_t n) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(n);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  return u == 0 ? fmt::format("{} B", n) : fmt::format("{:.1f} {}", v, units[u]);
}

// The wire's enum names, as the CLI has always printed them.
std::string wire_kind_name(identity::id_kind k) { return "ARTIFACT_ID_KIND_" + std::string(identity::id_kind_name(k)); }

std::string startup_phase_name(client::startup_phase p) {
  switch (p) {
    case client::startup_phase::listening: return "DAEMON_STARTUP_PHASE_LISTENING";
    case client::startup_phase::ready: return "DAEMON_STARTUP_PHASE_READY";
    case client::startup_phase::failed: return "DAEMON_STARTUP_PHASE_FAILED";
    case client::startup_phase::unspecified: break;
  }
  return "DAEMON_STARTUP_PHASE_UNSPECIFIED";
}

json descriptor_json(const client::artifact_descriptor& d) {
  return json{{"artifact_id", d.artifact_id},
              {"index_multihash", d.index_multihash},
              {"data_multihash", d.data_multihash},
              {"total_size", d.total_size},
              {"id_kind", wire_kind_name(d.id_kind)}};
}

// A progress bar on a terminal, nothing otherwise.
struct progress_bar {
  bool enabled = ::isatty(STDERR_FILENO) != 0;
  int last = -1;
  void operator()(std::uint64_t done, std::uint64_t total) {
    if (!enabled || total == 0) return;
    const int pct = static_cast<int>(done * 100 / total);
    if (pct == last) return;
    last = pct;
    const int width = 40;
    const int filled = pct * width / 100;
    fmt::print(stderr, "\r[{}{}] {:3}% {}", std::string(static_cast<std::size_t>(filled), '#'),
               std::string(static_cast<std::size_t>(width - filled), ' '), pct, human_bytes(done));
    if (done == total) fmt::print(stderr, "\n");
  }
};

int print_registered(const client::registered& r, const options& o, const char* verb) {
  if (o.json) {
    json j = descriptor_json(r.descriptor);
    j["existed"] = r.existed;
    j["registration_id"] = r.registration_id;
    j["seconds"] = r.begin_to_commit_seconds;
    fmt::print("{}\n", j.dump());
  } else {
    fmt::print("{} {}\n  total_size {} ({})\n  existed    {}\n  time       {:.3f} s\n", verb, r.descriptor.artifact_id,
               r.descriptor.total_size, human_bytes(r.descriptor.total_size), r.existed ? "true" : "false",
               r.begin_to_commit_seconds);
  }
  return 0;
}

int cmd_status(connection& c, const options& o) {
  auto got = c.config();
  if (!got) return fail_with(got.error());
  const auto& cfg = *got;
  if (o.json) {
    fmt::print("{}\n", json{{"socket", c.socket_path()},
                            {"startup_phase", startup_phase_name(cfg.phase)},
                            {"artifact_chunk_bytes", cfg.artifact_chunk_bytes},
                            {"stable_budget_bytes", cfg.stable_budget_bytes}}
                           .dump());
  } else {
    fmt::print("tensorregd at {}: {}\n  artifact_chunk_bytes {}\n  stable budget        {}\n", c.socket_path(),
               startup_phase_name(cfg.phase), cfg.artifact_chunk_bytes,
               cfg.stable_budget_bytes == 0 ? std::string("unlimited")
                                            : human_bytes(static_cast<std::uint64_t>(cfg.stable_budget_bytes)));
  }
  return 0;
}

int cmd_put(connection& c, const options& o) {
  if (o.positional.empty())
    return usage("usage: tensorreg put FILES.safetensors... [--policy cache|warm|pinned|durable]");
  auto bundle = index::safetensors_bundle::open(o.positional);
  if (!bundle) return fail_with(bundle.error());
  progress_bar bar;
  auto put = c.put(**bundle, {o.policy, [&](std::uint64_t done, std::uint64_t total) { bar(done, total); }});
  if (!put) return fail_with(put.error());
  return print_registered(*put, o, "put");
}

volatile sig_atomic_t g_stop = 0;

int cmd_lease(connection& c, const options& o) {
  if (o.positional.empty()) return usage("usage: tensorreg lease FILES.safetensors... [--ttl-ms N]");
  auto bundle = index::safetensors_bundle::open(o.positional);
  if (!bundle) return fail_with(bundle.error());
  auto held = c.register_lease(**bundle, o.ttl_ms);
  if (!held) return fail_with(held.error());
  print_registered(held->info(), o, "leased");
  fmt::print(stderr, "tensorreg: holding the lease until SIGINT/SIGTERM\n");
  std::fflush(stdout);
  // Hold until told to stop; the lease's destructor revokes it and frees its region.
  struct sigaction sa {};
  sa.sa_handler = [](int) { g_stop = 1; };
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
  while (g_stop == 0) ::pause();
  static_cast<void>(held->release());
  fmt::print(stderr, "tensorreg: lease revoked\n");
  return 0;
}

int cmd_ls(connection& c, const options& o) {
  auto got = c.list();
  if (!got) return fail_with(got.error());
  const auto& list = *got;
  if (o.json) {
    json arr = json::array();
    for (const auto& a : list) {
      json tiers = json::array();
      for (auto t : a.tiers) tiers.push_back(std::string(client::tier_name(t)));
      json j = descriptor_json(a.descriptor);
      j["tiers"] = tiers;
      j["lease_count"] = a.lease_count;
      arr.push_back(j);
    }
    fmt::print("{}\n", arr.dump());
    return 0;
  }
  fmt::print("{:<119} {:>12} {:>7}  {}\n", "ARTIFACT", "SIZE", "LEASES", "TIERS");
  for (const auto& a : list) {
    std::string tiers;
    for (auto t : a.tiers) tiers += (tiers.empty() ? "" : ",") + std::string(client::tier_name(t));
    fmt::print("{:<119} {:>12} {:>7}  {}\n", a.descriptor.artifact_id, human_bytes(a.descriptor.total_size),
               a.lease_count, tiers);
  }
  fmt::print("{} artifacts\n", list.size());
  return 0;
}

int cmd_show_or_index(connection& c, const options& o, bool index_only) {
  if (o.positional.size() != 1) return usage(index_only ? "usage: tensorreg index ID" : "usage: tensorreg show ID");
  auto got = c.index(o.positional[0]);
  if (!got) return fail_with(got.error());
  const auto& idx = *got;
  if (index_only) {
    fmt::print("{}\n", idx.index_json);
    return 0;
  }
  auto tensors = json::parse(idx.index_json, nullptr, false);
  if (o.json) {
    json j = descriptor_json(idx.descriptor);
    j["index"] = tensors;
    fmt::print("{}\n", j.dump());
    return 0;
  }
  const auto& d = idx.descriptor;
  fmt::print("artifact   {}\nkind       {}\ntotal_size {} ({})\nindex      {}\ndata       {}\n", d.artifact_id,
             wire_kind_name(d.id_kind), d.total_size, human_bytes(d.total_size), d.index_multihash, d.data_multihash);
  if (tensors.is_object()) {
    fmt::print("\n{:<48} {:>12} {:>12}  {:<20} {}\n", "TENSOR", "OFFSET", "BYTES", "DTYPE", "SHAPE");
    for (const auto& [name, e] : tensors.items()) {
      fmt::print("{:<48} {:>12} {:>12}  {:<20} {}\n", name, e[0].get<std::uint64_t>(), e[1].get<std::uint64_t>(),
                 e[4].get<std::string>(), e[2].dump());
    }
  }
  return 0;
}

int cmd_revoke(connection& c, const options& o) {
  if (o.positional.size() != 1) return usage("usage: tensorreg revoke REGISTRATION_ID");
  auto got = c.revoke(o.positional[0], "tensorreg revoke");
  if (!got) return fail_with(got.error());
  if (o.json) {
    fmt::print("{}\n", json{{"revoked", o.positional[0]}}.dump());
  } else {
    fmt::print("revoked {}\n", o.positional[0]);
  }
  return 0;
}

int cmd_deregister(connection& c, const options& o) {
  if (o.positional.size() != 1) return usage("usage: tensorreg deregister ID");
  auto got = c.deregister(o.positional[0], /*wait_for_drain=*/true);
  if (!got) return fail_with(got.error());
  const auto& res = *got;
  if (o.json) {
    fmt::print("{}\n", json{{"drained", res.drained}, {"removed", res.removed}}.dump());
  } else {
    fmt::print("deregistered {} (drained {}, removed {})\n", o.positional[0], res.drained, res.removed);
  }
  return 0;
}

// The artifact's bytes as the daemon's stable replica (loaded back from --persist-dir when
// only there), written as a safetensors file through a temporary name.
int cmd_export(connection& c, const options& o) {
  if (o.positional.size() != 1 || o.out.empty()) return usage("usage: tensorreg export ID --out FILE.safetensors");
  const auto& id = o.positional[0];
  auto got = c.get(id);
  if (!got) return fail_with(got.error());
  auto idx = index::canonical_index::parse(got->index_json, got->descriptor.total_size);
  if (!idx) return fail_with(with_context(std::move(idx).error(), "cannot export " + id));
  if (auto done = index::export_safetensors(*idx, got->memory, o.out); !done) return fail_with(done.error());
  if (o.json) {
    fmt::print("{}\n", json{{"artifact_id", id}, {"out", o.out}, {"total_size", got->descriptor.total_size}}.dump());
  } else {
    fmt::print("exported {}\n  to         {}\n", id, o.out);
  }
  return 0;
}

int cmd_stats(connection& c, const options& o) {
  auto got = c.stats();
  if (!got) return fail_with(got.error());
  const auto& s = *got;
  if (o.json) {
    json tiers = json::object();
    for (const auto& t : s.tiers)
      tiers[std::string(client::tier_name(t.where))] = {{"bytes", t.bytes}, {"artifacts", t.artifacts}};
    fmt::print("{}\n", json{{"artifacts", s.artifacts},
                            {"pending_registrations", s.pending_registrations},
                            {"leases", s.leases},
                            {"regions", s.regions},
                            {"open_mappings", s.open_mappings},
                            {"vmm_reserved_bytes", s.vmm_reserved_bytes},
                            {"connections", s.connections},
                            {"tiers", tiers}}
                           .dump());
    return 0;
  }
  fmt::print(
      "artifacts     {}\npending       {}\nleases        {}\nregions       {}\nopen mappings {}\nconnections   {}\n",
      s.artifacts, s.pending_registrations, s.leases, s.regions, s.open_mappings, s.connections);
  if (s.vmm_reserved_bytes != 0) fmt::print("vmm reserved  {}\n", human_bytes(s.vmm_reserved_bytes));
  for (const auto& t : s.tiers) {
    fmt::print("tier {:<12} {:>12} in {} artifacts\n", std::string(client::tier_name(t.where)), human_bytes(t.bytes),
               t.artifacts);
  }
  return 0;
}

const std::set<std::string>& daemon_commands() {
  static const std::set<std::string> names{"status", "put",    "lease",      "ls",    "show",
                                           "index",  "revoke", "deregister", "stats", "export"};
  return names;
}

}  // namespace

bool is_daemon_command(const std::string& command) { return daemon_commands().contains(command); }

int run_daemon_command(const std::string& command, const std::vector<std::string>& args) {
  auto parsed = parse(args);
  if (!parsed) return usage(parsed.error().message);
  const auto& o = *parsed;
  auto c = connection::connect(o.socket);
  if (!c) return fail_with(c.error());
  if (command == "status") return cmd_status(*c, o);
  if (command == "put") return cmd_put(*c, o);
  if (command == "lease") return cmd_lease(*c, o);
  if (command == "ls") return cmd_ls(*c, o);
  if (command == "show") return cmd_show_or_index(*c, o, false);
  if (command == "index") return cmd_show_or_index(*c, o, true);
  if (command == "revoke") return cmd_revoke(*c, o);
  if (command == "deregister") return cmd_deregister(*c, o);
  if (command == "export") return cmd_export(*c, o);
  return cmd_stats(*c, o);
}

}  // namespace tensorreg::cli
