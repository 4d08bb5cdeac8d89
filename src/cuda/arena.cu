// The per-device arena registry and the workspace carving (arena.h).
#include <map>

#include "cuda/arena.h"
#include "cuda/gemm.h"

namespace qmoe::cuda {

std::shared_ptr<Arena> acquire_arena(int device, std::size_t bytes, std::size_t host_bytes, std::size_t staging_bytes) {
  static std::mutex mu;
  static std::map<int, std::weak_ptr<Arena>> registry;
  std::lock_guard<std::mutex> lk(mu);
  std::shared_ptr<Arena> cur = registry[device].lock();
  if (cur && cur->buf.bytes() >= bytes && cur->host.bytes() >= host_bytes && cur->staging.bytes() >= staging_bytes)
    return cur;
  auto a = std::make_shared<Arena>();
  a->buf = DeviceBuffer(std::max(bytes, cur ? cur->buf.bytes() : std::size_t{0}));
  a->host = PinnedBuffer(std::max(host_bytes, cur ? cur->host.bytes() : std::size_t{0}));
  a->staging = DeviceBuffer(std::max(staging_bytes, cur ? cur->staging.bytes() : std::size_t{0}));
  QMOE_CUDA_CHECK(cudaEventCreateWithFlags(&a->done, cudaEventDisableTiming));
  registry[device] = a;
  return a;
}

HostRows carve_host_rows(Carver& c, std::int64_t rows, std::int64_t E, std::int64_t H) {
  HostRows h;
  h.offsets = c.take<int>(E + 1);
  h.token = c.take<int>(rows);
  h.x = c.take<float>(rows * H);
  h.y = c.take<float>(rows * H);
  return h;
}

Workspace carve_workspace(Carver& c, std::int64_t tokens, std::int64_t y2_tokens, int k, std::int64_t E, std::int64_t H,
                          std::int64_t a_stride) {
  Workspace w;
  const std::int64_t pairs = tokens * k;
  w.rb.topk_expert = c.take<int>(pairs);
  w.rb.topk_weight = c.take<float>(pairs);
  w.rb.slot = c.take<int>(pairs);
  w.rb.counts = c.take<int>(E);
  w.rb.offsets = c.take<int>(E + 1);
  // Every expert's last m-tile may be partial: at most pairs / (smallest tile) + E tiles.
  w.rb.tiles = c.take<MTile>(ceil_div(pairs, kMinTileTokens) + E);
  w.rb.num_tiles = c.take<int>(1);
  w.rb.token_of = c.take<int>(pairs);
  w.rb.pos_of = c.take<int>(pairs);
  w.rb.arrivals = c.take<int>(std::min<std::int64_t>(tokens, kFusedCombineTokens) * fused_combine_row_blocks(H));
  w.act = c.take<std::uint16_t>(pairs * a_stride);
  w.y2 = c.take<float>(y2_tokens * k * H);
  return w;
}

}  // namespace qmoe::cuda
