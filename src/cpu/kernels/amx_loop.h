// Internal: which loop the AMX-BF16 kernels (accuracy_level 3) run, and the
// scratch they need. Declarations only: this header is included both by
// baseline-compiled code (moe.cpp, tests) and by the *__amx.cpp kernels, so it
// holds no inline code that could be compiled with AMX flags and then called
// on a CPU without them. The definitions are in amx_loop.cpp (baseline flags).
#pragma once

#include <cstdint>

namespace qmoe::cpu::amx {

/// The AMX-BF16 inner loops, kept side by side while the panel loop is measured
/// against the current one on an AMX machine (amx_bf16_driver.h describes both).
enum class Loop : int {
  current = 0,  ///< QMOE_AMX_LOOP=current (default): one B tile per K step for up to 6 token blocks; pairs above 96 tokens
  panel = 1,    ///< QMOE_AMX_LOOP=new: B panel of 4 row tiles x 4 K steps decoded once, 2x2 tile blocks over it
  panel_k2 = 2, ///< QMOE_AMX_LOOP=new-k2: the same with 2 K steps per panel
  panel_k8 = 3, ///< QMOE_AMX_LOOP=new-k8: the same with 8 K steps per panel
};

/// The value QMOE_AMX_LOOP takes for `l` ("current", "new", "new-k2", "new-k8").
const char* loop_name(Loop l);

/// Parses a QMOE_AMX_LOOP value; null or empty means `current`. Anything else
/// throws qmoe::Error naming the variable, the value and the allowed values.
Loop parse_loop(const char* value);

/// The loop in use: QMOE_AMX_LOOP, read once per process (throws as parse_loop
/// does), unless set_loop chose one first.
Loop loop();

/// Chooses the loop for the whole process (tests run every loop through it).
void set_loop(Loop l);

/// Bytes of scratch a GemmTileBf16Fn call needs (any alignment: the kernel
/// rounds the pointer up to 64 bytes): the panel loop's B panel (4 row tiles x
/// up to 8 K steps x 1 KiB) and its float32 C tiles (6 token blocks x 4 row
/// tiles x 1 KiB), plus the alignment slack.
constexpr std::int64_t kScratchBytes = (4 * 8 + 6 * 4) * 1024 + 64;

}  // namespace qmoe::cpu::amx
