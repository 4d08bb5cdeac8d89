// Internal: the pause of a spin-wait loop (the CPU pool's polls, the CUDA host
// experts' poller): tells the core this thread is waiting, so a sibling
// hyperthread gets the execution units and the loop's exit costs no pipeline
// flush.
#pragma once

namespace qmoe::detail {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

}  // namespace qmoe::detail
