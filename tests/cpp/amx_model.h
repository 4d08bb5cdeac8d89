// A software model of the AMX-BF16 tile instructions, so that the AMX kernel's
// loops (src/cpu/kernels/amx_bf16_driver.h: the decode-ahead ring, token blocks,
// tile pairs, K tails) run and are tested on CPUs without AMX. The Xeon runs the
// real instructions through the same tests (test_bf16.cpp).
#pragma once

#include <cstdint>

#include "cpu/kernels.h"

namespace qmoe::test {

/// The kernel table's bgemm_q4 / bgemm_q8 (GemmTileBf16Fn) with modelled tiles. They
/// need AVX-512 (F/BW/VL/DQ, VNNI) and AVX-512 BF16 for the rest of the kernel: call
/// them only where amx_model_usable().
void gemm_bf16_q4_model(const cpu::PackGeometry& g, const std::uint8_t* tile, std::int64_t ntiles,
                        const std::uint16_t* x, std::int64_t ldx, std::int64_t ntok, float* y, std::int64_t ldy,
                        void* scratch);
void gemm_bf16_q8_model(const cpu::PackGeometry& g, const std::uint8_t* tile, std::int64_t ntiles,
                        const std::uint16_t* x, std::int64_t ldx, std::int64_t ntok, float* y, std::int64_t ldy,
                        void* scratch);

/// True when this CPU runs the model kernels: AVX-512 VNNI and BF16.
bool amx_model_usable();

/// The avx512vnni table with the model kernels as its bf16 set (and the amx table's threshold
/// and conversion), named avx512vnni_amx_model; null where !amx_model_usable().
const cpu::KernelConfig* amx_model_table();

}  // namespace qmoe::test
