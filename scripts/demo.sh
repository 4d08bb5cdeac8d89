#!/usr/bin/env bash
# The main job: build qmoe, synthesize a quantized MoE layer, write it to a
# qmoe file (out/demo.safetensors), load it back (reporting the load speed and
# the memory prepacking took) and run it on the CPU, reporting speed and error
# against the float64 reference.
#   scripts/demo.sh                       # gpt-oss-20b shape, 4-bit, T = 1, 16, 512
#   scripts/demo.sh --model mixtral-8x7b --bits 4 --block 32 --threads 2
# Extra arguments go to `qmoe bench` (see `build/qmoe bench --help`).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ensure_deb nlohmann-json3-dev
ensure_venv "$ROOT/scripts/requirements-build.txt"
say "building (Release)"
configure_build "$ROOT/build" -DCMAKE_BUILD_TYPE=Release -DQMOE_BUILD_TESTS=OFF -DQMOE_BUILD_BENCH=OFF
cmake --build "$ROOT/build" --target qmoe_cli -j "$JOBS"
args=("$@")
case " $* " in
  *" --file "*|*" --file="*|*" --write-file "*|*" --write-file="*) ;;
  *) mkdir -p "$ROOT/out"; args=(--write-file "$ROOT/out/demo.safetensors" "${args[@]}") ;;
esac
say "running: qmoe bench ${args[*]}"
exec "$ROOT/build/qmoe" bench "${args[@]}"
