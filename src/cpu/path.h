// Internal: the middle of a CPU chunk, FC1 (+bias, activation) and FC2 of every plan row,
// behind one interface with one implementation per arithmetic, chosen once per layer:
// float32 (path_f32.cpp), int8 activations (path_int8.cpp), bf16 on AMX (path_amx.cpp).
//
// The chunk (CpuMoe::run_chunk, moe.cpp) is plan -> gather -> FC1 -> FC2 -> combine. A
// path does the three middle steps for every row of the plan; the helpers below are the
// parts they share: the work partition, the float32 row gather and the FC1 epilogue loop.
//
// Work items are (expert x run of consecutive row tiles), about 8 per thread, handed out
// dynamically (for_each_run), so that each item streams one contiguous run of an expert's
// weights (short runs that hop between experts leave the hardware prefetchers cold) and one
// decode token still spreads over every thread. Determinism: every output element has one
// producer, and a kernel's order of operations depends on the expert's token count only, so
// the bits never depend on the thread count or on scheduling.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu/epilogue.h"
#include "cpu/kernels.h"
#include "cpu/packed.h"
#include "cpu/plan.h"
#include "cpu/quant_act.h"
#include "cpu/thread_pool.h"

namespace qmoe::cpu {

/// The packed layer the paths read (CpuMoe builds it once).
struct PackedLayer {
  PackedMatrix fc1, fc2;
  std::vector<float> bias1, bias2;  // per expert, in packed row order, padded to whole tiles
  Fc1Epilogue epilogue;             // FC1's bias is added by the epilogue too
  bool gated = false;               // swiglu: FC1 tiles hold interleaved gate/up rows
  std::int64_t hidden = 0, inter = 0;
};

/// Per-call working memory, kept between calls (CpuMoe's free list): fresh multi-megabyte
/// buffers every call cost page faults that dominated prefill (notably under gVisor).
struct Workspace {
  std::vector<float> xbuf, lbuf, mbuf, obuf;  // float32 copies of half-precision inputs / output
  std::vector<float> xg, act, y2;             // float32 FC1 inputs, FC2 inputs, FC2 outputs
  std::vector<std::uint16_t> xb1, xb2;        // bf16 FC1 and FC2 inputs (AMX path), blocked
  std::vector<std::int64_t> boff;             // first blocked row of each expert (AMX path)
  QuantRowsBuffer qbuf;                       // int8 activations (accuracy_level 4)
  std::vector<std::vector<float>> scratch;    // per thread: kernel scratch, FC1 outputs, path scratch
};

/// The start of v's storage rounded up to 64 bytes (grow() leaves the slack). Vector storage
/// is only 16-byte aligned, and rows that straddle cache lines cost kernels (AMX tile rows,
/// 64-byte vector stores) twice the L1 accesses.
template <class T>
T* aligned64(std::vector<T>& v) {
  const std::uintptr_t skip = (64 - reinterpret_cast<std::uintptr_t>(v.data()) % 64) % 64;
  return reinterpret_cast<T*>(reinterpret_cast<std::uint8_t*>(v.data()) + skip);
}

/// Grows v to hold n elements from a 64-byte boundary and returns that start; contents are
/// unspecified (callers write what they read).
template <class T>
T* grow(std::vector<T>& v, std::int64_t n) {
  constexpr std::int64_t kSlack = 64 / sizeof(T);
  if (v.size() < static_cast<std::size_t>(n + kSlack)) v.resize(static_cast<std::size_t>(n + kSlack));
  return aligned64(v);
}

/// FC1 kernel calls cover up to this many consecutive tiles; their outputs (rows of
/// kFc1Tiles * NR floats) sit in the thread's scratch until the epilogue.
inline constexpr std::int64_t kFc1Tiles = 4;

/// One chunk as every path sees it: the plan, the layer, the float32 row buffers and the
/// per-thread scratch. run_chunk sizes the buffers; the paths fill them.
struct Chunk {
  const Plan& plan;
  const PackedLayer& layer;
  ThreadPool& pool;
  Workspace& ws;
  const KernelConfig& kc;
  // float32 rows of the plan: FC1 inputs (hp = FC1's padded K columns), FC2 inputs (ip), and
  // FC2 outputs (y2, set before FC2; pad2 = FC2's rows padded to whole tiles).
  float* xg = nullptr;
  float* act = nullptr;
  float* y2 = nullptr;
  std::int64_t hp = 0, ip = 0, pad1 = 0, pad2 = 0;
  // Per-thread scratch: the float kernels' scratch | FC1 outputs (ybuf_floats) | the path's own.
  std::int64_t ybuf_floats = 0, scratch_need = 0;

