#include "daemon_commands.hpp"

#include <fmt/core.h>
#include <fmt/ranges.h>
#include <signal.h>
#include <unistd.h>

#include <poll.h>
#include <termios.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <thread>
#include <utility>
#include <variant>

#include "cluster_commands.hpp"
#include "local_commands.hpp"
#include "progress.hpp"
#include "tensorreg/client/connection.hpp"
#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/sha256.hpp"
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
  std::optional<std::string> name;      // put --name; unset: the file name
  bool copy = false;                    ///< put --copy: the client copies, no files handed over
  std::uint32_t interval_ms = 1000;     // top
  std::uint64_t count = 0;              // top: refreshes, 0 = until stopped
  std::string out;                      ///< export's --out
  std::vector<std::string> narrows;     ///< view --narrow NAME:DIM:START:LEN
  std::vector<std::string> transposes;  ///< view --transpose NAME:D0:D1
  std::string placement = "server";     ///< view --placement
  std::string view_id;                  ///< view --view-id
  bool no_wait = false;                 ///< persist --no-wait
  std::string etcd;                     ///< cluster ls --etcd
  std::uint32_t replicas = 0;           ///< publish --replicas
  bool all = false;                     ///< publish --all
  double timeout_seconds = 60;          ///< publish --timeout, put --timeout
  bool timeout_given = false;
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
    } else if (a == "--name") {
      TENSORREG_TRY_ASSIGN(o.name, value());
    } else if (a == "--interval-ms" || a == "--count") {
      TENSORREG_TRY_ASSIGN(auto v, value());
      try {
        std::size_t used = 0;
        const auto n = std::stoull(v, &used);
        if (used != v.size() || (a == "--interval-ms" && (n == 0 || n > 3'600'000))) throw std::invalid_argument(v);
        if (a == "--count") {
          o.count = n;
        } else {
          o.interval_ms = static_cast<std::uint32_t>(n);
        }
      } catch (const std::exception&) {
        return fail(errc::invalid_argument, a + " needs a positive number, got '" + v + "'");
      }
    } else if (a == "--out") {
      TENSORREG_TRY_ASSIGN(o.out, value());
    } else if (a == "--copy") {
      o.copy = true;
    } else if (a == "--no-wait") {
      o.no_wait = true;
    } else if (a == "--etcd") {
      TENSORREG_TRY_ASSIGN(o.etcd, value());
    } else if (a == "--all") {
      o.all = true;
    } else if (a == "--replicas") {
      TENSORREG_TRY_ASSIGN(auto v, value());
      try {
        std::size_t used = 0;
        const auto n = std::stoul(v, &used);
        if (used != v.size() || n == 0 || n > 65536) throw std::invalid_argument(v);
        o.replicas = static_cast<std::uint32_t>(n);
      } catch (const std::exception&) {
        return fail(errc::invalid_argument, "--replicas needs a number from 1 to 65536, got '" + v + "'");
      }
    } else if (a == "--timeout") {
      TENSORREG_TRY_ASSIGN(auto v, value());
      try {
        std::size_t used = 0;
        const auto t = std::stod(v, &used);
        if (used != v.size() || !(t > 0) || t > 86400) throw std::invalid_argument(v);
        o.timeout_seconds = t;
        o.timeout_given = true;
      } catch (const std::exception&) {
        return fail(errc::invalid_argument, "--timeout needs seconds, more than 0 and at most 86400, got '" + v + "'");
      }
    } else if (a == "--narrow") {
      TENSORREG_TRY_ASSIGN(o.narrows.emplace_back(), value());
    } else if (a == "--transpose") {
      TENSORREG_TRY_ASSIGN(o.transposes.emplace_back(), value());
    } else if (a == "--placement") {
      TENSORREG_TRY_ASSIGN(o.placement, value());
    } else if (a == "--view-id") {
      TENSORREG_TRY_ASSIGN(o.view_id, value());
    } else if (a == "--ttl-ms") {
      TENSORREG_TRY_ASSIGN(auto v, value());
      try {
        o.ttl_ms = static_cast<std::uint32_t>(std::stoul(v));
      } catch (const std::exception&) {
        return fail(errc::invalid_argument, "--ttl-ms needs a number, got '" + v + "'");
      }
    } else if (a.starts_with("--")) {
      return fail(errc::invalid_argument, "unknown option " + a + " (tensorreg <command> --help lists them)");
    } else {
      o.positional.push_back(a);
    }
  }
  return o;
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

// A tier result's status as the commit answer names it, lower case.
std::string_view tier_status_name(registration::local_stable_status s) {
  switch (s) {
    case registration::local_stable_status::ready: return "ready";
    case registration::local_stable_status::degraded: return "degraded";
    case registration::local_stable_status::skipped: return "skipped";
    case registration::local_stable_status::unspecified: break;
  }
  return "unspecified";
}

int print_registered(const client::registered& r, const options& o, const char* verb) {
  if (o.json) {
    json j = descriptor_json(r.descriptor);
    j["existed"] = r.existed;
    j["registration_id"] = r.registration_id;
    j["seconds"] = r.begin_to_commit_seconds;
    j["wall_seconds"] = seconds_waited();
    j["evicted"] = r.evicted;
    if (r.remote_stable_tier) {
      j["remote_stable_tier"] = {{"status", std::string(tier_status_name(r.remote_stable_tier->status))},
                                 {"message", r.remote_stable_tier->message}};
    }
    fmt::print("{}\n", j.dump());
  } else {
    // The time the user waited for the command: reading, copying, the daemon's hash and commit.
    fmt::print("{} {}\n  total_size {} ({})\n  existed    {}\n  time       {:.3f} s\n", verb, r.descriptor.artifact_id,
               r.descriptor.total_size, human_bytes(r.descriptor.total_size), r.existed ? "true" : "false",
               seconds_waited());
    for (const auto& id : r.evicted) fmt::print("  evicted    {} (to make room)\n", id);
    if (r.remote_stable_tier) {
      fmt::print("  replicas   {} ({})\n", tier_status_name(r.remote_stable_tier->status),
                 r.remote_stable_tier->message);
    }
  }
  return 0;
}

std::string budget_text(std::uint64_t budget) { return budget == 0 ? std::string("unlimited") : human_bytes(budget); }

std::string uptime_text(double seconds) {
  auto s = static_cast<std::uint64_t>(seconds);
  if (s < 60) return fmt::format("{}s", s);
  if (s < 3600) return fmt::format("{}m{:02}s", s / 60, s % 60);
  if (s < 86400) return fmt::format("{}h{:02}m", s / 3600, s / 60 % 60);
  return fmt::format("{}d{:02}h", s / 86400, s / 3600 % 24);
}

