// tensorreg — the command-line client.
//
// Commands that need no daemon: `digest` (ids of an index file and canonical bytes) and
// `index FILES.safetensors...` (the canonical index, total_size and id of safetensors files).
// Exits non-zero with a one-line error on bad input.
#include <fmt/core.h>

#include <exception>
#include <string>
#include <vector>

#include "local_commands.hpp"

namespace {

constexpr const char* kUsage =
    "usage: tensorreg <command> [args]\n"
    "  digest --index FILE [--data FILE | --zeros N] [--raw] [--threads N]\n"
    "      print the index multihash, the data multihash and the mi2 id\n"
    "  index FILES.safetensors... [--threads N]\n"
    "      print the canonical index JSON, total_size and the mi2 id of the files\n";

}  // namespace

int main(int argc, char** argv) try {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    fmt::print(args.empty() ? stderr : stdout, "{}", kUsage);
    return args.empty() ? 2 : 0;
  }
  const std::string command = args[0];
  args.erase(args.begin());
  if (command == "digest") return tensorreg::cli::run_digest(args);
  if (command == "index") return tensorreg::cli::run_index_files(args);
  fmt::print(stderr, "tensorreg: unknown command '{}'\n{}", command, kUsage);
  return 2;
} catch (const std::exception& e) {
  fmt::print(stderr, "tensorreg: {}\n", e.what());
  return 1;
}
