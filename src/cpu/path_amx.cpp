// The bf16 path on AMX (accuracy_level 3 on a table with AMX kernels, Bf16Kernels): experts
// with at least bf16.from tokens get bf16 FC1 and FC2 inputs in A-tile order and the AMX
// kernels (one or two tiles per call); experts with fewer take the float32 kernels on float32
// rows, as the float32 path does: a mostly empty tile product costs more than it saves.
//
// A-tile order ("blocked", GemmTileBf16Fn in kernels.h): per expert, blocks of 16 rows
// (zero-padded) of K steps of 16 x 32 bf16, kp = K padded to a multiple of 32 (zeros);
// expert e's blocks start at row boff[e]. FC1's come from the gather, FC2's straight from the
// FC1 epilogue (Fc1Dst; two buffers: FC1 still reads its inputs while epilogues write FC2's),
// which removed a 1 ms conversion pass at T = 512.
#include <cstring>

#include "cpu/path.h"

namespace qmoe::cpu {

namespace {

class AmxPath final : public ExpertPath {
 public:
  AmxPath(const KernelConfig& kc, int bits)
      : gemm_(kc.f32.gemm(bits).fn), bgemm_(kc.bf16.gemm(bits).fn), from_(kc.bf16.from), to_bf16_(kc.bf16.to_bf16) {}

  const char* label() const override { return " bf16-amx"; }
  // The decoded B tiles (+ slack to align them), in floats.
  std::int64_t path_scratch_floats() const override { return kBf16ScratchBytes / 4 + 16; }

  // Rows of experts on AMX go straight to bf16 (the last row of an expert also zeroes the
  // padding rows of its last block); the others are float32 rows, as on the float32 path.
  void gather(Chunk& c, const float* x) const override {
    const Plan& p = c.plan;
    const std::int64_t e_count = static_cast<std::int64_t>(p.count.size());
    std::vector<std::int64_t>& boff = c.ws.boff;
    boff.assign(static_cast<std::size_t>(e_count + 1), 0);
    for (std::int64_t e = 0; e < e_count; ++e)
      boff[e + 1] = boff[e] + (amx(c, static_cast<int>(e)) ? (p.count[e] + 15) / 16 * 16 : 0);
    const Blocked b = blocked(c, true);
    const std::int64_t h = c.layer.hidden, in = c.layer.inter;
    for_each_row(c, [&](std::int64_t r) {
      const int e = p.row_expert[r];
      if (!amx(c, e)) return gather_f32_row(c, x, r);
      const std::int64_t i = r - p.offset[e];
      std::uint16_t* row1 = b.row(b.x1, b.kp1, e, i);
      put_bf16(x + p.row_token[r] * h, h, row1);
      zero_bf16(row1, h, b.kp1);
      zero_bf16(b.row(b.x2, b.kp2, e, i), in, b.kp2);  // the FC1 epilogue writes columns [0, in)
      if (i == p.count[e] - 1)
        for (std::int64_t q = p.count[e]; q < boff[e + 1] - boff[e]; ++q) {
          zero_bf16(b.row(b.x1, b.kp1, e, q), 0, b.kp1);
          zero_bf16(b.row(b.x2, b.kp2, e, q), 0, b.kp2);
        }
    });
  }

  // FC1 calls take 1 or 2 tiles on AMX, up to kFc1Tiles otherwise; the epilogue writes FC2's
  // inputs in A-tile order for AMX experts (a tile's outputs lie within one K step: packed.h).
  void fc1(Chunk& c) const override {
    const PackedMatrix& m = c.layer.fc1;
    const Blocked b = blocked(c, false);
    for_each_run(
        c, m.geometry().tiles(), [&](int e) { return amx(c, e) ? std::min<std::int64_t>(kFc1Tiles, 2) : kFc1Tiles; },
        [&](int e, std::int64_t tile, std::int64_t n, int tid) {
          float* y = c.fc1_out(tid);
          constexpr std::int64_t ldy = kFc1Tiles * kTileRows;
          const bool on_amx = amx(c, e);
          if (on_amx)
            bgemm(c, b, m, b.x1, b.kp1, e, tile, n, y, ldy, tid);
          else
            gemm_f32(c, gemm_, m, e, tile, n, c.xg, c.hp, y, ldy, tid);
          fc1_epilogues(c, e, tile, n, y, ldy, [&](std::int64_t first) {
            return on_amx ? Fc1Dst{.bf16 = b.row(b.x2, b.kp2, e, 0) + first / 32 * 512 + first % 32,
                                   .ld = b.kp2,
                                   .to_bf16 = to_bf16_}
                          : Fc1Dst{.f32 = c.act + c.plan.offset[e] * c.ip + first, .ld = c.ip};
          });
        });
  }