int cmd_status(connection& c, const options& o) {
  auto got = c.config();
  if (!got) return fail_with(got.error());
  auto stats = c.stats();
  if (!stats) return fail_with(stats.error());
  const auto& cfg = *got;
  const auto& s = *stats;
  if (o.json) {
    fmt::print("{}\n", json{{"socket", c.socket_path()},
                            {"startup_phase", startup_phase_name(cfg.phase)},
                            {"artifact_chunk_bytes", cfg.artifact_chunk_bytes},
                            {"stable_budget_bytes", cfg.stable_budget_bytes},
                            {"stable_free_bytes", s.stable_free_bytes},
                            {"artifacts", s.artifacts},
                            {"uptime_seconds", s.uptime_seconds}}
                           .dump());
  } else {
    fmt::print("tensorregd at {}: {}\n  artifact_chunk_bytes {}\n  stable budget        {}\n", c.socket_path(),
               startup_phase_name(cfg.phase), cfg.artifact_chunk_bytes,
               cfg.stable_budget_bytes == 0 ? std::string("unlimited")
                                            : human_bytes(static_cast<std::uint64_t>(cfg.stable_budget_bytes)));
    if (s.stable_budget_bytes != 0) fmt::print("  stable free          {}\n", human_bytes(s.stable_free_bytes));
    fmt::print("  artifacts            {}\n  uptime               {}\n", s.artifacts, uptime_text(s.uptime_seconds));
  }
  return 0;
}

// Policies whose admission never evicts: their overflow is reject (store_policy.cpp).
bool never_evicts(const std::string& policy) { return policy == "warm" || policy == "pinned"; }

// "not enough room: ..." in the user's words, from the daemon's budget; nullopt when it fits
// (or when there is no budget, or the daemon cannot say).
// `index_multihash` set: an artifact with this index and size may be the same content, which
// the daemon takes without room (a join), so only its own answer can tell.
std::optional<std::string> room_problem(connection& c, const std::string& policy, std::uint64_t size,
                                        const std::string& index_multihash = {}) {
  auto stats = c.stats();
  if (!stats || stats->stable_budget_bytes == 0) return std::nullopt;
  if (!index_multihash.empty()) {
    auto list = c.list();
    if (!list) return std::nullopt;
    for (const auto& a : *list) {
      if (a.descriptor.index_multihash == index_multihash && a.descriptor.total_size == size) return std::nullopt;
    }
  }
  const auto& s = *stats;
  const std::string shown = policy.empty() ? std::string("cache") : policy;
  if (size > s.stable_budget_bytes) {
    return fmt::format(
        "not enough room: the artifact is {}, more than the daemon's whole stable budget of {}; start "
        "tensorregd with a larger --stable-bytes",
        human_bytes(size), human_bytes(s.stable_budget_bytes));
  }
  if (size > s.stable_free_bytes && never_evicts(shown)) {
    return fmt::format(
        "not enough room: {} free of {}, and '{}' does not evict; free space with `tensorreg rm` or "
        "use --policy cache",
        human_bytes(s.stable_free_bytes), human_bytes(s.stable_budget_bytes), shown);
  }
  return std::nullopt;
}

std::string default_name(const std::vector<std::string>& files) {
  std::string name = std::filesystem::path(files.front()).filename().string();
  if (files.size() > 1) name += fmt::format(" (+{} files)", files.size() - 1);
  return name;
}

int cmd_put(connection& c, const options& o) {
  if (o.positional.empty())
    return usage(
        "usage: tensorreg put FILES.safetensors... [--policy PROFILE|LEVEL:TIER[:SCOPE[:N]],...] [--name NAME] "
        "[--copy] [--timeout SECONDS]");
  auto bundle = index::safetensors_bundle::open(o.positional);
  if (!bundle) return fail_with(bundle.error());
  // Checked before the copy: a put the budget cannot take fails at once, in the user's words.
  const auto size = (*bundle)->index().total_size();
  const auto index_multihash = hash::encode_multihash(hash::sha256(std::string_view((*bundle)->index().json())));
  if (auto problem = room_problem(c, o.policy, size, index_multihash)) {
    fmt::print(stderr, "tensorreg: {}\n", *problem);
    return 1;
  }
  const std::string committing =
      fmt::format("the daemon {} {} and commits{}", o.copy ? "hashes" : "reads, copies and hashes", human_bytes(size),
                  o.policy == "durable" ? " (and writes its durable copy)" : "");
  progress shown("put " + o.name.value_or(default_name(o.positional)));
  shown.phase(o.copy ? "looking for the same content in the daemon" : "handing the files to the daemon");
  client::put_options po{o.policy, [&](std::uint64_t done, std::uint64_t total) {
                           shown.update(done, total);
                           if (done == total) shown.phase(committing);
                         }};
  po.name = o.name.value_or(default_name(o.positional));
  // The daemon reads the files itself, copying and hashing them in one pass and copying nothing
  // it holds (issue #20). With --copy, reuse_held makes a put of held content cost a hash here.
  po.hand_over_files = !o.copy;
  po.reuse_held = true;
  // At least a millisecond: 0 would mean the daemon's default.
  if (o.timeout_given) po.replica_timeout_ms = static_cast<std::uint32_t>(std::max(1.0, o.timeout_seconds * 1000));
  auto put = c.put(**bundle, po);
  shown.finish();
  if (!put) {
    // Others' uploads may have taken the room meanwhile: say it in the same words when so.
    if (put.error().code == errc::resource_exhausted) {
      if (auto problem = room_problem(c, o.policy, size)) {
        fmt::print(stderr, "tensorreg: {} ({})\n", *problem, put.error().message);
        return 1;
      }
    }
    return fail_with(put.error());
  }
  return print_registered(*put, o, "put");
}

volatile sig_atomic_t g_stop = 0;

