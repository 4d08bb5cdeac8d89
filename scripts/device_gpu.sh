#!/usr/bin/env bash
# On the lent H200 host: build the library, the C++ tests and the Python
# extension with the CUDA backend (sm_90a) in one CMake tree, run the CUDA
# tests, then benchmark against PyTorch. Logs and JSON/PNG under $OUT
# (default ./out/device).
#   scripts/device_gpu.sh                      # build + C++ and Python CUDA tests + full benchmark
#   scripts/device_gpu.sh --no-pytest --no-bench
#   scripts/device_gpu.sh --no-tests -- ARGS   # build, then bench/gpu_vs_torch.py ARGS
#   scripts/device_gpu.sh --sanitize --no-pytest --no-bench
#                                              # + compute-sanitizer memcheck, racecheck, synccheck
#                                              #   over the whole C++ CUDA suite (and memcheck over
#                                              #   the Python CUDA and host-experts tests)
# Afterwards build-gpu/python is the package to put on PYTHONPATH.
set -uo pipefail
# The nlohmann headers carried in .deps (the GPU host has no network), when there.
[ -d .deps/share/cmake/nlohmann_json ] && export QMOE_DEPS="$PWD/.deps"
OUT="${OUT:-$PWD/out/device}"
mkdir -p "$OUT"
tests=1 pytest=1 bench=1 sanitize=0
# Each test step is cut off after this many seconds, so a kernel that hangs
# costs minutes of device time, not the whole lease (the suites take ~10 s).
step_limit="${QMOE_STEP_LIMIT:-180}"
while [ $# -gt 0 ]; do
  case "$1" in
    --no-tests) tests=0 ;;
    --no-pytest) pytest=0 ;;
    --no-bench) bench=0 ;;
    --sanitize) sanitize=1 ;;
    --) shift; break ;;
    *) echo "usage: scripts/device_gpu.sh [--no-tests] [--no-pytest] [--no-bench] [--sanitize] [-- BENCH_ARGS...]" >&2; exit 2 ;;
  esac
  shift
done
exec > >(tee -a "$OUT/gpu_log.txt") 2>&1
echo "== machine"; date; nproc
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,memory.total --format=csv
# The image's default compiler links a static libstdc++ that clashes with
# numpy's inside the extension: use g++-13 where it is there.
if command -v g++-13 >/dev/null; then export CC=gcc-13 CXX=g++-13 CUDAHOSTCXX=g++-13; fi
echo "== build"
t0=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DQMOE_CUDA=ON -DQMOE_BUILD_TESTS=ON \
  -DQMOE_BUILD_PYTHON=ON -DQMOE_BUILD_BENCH=OFF -DQMOE_BUILD_CLI=ON \
  ${QMOE_DEPS:+-Dnlohmann_json_DIR="$QMOE_DEPS/share/cmake/nlohmann_json"} >/dev/null || exit 1
ninja -C build-gpu -j "$(nproc)" qmoe_tests _core qmoe_cli >"$OUT/build.txt" 2>&1 || { tail -40 "$OUT/build.txt"; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s"
export PYTHONPATH="$PWD/build-gpu/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$tests" = 1 ]; then
  echo "== C++ CUDA tests"
  timeout "$step_limit" build-gpu/tests/cpp/qmoe_tests --gtest_filter='*Cuda*' --gtest_brief=1 2>&1 | tail -15
  [ "${PIPESTATUS[0]}" = 124 ] && echo "C++ CUDA tests: stopped after $step_limit s (a kernel that never finishes?)"
fi
if [ "$tests" = 1 ] && [ "$pytest" = 1 ]; then
  echo "== Python CUDA tests"
  timeout "$step_limit" python3 -m pytest tests/python/test_cuda.py -q -x 2>&1 | tail -8
  [ "${PIPESTATUS[0]}" = 124 ] && echo "Python CUDA tests: stopped after $step_limit s (a kernel that never finishes?)"
fi
if [ "$sanitize" = 1 ]; then
  # Every CUDA test of the C++ suite under each tool; a tool reports "ERROR SUMMARY: N errors".
  cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for tool in memcheck racecheck synccheck; do
    echo "== compute-sanitizer --tool $tool (C++ CUDA suite)"
    timeout "${QMOE_SANITIZE_LIMIT:-900}" "$cs" --tool "$tool" --error-exitcode 3 \
      build-gpu/tests/cpp/qmoe_tests --gtest_filter='*Cuda*:HostExperts*' --gtest_brief=1 \
      >"$OUT/sanitize_$tool.txt" 2>&1
    echo "rc=$? $(grep -E 'ERROR SUMMARY|PASSED|FAILED' "$OUT/sanitize_$tool.txt" | tail -3 | tr '\n' ' ')"
  done
  for t in test_host_experts test_cuda; do
    echo "== compute-sanitizer --tool memcheck (Python $t.py)"
    timeout "${QMOE_SANITIZE_LIMIT:-900}" "$cs" --tool memcheck --error-exitcode 3 \
      python3 -m pytest -q -p no:cacheprovider "tests/python/$t.py" >"$OUT/sanitize_py_$t.txt" 2>&1
    echo "rc=$? $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/sanitize_py_$t.txt" | tail -2 | tr '\n' ' ')"
  done
fi
[ "$bench" = 1 ] || exit 0
echo "== benchmark"
if [ $# -gt 0 ]; then
  python3 bench/gpu_vs_torch.py "$@"
else
  python3 bench/gpu_vs_torch.py --graph --json "$OUT/gpu_vs_torch.json"
fi
