#!/usr/bin/env bash
# On the lent GPU host: the GPU side of qmoe.hf / qmoe.torch (issue 15) in one run.
# Builds the Python extension with CUDA, runs the torch/hf tests (CPU and CUDA),
# then bench/hf_generate.py on the GPU and bench/convert_checkpoint.py on all cores.
# Needs the nlohmann headers carried in .deps. Logs and JSON under $OUT.
set -uo pipefail
OUT="${OUT:-$PWD/out/device}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/hf_log.txt") 2>&1
echo "== machine"; date; nproc; nvidia-smi --query-gpu=name --format=csv,noheader
if command -v g++-13 >/dev/null; then export CC=gcc-13 CXX=g++-13 CUDAHOSTCXX=g++-13; fi
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DQMOE_CUDA=ON -DQMOE_BUILD_TESTS=OFF \
  -DQMOE_BUILD_PYTHON=ON -DQMOE_BUILD_BENCH=OFF -Dnlohmann_json_DIR="$PWD/.deps/share/cmake/nlohmann_json" >/dev/null || exit 1
timeout 300 ninja -C build-gpu _core qmoe_cli >"$OUT/build.txt" 2>&1 || { tail -30 "$OUT/build.txt"; exit 1; }
export PYTHONPATH="$PWD/build-gpu/python" PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, qmoe; print('torch', torch.__version__, 'transformers', transformers.__version__, 'qmoe cuda', qmoe.cuda_available())"
echo "== tests"
timeout ${QMOE_TEST_LIMIT:-240} python3 -m pytest -q -p no:cacheprovider --tb=short ${QMOE_TESTS:-tests/python/test_hf_cuda.py tests/python/test_torch.py tests/python/test_hf_model.py} 2>&1 | tail -${QMOE_TEST_TAIL:-60}
echo "== hf_generate (GPU, bf16)"
timeout ${QMOE_BENCH_LIMIT:-240} python3 bench/hf_generate.py --device cuda --graph --graph-impls ${QMOE_GRAPH_IMPLS:-batched_mm,grouped_mm} --layers ${QMOE_LAYERS:-8} --tokens 32 --reps 3 --json "$OUT/hf_generate_cuda.json" 2>&1 | grep -v "^\[transformers\]"
echo "== convert_checkpoint (all cores)"
[ "${QMOE_SKIP_CONVERT:-0}" = 1 ] || timeout 180 python3 bench/convert_checkpoint.py --layers 2 --json "$OUT/convert_16.json" 2>&1 | tail -4
date