  void fc2(Chunk& c) const override {
    const PackedMatrix& m = c.layer.fc2;
    const Blocked b = blocked(c, false);
    const std::int64_t tiles = m.geometry().tiles();
    for_each_run(
        c, tiles, [&](int e) { return amx(c, e) ? std::min<std::int64_t>(tiles, 2) : tiles; },
        [&](int e, std::int64_t tile, std::int64_t n, int tid) {
          float* y = c.y2 + c.plan.offset[e] * c.pad2 + tile * kTileRows;
          if (amx(c, e))
            bgemm(c, b, m, b.x2, b.kp2, e, tile, n, y, c.pad2, tid);
          else
            gemm_f32(c, gemm_, m, e, tile, n, c.act, c.ip, y, c.pad2, tid);
        });
  }

 private:
  // The chunk's blocked buffers: FC1's (x1, kp1 columns) and FC2's (x2, kp2) inputs.
  struct Blocked {
    std::uint16_t* x1;
    std::uint16_t* x2;
    std::int64_t kp1, kp2;
    const std::int64_t* boff;
    // Row i of expert e in a blocked buffer x of kp columns; its column j is at row + j / 32 * 512 + j % 32.
    std::uint16_t* row(std::uint16_t* x, std::int64_t kp, int e, std::int64_t i) const {
      return x + (boff[e] + i / 16 * 16) * kp + i % 16 * 32;
    }
  };
  // The chunk's buffers, sized for its plan first (`size`: in the gather, after ws.boff).
  static Blocked blocked(Chunk& c, bool size) {
    const std::int64_t kp1 = (c.hp + 31) / 32 * 32, kp2 = (c.ip + 31) / 32 * 32;
    const std::int64_t rows = c.ws.boff.back();
    std::uint16_t* x1 = size ? grow(c.ws.xb1, rows * kp1) : aligned64(c.ws.xb1);
    std::uint16_t* x2 = size ? grow(c.ws.xb2, rows * kp2) : aligned64(c.ws.xb2);
    return {x1, x2, kp1, kp2, c.ws.boff.data()};
  }

  bool amx(const Chunk& c, int e) const { return c.plan.count[e] >= from_; }

  void bgemm(const Chunk& c, const Blocked& b, const PackedMatrix& m, const std::uint16_t* x, std::int64_t kp, int e,
             std::int64_t tile, std::int64_t n, float* y, std::int64_t ldy, int tid) const {
    bgemm_(m.geometry(), m.tile(e, tile), n, x + b.boff[e] * kp, kp, c.plan.count[e], y, ldy, c.path_scratch(tid));
  }

  // Zeroes columns [c0, c1) of a blocked row.
  static void zero_bf16(std::uint16_t* row, std::int64_t c0, std::int64_t c1) {
    for (std::int64_t c = c0; c < c1; c = c / 32 * 32 + 32)
      std::fill(row + c / 32 * 512 + c % 32, row + c / 32 * 512 + std::min<std::int64_t>(32, c1 - c / 32 * 32),
                std::uint16_t{0});
  }

  // Writes n floats as bf16 into columns [0, n) of a blocked row (columns up to the next
  // multiple of 32 become zeros), converted by the table's to_bf16 a stack buffer at a time.
  void put_bf16(const float* src, std::int64_t n, std::uint16_t* row) const {
    constexpr std::int64_t kSpan = 512;
    alignas(64) std::uint16_t tmp[kSpan];
    for (std::int64_t c0 = 0; c0 < n; c0 += kSpan) {
      const std::int64_t len = std::min(kSpan, n - c0), steps = (len + 31) / 32;
      to_bf16_(src + c0, tmp, len);
      std::fill(tmp + len, tmp + steps * 32, std::uint16_t{0});
      for (std::int64_t s = 0; s < steps; ++s) std::memcpy(row + (c0 / 32 + s) * 512, tmp + s * 32, 64);
    }
  }

  GemmTileFn gemm_;
  GemmTileBf16Fn bgemm_;
  std::int64_t from_;
  void (*to_bf16_)(const float* src, std::uint16_t* dst, std::int64_t n);
};

}  // namespace

std::unique_ptr<ExpertPath> make_amx_path(const KernelConfig& kc, int bits) {
  return std::make_unique<AmxPath>(kc, bits);
}

}  // namespace qmoe::cpu