int cmd_lease(connection& c, const options& o) {
  if (o.positional.empty()) return usage("usage: tensorreg lease FILES.safetensors... [--ttl-ms N]");
  auto bundle = index::safetensors_bundle::open(o.positional);
  if (!bundle) return fail_with(bundle.error());
  const auto size = (*bundle)->index().total_size();
  progress shown("lease " + default_name(o.positional));
  client::lease_register_options lo;
  lo.ttl_ms = o.ttl_ms;
  lo.progress = [&](std::uint64_t done, std::uint64_t total) {
    shown.update(done, total);
    if (done == total) shown.phase(fmt::format("the daemon hashes {} and commits", human_bytes(size)));
  };
  auto held = c.register_lease(**bundle, lo);
  shown.finish();
  if (!held) return fail_with(held.error());
  print_registered(held->info(), o, "leased");
  fmt::print(stderr, "tensorreg: holding the lease until SIGINT/SIGTERM\n");
  std::fflush(stdout);
  // Hold until told to stop; the lease's destructor revokes it and frees its region.
  struct sigaction sa {};
  sa.sa_handler = [](int) { g_stop = 1; };
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
  // Ask the daemon once a second whether it still holds the lease: a revoke from elsewhere, an
  // expiry or a daemon that died ends this process with a non-zero exit and the reason.
  while (g_stop == 0) {
    struct timespec second {
      1, 0
    };
    ::nanosleep(&second, nullptr);  // a signal cuts it short
    if (g_stop != 0) break;
    if (auto alive = held->check(); !alive) {
      const auto& e = alive.error();
      if (e.code == errc::unavailable) {
        fmt::print(stderr, "tensorreg: the daemon went away; the lease on {} is gone: {}\n",
                   held->info().descriptor.artifact_id, e.message);
      } else {
        fmt::print(stderr, "tensorreg: the lease {} on {} was revoked or expired: {} ({})\n",
                   held->info().registration_id, held->info().descriptor.artifact_id, e.message, errc_name(e.code));
      }
      static_cast<void>(held->release());
      return 1;
    }
  }
  static_cast<void>(held->release());
  fmt::print(stderr, "tensorreg: lease revoked\n");
  return 0;
}

// The part of an id that tells artifacts apart: for mi2 ids the data multihash without its
// common "bciq" header (artifacts of one architecture share the index hash, the first part).
std::string distinctive_part(const std::string& id) {
  if (id.starts_with("mi2:")) {
    const auto colon = id.rfind(':');
    if (colon != std::string::npos && colon > 4) {
      std::string data = id.substr(colon + 1);
      return data.starts_with("bciq") ? data.substr(4) : data;
    }
  }
  return id;
}

// What ls shows: 12 characters of the distinctive part (`show` takes any unique prefix of it).
std::string short_id(const std::string& id) {
  const auto part = distinctive_part(id);
  return part == id ? (id.size() <= 20 ? id : id.substr(0, 20)) : part.substr(0, 12);
}

std::string expiry_text(const client::assembly_status& a) {
  if (!a.expires_in) return "never";
  return fmt::format("in {:.1f} s", std::chrono::duration<double>(*a.expires_in).count());
}

std::string coverage_text(const client::assembly_status& a) {
  const double percent = a.canonical_size_bytes == 0 ? 100.0
                                                     : 100.0 * static_cast<double>(a.covered_bytes) /
                                                           static_cast<double>(a.canonical_size_bytes);
  return fmt::format("{:.1f} % of {}", percent, human_bytes(a.canonical_size_bytes));
}

// The assemblies still waiting for pieces (a sealed one is listed as its artifact).
void print_open_assemblies(const std::vector<client::assembly_status>& assemblies) {
  std::size_t open = 0;
  for (const auto& a : assemblies) {
    if (a.sealed) continue;
    if (open++ == 0) fmt::print("\n{:<60} {:>6}  {:<24} {}\n", "ASSEMBLY", "PIECES", "COVERED", "EXPIRES");
    fmt::print("{:<60} {:>6}  {:<24} {}\n", a.cgid, a.pieces, coverage_text(a), expiry_text(a));
  }
  if (open > 0) fmt::print("{} {} waiting for pieces\n", open, open == 1 ? "assembly" : "assemblies");
}

json assembly_json(const client::assembly_status& a) {
  json j = {{"cgid", a.cgid},
            {"canonical_size_bytes", a.canonical_size_bytes},
            {"covered_bytes", a.covered_bytes},
            {"pieces", a.pieces},
            {"sealed", a.sealed},
            {"artifact_id", a.artifact_id}};
  j["expires_in_ms"] = a.expires_in ? json(a.expires_in->count()) : json(nullptr);
  return j;
}

// `show cgid:…` of an assembly that has no artifact of that id: where it stands.
std::optional<int> show_assembly(connection& c, const options& o) {
  auto got = c.assemblies();
  if (!got) return fail_with(got.error());
  for (const auto& a : *got) {
    if (a.cgid != o.positional[0]) continue;
    if (o.json) {
      fmt::print("{}\n", assembly_json(a).dump());
      return 0;
    }
    fmt::print("assembly   {}\npieces     {}\ncovered    {} ({} of {} bytes)\n", a.cgid, a.pieces, coverage_text(a),
               a.covered_bytes, a.canonical_size_bytes);
    fmt::print("state      {}\nexpires    {}\n", a.sealed ? "sealed as " + a.artifact_id : "open, waiting for pieces",
               expiry_text(a));
    return 0;
  }
  return std::nullopt;
}

int cmd_ls(connection& c, const options& o) {
  auto got = c.listing();
  if (!got) return fail_with(got.error());
  const auto& list = got->artifacts;
  if (o.json) {
    json arr = json::array();
    for (const auto& a : list) {
      json tiers = json::array();
      for (auto t : a.tiers) tiers.push_back(std::string(client::tier_name(t)));
      json j = descriptor_json(a.descriptor);
      j["name"] = a.name;
      j["tiers"] = tiers;
      j["lease_count"] = a.lease_count;
      arr.push_back(j);
    }
    fmt::print("{}\n", arr.dump());
    return 0;
  }
  fmt::print("{:<12}  {:<32} {:>12} {:>7}  {}\n", "ID", "NAME", "SIZE", "LEASES", "TIERS");
  for (const auto& a : list) {
    std::string tiers;
    for (auto t : a.tiers) tiers += (tiers.empty() ? "" : ",") + std::string(client::tier_name(t));
    fmt::print("{:<12}  {:<32} {:>12} {:>7}  {}\n", short_id(a.descriptor.artifact_id), a.name.empty() ? "-" : a.name,
               human_bytes(a.descriptor.total_size), a.lease_count, tiers);
  }
  fmt::print("{} artifacts\n", list.size());
  print_open_assemblies(got->assemblies);
  return 0;
}

