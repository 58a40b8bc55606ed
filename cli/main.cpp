// tensorreg — the command-line client.
//
// Commands that need no daemon: `digest` (ids of an index file and canonical bytes) and
// `index FILES.safetensors...` (the canonical index, total_size and id of safetensors files);
// the others talk to tensorregd (cli/daemon_commands.hpp).
// Exits non-zero with a one-line error on bad input.
#include <fmt/core.h>

#include <algorithm>
#include <exception>
#include <string>
#include <vector>

#include "daemon_commands.hpp"
#include "local_commands.hpp"

namespace {

constexpr const char* kUsage =
    "usage: tensorreg <command> [args]\n"
    "  digest --index FILE [--data FILE | --zeros N] [--raw] [--threads N]\n"
    "      print the index multihash, the data multihash and the mi2 id\n"
    "  index FILES.safetensors... [--threads N]\n"
    "      print the canonical index JSON, total_size and the mi2 id of the files\n"
    "daemon commands (all take --socket PATH and --json):\n"
    "  status                          the daemon's configuration\n"
    "  put FILES.safetensors... [--policy cache|warm|pinned|durable]\n"
    "                                  store the files in the daemon's stable DRAM\n"
    "  lease FILES.safetensors... [--ttl-ms N]\n"
    "                                  lease them in place from shared memory until SIGTERM\n"
    "  ls                              the artifacts the daemon holds\n"
    "  show ID                         an artifact's descriptor and tensors\n"
    "  index ID                        an artifact's canonical index JSON\n"
    "  revoke REGISTRATION_ID          drop a registration or lease\n"
    "  deregister ID                   drain and remove an artifact\n"
    "  export ID --out FILE            write an artifact as a .safetensors file\n"
    "  stats                           counters\n";

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
  // `index ID` asks the daemon; `index FILES...` reads safetensors files.
  const bool index_of_id = command == "index" && std::any_of(args.begin(), args.end(), [](const std::string& a) {
                             return a.starts_with("mi2:") || a.starts_with("cgid:");
                           });
  if (command == "index" && !index_of_id) return tensorreg::cli::run_index_files(args);
  if (tensorreg::cli::is_daemon_command(command)) return tensorreg::cli::run_daemon_command(command, args);
  fmt::print(stderr, "tensorreg: unknown command '{}'\n{}", command, kUsage);
  return 2;
} catch (const std::exception& e) {
  fmt::print(stderr, "tensorreg: {}\n", e.what());
  return 1;
}
