#!/usr/bin/env bash
# One call on the lent GPU host that measures what the open issues need, each step
# under a time guard so the whole fits the device tool's 10-minute call:
#   1. build + the C++ CUDA suite (scripts/device_gpu.sh);
#   2. the same bits with and without LayerOptions::cuda_fuse over the CUDA output
#      sweep (tools/output_hashes.cpp);
#   3. per-kernel timelines with cuda_fuse off and on (bench/gpu_timeline.py), twice;
#   4. host experts at T = 1 (50% and 100% on the CPU) with host threads all-but-one
#      and all, polled handoffs beside (bench/host_experts.py --polling);
#   5. the issue-17 table with whatever time is left (bench/gpu_vs_torch.py --graph).
# Logs, JSON and the plot under $OUT (default ./out/device; at most 8 files, as the tool returns).
#   scripts/device_measure.sh [SECONDS]    # the budget, default 570
set -uo pipefail
OUT="${OUT:-$PWD/out/device}"
mkdir -p "$OUT"
T0=$(date +%s) LIMIT="${1:-570}"
left() { echo $((LIMIT - ($(date +%s) - T0))); }
# step MAX CMD...: CMD under `timeout min(MAX, time left)`, skipped with under 25 s left.
step() {
  local s=$1 l
  shift
  l=$(left)
  if [ "$l" -le 25 ]; then
    echo "SKIP (out of time): $*"
    return
  fi
  [ "$s" -lt "$l" ] || s=$l
  echo "== [$(($(date +%s) - T0)) s] $*"
  timeout "$s" "$@"
  echo "rc=$? [$(($(date +%s) - T0)) s]"
}
exec > >(tee -a "$OUT/measure.txt") 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
QMOE_STEP_LIMIT=100 step 330 bash scripts/device_gpu.sh --no-pytest --no-bench
export PYTHONPATH="$PWD/build-gpu/python" PYTHONUNBUFFERED=1
step 100 ninja -C build-gpu qmoe_output_hashes
for f in 0 1; do
  QMOE_CUDA_FUSE=$f timeout 50 build-gpu/qmoe_output_hashes cuda >"/tmp/hashes_fuse$f.txt"
  echo "hashes QMOE_CUDA_FUSE=$f: rc=$? $(tail -1 "/tmp/hashes_fuse$f.txt")"
done
cmp -s /tmp/hashes_fuse0.txt /tmp/hashes_fuse1.txt && echo "cuda_fuse: the same bits" || echo "cuda_fuse: BITS DIFFER"
for f in 0 1 0 1; do
  echo "### QMOE_CUDA_FUSE=$f"
  QMOE_CUDA_FUSE=$f step 45 python3 bench/gpu_timeline.py --models qwen3-30b-a3b,gpt-oss-20b --tokens 1,16 --calls 40
done
for ht in 15 16; do
  step 60 python3 bench/host_experts.py --models gpt-oss-20b,qwen3-30b-a3b --tokens 1 --host 0.5,1 --calls 20 \
    --rounds 2 --threads 16 --host-threads "$ht" --polling --json "$OUT/host_experts_t$ht.json"
done
step 300 python3 bench/gpu_vs_torch.py --graph --rounds 2 --repeats 30 --json "$OUT/gpu_vs_torch.json"
echo "== done at $(($(date +%s) - T0)) s"
