// The AMX-BF16 loop switch (amx_loop.h). Baseline flags: callable on any CPU.
#include "cpu/kernels/amx_loop.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "core/check.h"

namespace qmoe::cpu::amx {

namespace {
constexpr Loop kLoops[] = {Loop::current, Loop::panel, Loop::panel_k2, Loop::panel_k8};
std::atomic<int> g_loop{-1};  // -1: QMOE_AMX_LOOP not read yet
}  // namespace

const char* loop_name(Loop l) {
  switch (l) {
    case Loop::current: return "current";
    case Loop::panel: return "new";
    case Loop::panel_k2: return "new-k2";
    case Loop::panel_k8: return "new-k8";
  }
  return "?";
}

Loop parse_loop(const char* value) {
  if (!value || !*value) return Loop::current;
  for (Loop l : kLoops)
    if (std::strcmp(value, loop_name(l)) == 0) return l;
  detail::fail("QMOE_AMX_LOOP: unknown value '", value, "' (allowed: current, new, new-k2, new-k8)");
}

Loop loop() {
  int v = g_loop.load(std::memory_order_relaxed);
  if (v < 0) {
    int fresh = static_cast<int>(parse_loop(std::getenv("QMOE_AMX_LOOP")));
    // The first reader (or set_loop) wins; every thread then sees the same loop.
    v = g_loop.compare_exchange_strong(v, fresh, std::memory_order_relaxed) ? fresh : v;
  }
  return static_cast<Loop>(v);
}

void set_loop(Loop l) { g_loop.store(static_cast<int>(l), std::memory_order_relaxed); }

}  // namespace qmoe::cpu::amx
