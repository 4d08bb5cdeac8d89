// float32 -> bfloat16 rows (round to nearest even) with AVX-512 BF16 (no AMX instruction):
// the AMX path's activation conversion (KernelConfig::to_bf16).
#include <immintrin.h>

#include "cpu/kernels.h"

namespace qmoe::cpu {

void convert_f32_bf16__avx512bf16(const float* src, std::uint16_t* dst, std::int64_t n) {
  std::int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i))));
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm256_mask_storeu_epi16(dst + i, m,
                             reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + i))));
  }
}

}  // namespace qmoe::cpu
