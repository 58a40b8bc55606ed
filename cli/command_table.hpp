// cli/command_table.hpp — every `tensorreg` command and option, described once.
//
// The one table the usage text, `tensorreg <command> --help`, the bash completion and the man
// page are generated from (cli/main.cpp; `tensorreg --completion bash|zsh`, `tensorreg --man`), so
// that they cannot disagree with each other.
//
// Thread-safety: constant data. Ownership: static storage.
#pragma once

#include <span>
#include <string>
#include <string_view>

namespace tensorreg::cli {

struct option_help {
  std::string_view name;   ///< "--socket"
  std::string_view value;  ///< "PATH"; empty for a flag
  std::string_view help;
};

struct command_help {
  std::string_view name;       ///< "put"
  std::string_view arguments;  ///< "FILES.safetensors..."
  std::string_view summary;    ///< one line
  std::span<const option_help> options;
  bool daemon = true;  ///< talks to tensorregd (takes --socket and --json)
};

/// Every command, in the order the usage lists them.
[[nodiscard]] std::span<const command_help> commands() noexcept;

/// The command named `name`, or null.
[[nodiscard]] const command_help* find_command(std::string_view name) noexcept;

/// "usage: tensorreg put FILES.safetensors... [options]" and its options, one per line.
[[nodiscard]] std::string command_usage(const command_help& c);

/// The overview `tensorreg --help` prints.
[[nodiscard]] std::string overall_usage();

/// A bash completion script for `tensorreg` (`complete -F`).
[[nodiscard]] std::string bash_completion();

/// A zsh completion function for `tensorreg` (`#compdef`; install as `_tensorreg` in $fpath).
[[nodiscard]] std::string zsh_completion();

/// The man page tensorreg(1), in roff.
[[nodiscard]] std::string man_page(std::string_view version);

}  // namespace tensorreg::cli
