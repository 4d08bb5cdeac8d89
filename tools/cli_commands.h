// The subcommands of the `qmoe` command-line tool. Each returns the exit code;
// a bad command line throws cli::UsageError (exit 2), a contract violation
// qmoe::Error (exit 1).
#pragma once

#include <string>
#include <vector>

#ifndef QMOE_CLI_VERSION
#define QMOE_CLI_VERSION "unknown"
#endif

namespace qmoe::cli {

/// `qmoe bench` / `qmoe demo`: synthesize, prepack, free raw, time, check.
int run_bench(const std::vector<std::string>& args);
/// `qmoe info`: version, CPU features, kernels chosen, hardware threads.
int run_info(const std::vector<std::string>& args);
/// `qmoe info FILE [--tensors]`: the layers, shapes, bits, blocks and bytes of a qmoe file.
int run_info_file(const std::string& path, const std::vector<std::string>& args);
/// Replaces this process by `python3 -m <module> <args>` (the interpreter
/// installed beside this tool, else python3 on PATH); returns only on failure.
int run_python(const std::string& module, const std::vector<std::string>& args);

}  // namespace qmoe::cli
