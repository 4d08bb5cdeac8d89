#!/usr/bin/env bash
# On the lent GPU host (16-core Xeon + H100/H200): experts in host memory beside
# the GPU (issue 18 part A). Builds the CUDA tests and the Python extension, runs
# the host-experts tests (C++ and Python) and the CUDA suites they touch, then
# bench/host_experts.py. Needs the nlohmann headers carried in .deps.
# Logs and JSON under $OUT (default ./out/device).
#   scripts/device_host_experts.sh [--no-tests] [--no-bench] [bench args...]
set -uo pipefail
OUT="${OUT:-$PWD/out/device}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/host_experts_log.txt") 2>&1
tests=1 bench=1
while [ $# -gt 0 ]; do
  case "$1" in
    --no-tests) tests=0 ;;
    --no-bench) bench=0 ;;
    *) break ;;
  esac
  shift
done
echo "== machine"; date; nproc; grep -m1 "model name" /proc/cpuinfo
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
if command -v g++-13 >/dev/null; then export CC=gcc-13 CXX=g++-13 CUDAHOSTCXX=g++-13; fi
t0=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DQMOE_CUDA=ON -DQMOE_BUILD_TESTS=ON \
  -DQMOE_BUILD_PYTHON=ON -DQMOE_BUILD_BENCH=OFF -DQMOE_BUILD_CLI=ON \
  -Dnlohmann_json_DIR="$PWD/.deps/share/cmake/nlohmann_json" >/dev/null || exit 1
timeout 400 ninja -C build-gpu -j "$(nproc)" qmoe_tests _core >"$OUT/build.txt" 2>&1 || { tail -30 "$OUT/build.txt"; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s"
export PYTHONPATH="$PWD/build-gpu/python" PYTHONUNBUFFERED=1
if [ "$tests" = 1 ]; then
  echo "== C++: host experts and the CUDA suite"
  timeout 180 build-gpu/tests/cpp/qmoe_tests --gtest_filter='*Cuda*:HostExperts*:ThreadPool*' --gtest_brief=1 2>&1 | tail -40
  echo "== Python: host experts, CUDA"
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/python/test_host_experts.py -x 2>&1 | tail -15
  timeout 180 python3 -m pytest -q -p no:cacheprovider --tb=short tests/python/test_cuda.py -x 2>&1 | tail -40
fi
[ "$bench" = 1 ] || exit 0
echo "== bench/host_experts.py"
timeout 420 python3 bench/host_experts.py --json "$OUT/host_experts.json" "$@"