// The one artifact whose id starts with `text` (a whole id is its own prefix).
// Errors: NOT_FOUND (none), INVALID_ARGUMENT (several: the message lists them).
result<std::string> resolve_id(connection& c, const std::string& text, std::string_view verb) {
  TENSORREG_TRY_ASSIGN(auto list, c.list());
  std::vector<std::string> matches;
  for (const auto& a : list) {
    const auto& id = a.descriptor.artifact_id;
    if (id == text) return text;
    if (!text.empty() && (id.starts_with(text) || distinctive_part(id).starts_with(text))) matches.push_back(id);
  }
  if (matches.empty()) {
    return fail(errc::not_found,
                fmt::format("cannot {} '{}': no artifact id (or short id, as ls shows) starts with it", verb, text));
  }
  if (matches.size() > 1) {
    std::string listed;
    for (const auto& m : matches) listed += "\n  " + m;
    return fail(errc::invalid_argument, fmt::format("cannot {} '{}': the prefix is ambiguous, {} artifacts start with "
                                                    "it (give more characters):{}",
                                                    verb, text, matches.size(), listed));
  }
  return matches.front();
}

// A whole id as it is (the daemon may not hold it yet: a cluster get or publish), anything else
// as a prefix of an id the daemon lists.
result<std::string> whole_or_resolved_id(connection& c, const std::string& text, std::string_view verb) {
  if (text.starts_with("mi2:") || text.starts_with("cgid:")) return text;
  return resolve_id(c, text, verb);
}

// "w:transpose(0,1) b": each tensor with its ops, a whole tensor by its name alone.
std::string spec_text(const identity::view_spec& spec) {
  std::string out;
  for (const auto& [name, ops] : spec) {
    out += (out.empty() ? "" : " ") + name;
    for (const auto& op : ops) {
      if (const auto* n = std::get_if<identity::narrow_op>(&op)) {
        out += fmt::format(":narrow({},{},{})", n->dim, n->start, n->length);
      } else {
        const auto& t = std::get<identity::transpose_op>(op);
        out += fmt::format(":transpose({},{})", t.dim0, t.dim1);
      }
    }
  }
  return out;
}

json view_json(const client::artifact_view& v) {
  json ranges = json::array();
  for (const auto& r : v.canonical_ranges) ranges.push_back(json::array({r.offset, r.length}));
  return json{{"view_id", v.view_id},
              {"registration_kind", std::string(views::kind_name(v.kind))},
              {"placement", std::string(views::placement_name(v.place))},
              {"spec", spec_text(v.spec)},
              {"view_size", v.view_size},
              {"view_data_hash", v.view_data_hash},
              {"canonical_ranges", ranges}};
}

// The views registered on an artifact; a PIECE view is the piece that sealed its assembly
// (registration.md §7.12).
void print_views(const std::vector<client::artifact_view>& registered) {
  if (registered.empty()) return;
  fmt::print("\n{:<60} {:<9} {:>12}  {}\n", "VIEW", "KIND", "BYTES", "SPEC");
  for (const auto& v : registered) {
    const bool piece = v.kind == views::registration_kind::piece;
    fmt::print("{:<60} {:<9} {:>12}  {}\n", v.view_id, piece ? "assembly" : "canonical", v.view_size,
               spec_text(v.spec));
  }
}

