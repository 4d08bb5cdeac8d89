// Internal: the tile-kernel driver, written once against a small set of
// per-ISA primitives ("Ops"). Each ISA's translation unit includes this with
// its own Ops and its own compiler flags, so the loop structure is shared and
// only the instructions differ.
//
// A tile is NR = 16 rows in "row lanes" (see packed.h): one 64-byte group holds
// the next 8 (4-bit) or 4 (8-bit) codes of every row, row r in 32-bit lane r.
// A call covers a run of consecutive tiles of one expert (they lie back to
// back in memory) and works on several of them at once, so that one loaded
// activation serves 16 rows per tile. Two regimes, chosen by the number of
// tokens routed to the expert: the reuse regime from ReuseFrom tokens on, the
// table's F32Kernels::reuse_from, which the kernel files pass in (kernels.h):
//  * few tokens (decode, "direct"): each column is extracted in registers and used at
//    once for up to Ops::kDirectTokens tokens of Ops::kDirectTiles tiles; the
//    row scale is applied once per block. Extraction is a shift, a mask and
//    the float "magic number" trick ((code | 0x4B000000) as float is 2^23 +
//    code, minus 2^23 + zero gives code - zero exactly, with no int->float
//    conversion), or, where Ops has a table lookup for the width and the 16
//    zero points of the block are equal (always so for symmetric
//    quantization), a shift and a lookup of code - zero in a 16-entry table.
//    Columns accumulate round-robin into 2 partial sums per output (4 where a
//    column is one vector and there is one token), so the FMA latency hides.
//  * many tokens (prefill, "reuse"): a chunk of Ops::kReuseTiles tiles is dequantized
//    once into scratch (scale * (code - zero), as float weights, the tiles'
//    rows side by side per column) and reused for every token by a register
//    block of those rows x up to Ops::kReuseTokens tokens, so decoding costs
//    O(weights), not O(weights * tokens); the first Ops::kDecodeTokens tokens
//    (where Ops has it; else none) run inside the decode loop, the others are
//    cut into blocks of near-equal size so that no small remainder block wastes
//    weight loads.
//
// Ops must provide (NV vectors V cover the 16 rows of one column): the block
// sizes kDirectTokens, kDirectTiles, kReuseTokens, kReuseTiles, optionally kDecodeTokens, and
//   V zero(); V splat(float); V load(const float*); void store(float*, V);
//   V fma(V a, V b, V c) = a * b + c; V add(V, V); V mul(V, V);
//   Z zeros(const uint8_t* z16)               -- a block's 16 zero points
//   Q group(const uint8_t* p64)               -- one 64-byte group of codes
//   template <int BITS, int J> void column(const Q&, const Z&, V* w)
//                                             -- float(code - zero) of column J of the group
//   template <int BITS> bool kLut             -- whether the two below exist for BITS:
//   bool uniform(const Z&)                    -- the 16 zero points are equal
//   template <int J> void column_lut(const Q&, const Z&, V* w)
//                                             -- column(...) by table lookup, valid where uniform
//
// Accumulation order: an output's order of additions depends only on the
// regime and (direct) on the token block size, both functions of the token
// count alone, never on the run of tiles a call covers or on the tiles worked
// on together; so the bits never depend on how the caller splits tiles among
// threads.
//
// ODR caution: this header is compiled with different -m flags per ISA, so it
// must not emit any non-template inline function or std:: template that the
// linker could merge across ISAs (a baseline caller could then run AVX-512
// code). Everything here is a template on Ops; the layout arithmetic is
// TileLayout's and PackGeometry's (packed.h), constexpr and always inlined.
#pragma once

#include <cstdint>
#include <utility>

#include "cpu/kernels.h"

