#!/usr/bin/env bash
# On the lent GPU host (16-core Xeon + H200): the file-format and ONNX figures
# of issue 14 in one run. Builds the Python extension and the CLI with CUDA,
# checks the file tests (CPU and CUDA), then measures
#   * load speed and peak RSS growth of a >= 1 GiB qmoe file (mixtral-8x7b,
#     8-bit block 32) on 16 threads and onto the GPU (bench/load_file.py);
#   * a 4-layer gpt-oss-20b-shaped ONNX model, plain ONNX Runtime against the
#     offloaded session, alternating, 16 threads (and 2 pinned to two cores
#     with --two-threads) (bench/onnx_offload.py).
# Needs: the nlohmann headers carried in .deps (see -Dnlohmann_json_DIR) and
# wheels of onnxruntime 1.32.0 + onnxruntime-extensions 0.15.2 in .whl.
# QMOE_DEVICE_CUDA=0: a CPU-only build and CPU figures only (a shorter run).
# Logs and JSON under $OUT (default ./out/device).
set -uo pipefail
OUT="${OUT:-$PWD/out/device}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/files_log.txt") 2>&1
echo "== machine"; date; nproc; grep -m1 "model name" /proc/cpuinfo
nvidia-smi --query-gpu=name --format=csv,noheader
if command -v g++-13 >/dev/null; then export CC=gcc-13 CXX=g++-13 CUDAHOSTCXX=g++-13; fi
t0=$(date +%s)
cuda="${QMOE_DEVICE_CUDA:-1}"
devices="cpu"; [ "$cuda" = 1 ] && devices="cpu cuda"
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DQMOE_CUDA=$([ "$cuda" = 1 ] && echo ON || echo OFF) -DQMOE_BUILD_TESTS=OFF \
  -DQMOE_BUILD_PYTHON=ON -DQMOE_BUILD_BENCH=OFF -Dnlohmann_json_DIR="$PWD/.deps/share/cmake/nlohmann_json" >/dev/null || exit 1
timeout 300 ninja -C build-gpu -j "$(nproc)" _core qmoe_cli >"$OUT/build.txt" 2>&1 || { tail -30 "$OUT/build.txt"; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD/build-gpu/python:/tmp/site" PYTHONUNBUFFERED=1
python3 -c "import onnxruntime, onnxruntime_extensions, qmoe; print('ort', onnxruntime.__version__, 'ext', onnxruntime_extensions.__version__, 'cuda', qmoe.cuda_available())"
echo "== file tests (CPU and CUDA)"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/python/test_file.py 2>&1 | tail -2
echo "== a >= 1 GiB file: mixtral-8x7b 8-bit block 32"
timeout 90 build-gpu/qmoe bench --model mixtral-8x7b --bits 8 --block 32 --write-file /tmp/m8.safetensors --threads 16 \
  --tokens 1 --max-time 0.5 --ref-tokens 0 --no-ceilings --json "$OUT/bench_m8.json" 2>/dev/null | grep -E "load|prepacked|peak"
for d in $devices; do timeout 60 python3 bench/load_file.py /tmp/m8.safetensors --device $d --threads 16 --runs 3 --json "$OUT/load_m8_$d.json"; done
rm -f /tmp/m8.safetensors
echo "== ONNX Runtime vs offloaded session, 4 gpt-oss-20b layers"
timeout 120 python3 bench/onnx_offload.py --threads 16 --tokens 1,16 --seconds 12 --dir /tmp/oo --json "$OUT/onnx_offload_16.json" 2>&1 | grep -v "^  run"
[ "${1:-}" = "--two-threads" ] && timeout 100 taskset -c 0,1 python3 bench/onnx_offload.py --threads 2 --tokens 1,16 --seconds 12 --dir /tmp/oo --json "$OUT/onnx_offload_2.json" 2>&1 | grep -v "^  run"
date
