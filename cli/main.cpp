// tensorreg — the command-line client.
//
// Commands that need no daemon: `digest` (ids of an index file and canonical bytes) and
// `index FILES.safetensors...` (the canonical index, total_size and id of safetensors files);
// the others talk to tensorregd (cli/daemon_commands.hpp). Every command and option is
// described in cli/command_table.hpp, which the usage, `<command> --help`, the bash completion
// (`--completion bash`) and the man page (`--man`) are printed from.
// Exits 0 on success, 1 with a one-line error when the daemon or the input refuses, 2 for usage
// errors.
#include <fmt/core.h>

#include <algorithm>
#include <exception>
#include <string>
#include <vector>

#include "command_table.hpp"
#include "daemon_commands.hpp"
#include "local_commands.hpp"
#include "progress.hpp"

int main(int argc, char** argv) try {
  namespace cli = tensorreg::cli;
  cli::mark_command_start();  // the `time` commands print is the wall time from here
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) {
    fmt::print(stderr, "{}", cli::overall_usage());
    return 2;
  }
  const std::string command = args[0];
  args.erase(args.begin());
  if (command == "--help" || command == "-h" || command == "help") {
    const auto* c = args.empty() ? nullptr : cli::find_command(args[0]);
    fmt::print("{}", c != nullptr ? cli::command_usage(*c) : cli::overall_usage());
    return 0;
  }
  if (command == "--version" || command == "version") {
    fmt::print("tensorreg {}\n", TENSORREG_VERSION);
    return 0;
  }
  if (command == "--completion") {
    if (args.size() != 1 || (args[0] != "bash" && args[0] != "zsh")) {
      fmt::print(stderr, "tensorreg: --completion takes 'bash' or 'zsh'\n");
      return 2;
    }
    fmt::print("{}", args[0] == "bash" ? cli::bash_completion() : cli::zsh_completion());
    return 0;
  }
  if (command == "--man") {
    fmt::print("{}", cli::man_page(TENSORREG_VERSION));
    return 0;
  }
  const auto* known = cli::find_command(command);
  if (known == nullptr) {
    fmt::print(stderr, "tensorreg: unknown command '{}'\n{}", command, cli::overall_usage());
    return 2;
  }
  if (std::any_of(args.begin(), args.end(), [](const std::string& a) { return a == "--help" || a == "-h"; })) {
    fmt::print("{}", cli::command_usage(*known));
    return 0;
  }
  if (command == "digest") return cli::run_digest(args);
  // `index ID` asks the daemon; `index FILES...` reads safetensors files.
  const bool index_of_id = command == "index" && std::any_of(args.begin(), args.end(), [](const std::string& a) {
                             return a.starts_with("mi2:") || a.starts_with("cgid:");
                           });
  if (command == "index" && !index_of_id) return cli::run_index_files(args);
  return cli::run_daemon_command(command, args);
} catch (const std::exception& e) {
  fmt::print(stderr, "tensorreg: {}\n", e.what());
  return 1;
}
