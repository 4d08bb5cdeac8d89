#!/usr/bin/env bash
# The comparison of the README: ONNX Runtime's QMoE and qmoe on the same weights,
# in one run, against the machine's measured ceilings (bench/vs_onnxruntime.py).
# Sets up the project venv like scripts/test.sh (pinned versions, incl. matplotlib),
# installs the qmoe package into it, then runs the benchmark.
#   scripts/bench.sh                      # gpt-oss-20b, 2 threads, T = 1,16,512,4096 -> out/bench.{json,png}
#   scripts/bench.sh --models qwen3-30b-a3b,mixtral-8x7b --tokens 1 --threads 2 --json out/t1.json
# Arguments, when given, replace the defaults and go to bench/vs_onnxruntime.py
# (see `python bench/vs_onnxruntime.py --help`). QMOE_PY_BUILD_DIR=DIR builds the
# package in DIR instead of the default build-py/.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ensure_deb nlohmann-json3-dev
ensure_venv "$ROOT/scripts/requirements-build.txt" "$ROOT/tests/python/requirements.txt"

say "Python package (pip install .)"
build_dir=()
if [ -n "${QMOE_PY_BUILD_DIR:-}" ]; then build_dir=(--config-settings=build-dir="$QMOE_PY_BUILD_DIR"); fi
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$JOBS}" \
  "$PY" -m pip install -q --no-build-isolation "${build_dir[@]}" "$ROOT"

if [ "$#" -eq 0 ]; then
  set -- --models gpt-oss-20b --threads 2 --json "$ROOT/out/bench.json" --plot "$ROOT/out/bench.png"
fi
mkdir -p "$ROOT/out"
say "running: bench/vs_onnxruntime.py $*"
exec "$PY" "$ROOT/bench/vs_onnxruntime.py" "$@"
