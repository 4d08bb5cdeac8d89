// The GPU prepack (prepack.h): geometry, one allocation for both matrices, and
// the per-expert staging loop around the packing kernels of pack.cu.
#include <type_traits>

#include "cuda/arena.h"
#include "cuda/prepack.h"

namespace qmoe::cuda {

namespace {

GpuGeometry geometry(int bits, int block_size, bool gated, bool zp, std::int64_t rows, std::int64_t cols,
                     std::int64_t inter) {
  GpuGeometry g;
  g.bits = bits;
  g.block_size = block_size;
  g.gated = gated;
  g.zero_points = zp;
  g.rows = rows;
  g.cols = cols;
  g.padded_rows = round_up(gated ? ceil_div(inter, 8) * 16 : rows, kRowAlign);
  g.padded_cols = round_up(cols, kKAlign);
  return g;
}

PackedGpu carve_packed(Carver& c, const GpuGeometry& g, std::int64_t E) {
  PackedGpu p;
  p.tag = c.take<GpuPackTag>(1);
  p.codes = c.take<std::uint8_t>(E * g.code_bytes_per_expert());
  p.rel_scales = g.block_size ? c.take<std::uint16_t>(E * g.rel_scale_words_per_expert() * 2) : nullptr;
  p.zero_points = g.zero_points ? c.take<std::uint8_t>(E * g.zp_pairs_per_expert() * 2) : nullptr;
  p.row_scales = c.take<float>(E * g.padded_rows);
  p.bias = c.take<float>(E * g.padded_rows);
  return p;
}

// One expert's slice of a raw tensor (experts are the outermost dimension).
const std::uint8_t* slice(const TensorView& v, std::int64_t e, std::int64_t E) {
  return static_cast<const std::uint8_t*>(v.data) + v.nbytes() / static_cast<std::size_t>(E) * e;
}
std::size_t slice_bytes(const TensorView& v, std::int64_t E) {
  return v.present() ? v.nbytes() / static_cast<std::size_t>(E) : 0;
}

}  // namespace

PackedGpu rebase(const PackedGpu& p, std::uintptr_t from, void* to) {
  auto move = [&](auto* ptr) {
    using T = std::remove_pointer_t<decltype(ptr)>;
    return ptr ? reinterpret_cast<T*>(static_cast<char*>(to) + (reinterpret_cast<std::uintptr_t>(ptr) - from)) : ptr;
  };
  PackedGpu q;
  q.tag = move(p.tag);
  q.codes = move(p.codes);
  q.rel_scales = move(p.rel_scales);
  q.zero_points = move(p.zero_points);
  q.row_scales = move(p.row_scales);
  q.bias = move(p.bias);
  return q;
}

PackedGpu shift_slots(const PackedGpu& p, const GpuGeometry& g, std::int64_t slots) {
  PackedGpu q = p;
  q.codes = p.codes - slots * g.code_bytes_per_expert();
  if (p.rel_scales) q.rel_scales = p.rel_scales - slots * g.rel_scale_words_per_expert() * 2;
  if (p.zero_points) q.zero_points = p.zero_points - slots * g.zp_pairs_per_expert() * 2;
  q.row_scales = p.row_scales - slots * g.padded_rows;
  q.bias = p.bias - slots * g.padded_rows;
  return q;
}

PackedLayer prepack_layer(const ExpertWeights& w, const MoeAttributes& a, const MoeShape& s,
                          const detail::ReleaseFn* release, const std::vector<int>* experts) {
  PackedLayer out;
  // Slices of the raw tensors are of the E experts; the packed matrices hold `slots`.
  const std::int64_t E = s.num_experts, H = s.hidden, I = s.inter;
  const std::int64_t slots = experts ? static_cast<std::int64_t>(experts->size()) : E;
  // The GEMMs index K columns and slabs with 32-bit integers.
  constexpr std::int64_t kMaxDim = std::int64_t{1} << 30;
  detail::require(H < kMaxDim && I < kMaxDim,
                  "fc1_experts_weights: the CUDA backend takes hidden and inter sizes "
                  "below 2^30, got hidden ",
                  H, ", inter ", I);
  const bool gated = a.activation == Activation::swiglu;
  const bool zp1 = w.fc1_zero_points.present() || w.fc3_zero_points.present();
  out.g1 = geometry(a.expert_weight_bits, a.block_size, gated, zp1, s.fc1_rows, H, I);
  if (gated) out.g1.rows = 2 * I;
  out.g2 = geometry(a.expert_weight_bits, a.block_size, false, w.fc2_zero_points.present(), H, I, I);
  out.has_bias2 = w.fc2_bias.present();

  // The packed weights: one allocation, sized by a dry run of the carver.
  Carver sizing{nullptr};
  carve_packed(sizing, out.g1, slots);
  carve_packed(sizing, out.g2, slots);
  out.packed = DeviceBuffer(sizing.used);
  out.bytes = sizing.used;
  Carver c{out.packed.get<char>()};
  out.p1 = carve_packed(c, out.g1, slots);
  out.p2 = carve_packed(c, out.g2, slots);

  // Stage one expert's raw tensors at a time and pack it on the device.
  const TensorView* raw[] = {&w.fc1_weights, &w.fc1_scales, &w.fc1_zero_points, &w.fc1_bias,
                             &w.fc3_weights, &w.fc3_scales, &w.fc3_zero_points, &w.fc3_bias,
                             &w.fc2_weights, &w.fc2_scales, &w.fc2_zero_points, &w.fc2_bias};
  std::size_t stage_bytes = 0;
  for (const TensorView* v : raw) stage_bytes += align_up(slice_bytes(*v, E));
  DeviceBuffer stage(stage_bytes);
  cudaStream_t stream = nullptr;
  QMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  try {
    for (std::int64_t slot = 0; slot < slots; ++slot) {
      const std::int64_t e = experts ? (*experts)[slot] : slot;
      const void* dev[12] = {};
      std::size_t off = 0;
      for (int i = 0; i < 12; ++i) {
        const std::size_t n = slice_bytes(*raw[i], E);
        if (n) {
          char* dst = stage.get<char>() + off;
          QMOE_CUDA_CHECK(cudaMemcpyAsync(dst, slice(*raw[i], e, E), n, cudaMemcpyHostToDevice, stream));
          // From pageable memory the call returns once the bytes are staged
          // (the DMA may still run from CUDA's own pinned buffer), so the
          // source is no longer needed.
          if (release) (*release)(slice(*raw[i], e, E), n);
          dev[i] = dst;
        }
        off += align_up(n);
      }
      auto raw_expert = [&](int base, const TensorView& scales, const TensorView& bias) {
        RawExpert r;
        r.codes = static_cast<const std::uint8_t*>(dev[base]);
        r.scales = dev[base + 1];
        r.scale_dtype = scales.dtype;
        r.zero_points = static_cast<const std::uint8_t*>(dev[base + 2]);
        r.bias = dev[base + 3];
        r.bias_dtype = bias.present() ? bias.dtype : DType::f32;
        return r;
      };
      const RawExpert fc1 = raw_expert(0, w.fc1_scales, w.fc1_bias);
      const RawExpert fc3 = raw_expert(4, w.fc3_scales, w.fc3_bias);
      const RawExpert fc2 = raw_expert(8, w.fc2_scales, w.fc2_bias);
      const bool use_fc3 = gated && a.swiglu_fusion == 0;
      pack_expert(out.g1, a.swiglu_fusion, I, fc1, use_fc3 ? &fc3 : nullptr, slot, out.p1, stream);
      pack_expert(out.g2, 0, I, fc2, nullptr, slot, out.p2, stream);
    }
    // The tags, written last and read back: the packed matrices are complete and are what
    // this Layer's kernels will read.
    const GpuPackTag tags[2] = {make_tag(out.g1, slots), make_tag(out.g2, slots)};
    QMOE_CUDA_CHECK(cudaMemcpyAsync(out.p1.tag, &tags[0], sizeof tags[0], cudaMemcpyHostToDevice, stream));
    QMOE_CUDA_CHECK(cudaMemcpyAsync(out.p2.tag, &tags[1], sizeof tags[1], cudaMemcpyHostToDevice, stream));
    GpuPackTag back[2];
    QMOE_CUDA_CHECK(cudaMemcpyAsync(&back[0], out.p1.tag, sizeof back[0], cudaMemcpyDeviceToHost, stream));
    QMOE_CUDA_CHECK(cudaMemcpyAsync(&back[1], out.p2.tag, sizeof back[1], cudaMemcpyDeviceToHost, stream));
    QMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    check_tag(back[0], out.g1, slots, "fc1_experts_weights");
    check_tag(back[1], out.g2, slots, "fc2_experts_weights");
  } catch (...) {
    cudaStreamDestroy(stream);
    throw;
  }
  QMOE_CUDA_CHECK(cudaStreamDestroy(stream));

  return out;
}

}  // namespace qmoe::cuda