int cmd_show_or_index(connection& c, const options& o, bool index_only) {
  if (o.positional.size() != 1)
    return usage(index_only ? "usage: tensorreg index ID" : "usage: tensorreg show ID-OR-PREFIX");
  auto id = resolve_id(c, o.positional[0], index_only ? "find the index of" : "show");
  if (!id && id.error().code == errc::not_found && !index_only) {
    if (auto shown = show_assembly(c, o)) return *shown;
  }
  if (!id) return fail_with(id.error());
  auto got = c.index(*id);
  if (!got) return fail_with(got.error());
  const auto& idx = *got;
  if (index_only) {
    fmt::print("{}\n", idx.index_json);
    return 0;
  }
  auto tensors = json::parse(idx.index_json, nullptr, false);
  auto listed = c.list();
  if (!listed) return fail_with(listed.error());
  std::vector<client::artifact_view> registered;
  for (const auto& a : *listed) {
    if (a.descriptor.artifact_id == *id) registered = a.views;
  }
  if (o.json) {
    json j = descriptor_json(idx.descriptor);
    j["index"] = tensors;
    j["views"] = json::array();
    for (const auto& v : registered) j["views"].push_back(view_json(v));
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
  print_views(registered);
  return 0;
}

// NAME:A:B[:C] split from the right (tensor names may hold ':'): the name and `fields` ints.
result<std::pair<std::string, std::vector<std::int64_t>>> split_op(const std::string& text, std::size_t fields,
                                                                   std::string_view option, std::string_view form) {
  std::vector<std::int64_t> values(fields);
  std::size_t end = text.size();
  for (std::size_t k = fields; k-- > 0;) {
    const auto colon = text.rfind(':', end == 0 ? 0 : end - 1);
    if (colon == std::string::npos || colon == 0 || end == 0) {
      return fail(errc::invalid_argument, fmt::format("{} takes {}, got '{}'", option, form, text));
    }
    const auto number = text.substr(colon + 1, end - colon - 1);
    try {
      std::size_t used = 0;
      values[k] = std::stoll(number, &used);
      if (used != number.size()) throw std::invalid_argument(number);
    } catch (const std::exception&) {
      return fail(errc::invalid_argument, fmt::format("{} takes {}, got '{}'", option, form, text));
    }
    end = colon;
  }
  return std::pair{text.substr(0, end), std::move(values)};
}

result<client::view_options> view_options_of(const options& o) {
  client::view_options v;
  for (const auto& n : o.narrows) {
    TENSORREG_TRY_ASSIGN(auto op, split_op(n, 3, "--narrow", "NAME:DIM:START:LEN"));
    const auto& f = op.second;
    if (f[0] < 0 || f[0] > 0xFFFFFFFF || f[2] < 0) {
      return fail(errc::invalid_argument, "--narrow takes NAME:DIM:START:LEN with DIM and LEN >= 0, got '" + n + "'");
    }
    v.spec[op.first].push_back(
        identity::narrow_op{static_cast<std::uint32_t>(f[0]), f[1], static_cast<std::uint64_t>(f[2])});
  }
  for (const auto& t : o.transposes) {
    TENSORREG_TRY_ASSIGN(auto op, split_op(t, 2, "--transpose", "NAME:D0:D1"));
    const auto& f = op.second;
    if (f[0] < 0 || f[1] < 0 || f[0] > 0xFFFFFFFF || f[1] > 0xFFFFFFFF) {
      return fail(errc::invalid_argument, "--transpose takes NAME:D0:D1 with dims >= 0, got '" + t + "'");
    }
    v.spec[op.first].push_back(
        identity::transpose_op{static_cast<std::uint32_t>(f[0]), static_cast<std::uint32_t>(f[1])});
  }
  if (o.placement == "server") {
    v.place = views::placement::server;
  } else if (o.placement == "client") {
    v.place = views::placement::client;
  } else {
    return fail(errc::invalid_argument, "--placement takes server or client, got '" + o.placement + "'");
  }
  v.view_id = o.view_id;
  return v;
}

int cmd_view(connection& c, const options& o) {
  if (o.positional.size() != 1) {
    return usage("usage: tensorreg view ID-OR-PREFIX [--narrow NAME:DIM:START:LEN] [--transpose NAME:D0:D1]...");
  }
  auto spec = view_options_of(o);
  if (!spec) return usage(spec.error().message);
  if (spec->spec.empty()) return usage("tensorreg view needs at least one --narrow or --transpose");
  auto id = resolve_id(c, o.positional[0], "register a view of");
  if (!id) return fail_with(id.error());
  auto v = c.register_view(*id, *spec);
  if (!v) return fail_with(v.error());
  std::uint64_t covered = 0;
  for (const auto& r : v->canonical_ranges) covered += r.length;
  if (o.json) {
    json ranges = json::array();
    for (const auto& r : v->canonical_ranges) ranges.push_back(json::array({r.offset, r.length}));
    json j{{"view_id", v->view_id},
           {"artifact_id", v->descriptor.artifact_id},
           {"registration_kind", std::string(views::kind_name(v->kind))},
           {"view_data_hash", v->view_data_hash},
           {"view_index", json::parse(v->view_index_json, nullptr, false)},
           {"canonical_ranges", ranges},
           {"existed", v->existed}};
    fmt::print("{}\n", j.dump());
    return 0;
  }
  fmt::print("{}\n  artifact   {}\n  data_hash  {}\n  covers     {} bytes in {} ranges\n", v->view_id,
             v->descriptor.artifact_id, v->view_data_hash, covered, v->canonical_ranges.size());
  return 0;
}

int cmd_revoke(connection& c, const options& o) {
  if (o.positional.size() != 1) return usage("usage: tensorreg revoke REGISTRATION_ID");
  auto got = c.revoke_if_held(o.positional[0], "tensorreg revoke");
  if (!got) return fail_with(got.error());
  if (!*got) {
    return fail_with(error{errc::not_found, fmt::format("cannot revoke '{}': the daemon holds no registration, lease "
                                                        "or join with this id (`tensorreg put --json` prints "
                                                        "registration ids)",
                                                        o.positional[0])});
  }
  if (o.json) {
    fmt::print("{}\n", json{{"revoked", o.positional[0]}}.dump());
  } else {
    fmt::print("revoked {}\n", o.positional[0]);
  }
  return 0;
}

int cmd_deregister(connection& c, const options& o, std::string_view name) {
  if (o.positional.size() != 1) return usage(fmt::format("usage: tensorreg {} ID-OR-PREFIX", name));
  auto id = resolve_id(c, o.positional[0], "remove");
  if (!id) return fail_with(id.error());
  auto got = c.deregister(*id, /*wait_for_drain=*/true);
  if (!got) return fail_with(got.error());
  const auto& res = *got;
  if (o.json) {
    fmt::print("{}\n", json{{"drained", res.drained}, {"removed", res.removed}}.dump());
  } else {
    fmt::print("deregistered {} (drained {}, removed {})\n", *id, res.drained, res.removed);
  }
  return 0;
}

// Writes `got` (a stable replica) as the safetensors file `out` through a temporary name,
// drawing its bytes on `shown`. Shared by export and get --out.
status write_safetensors_file(const client::stable_replica& got, const std::string& id, const std::string& out,
                              progress& shown) {
  auto idx = index::canonical_index::parse(got.index_json, got.descriptor.total_size);
  if (!idx) return tl::unexpected(with_context(std::move(idx).error(), "cannot export " + id));
  return index::export_safetensors(*idx, got.memory, out, [&](std::uint64_t done, std::uint64_t total) {
    shown.update(done, total);
    if (done == total) shown.phase("flushing " + out + " to disk");
  });
}

// The artifact's bytes as the daemon's stable replica (loaded back from --persist-dir when
// only there), written as a safetensors file through a temporary name.
int cmd_export(connection& c, const options& o) {
  if (o.positional.size() != 1 || o.out.empty()) {
    return usage("usage: tensorreg export ID-OR-PREFIX --out FILE.safetensors");
  }
  auto resolved = resolve_id(c, o.positional[0], "export");
  if (!resolved) return fail_with(resolved.error());
  const auto& id = *resolved;
  progress shown("export " + short_id(id));
  shown.phase("opening the daemon's copy");
  auto got = c.get(id);
  if (!got) {
    shown.finish();
    return fail_with(got.error());
  }
  auto written = write_safetensors_file(*got, id, o.out, shown);
  shown.finish();
  if (!written) return fail_with(written.error());
  if (o.json) {
    fmt::print("{}\n", json{{"artifact_id", id},
                            {"out", o.out},
                            {"total_size", got->descriptor.total_size},
                            {"wall_seconds", seconds_waited()}}
                           .dump());
  } else {
    fmt::print("exported {}\n  to         {}\n  time       {:.3f} s\n", id, o.out, seconds_waited());
  }
  return 0;
}

// The artifact's entry in the daemon's list, if it has one.
std::optional<client::artifact_info> listed(connection& c, const std::string& id) {
  auto list = c.list();
  if (!list) return std::nullopt;
  for (auto& a : *list) {
    if (a.descriptor.artifact_id == id) return std::move(a);
  }
  return std::nullopt;
}

bool has_tier(const client::artifact_info& a, client::tier t) {
  return std::find(a.tiers.begin(), a.tiers.end(), t) != a.tiers.end();
}

std::string tiers_text(const client::artifact_info& a) {
  std::string tiers;
  for (auto t : a.tiers) tiers += (tiers.empty() ? "" : ",") + std::string(client::tier_name(t));
  return tiers.empty() ? std::string("-") : tiers;
}

json tiers_json(const client::artifact_info& a) {
  json tiers = json::array();
  for (auto t : a.tiers) tiers.push_back(std::string(client::tier_name(t)));
  return tiers;
}

std::string persistence_state_name(persistence::task_state s) { return std::string(persistence::task_state_name(s)); }

// `persist`: StartPersistence, then (unless --no-wait) WaitPersistenceStatus in short slices so
// that the bytes written so far can be drawn on a terminal; FAILED and DEGRADED exit 1 with the
// reason (registration.md §1.6, DECISIONS §5.11).
int cmd_persist(connection& c, const options& o) {
  if (o.positional.size() != 1) return usage("usage: tensorreg persist ID-OR-PREFIX [--no-wait]");
  auto resolved = resolve_id(c, o.positional[0], "persist");
  if (!resolved) return fail_with(resolved.error());
  const auto& id = *resolved;
  const auto entry = listed(c, id);
  const std::uint64_t total = entry ? entry->descriptor.total_size : 0;
  auto task = c.start_persistence(id);
  if (!task) return fail_with(task.error());
  if (!o.no_wait) {
    progress shown("persist " + short_id(id));
    shown.phase("queued on the daemon's persistence threads");
    while (!persistence::is_terminal(task->state)) {
      auto next = c.wait_persistence(task->task_id, std::chrono::milliseconds(200));
      if (!next) {
        shown.finish();
        return fail_with(with_context(next.error(), "cannot wait for persistence task " + task->task_id));
      }
      task = std::move(next);
      if (task->state == persistence::task_state::running && total != 0) {
        const auto done = static_cast<std::uint64_t>(std::clamp(task->progress, 0.0, 1.0) * static_cast<double>(total));
        shown.update(done, total);
      }
    }
    shown.finish();
  }
  const auto& t = *task;
  const auto state = persistence_state_name(t.state);
  if (o.json) {
    json j{{"artifact_id", id},      {"task_id", t.task_id}, {"state", state},
           {"progress", t.progress}, {"total_size", total},  {"wall_seconds", seconds_waited()}};
    if (!t.degraded_reason.empty()) j["degraded_reason"] = t.degraded_reason;
    if (!t.last_error.empty()) j["last_error"] = t.last_error;
    fmt::print("{}\n", j.dump());
  } else {
    fmt::print("{} {}\n  task       {}\n  state      {}\n", o.no_wait ? "persisting" : "persisted", id, t.task_id,
               state);
    if (total != 0) fmt::print("  total_size {} ({})\n", total, human_bytes(total));
    if (auto after = listed(c, id); after && !o.no_wait) fmt::print("  tiers      {}\n", tiers_text(*after));
    fmt::print("  time       {:.3f} s\n", seconds_waited());
  }
  if (t.state == persistence::task_state::failed) {
    fmt::print(stderr, "tensorreg: persistence of {} failed: {}\n", id,
               t.last_error.empty() ? std::string("the daemon gave no reason") : t.last_error);
    return 1;
  }
  if (t.state == persistence::task_state::degraded) {
    fmt::print(stderr, "tensorreg: persistence of {} is degraded: {}\n", id,
               t.degraded_reason.empty() ? std::string("the daemon gave no reason") : t.degraded_reason);
    return 1;
  }
  return 0;
}

// The progress line of a pull of `id` the daemon reports: its hosts until the manifest is in,
// then bytes verified of the total.
void show_pull(progress& shown, const client::daemon_stats& stats, const std::string& id) {
  for (const auto& p : stats.pulls) {
    if (p.artifact_id != id) continue;
    if (p.total_bytes == 0) {
      shown.phase(fmt::format("the daemon pulls it from {}", fmt::join(p.sources, ", ")));
    } else {
      shown.update(p.verified_bytes, p.total_bytes);
    }
  }
}

// `get`/`pull`: GetArtifactMemfd makes the artifact local (the daemon restores it from its
// persist dir, or pulls it from the cluster when no copy is here; docs/cluster.md §5), then
// --out writes it as export does. A whole id is sent as it is (the daemon may not hold it yet);
// anything else is a prefix of an id the daemon lists.
int cmd_get(connection& c, const options& o, std::string_view name) {
  if (o.positional.size() != 1) return usage(fmt::format("usage: tensorreg {} ID [--out FILE.safetensors]", name));
  auto whole = whole_or_resolved_id(c, o.positional[0], "get");
  if (!whole) return fail_with(whole.error());
  const std::string id = std::move(*whole);
  const auto before = listed(c, id);
  // Where the bytes come from: the stable replica here, this daemon's persist dir, or (with
  // --cluster) the hosts that hold it; the daemon reports a pull's bytes, not a restore's.
  std::string source = "stable_dram";
  std::string waiting = "opening the daemon's copy";
  if (!before) {
    source = "cluster";
    auto cfg = c.config();
    waiting = cfg && !cfg->cluster_url.empty() ? "the daemon looks for it in the cluster and pulls it"
                                               : "asking the daemon (it is in no cluster)";
  } else if (!has_tier(*before, client::tier::stable_dram)) {
    source = has_tier(*before, client::tier::shared_disk) ? "shared_disk" : tiers_text(*before);
    waiting = "the daemon restores it from " + source;
  }
  progress shown(fmt::format("{} {}", name, short_id(id)));
  shown.phase(waiting);
  // A pull reports its bytes in GetStats (wire-format.md §14), asked on a second connection
  // while this one waits for the answer.
  std::mutex watch_mutex;
  std::condition_variable watch_stop;
  bool got_answer = false;
  std::thread watcher;
  if (source == "cluster" && shown.enabled()) {
    watcher = std::thread([&] {
      auto side = connection::connect(c.socket_path());
      if (!side) return;
      std::unique_lock lock(watch_mutex);
      while (!watch_stop.wait_for(lock, std::chrono::milliseconds(200), [&] { return got_answer; })) {
        lock.unlock();
        if (auto stats = side->stats()) show_pull(shown, *stats, id);
        lock.lock();
      }
    });
  }
  auto got = c.get(id);
  if (watcher.joinable()) {
    {
      std::lock_guard lock(watch_mutex);
      got_answer = true;
    }
    watch_stop.notify_all();
    watcher.join();
  }
  if (!got) {
    shown.finish();
    return fail_with(got.error());
  }
  if (!o.out.empty()) {
    if (auto written = write_safetensors_file(*got, id, o.out, shown); !written) {
      shown.finish();
      return fail_with(written.error());
    }
  }
  shown.finish();
  const auto after = listed(c, id);
  const std::uint64_t size = got->descriptor.total_size;
  if (o.json) {
    json j{{"artifact_id", id},
           {"total_size", size},
           {"source", source},
           {"tiers", after ? tiers_json(*after) : json::array()},
           {"wall_seconds", seconds_waited()}};
    if (!o.out.empty()) j["out"] = o.out;
    fmt::print("{}\n", j.dump());
  } else {
    fmt::print("got {}\n  total_size {} ({})\n  from       {}\n  tiers      {}\n", id, size, human_bytes(size), source,
               after ? tiers_text(*after) : std::string("-"));
    if (!o.out.empty()) fmt::print("  to         {}\n", o.out);
    fmt::print("  time       {:.3f} s\n", seconds_waited());
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
    json pulls = json::array();
    for (const auto& p : s.pulls) {
      pulls.push_back({{"artifact_id", p.artifact_id},
                       {"total_bytes", p.total_bytes},
                       {"verified_bytes", p.verified_bytes},
                       {"sources", p.sources},
                       {"seconds", p.seconds}});
    }
    fmt::print("{}\n", json{{"artifacts", s.artifacts},
                            {"pending_registrations", s.pending_registrations},
                            {"leases", s.leases},
                            {"regions", s.regions},
                            {"open_mappings", s.open_mappings},
                            {"vmm_reserved_bytes", s.vmm_reserved_bytes},
                            {"connections", s.connections},
                            {"tiers", tiers},
                            {"stable_budget_bytes", s.stable_budget_bytes},
                            {"stable_free_bytes", s.stable_free_bytes},
                            {"stable_reserved_bytes", s.stable_reserved_bytes},
                            {"populated_reserve_bytes", s.populated_reserve_bytes},
                            {"hits", s.hits},
                            {"misses", s.misses},
                            {"evictions", s.evictions},
                            {"evicted_bytes", s.evicted_bytes},
                            {"uptime_seconds", s.uptime_seconds},
                            {"requests", s.requests},
                            {"request_errors", s.request_errors},
                            {"bytes_registered", s.bytes_registered},
                            {"bytes_hashed", s.bytes_hashed},
                            {"bytes_copied", s.bytes_copied},
                            {"pulls", pulls}}
                           .dump());
    return 0;
  }
  fmt::print(
      "artifacts     {}\npending       {}\nleases        {}\nregions       {}\nopen mappings {}\nconnections   {}\n",
      s.artifacts, s.pending_registrations, s.leases, s.regions, s.open_mappings, s.connections);
  if (s.vmm_reserved_bytes != 0) fmt::print("vmm reserved  {}\n", human_bytes(s.vmm_reserved_bytes));
  for (const auto& p : s.pulls) {
    fmt::print("pulling       {}: {} of {} in {:.1f} s from {}\n", p.artifact_id, human_bytes(p.verified_bytes),
               p.total_bytes != 0 ? human_bytes(p.total_bytes) : std::string("?"), p.seconds,
               fmt::join(p.sources, ", "));
  }
  for (const auto& t : s.tiers) {
    fmt::print("tier {:<12} {:>12} in {} artifacts\n", std::string(client::tier_name(t.where)), human_bytes(t.bytes),
               t.artifacts);
  }
  fmt::print("budget        {}\n", budget_text(s.stable_budget_bytes));
  if (s.stable_budget_bytes != 0) {
    fmt::print("free          {}{}\n", human_bytes(s.stable_free_bytes),
               s.stable_reserved_bytes != 0
                   ? fmt::format(" ({} reserved by uploads)", human_bytes(s.stable_reserved_bytes))
                   : std::string());
  }
  if (s.populated_reserve_bytes != 0) {
    fmt::print("reserve       {} faulted in for the next put\n", human_bytes(s.populated_reserve_bytes));
  }
  fmt::print(
      "hits          {}\nmisses        {}\nevictions     {} ({})\nuptime        {}\nrequests      {} ({} "
      "errors)\nregistered    {}\nhashed        {}\ncopied        {}\n",
      s.hits, s.misses, s.evictions, human_bytes(s.evicted_bytes), uptime_text(s.uptime_seconds), s.requests,
      s.request_errors, human_bytes(s.bytes_registered), human_bytes(s.bytes_hashed), human_bytes(s.bytes_copied));
  return 0;
}

// `top`: the daemon's state and rates, redrawn in place on a terminal (plain frames one after
// another when piped). q or SIGINT stops it.
int cmd_top(connection& c, const options& o) {
  struct sigaction sa {};
  sa.sa_handler = [](int) { g_stop = 1; };
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
  const bool tty_out = ::isatty(STDOUT_FILENO) != 0;
  const bool tty_in = ::isatty(STDIN_FILENO) != 0;
  // Keys without Enter: the terminal's canonical mode off while top runs, restored after.
  struct termios saved {};
  const bool raw_keys = tty_in && ::tcgetattr(STDIN_FILENO, &saved) == 0;
  if (raw_keys) {
    auto keys = saved;
    keys.c_lflag &= ~static_cast<tcflag_t>(ICANON | ECHO);
    ::tcsetattr(STDIN_FILENO, TCSANOW, &keys);
    fmt::print("\x1b[?25l");  // hide the cursor
  }
  std::optional<client::daemon_stats> last;
  auto last_time = std::chrono::steady_clock::now();
  int rc = 0;
  for (std::uint64_t frame = 0; g_stop == 0 && (o.count == 0 || frame < o.count); ++frame) {
    auto stats = c.stats();
    if (!stats) {
      rc = fail_with(stats.error());
      break;
    }
    auto list = c.list();
    if (!list) {
      rc = fail_with(list.error());
      break;
    }
    const auto now = std::chrono::steady_clock::now();
    const double dt = std::chrono::duration<double>(now - last_time).count();
    auto rate = [&](std::uint64_t cur, std::uint64_t before) {
      return last && dt > 0 ? static_cast<double>(cur - std::min(cur, before)) / dt : 0.0;
    };
    const auto& s = *stats;
    std::string out = tty_out ? "\x1b[H\x1b[2J" : "";
    out += fmt::format("tensorregd at {}  up {}  {} clients  budget {}  free {}\n", c.socket_path(),
                       uptime_text(s.uptime_seconds), s.connections, budget_text(s.stable_budget_bytes),
                       s.stable_budget_bytes == 0 ? std::string("-") : human_bytes(s.stable_free_bytes));
    out += fmt::format(
        "requests {:.1f}/s  registered {}/s  hashed {}/s  hits {}  misses {}  evictions {}\n",
        rate(s.requests, last ? last->requests : 0),
        human_bytes(static_cast<std::uint64_t>(rate(s.bytes_registered, last ? last->bytes_registered : 0))),
        human_bytes(static_cast<std::uint64_t>(rate(s.bytes_hashed, last ? last->bytes_hashed : 0))), s.hits, s.misses,
        s.evictions);
    out += fmt::format("{} artifacts, {} leases, {} regions, {} pending\n\n", s.artifacts, s.leases, s.regions,
                       s.pending_registrations);
    auto artifacts = *list;
    std::sort(artifacts.begin(), artifacts.end(),
              [](const auto& a, const auto& b) { return a.descriptor.total_size > b.descriptor.total_size; });
    out += fmt::format("{:<12}  {:<32} {:>12} {:>7}  {}\n", "ID", "NAME", "SIZE", "READERS", "TIERS");
    for (const auto& a : artifacts) {
      std::string tiers;
      for (auto t : a.tiers) tiers += (tiers.empty() ? "" : ",") + std::string(client::tier_name(t));
      out += fmt::format("{:<12}  {:<32} {:>12} {:>7}  {}\n", short_id(a.descriptor.artifact_id),
                         a.name.empty() ? "-" : a.name, human_bytes(a.descriptor.total_size), a.lease_count, tiers);
    }
    if (!tty_out) out += "\n";
    fmt::print("{}", out);
    std::fflush(stdout);
    last = s;
    last_time = now;
    if (o.count != 0 && frame + 1 >= o.count) break;
    // Wait for the next frame, or a key (q quits), or a signal.
    struct pollfd in {
      STDIN_FILENO, POLLIN, 0
    };
    const int ready = ::poll(&in, tty_in ? 1 : 0, static_cast<int>(o.interval_ms));
    if (ready > 0 && (in.revents & POLLIN) != 0) {
      char key = 0;
      if (::read(STDIN_FILENO, &key, 1) == 1 && (key == 'q' || key == 'Q')) break;
    }
  }
  if (raw_keys) {
    ::tcsetattr(STDIN_FILENO, TCSANOW, &saved);
    fmt::print("\x1b[?25h");
    std::fflush(stdout);
  }
  return rc;
}

// `publish`: the daemon asks members of its cluster to hold replicas of an artifact it holds,
// and waits until they do (PublishArtifact, docs/cluster.md §5). Not reached in time: the
// answer is printed all the same, and the exit code is 1.
int cmd_publish(connection& c, const options& o) {
  if (o.positional.size() != 1 || (o.replicas == 0) == !o.all) {
    return usage("usage: tensorreg publish ID (--replicas N | --all) [--timeout SECONDS]");
  }
  auto whole = whole_or_resolved_id(c, o.positional[0], "publish");
  if (!whole) return fail_with(whole.error());
  const std::string id = std::move(*whole);
  progress shown(fmt::format("publish {}", short_id(id)));
  shown.phase(o.all ? std::string("the daemon asks every member to hold it")
                    : fmt::format("the daemon asks members until {} hold it", o.replicas));
  const auto timeout = std::chrono::milliseconds(static_cast<std::int64_t>(o.timeout_seconds * 1000 + 0.5));
  auto done = c.publish(id, o.replicas, o.all, std::max(timeout, std::chrono::milliseconds(1)));
  shown.finish();
  if (!done) return fail_with(done.error());
  if (o.json) {
    fmt::print("{}\n", json{{"artifact_id", id},
                            {"holders", done->holders},
                            {"asked", done->asked},
                            {"target", done->target},
                            {"reached", done->reached},
                            {"members", done->members},
                            {"declined", done->declined},
                            {"wall_seconds", seconds_waited()}}
                           .dump());
  } else {
    fmt::print("{} {}\n  holders  {} ({} of {})\n  asked    {}\n  time     {:.3f} s\n",
               done->reached ? "published" : "not published", id, fmt::join(done->holders, ", "), done->holders.size(),
               done->target, done->asked.empty() ? "-" : fmt::format("{}", fmt::join(done->asked, ", ")),
               seconds_waited());
    for (const auto& d : done->declined) fmt::print("  declined {}\n", d);
  }
  if (!done->reached) {
    const auto when = done->holders.size() >= done->members ? fmt::format("; the cluster has {} members", done->members)
                                                            : fmt::format(" after {} s", o.timeout_seconds);
    fmt::print(stderr, "tensorreg: cannot publish {}: {} of {} hosts hold it{} (DEADLINE_EXCEEDED)\n", id,
               done->holders.size(), done->target, when);
    return 1;
  }
  return 0;
}

// `cluster ls`: the catalogue named by --etcd, else the one the daemon joined (GetServerConfig).
int cmd_cluster(const options& o) {
  if (o.positional.size() != 1 || o.positional[0] != "ls") {
    return usage("usage: tensorreg cluster ls [--etcd etcd://HOST:PORT/PREFIX]");
  }
  std::string url = o.etcd;
  if (url.empty()) {
    auto c = connection::connect(o.socket);
    if (!c) {
      return fail_with(with_context(c.error(),
                                    "cannot find the cluster: no daemon to ask (give --etcd "
                                    "etcd://HOST:PORT/PREFIX)"));
    }
    auto cfg = c->config();
    if (!cfg) return fail_with(cfg.error());
    if (cfg->cluster_url.empty()) {
      return fail_with(error{errc::failed_precondition,
                             fmt::format("cannot list the cluster: the daemon at {} is not in one (tensorregd "
                                         "--cluster); give --etcd etcd://HOST:PORT/PREFIX",
                                         c->socket_path())});
    }
    url = cfg->cluster_url;
  }
  return cluster_ls(url, o.json);
}

const std::set<std::string>& daemon_commands() {
  static const std::set<std::string> names{"status", "put",        "lease", "ls",    "show",    "index",
                                           "revoke", "deregister", "rm",    "stats", "top",     "export",
                                           "view",   "persist",    "get",   "pull",  "cluster", "publish"};
  return names;
}

}  // namespace