  /// Thread `tid`'s scratch (64-byte aligned).
  float* scratch(int tid) const { return grow(ws.scratch[tid], scratch_need); }
  /// Where thread `tid`'s FC1 kernel calls write (rows of kFc1Tiles * NR floats).
  float* fc1_out(int tid) const { return scratch(tid) + kc.f32.scratch_floats; }
  /// The path's own part of thread `tid`'s scratch.
  float* path_scratch(int tid) const { return scratch(tid) + kc.f32.scratch_floats + ybuf_floats; }
};

/// The FC1 and FC2 of every plan row in one arithmetic. Implementations are immutable and
/// shared by concurrent calls; per-call state lives in the Chunk and its Workspace.
class ExpertPath {
 public:
  virtual ~ExpertPath() = default;
  /// Appended to the backend's name: "", " int8-activations" or " bf16-amx".
  virtual const char* label() const = 0;
  /// Floats of per-thread scratch the path needs beyond the float kernels' and FC1's outputs.
  virtual std::int64_t path_scratch_floats() const { return 0; }
  /// Gathers the chunk's rows from x (the chunk's inputs, [T, H]): each plan row's FC1 input,
  /// zero-padded to the packed width (kernels read whole code groups), and zeroes the
  /// padding columns of its FC2 input. The default: every row in float32 (gather_f32_row).
  virtual void gather(Chunk& c, const float* x) const;
  /// FC1's inputs in the form its kernels read (int8: quantized), after the gather.
  virtual void fc1_inputs(Chunk&) const {}
  /// FC1 + bias + activation: FC2's inputs.
  virtual void fc1(Chunk& c) const = 0;
  /// FC2's inputs in the form its kernels read, after FC1.
  virtual void fc2_inputs(Chunk&) const {}
  /// FC2: row r of c.y2 = FC2 of row r's FC2 input (bias and routing weight come in the combine).
  virtual void fc2(Chunk& c) const = 0;
};

/// The path of accuracy_level `level` on table `kc` for `bits`-bit weights: 4 -> int8
/// activations, 3 with AMX kernels -> bf16, else float32.
std::unique_ptr<ExpertPath> make_expert_path(const KernelConfig& kc, int bits, int level);
std::unique_ptr<ExpertPath> make_f32_path(const KernelConfig& kc, int bits);
std::unique_ptr<ExpertPath> make_int8_path(const KernelConfig& kc, int bits);
std::unique_ptr<ExpertPath> make_amx_path(const KernelConfig& kc, int bits);

// ---- helpers the paths share

/// Calls fn(r) for every plan row r, in parallel (32 rows per item).
template <class Fn>
void for_each_row(const Chunk& c, Fn&& fn) {
  const std::int64_t nrows = c.plan.rows, per = 32, items = (nrows + per - 1) / per;
  c.pool.parallel_for(items, [&](std::int64_t item, int) {
    for (std::int64_t r = item * per; r < std::min(nrows, (item + 1) * per); ++r) fn(r);
  });
}

/// The float32 gather of plan row r: its token's x row into xg, zero-padded to hp columns,
/// and its FC2 input's padding columns [I, ip) zeroed.
inline void gather_f32_row(const Chunk& c, const float* x, std::int64_t r) {
  const std::int64_t h = c.layer.hidden, in = c.layer.inter, hp = c.hp, ip = c.ip;
  std::memcpy(c.xg + r * hp, x + c.plan.row_token[r] * h, static_cast<std::size_t>(h) * 4);
  std::fill(c.xg + r * hp + h, c.xg + (r + 1) * hp, 0.f);
  std::fill(c.act + r * ip + in, c.act + (r + 1) * ip, 0.f);
}

inline void ExpertPath::gather(Chunk& c, const float* x) const {
  for_each_row(c, [&](std::int64_t r) { gather_f32_row(c, x, r); });
}

/// Calls fn(e, tile, n, tid) for every kernel call of the tiles [0, tiles) of every active
/// expert e, in parallel: work items are runs of consecutive tiles of one expert, about 8 per
/// thread, and a call takes up to max_tiles(e) tiles of its item's run.
template <class MaxTiles, class Fn>
void for_each_run(const Chunk& c, std::int64_t tiles, MaxTiles&& max_tiles, Fn&& fn) {
  const std::vector<int>& active = c.plan.active;
  const std::int64_t target_items = 8 * static_cast<std::int64_t>(c.pool.size());
  const std::int64_t per = std::max<std::int64_t>(1, static_cast<std::int64_t>(active.size()) * tiles / target_items);
  const std::int64_t groups = (tiles + per - 1) / per;
  c.pool.parallel_for(static_cast<std::int64_t>(active.size()) * groups, [&](std::int64_t item, int tid) {
    const int e = active[item / groups];
    const std::int64_t end = std::min(tiles, (item % groups + 1) * per);
    for (std::int64_t tile = (item % groups) * per, n = 0; tile < end; tile += n) {
      n = std::min(end - tile, max_tiles(e));
      fn(e, tile, n, tid);
    }
  });
}

/// The FC1 epilogue of the n tiles from `tile` of expert e, whose kernel outputs are at y
/// (row stride ldy, tile j at y + j * NR): bias + activation into FC2's input rows, tile j's
/// outputs [first, first + outs) to dst(first) (outs = NR, or NR / 2 gated).
template <class Dst>
void fc1_epilogues(const Chunk& c, int e, std::int64_t tile, std::int64_t n, const float* y, std::int64_t ldy,
                   Dst&& dst) {
  constexpr int nr = kTileRows;
  const PackedLayer& l = c.layer;
  for (std::int64_t j = 0; j < n; ++j) {
    const std::int64_t outs = l.gated ? nr / 2 : nr, first = (tile + j) * outs;
    fc1_epilogue(l.epilogue, y + j * nr, ldy, c.plan.count[e], &l.bias1[e * c.pad1 + (tile + j) * nr], dst(first),
                 static_cast<int>(std::min<std::int64_t>(outs, l.inter - first)));
  }
}

/// The float32 kernel call of `m`'s tiles [tile, tile + n) of expert e on plan rows xf
/// (ldf floats apart): the float32 path, and the AMX path's experts with few tokens.
inline void gemm_f32(const Chunk& c, GemmTileFn gemm, const PackedMatrix& m, int e, std::int64_t tile, std::int64_t n,
                     const float* xf, std::int64_t ldf, float* y, std::int64_t ldy, int tid) {
  gemm(m.geometry(), m.tile(e, tile), n, xf + c.plan.offset[e] * ldf, ldf, c.plan.count[e], y, ldy, c.scratch(tid));
}

}  // namespace qmoe::cpu
