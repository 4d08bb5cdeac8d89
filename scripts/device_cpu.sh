#!/usr/bin/env bash
# On the lent GPU host (16-core Xeon): build, test every CPU kernel table the
# CPU supports, and measure the CPU engine (thread scaling, levels 0 and 4, vs
# ONNX Runtime). Writes logs and JSON under $OUT (default ./out/device).
set -uo pipefail
OUT="${OUT:-$PWD/out/device}"
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
echo "== machine"; date; nproc; grep -m1 "model name" /proc/cpuinfo
grep -m1 -o -w -E "amx_tile|amx_int8|amx_bf16|avx512_vnni|avx512_bf16" /proc/cpuinfo | sort -u | tr '\n' ' '; echo
lscpu | grep -i -E "cache|socket|numa" || true
echo "== build"
cmake -S . -B build-dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DQMOE_BUILD_BENCH=OFF >/dev/null && ninja -C build-dev || exit 1
echo "== tests"; (cd build-dev && ctest --output-on-failure -j 16 2>&1 | tail -5)
./build-dev/qmoe info | head -6
B="./build-dev/qmoe bench --model gpt-oss-20b --max-time 4"
echo "== gpt-oss-20b 16 threads, level 0 and 4"
for l in 0 3 4; do
  $B --threads 16 --tokens 1,16,512,4096 --accuracy-level $l --ref-tokens 4 --json "$OUT/bench16_l$l.json" 2>/dev/null | grep -v "^timing"
done
echo "== thread scaling (T = 1, 512; levels 0 and 4)"
for t in 1 2 4 8 16; do
  for l in 0 3 4; do echo "-- threads $t level $l"; $B --threads $t --tokens 1,512 --accuracy-level $l --no-bandwidth --ref-tokens 0 2>/dev/null | grep -E "^ +(1|512) "; done
done
echo "== other shapes, T = 1, 16 threads"
for m in qwen3-30b-a3b mixtral-8x7b; do ./build-dev/qmoe bench --model $m --threads 16 --tokens 1,16 --ref-tokens 2 --max-time 3 2>/dev/null | grep -v "^timing"; done
echo "== vs onnxruntime (python package)"
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . >/dev/null 2>&1 && export PYTHONPATH=/tmp/site
python3 -c "import qmoe, onnxruntime; print('qmoe', qmoe.__file__, 'ort', onnxruntime.__version__)"
for t in 16 2; do python3 bench/vs_onnxruntime.py --threads $t --tokens 1,16,512 --accuracy-levels 0,3,4 --max-time 5 --json "$OUT/vs_ort_$t.json" --plot "$OUT/vs_ort_$t.png" 2>&1 | grep -v "^  timing"; done
