// The CPU packed layout, read back by an unpacker written from the layout
// description in packed.h (not from the packer), against the raw dequantizer.
// Also: the tag refuses foreign, corrupt and truncated packed data.
#include <gtest/gtest.h>

#include <cstring>

#include "cpu/kernels.h"
#include "cpu/moe.h"
#include "cpu/packed.h"
#include "helpers.h"

namespace qmoe::test {
namespace {

// Value of packed element (e, p, c) from the bytes alone, following packed.h's description.
double unpack(const std::uint8_t* bytes, std::int64_t e, std::int64_t p, std::int64_t c) {
  cpu::PackTag tag;
  std::memcpy(&tag, bytes, sizeof tag);
  const std::int64_t nr = tag.nr, bl = tag.block_len, blocks = tag.cols / bl;
  const std::int64_t group = 32 / tag.bits;  // columns per 4-byte lane
  const std::int64_t padded = (bl + group - 1) / group * group;
  const std::int64_t block_bytes = nr * 4 + nr + padded * nr * tag.bits / 8;
  const std::int64_t tile_bytes = blocks * block_bytes;
  const std::uint8_t* blk =
      bytes + 128 + e * static_cast<std::int64_t>(tag.expert_stride) + (p / nr) * tile_bytes + (c / bl) * block_bytes;
  const std::int64_t r = p % nr, cc = c % bl;
  float scale;
  std::memcpy(&scale, blk + 4 * r, 4);
  const int zero = blk[4 * nr + r];
  // Lane r of group cc / group: a little-endian 32-bit word, code j at bits [bits*j, bits*(j+1)).
  const std::uint8_t* lane = blk + 5 * nr + ((cc / group) * nr + r) * 4;
  const std::uint32_t word = lane[0] | (lane[1] << 8) | (lane[2] << 16) | (static_cast<std::uint32_t>(lane[3]) << 24);
  const int code = (word >> (tag.bits * (cc % group))) & ((1u << tag.bits) - 1);
  return static_cast<double>(scale) * (code - zero);
}

class PackLayout : public ::testing::TestWithParam<std::tuple<int, int, int, bool>> {};

TEST_P(PackLayout, UnpackerAgreesWithRawDequantizer) {
  const auto [bits, block, fusion, sym] = GetParam();
  MoeAttributes a;
  a.k = 2;
  a.activation = Activation::swiglu;
  a.swiglu_fusion = fusion;
  a.expert_weight_bits = bits;
  a.block_size = block;
  const std::int64_t e = 3, h = 64, in = block ? 96 : 36;  // 36: gate/up rows do not fill whole tiles
  tools::SynthOptions so;
  so.symmetric = sym;
  const auto s = tools::synth_layer(e, h, in, a, so);
  const cpu::CpuMoe moe(s.views(), a, s.shape, 1);
  const auto w1 = dequantize(s.fc1.weights_view(), s.fc1.scales_view(), s.fc1.zero_points_view(), bits, block, h);
  const auto w2 = dequantize(s.fc2.weights_view(), s.fc2.scales_view(), s.fc2.zero_points_view(), bits, block, in);
  std::vector<double> w3;
  if (fusion == 0) w3 = dequantize(s.fc3.weights_view(), s.fc3.scales_view(), s.fc3.zero_points_view(), bits, block, h);
  const std::int64_t n1 = s.fc1.rows;
  for (std::int64_t ei = 0; ei < e; ++ei) {
    // FC1: packed row 2i is gate i, 2i+1 is up i.
    for (std::int64_t i = 0; i < in; ++i)
      for (std::int64_t c = 0; c < h; ++c) {
        double gate, up;
        if (fusion == 1) {
          gate = w1[(ei * n1 + 2 * i) * h + c], up = w1[(ei * n1 + 2 * i + 1) * h + c];
        } else if (fusion == 2) {
          gate = w1[(ei * n1 + i) * h + c], up = w1[(ei * n1 + in + i) * h + c];
        } else {
          gate = w1[(ei * n1 + i) * h + c], up = w3[(ei * in + i) * h + c];
        }
        ASSERT_EQ(unpack(moe.fc1().raw(), ei, 2 * i, c), gate) << ei << "," << i << "," << c;
        ASSERT_EQ(unpack(moe.fc1().raw(), ei, 2 * i + 1, c), up) << ei << "," << i << "," << c;
      }
    // Padding rows past 2I are zero weights.
    const std::int64_t padded = moe.fc1().geometry().tiles() * 16;
    for (std::int64_t p = 2 * in; p < padded; ++p) ASSERT_EQ(unpack(moe.fc1().raw(), ei, p, 5), 0.0);
    for (std::int64_t r = 0; r < h; ++r)
      for (std::int64_t c = 0; c < in; ++c)
        ASSERT_EQ(unpack(moe.fc2().raw(), ei, r, c), w2[(ei * h + r) * in + c]) << ei << "," << r << "," << c;
  }
}

INSTANTIATE_TEST_SUITE_P(All, PackLayout,
                         ::testing::Combine(::testing::Values(4, 8), ::testing::Values(0, 16, 32),
                                            ::testing::Values(0, 1, 2), ::testing::Bool()));

TEST(PackTag, RefusesForeignCorruptAndTruncatedData) {
  MoeAttributes a;
  a.k = 1;
  const auto s = tools::synth_layer(2, 32, 32, a);
  const cpu::CpuMoe moe(s.views(), a, s.shape, 1);
  const auto& m = moe.fc2();
  const auto& g = m.geometry();
  auto check = [&](const std::vector<std::uint8_t>& bytes) {
    cpu::check_tag(bytes.data(), bytes.size(), "fc2", cpu::kernel_config().isa, cpu::kTileRows, g.bits, g.block_len, 2,
                   g.rows, g.cols);
  };
  std::vector<std::uint8_t> good(m.raw(), m.raw() + m.bytes());
  EXPECT_NO_THROW(check(good));
  auto expect_error = [&](std::vector<std::uint8_t> bytes, const char* needle) {
    try {
      check(bytes);
      ADD_FAILURE() << "accepted: " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("fc2"), std::string::npos) << e.what();
    }
  };
  auto bad = good;
  bad[0] ^= 0xff;
  expect_error(bad, "magic");
  bad = good;
  bad[8] = 1;  // version 1 (the earlier column-major layout) must be refused
  expect_error(bad, "version");
  bad = good;
  bad[12] = 7;  // backend
  expect_error(bad, "backend");
  bad = good;
  bad[16] = 9;  // isa
  expect_error(bad, "ISA");
  bad = good;
  bad[24] = 8;  // bits
  expect_error(bad, "bits");
  bad.assign(good.begin(), good.end() - 1);
  expect_error(bad, "truncated");
  bad.assign(good.begin(), good.begin() + 10);
  expect_error(bad, "too short");
  // Raw ONNX Runtime weights are not packed data: refused by the tag, never misread.
  std::vector<std::uint8_t> raw(s.fc2.weights.begin(), s.fc2.weights.end());
  expect_error(raw, "magic");
}

}  // namespace
}  // namespace qmoe::test