bool is_daemon_command(const std::string& command) { return daemon_commands().contains(command); }

int run_daemon_command(const std::string& command, const std::vector<std::string>& args) {
  auto parsed = parse(args);
  if (!parsed) return usage(parsed.error().message);
  auto o = *parsed;
  if (o.socket.empty()) {
    // The CLI's convention for the socket: --socket, then $TENSORREG_SOCKET, then the default.
    if (const char* env = std::getenv("TENSORREG_SOCKET"); env != nullptr) o.socket = env;
  }
  if (command == "cluster") return cmd_cluster(o);
  auto c = connection::connect(o.socket);
  if (!c) return fail_with(c.error());
  if (command == "status") return cmd_status(*c, o);
  if (command == "put") return cmd_put(*c, o);
  if (command == "lease") return cmd_lease(*c, o);
  if (command == "ls") return cmd_ls(*c, o);
  if (command == "show") return cmd_show_or_index(*c, o, false);
  if (command == "index") return cmd_show_or_index(*c, o, true);
  if (command == "revoke") return cmd_revoke(*c, o);
  if (command == "deregister" || command == "rm") return cmd_deregister(*c, o, command);
  if (command == "top") return cmd_top(*c, o);
  if (command == "export") return cmd_export(*c, o);
  if (command == "view") return cmd_view(*c, o);
  if (command == "persist") return cmd_persist(*c, o);
  if (command == "get" || command == "pull") return cmd_get(*c, o, command);
  if (command == "publish") return cmd_publish(*c, o);
  return cmd_stats(*c, o);
}

}  // namespace tensorreg::cli
