// The int8-activation path (accuracy_level 4): the float32 rows quantized once per matrix
// (quant_act.h, the table's quantize_rows), then the table's int8 kernels (Qd8Kernels), one
// tile per call.
#include "cpu/path.h"

namespace qmoe::cpu {

namespace {

// Plan rows [first, ...) of quantized rows q.
QuantRows rows_of(const QuantRows& q, std::int64_t first) {
  return QuantRows{q.q + first * q.ldq, q.scale + first * q.lds, q.zsum + first * q.ldz, q.ldq, q.lds, q.ldz};
}

class Int8Path final : public ExpertPath {
 public:
  Int8Path(const KernelConfig& kc, int bits) : igemm_(kc.qd8.gemm(bits).fn), quantize_rows_(kc.qd8.quantize_rows) {}

  const char* label() const override { return " int8-activations"; }

  void fc1_inputs(Chunk& c) const override { quantize(c, c.xg, c.hp, c.layer.fc1.geometry()); }

  void fc1(Chunk& c) const override {
    const PackedMatrix& m = c.layer.fc1;
    const QuantRows q = c.ws.qbuf.view(m.geometry());
    for_each_run(
        c, m.geometry().tiles(), [](int) { return std::int64_t{1}; },
        [&](int e, std::int64_t tile, std::int64_t n, int tid) {
          float* y = c.fc1_out(tid);
          constexpr std::int64_t ldy = kFc1Tiles * kTileRows;
          igemm_(m.geometry(), m.tile(e, tile), rows_of(q, c.plan.offset[e]), c.plan.count[e], y, ldy);
          fc1_epilogues(c, e, tile, n, y, ldy, [&](std::int64_t first) {
            return Fc1Dst{.f32 = c.act + c.plan.offset[e] * c.ip + first, .ld = c.ip};
          });
        });
  }

  void fc2_inputs(Chunk& c) const override { quantize(c, c.act, c.ip, c.layer.fc2.geometry()); }

  void fc2(Chunk& c) const override {
    const PackedMatrix& m = c.layer.fc2;
    const QuantRows q = c.ws.qbuf.view(m.geometry());
    for_each_run(
        c, m.geometry().tiles(), [](int) { return std::int64_t{1}; },
        [&](int e, std::int64_t tile, std::int64_t, int) {
          igemm_(m.geometry(), m.tile(e, tile), rows_of(q, c.plan.offset[e]), c.plan.count[e],
                 c.y2 + c.plan.offset[e] * c.pad2 + tile * kTileRows, c.pad2);
        });
  }

 private:
  // Every plan row's activations (ld floats apart) quantized into ws.qbuf for g's kernels,
  // in parallel over rows.
  void quantize(Chunk& c, const float* rows, std::int64_t ld, const PackGeometry& g) const {
    const std::int64_t nrows = c.plan.rows;
    resize_for(c.ws.qbuf, nrows, g);
    const std::int64_t per = 16, items = (nrows + per - 1) / per;
    c.pool.parallel_for(items, [&](std::int64_t i, int) {
      quantize_rows_(rows, ld, i * per, std::min(nrows, (i + 1) * per), g, c.ws.qbuf);
    });
  }

  GemmTileI8Fn igemm_;
  QuantizeRowsFn quantize_rows_;
};

}  // namespace

std::unique_ptr<ExpertPath> make_int8_path(const KernelConfig& kc, int bits) {
  return std::make_unique<Int8Path>(kc, bits);
}

}  // namespace qmoe::cpu
