// Internal: the CUDA kernel table. Every GEMM variant the forward pass can run,
// with its block geometry (gemm.h), the average tokens per expert it serves,
// the architecture it needs, its FC2 K-split target and its launch function.
// The forward pass (moe.cu) chooses from this table and nowhere else.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "cuda/gemm.h"
#include "qmoe/layer.h"

namespace qmoe::cuda {

using GemmLaunchFn = void (*)(const GemmProblem& p, DType dtype, int mt, std::int64_t tile_capacity,
                              cudaStream_t stream);

struct GemmVariant {
  const char* name;  ///< "decode", "mma.sync" or "wgmma"
  int mt;            ///< token tile height / 8, passed to `launch`
  GemmGeometry geometry;
  /// Serves calls whose average tokens per expert is at most this (the last
  /// mma.sync row takes any count). The wgmma row: see min_avg_tokens.
  double max_avg_tokens;
  /// wgmma only: where `automatic` switches to it (tokens per expert, inclusive).
  double min_avg_tokens;
  /// Compute capability this variant needs: at least min_cc; exactly_cc when not 0
  /// (and, for wgmma, a build with the sm_90a kernel: wgmma_available()).
  int min_cc, exactly_cc;
  /// FC2: blocks per SM to aim for when choosing the K split.
  int blocks_per_sm;
  GemmLaunchFn launch;
  /// accuracy_level 4: the tokens enter as int8 codes (act8.h; GemmProblem::act_meta).
  bool int8_tokens = false;
};

/// wgmma_threshold()'s "never": no token count reaches it.
inline constexpr double kNoWgmma = std::numeric_limits<double>::infinity();

/// The GEMM choice a Layer makes once at creation, from LayerOptions::cuda_gemm
/// and the device: the average tokens per expert from which the wgmma row runs
/// (infinity: never). Throws when wgmma is forced where it cannot run.
double wgmma_threshold(CudaGemm gemm, int cc);

/// The variant for a pass with `avg` tokens per expert on average; `int8_tokens`
/// (accuracy_level 4 where wgmma_act8_available and act8_fits): the int8-token wgmma
/// kernel wherever wgmma runs.
const GemmVariant& pick_gemm(double avg, double wgmma_from, bool int8_tokens = false);

/// FC2's K splits for a pass: when the row blocks and the experts hit cannot
/// fill the GPU with `v.blocks_per_sm` blocks per SM, K is split (into at most
/// 16 pieces of whole kKAlign columns (kAct8Block for int8 tokens: a split starts on an
/// activation block), and no more than the workspace's `chunk / tokens` copies of the
/// partials hold).
struct KSplit {
  int splits;
  std::int64_t split_cols;
};
KSplit fc2_k_split(const GemmVariant& v, const GpuGeometry& g2, std::int64_t pairs, std::int64_t experts, int sms,
                   std::int64_t chunk, std::int64_t tokens);

}  // namespace qmoe::cuda
