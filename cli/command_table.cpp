#include "command_table.hpp"

#include <fmt/core.h>

#include <array>

namespace tensorreg::cli {
namespace {

// Every daemon command takes these; they are listed once, after each command's own.
constexpr std::array<option_help, 3> kDaemonOptions{{
    {"--socket", "PATH", "the daemon's socket (default $TENSORREG_SOCKET, else the per-user default)"},
    {"--json", "", "print JSON for scripts instead of a table"},
    {"--help", "", "print this command's usage"},
}};

constexpr std::array<option_help, 5> kDigest{{
    {"--index", "FILE", "the canonical index JSON"},
    {"--data", "FILE", "the canonical bytes"},
    {"--zeros", "N", "N zero bytes as the canonical bytes"},
    {"--raw", "", "hash the files' bytes as they are"},
    {"--threads", "N", "hashing threads"},
}};
constexpr std::array<option_help, 1> kIndex{{{"--threads", "N", "hashing threads"}}};
constexpr std::array<option_help, 4> kPut{{
    {"--policy", "PROFILE",
     "cache (evicts to make room; default), warm, pinned, durable, ha, or tiers LEVEL:TIER[:SCOPE[:N]],... "
     "(should:stable_dram:remote:2: two other hosts hold it)"},
    {"--name", "NAME", "the name `ls` shows (default: the file name)"},
    {"--copy", "", "copy the files into the daemon's memory from here instead of handing them to the daemon"},
    {"--timeout", "SECONDS",
     "how long the commit waits for the copies on other hosts that the policy asks for (default and most: the "
     "daemon's --replica-timeout-ms)"},
}};
constexpr std::array<option_help, 1> kLease{{{"--ttl-ms", "N", "lease TTL, renewed while it runs (default 600000)"}}};
constexpr std::array<option_help, 1> kExport{{{"--out", "FILE", "the .safetensors file to write (required)"}}};
constexpr std::array<option_help, 1> kPersist{{
    {"--no-wait", "", "print the task id and return at once (default: wait for the end, with progress)"},
}};
constexpr std::array<option_help, 1> kGet{{{"--out", "FILE", "also write the artifact as a .safetensors file"}}};
constexpr std::array<option_help, 1> kCluster{{
    {"--etcd", "URL", "the cluster's catalogue, etcd://HOST:PORT/PREFIX (default: the daemon's --cluster)"},
}};
constexpr std::array<option_help, 3> kPublish{{
    {"--replicas", "N", "until N members hold it, this daemon counted"},
    {"--all", "", "until every member of the cluster holds it"},
    {"--timeout", "SECONDS", "how long to wait for them (default 60); exit 1 when not reached"},
}};
constexpr std::array<option_help, 2> kTop{{
    {"--interval-ms", "N", "refresh period (default 1000)"},
    {"--count", "N", "stop after N refreshes (default: until q or SIGINT)"},
}};

constexpr std::array<option_help, 4> kView{{
    {"--narrow", "NAME:DIM:START:LEN", "narrow tensor NAME along DIM (START < 0 counts from the end); once per tensor"},
    {"--transpose", "NAME:D0:D1", "transpose dims D0 and D1 of tensor NAME; repeatable"},
    {"--placement", "WHERE", "server (send the view bytes; default) or client (send the canonical bytes)"},
    {"--view-id", "ID", "the view_id the daemon must compute (refused when it differs)"},
}};

constexpr std::array<command_help, 19> kCommands{{
    {"digest", "--index FILE [--data FILE | --zeros N]", "print the index multihash, data multihash and mi2 id",
     kDigest, false},
    {"index", "FILES.safetensors... | ID",
     "the canonical index of files (no daemon), or of an artifact the daemon holds", kIndex, false},
    {"status", "", "the daemon's configuration, budget, free space and uptime", {}},
    {"put", "FILES.safetensors...", "store the files in the daemon's stable DRAM", kPut},
    {"lease", "FILES.safetensors...", "lease them in place from shared memory until SIGINT/SIGTERM", kLease},
    {"ls",
     "",
     "the artifacts the daemon holds: short id, name, size, leases, tiers; then the assemblies waiting for pieces",
     {}},
    {"show",
     "ID-OR-PREFIX",
     "an artifact's descriptor, tensors and views (a unique prefix of its id or of its short id); for the cgid of "
     "an assembly, its pieces, coverage and expiry",
     {}},
    {"view", "ID-OR-PREFIX",
     "register a view of an artifact (every tensor not narrowed or transposed is taken whole); print its view_id",
     kView},
    {"revoke", "REGISTRATION_ID", "drop a registration or lease (NOT_FOUND when there is none)", {}},
    {"deregister", "ID-OR-PREFIX", "drain and remove an artifact", {}},
    {"rm", "ID-OR-PREFIX", "the same as deregister", {}},
    {"stats", "", "budget, free, hits, misses, evictions, uptime and request counts", {}},
    {"top", "", "a live view of the artifacts and rates, refreshed in place (q quits)", kTop},
    {"export", "ID-OR-PREFIX", "write an artifact as a .safetensors file", kExport},
    {"persist", "ID-OR-PREFIX",
     "write an artifact to the daemon's --persist-dir and wait for it (progress on a terminal)", kPersist},
    {"get", "ID", "make an artifact local: restored from the persist dir or pulled from the cluster when not held",
     kGet},
    {"pull", "ID", "the same as get", kGet},
    {"publish", "ID", "ask members of the daemon's cluster to hold replicas of an artifact it holds, and wait",
     kPublish},
    {"cluster", "ls", "the cluster's hosts: transfer address, capacity, lease health and what each holds", kCluster},
}};

std::string option_line(const option_help& o) {
  const std::string left = o.value.empty() ? std::string(o.name) : fmt::format("{} {}", o.name, o.value);
  return fmt::format("  {:<18} {}\n", left, o.help);
}

// roff: a leading dot or quote would start a request; backslashes and dashes are escaped.
std::string roff(std::string_view text) {
  std::string out;
  for (char c : text) {
    if (c == '\\') {
      out += "\\e";
    } else if (c == '-') {
      out += "\\-";
    } else {
      out += c;
    }
  }
  if (!out.empty() && (out[0] == '.' || out[0] == '\'')) out.insert(0, "\\&");
  return out;
}

}  // namespace

std::span<const command_help> commands() noexcept { return kCommands; }

const command_help* find_command(std::string_view name) noexcept {
  for (const auto& c : kCommands) {
    if (c.name == name) return &c;
  }
  return nullptr;
}

std::string command_usage(const command_help& c) {
  std::string out = fmt::format("usage: tensorreg {}{}{} [options]\n  {}\n", c.name, c.arguments.empty() ? "" : " ",
                                c.arguments, c.summary);
  if (!c.options.empty() || c.daemon) out += "options:\n";
  for (const auto& o : c.options) out += option_line(o);
  if (c.daemon) {
    for (const auto& o : kDaemonOptions) out += option_line(o);
  } else {
    out += option_line(kDaemonOptions[2]);
  }
  return out;
}

std::string overall_usage() {
  std::string out = "usage: tensorreg <command> [args] (tensorreg <command> --help for its options)\n";
  for (const auto& c : kCommands) {
    const std::string left = fmt::format("{}{}{}", c.name, c.arguments.empty() ? "" : " ", c.arguments);
    out += fmt::format("  {:<46} {}\n", left, c.summary);
  }
  out += "daemon commands take --socket PATH (or $TENSORREG_SOCKET) and --json\n";
  out += "  --version                                      print the version\n";
  return out;
}

std::string bash_completion() {
  std::string names;
  for (const auto& c : kCommands) names += fmt::format("{}{}", names.empty() ? "" : " ", c.name);
  std::string cases;
  for (const auto& c : kCommands) {
    std::string opts;
    for (const auto& o : c.options) opts += fmt::format("{} ", o.name);
    if (c.daemon) {
      for (const auto& o : kDaemonOptions) opts += fmt::format("{} ", o.name);
    } else {
      opts += "--help";
    }
    cases += fmt::format("    {}) opts=\"{}\" ;;\n", c.name, opts);
  }
  return fmt::format(
      "# bash completion for tensorreg (generated by `tensorreg --completion bash`)\n"
      "_tensorreg() {{\n"
      "  local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} opts\n"
      "  if [ \"$COMP_CWORD\" -eq 1 ]; then\n"
      "    COMPREPLY=($(compgen -W \"{} --help --version\" -- \"$cur\"))\n"
      "    return\n"
      "  fi\n"
      "  case \"$prev\" in\n"
      "    --socket|--index|--data) COMPREPLY=($(compgen -f -- \"$cur\")); return ;;\n"
      "    --policy) COMPREPLY=($(compgen -W \"cache warm pinned durable\" -- \"$cur\")); return ;;\n"
      "  esac\n"
      "  case \"${{COMP_WORDS[1]}}\" in\n"
      "{}"
      "    *) opts=\"\" ;;\n"
      "  esac\n"
      "  if [[ \"$cur\" == -* ]]; then\n"
      "    COMPREPLY=($(compgen -W \"$opts\" -- \"$cur\"))\n"
      "  else\n"
      "    COMPREPLY=($(compgen -f -- \"$cur\"))\n"
      "  fi\n"
      "}}\n"
      "complete -F _tensorreg tensorreg\n",
      names, cases);
}

namespace {

// Text inside a single-quoted zsh word: ' closes it, and _arguments / _describe give ':' and
// the brackets a meaning of their own.
std::string zsh_text(std::string_view text) {
  std::string out;
  for (char c : text) {
    if (c == '\'') {
      out += "'\\''";
    } else if (c == ':' || c == '[' || c == ']') {
      out += '\\';
      out += c;
    } else {
      out += c;
    }
  }
  return out;
}

std::string zsh_option(const option_help& o) {
  std::string action;
  if (o.name == "--policy") {
    action = ":profile:(cache warm pinned durable)";
  } else if (o.value == "PATH" || o.value == "FILE") {
    action = fmt::format(":{}:_files", o.value);
  } else if (!o.value.empty()) {
    action = fmt::format(":{}: ", o.value);
  }
  return fmt::format("'{}[{}]{}'", o.name, zsh_text(o.help), action);
}

}  // namespace

std::string zsh_completion() {
  std::string described;
  for (const auto& c : kCommands) described += fmt::format("    '{}:{}'\n", c.name, zsh_text(c.summary));
  std::string cases;
  for (const auto& c : kCommands) {
    std::string args;
    for (const auto& o : c.options) args += " " + zsh_option(o);
    if (c.daemon) {
      for (const auto& o : kDaemonOptions) args += " " + zsh_option(o);
    } else {
      args += " " + zsh_option(kDaemonOptions[2]);
    }
    cases += fmt::format("    {}) _arguments{} '*:file:_files' ;;\n", c.name, args);
  }
  return fmt::format(
      "#compdef tensorreg\n"
      "# zsh completion for tensorreg (generated by `tensorreg --completion zsh`)\n"
      "_tensorreg() {{\n"
      "  local -a commands\n"
      "  commands=(\n{}  )\n"
      "  if (( CURRENT == 2 )); then\n"
      "    _describe 'command' commands\n"
      "    return\n"
      "  fi\n"
      "  shift words\n"
      "  (( CURRENT-- ))\n"
      "  case $words[1] in\n"
      "{}"
      "  esac\n"
      "}}\n"
      "_tensorreg \"$@\"\n",
      described, cases);
}

std::string man_page(std::string_view version) {
  std::string out = fmt::format(
      ".TH TENSORREG 1 \"\" \"tensorreg {}\" \"User Commands\"\n"
      ".SH NAME\ntensorreg \\- register and share model weights with tensorregd\n"
      ".SH SYNOPSIS\n.B tensorreg\n.I command\n[\\fIargs\\fR] [\\fIoptions\\fR]\n"
      ".SH DESCRIPTION\nCommands that talk to the daemon take \\fB\\-\\-socket\\fR \\fIPATH\\fR (default "
      "\\fB$TENSORREG_SOCKET\\fR) and \\fB\\-\\-json\\fR.\n"
      ".SH COMMANDS\n",
      roff(version));
  for (const auto& c : kCommands) {
    out += fmt::format(".TP\n\\fB{}\\fR {}\n{}\n", roff(c.name), roff(c.arguments), roff(c.summary));
    for (const auto& o : c.options) {
      out += fmt::format(".RS\n.TP\n\\fB{}\\fR {}\n{}\n.RE\n", roff(o.name), roff(o.value), roff(o.help));
    }
  }
  out += ".SH ENVIRONMENT\n.TP\n.B TENSORREG_SOCKET\nthe daemon's socket when \\fB\\-\\-socket\\fR is not given\n";
  out += ".SH EXIT STATUS\n0 on success, 1 when the daemon or the input refuses, 2 for usage errors.\n";
  out += ".SH SEE ALSO\n.BR tensorregd (8)\n";
  return out;
}

}  // namespace tensorreg::cli