namespace qmoe::cpu::driver {

constexpr int NR = kTileRows;
constexpr std::int64_t kChunk = 256;  // columns dequantized at once in the prefill regime (a multiple of 8)

// Layout arithmetic: packed.h's TileLayout (always inlined, so nothing here is shared
// across ISAs), with BITS known at compile time.
template <int BITS>
constexpr std::int64_t kGroupCols = TileLayout::kGroupCols<BITS>;

template <class Ops>
struct Block {
  typename Ops::V scale[Ops::NV];
  typename Ops::Z zero;
  const std::uint8_t* codes;
};

template <class Ops, int BITS>
inline Block<Ops> block_at(const PackGeometry& g, const std::uint8_t* tile, std::int64_t b) {
  const std::uint8_t* p = tile + b * TileLayout::block_bytes<BITS>(g.block_len);
  Block<Ops> v;
  // 16-byte aligned: blocks are multiples of 16 bytes (packed.h)
  const float* s = reinterpret_cast<const float*>(p + TileLayout::kScalesOffset);
  for (int j = 0; j < Ops::NV; ++j) v.scale[j] = Ops::load(s + j * (NR / Ops::NV));
  v.zero = Ops::zeros(p + TileLayout::kZerosOffset);
  v.codes = p + TileLayout::kCodesOffset;
  return v;
}

// Calls f(std::integral_constant<int, M>) for the M in [1, N] equal to n (1 <= n <= N):
// a run-time token count turned into a compile-time register-block size.
template <int N, class F>
inline void with_count(std::int64_t n, F&& f) {
  if constexpr (N > 1) {
    if (n == N) return f(std::integral_constant<int, N>{});
    return with_count<N - 1>(n, f);
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// Calls f(std::integral_constant<int, J>) for J = 0 .. N-1, unrolled.
template <int N, class F>
inline void unroll(F&& f) {
  [&]<int... J>(std::integer_sequence<int, J...>) { (f(std::integral_constant<int, J>{}), ...); }
  (std::make_integer_sequence<int, N>{});
}

// Calls f(std::bool_constant<LUT>): LUT where Ops has a table lookup for BITS
// and each of the NT blocks has equal zero points.
// Always inlined, with its callers' lambdas: the partial sums they update must stay in registers.
template <class Ops, int BITS, int NT, class F>
[[gnu::always_inline]] inline void with_lut(const Block<Ops> (&v)[NT], F&& f) {
  if constexpr (Ops::template kLut<BITS>) {
    bool uniform = true;
    for (int i = 0; i < NT; ++i) uniform = uniform && Ops::uniform(v[i].zero);
    if (uniform) return f(std::true_type{});
  }
  f(std::false_type{});
}

template <class Ops, int BITS, bool LUT, int J>
inline void column(const typename Ops::Q& q, const typename Ops::Z& z, typename Ops::V* w) {
  if constexpr (LUT)
    Ops::template column_lut<J>(q, z, w);
  else
    Ops::template column<BITS, J>(q, z, w);
}

// y[m][i * NR + r] = rows r of tiles i < NT times tokens m < M.
template <class Ops, int BITS, int M, int NT>
void direct(const PackGeometry& g, const std::uint8_t* tile, std::int64_t tile_bytes, const float* x, std::int64_t ldx,
            float* y, std::int64_t ldy) {
  using V = typename Ops::V;
  constexpr int NV = Ops::NV;
  constexpr int G = static_cast<int>(kGroupCols<BITS>);
  // Partial sums per output: 4 when a single vector per column would leave too few FMA chains.
  // A function of M only (never of NT), so an output's order of additions is fixed.
  constexpr int P = M * NV >= 2 ? 2 : 4;
  V acc[M][NT][NV];
  for (int m = 0; m < M; ++m)
    for (int i = 0; i < NT; ++i)
      for (int j = 0; j < NV; ++j) acc[m][i][j] = Ops::zero();
  const std::int64_t pb = TileLayout::padded_block<BITS>(g.block_len), nb = g.cols / g.block_len;
  for (std::int64_t b = 0; b < nb; ++b) {
    Block<Ops> v[NT];
    for (int i = 0; i < NT; ++i) v[i] = block_at<Ops, BITS>(g, tile + i * tile_bytes, b);
    V part[P][M][NT][NV];
    for (int p = 0; p < P; ++p)
      for (int m = 0; m < M; ++m)
        for (int i = 0; i < NT; ++i)
          for (int j = 0; j < NV; ++j) part[p][m][i][j] = Ops::zero();
    with_lut<Ops, BITS>(
        v, [&](auto LUT) __attribute__((always_inline)) {
          for (std::int64_t grp = 0; grp < pb / G; ++grp) {
            typename Ops::Q q[NT];
            for (int i = 0; i < NT; ++i) q[i] = Ops::group(v[i].codes + grp * 64);
            const float* xg = x + b * pb + grp * G;
            unroll<G>([&](auto J) {
              V w[NT][NV];
              for (int i = 0; i < NT; ++i) column<Ops, BITS, LUT, J>(q[i], v[i].zero, w[i]);
              for (int m = 0; m < M; ++m) {
                const V xv = Ops::splat(xg[m * ldx + J]);
                for (int i = 0; i < NT; ++i)
                  for (int j = 0; j < NV; ++j) part[J % P][m][i][j] = Ops::fma(w[i][j], xv, part[J % P][m][i][j]);
              }
            });
          }
        });
    for (int m = 0; m < M; ++m)
      for (int i = 0; i < NT; ++i)
        for (int j = 0; j < NV; ++j) {
          V sum = Ops::add(part[0][m][i][j], part[1][m][i][j]);
          if constexpr (P == 4) sum = Ops::add(sum, Ops::add(part[2][m][i][j], part[3][m][i][j]));
          acc[m][i][j] = Ops::fma(v[i].scale[j], sum, acc[m][i][j]);
        }
  }
  for (int m = 0; m < M; ++m)
    for (int i = 0; i < NT; ++i)
      for (int j = 0; j < NV; ++j) Ops::store(y + m * ldy + i * NR + j * (NR / NV), acc[m][i][j]);
}

// y[m] (+)= W_chunk x[m] for M tokens; W_chunk is n columns of W rows (W = NT * NR),
// y[m] rows of W floats. The first chunk starts from zero instead of reading y.
template <class Ops, int NT, int M>
void chunk_tokens(const float* w, std::int64_t n, const float* x, std::int64_t ldx, float* y, std::int64_t ldy,
                  bool first) {
  if constexpr (NT == 2 && requires { Ops::template kChunk2<M>; })
    if constexpr (Ops::template kChunk2<M>) return Ops::template chunk2<M>(w, n, x, ldx, y, ldy, first);
  using V = typename Ops::V;
  constexpr int NV = Ops::NV * NT, W = NR * NT, L = NR / Ops::NV;
  V acc[M][NV];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = first ? Ops::zero() : Ops::load(y + m * ldy + j * L);
  for (std::int64_t c = 0; c < n; ++c) {
    V wc[NV];
    for (int j = 0; j < NV; ++j) wc[j] = Ops::load(w + c * W + j * L);
    for (int m = 0; m < M; ++m) {
      const V xv = Ops::splat(x[m * ldx + c]);
      for (int j = 0; j < NV; ++j) acc[m][j] = Ops::fma(wc[j], xv, acc[m][j]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NV; ++j) Ops::store(y + m * ldy + j * L, acc[m][j]);
}

// Dequantizes the chunk [c0, c0 + n) of the NT tiles' block v into w (scale * (code - zero),
// the tiles' rows side by side per column) and, while each column is in registers, runs
// it for the first MF tokens (MF = 0: none): y[m] (+)= W_chunk x[m] as chunk_tokens does,
// with the same FMAs in the same order. Why: a separate decode pass is a burst of stores
// (two 64-byte stores per column) that the FMA-bound token loops cannot hide; inside a
// token loop the stores overlap the FMAs (one thread, 64 tokens/expert, 6 tokens with the
// decode: 238 -> 252 GFLOP/s; 4 or 8 tokens measured 1-4% lower than 6).
template <class Ops, int BITS, int NT, int MF, bool LUT>
void decode_chunk(const Block<Ops> (&v)[NT], std::int64_t c0, std::int64_t n, float* w, const float* x,
                  std::int64_t ldx, float* y, std::int64_t ldy, bool first) {
  using V = typename Ops::V;
  constexpr int NV = Ops::NV, W = NR * NT, L = NR / NV;
  constexpr int G = static_cast<int>(kGroupCols<BITS>);
  V acc[MF > 0 ? MF : 1][NT][NV];
  for (int m = 0; m < MF; ++m)
    for (int i = 0; i < NT; ++i)
      for (int j = 0; j < NV; ++j) acc[m][i][j] = first ? Ops::zero() : Ops::load(y + m * ldy + i * NR + j * L);
  for (std::int64_t grp = c0 / G; grp < (c0 + n) / G; ++grp) {
    float* dst = w + (grp * G - c0) * W;
    typename Ops::Q q[NT];
    for (int i = 0; i < NT; ++i) {
      // The same group of the next chunk into L1: it then arrives while this chunk's
      // tokens are computed (several microseconds) instead of stalling its decode on
      // DRAM (FC1 loop, 64 tokens/expert, one thread: 237 -> 247 GFLOP/s). Past the
      // block's end it touches the next block or tile, which is read next anyway.
      __builtin_prefetch(v[i].codes + grp * 64 + kChunk * BITS * NR / 8, 0, 3);
      q[i] = Ops::group(v[i].codes + grp * 64);
    }
    unroll<G>([&](auto J) {
      V wj[NT][NV];
      for (int i = 0; i < NT; ++i) {
        column<Ops, BITS, LUT, J>(q[i], v[i].zero, wj[i]);
        for (int j = 0; j < NV; ++j) {
          wj[i][j] = Ops::mul(v[i].scale[j], wj[i][j]);
          Ops::store(dst + J * W + i * NR + j * L, wj[i][j]);
        }
      }
      for (int m = 0; m < MF; ++m) {
        const V xv = Ops::splat(x[m * ldx + grp * G - c0 + J]);
        for (int i = 0; i < NT; ++i)
          for (int j = 0; j < NV; ++j) acc[m][i][j] = Ops::fma(wj[i][j], xv, acc[m][i][j]);
      }
    });
  }
  for (int m = 0; m < MF; ++m)
    for (int i = 0; i < NT; ++i)
      for (int j = 0; j < NV; ++j) Ops::store(y + m * ldy + i * NR + j * L, acc[m][i][j]);
}

// NT consecutive tiles, every token: each chunk of NT tiles is dequantized once to w.
// Tokens of a prefill call that run inside its decode loop: Ops::kDecodeTokens where Ops has it.
template <class Ops>
constexpr int kDecodeTokensOf = [] {
  if constexpr (requires { Ops::kDecodeTokens; }) return Ops::kDecodeTokens;
  return 0;
}();

template <class Ops, int BITS, int NT>
void reuse(const PackGeometry& g, const std::uint8_t* tile, std::int64_t tile_bytes, const float* x, std::int64_t ldx,
           std::int64_t ntok, float* y, std::int64_t ldy, float* w) {
  constexpr int MT = Ops::kReuseTokens;
  constexpr int MF = kDecodeTokensOf<Ops>;
  const std::int64_t pb = TileLayout::padded_block<BITS>(g.block_len), nb = g.cols / g.block_len;
  // The first MF tokens run with the decode; the rest in blocks of near-equal size:
  // ceil((ntok - MF) / MT) blocks, none larger than MT.
  const std::int64_t nblocks = (ntok - MF + MT - 1) / MT;
  for (std::int64_t b = 0; b < nb; ++b) {
    Block<Ops> v[NT];
    for (int i = 0; i < NT; ++i) v[i] = block_at<Ops, BITS>(g, tile + i * tile_bytes, b);
    for (std::int64_t c0 = 0; c0 < pb; c0 += kChunk) {
      const std::int64_t n = pb - c0 < kChunk ? pb - c0 : kChunk;  // a multiple of G
      const float* xc = x + b * pb + c0;
      const bool first = b == 0 && c0 == 0;
      with_lut<Ops, BITS>(v,
                          [&](auto LUT) { decode_chunk<Ops, BITS, NT, MF, LUT>(v, c0, n, w, xc, ldx, y, ldy, first); });
      for (std::int64_t k = 0, t = MF; k < nblocks; ++k) {
        const std::int64_t m = (ntok - t + (nblocks - k) - 1) / (nblocks - k);
        with_count<MT>(m, [&](auto M) { chunk_tokens<Ops, NT, M>(w, n, xc + t * ldx, ldx, y + t * ldy, ldy, first); });
        t += m;
      }
    }
  }
}

// Calls f(std::integral_constant<int, N>, i) for runs of N <= NMAX tiles starting at tile i,
// covering [0, ntiles): NMAX at a time, then one shorter run for the rest.
template <int NMAX, class F>
inline void tile_runs(std::int64_t ntiles, F&& f) {
  std::int64_t i = 0;
  for (; i + NMAX <= ntiles; i += NMAX) f(std::integral_constant<int, NMAX>{}, i);
  if constexpr (NMAX > 1)
    if (i < ntiles) with_count<NMAX - 1>(ntiles - i, [&](auto N) { f(N, i); });
}

// The kernel: GemmTileFn (kernels.h), in the reuse regime from ReuseFrom tokens on.
template <class Ops, int BITS, std::int64_t ReuseFrom>
void gemm(const PackGeometry& g, const std::uint8_t* tile, std::int64_t ntiles, const float* x, std::int64_t ldx,
          std::int64_t ntok, float* y, std::int64_t ldy, float* scratch) {
  static_assert(kDecodeTokensOf<Ops> < ReuseFrom, "the decode's tokens are a part of every prefill call's tokens");
  static_assert(Ops::NV * sizeof(typename Ops::V) == NR * sizeof(float), "NV vectors hold a column of a tile's rows");
  constexpr int MD = Ops::kDirectTokens;
  const std::int64_t tb = g.cols / g.block_len * TileLayout::block_bytes<BITS>(g.block_len);
  if (ntok >= ReuseFrom) {
    tile_runs<Ops::kReuseTiles>(ntiles, [&](auto N, std::int64_t i) {
      reuse<Ops, BITS, N>(g, tile + i * tb, tb, x, ldx, ntok, y + i * NR, ldy, scratch);
    });
    return;
  }
  tile_runs<Ops::kDirectTiles>(ntiles, [&](auto N, std::int64_t i) {
    const std::uint8_t* ti = tile + i * tb;
    float* yi = y + i * NR;
    std::int64_t t = 0;
    for (; t + MD <= ntok; t += MD) direct<Ops, BITS, MD, N>(g, ti, tb, x + t * ldx, ldx, yi + t * ldy, ldy);
    // The remainder in one pass too: every token of the expert shares one decode of the tiles.
    if (t < ntok)
      with_count<MD - 1>(ntok - t,
                         [&](auto M) { direct<Ops, BITS, M, N>(g, ti, tb, x + t * ldx, ldx, yi + t * ldy, ldy); });
  });
}

}  // namespace qmoe::cpu::driver
