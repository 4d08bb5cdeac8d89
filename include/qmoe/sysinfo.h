// qmoe/sysinfo.h — the machine's measured ceilings, to report performance against.
#pragma once

#include <cstddef>

namespace qmoe {

/// Read bandwidth in bytes/s: `threads` threads each summing their share of a
/// buffer of `bytes` (choose it far larger than the last-level cache); the best
/// of three timed passes after a warm-up pass.
double measure_read_bandwidth(int threads, std::size_t bytes = std::size_t{1} << 30);

/// float32 multiply-add rate in flop/s (2 per FMA) of `threads` threads running
/// independent FMA chains with the CPU kernels' instruction set (the one
/// Layer uses: QMOE_CPU_ISA applies) for about `seconds`.
double measure_peak_flops(int threads, double seconds = 0.3);

/// The CPU kernel table Layer uses in this process, e.g. "avx512vnni".
const char* cpu_kernel_isa();

}  // namespace qmoe
