// The float32 path (accuracy_level 0-2, and 3 without AMX): float32 activation rows through
// the table's float kernels (F32Kernels).
#include "cpu/path.h"

namespace qmoe::cpu {

namespace {

class F32Path final : public ExpertPath {
 public:
  F32Path(const KernelConfig& kc, int bits) : gemm_(kc.f32.gemm(bits).fn) {}

  const char* label() const override { return ""; }

  // FC1 calls take up to kFc1Tiles tiles: FC2's inputs are act[row][0..I).
  void fc1(Chunk& c) const override {
    const PackedMatrix& m = c.layer.fc1;
    for_each_run(
        c, m.geometry().tiles(), [](int) { return kFc1Tiles; },
        [&](int e, std::int64_t tile, std::int64_t n, int tid) {
          float* y = c.fc1_out(tid);
          constexpr std::int64_t ldy = kFc1Tiles * kTileRows;
          gemm_f32(c, gemm_, m, e, tile, n, c.xg, c.hp, y, ldy, tid);
          fc1_epilogues(c, e, tile, n, y, ldy, [&](std::int64_t first) {
            return Fc1Dst{.f32 = c.act + c.plan.offset[e] * c.ip + first, .ld = c.ip};
          });
        });
  }

  // FC2 calls take an item's whole run of tiles, written straight into y2.
  void fc2(Chunk& c) const override {
    const PackedMatrix& m = c.layer.fc2;
    const std::int64_t tiles = m.geometry().tiles();
    for_each_run(
        c, tiles, [&](int) { return tiles; },
        [&](int e, std::int64_t tile, std::int64_t n, int tid) {
          gemm_f32(c, gemm_, m, e, tile, n, c.act, c.ip, c.y2 + c.plan.offset[e] * c.pad2 + tile * kTileRows, c.pad2,
                   tid);
        });
  }

 private:
  GemmTileFn gemm_;
};

}  // namespace

std::unique_ptr<ExpertPath> make_f32_path(const KernelConfig& kc, int bits) {
  return std::make_unique<F32Path>(kc, bits);
}

std::unique_ptr<ExpertPath> make_expert_path(const KernelConfig& kc, int bits, int level) {
  if (level == 4) return make_int8_path(kc, bits);
  if (level == 3 && kc.has_bf16()) return make_amx_path(kc, bits);
  return make_f32_path(kc, bits);
}

}  // namespace qmoe::cpu
