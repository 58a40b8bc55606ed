// cli/local_commands.hpp — `tensorreg` commands that need no daemon: digest, index FILES.
#pragma once

#include <string>
#include <vector>

#include "tensorreg/common/error.hpp"

namespace tensorreg::cli {

/// The value after option args[i] (advancing i), or INVALID_ARGUMENT "<option> needs a value".
[[nodiscard]] result<std::string> option_value(const std::vector<std::string>& args, std::size_t& i);

/// `digest --index FILE [--data FILE | --zeros N] [--raw] [--threads N]`. Returns the exit code.
int run_digest(const std::vector<std::string>& args);

/// `index FILES.safetensors... [--threads N]`. Returns the exit code.
int run_index_files(const std::vector<std::string>& args);

}  // namespace tensorreg::cli
