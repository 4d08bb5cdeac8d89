#!/usr/bin/env bash
# On the lent GPU host: is a refactor free of behaviour and speed changes?
# Builds a baseline tree (a `git archive` tarball of an older commit, $1) and
# this tree, each with CUDA, the CLI and the Python extension, then writes under
# $OUT (default ./out/device):
#   * hashes of the output bits (tools/output_hashes.cpp, copied into the
#     baseline too) of the CUDA sweep and of the CPU sweep on every table the
#     Xeon runs (amx included), base vs head, and their diffs;
#   * `qmoe bench` (CPU, 16 threads, levels 0, 3, 4) alternating base and head;
#   * bench/gpu_vs_torch.py (qmoe vs a bf16 grouped GEMM; this tree's script)
#     alternating the base and head packages.
#   git archive OLD -- . ':!docs/*.png' | gzip > .base.tgz   # here, then carry .base.tgz
#   scripts/device_refactor.sh .base.tgz [STAGE...]
# STAGE: hashes, cpubench, gpubench (default: all three). The builds persist on
# a warm machine, so the stages can be split over several calls.
# Needs the nlohmann headers carried in .deps.
set -uo pipefail
base_tgz="${1:?usage: scripts/device_refactor.sh BASE.tgz [hashes] [cpubench] [gpubench]}"
shift
stages="${*:-hashes cpubench gpubench}"
has_stage() { case " $stages " in *" $1 "*) return 0 ;; esac; return 1; }
OUT="${OUT:-$PWD/out/device}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/refactor_log.txt") 2>&1
step_limit="${QMOE_STEP_LIMIT:-300}"
echo "== machine"; date; nproc; grep -m1 "model name" /proc/cpuinfo
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
if command -v g++-13 >/dev/null; then export CC=gcc-13 CXX=g++-13 CUDAHOSTCXX=g++-13; fi
head_dir="$PWD"
base_dir=/tmp/qmoe_base
if [ ! -f "$base_dir/CMakeLists.txt" ]; then
  mkdir -p "$base_dir" && tar -xzf "$base_tgz" -C "$base_dir" || exit 1
fi
cp tools/output_hashes.cpp "$base_dir/tools/"
grep -q qmoe_output_hashes "$base_dir/CMakeLists.txt" || cat >>"$base_dir/CMakeLists.txt" <<'EOF'
add_executable(qmoe_output_hashes tools/output_hashes.cpp)
target_link_libraries(qmoe_output_hashes PRIVATE qmoe qmoe_synth)
EOF

build() {  # build DIR SRC
  local t0; t0=$(date +%s)
  cmake -S "$2" -B "$1" -G Ninja -DCMAKE_BUILD_TYPE=Release -DQMOE_CUDA=ON -DQMOE_BUILD_TESTS=OFF \
    -DQMOE_BUILD_PYTHON=ON -DQMOE_BUILD_BENCH=OFF -DQMOE_BUILD_CLI=ON \
    -Dnlohmann_json_DIR="$head_dir/.deps/share/cmake/nlohmann_json" >/dev/null || return 1
  timeout 480 ninja -C "$1" -j "$(( $(nproc) / 2 ))" qmoe_output_hashes qmoe_cli _core >"$OUT/build_$(basename "$1").txt" 2>&1 ||
    { tail -30 "$OUT/build_$(basename "$1").txt"; return 1; }
  echo "built $1 in $(( $(date +%s) - t0 )) s"
}
echo "== build (base and head side by side)"
build /tmp/build-base "$base_dir" & base_pid=$!
build "$head_dir/build-head" "$head_dir" & head_pid=$!
wait $base_pid || exit 1
wait $head_pid || exit 1

echo "== output hashes (base vs head)"
run_hashes() {  # run_hashes TAG ARGS... (env set by the caller)
  for side in base head; do
    local bin=/tmp/build-base/qmoe_output_hashes
    [ "$side" = head ] && bin="$head_dir/build-head/qmoe_output_hashes"
    timeout "$step_limit" "$bin" "$@" >"$OUT/hash_${side}_$tag.txt" 2>"$OUT/hash_${side}_$tag.err"
    echo "$side $tag rc=$? $(tail -1 "$OUT/hash_${side}_$tag.txt")"
  done
  if cmp -s "$OUT/hash_base_$tag.txt" "$OUT/hash_head_$tag.txt"; then echo "$tag: IDENTICAL"; else
    echo "$tag: DIFFERENT"; diff "$OUT/hash_base_$tag.txt" "$OUT/hash_head_$tag.txt" | head -20; fi
}
if has_stage hashes; then
  tag=cuda run_hashes cuda
  for isa in amx avx512vnni avx512 avx2 scalar; do
    QMOE_CPU_ISA=$isa tag=cpu_$isa run_hashes cpu
  done
fi

if has_stage cpubench; then
echo "== qmoe bench, CPU, 16 threads (base, head, base, head)"
for round in 1 2; do
  for side in base head; do
    bin=/tmp/build-base/qmoe
    [ "$side" = head ] && bin="$head_dir/build-head/qmoe"
    for l in 0 3 4; do
      echo "-- $side round $round level $l"
      timeout "$step_limit" "$bin" bench --model gpt-oss-20b --threads 16 --tokens 1,16,512 --accuracy-level "$l" \
        --ref-tokens 0 --max-time 3 --min-time 1 --no-ceilings --json "$OUT/bench_${side}_r${round}_l$l.json" 2>/dev/null |
        grep -E "^ +(1|16|512) "
    done
  done
done
fi

if has_stage gpubench; then
echo "== bench/gpu_vs_torch.py (base package, head package, base, head)"
export PYTHONUNBUFFERED=1
for round in 1 2; do
  for side in base head; do
    pkg=/tmp/build-base/python
    [ "$side" = head ] && pkg="$head_dir/build-head/python"
    echo "-- $side round $round"
    PYTHONPATH="$pkg" timeout "$step_limit" python3 bench/gpu_vs_torch.py --models gpt-oss-20b,mixtral-8x7b \
      --tokens 1,16,128,4096 --rounds 2 --no-reference --json "$OUT/gpu_${side}_r$round.json" --png '' \
      >"$OUT/gpu_${side}_r$round.txt" 2>&1
    echo "rc=$?"; tail -16 "$OUT/gpu_${side}_r$round.txt"
  done
done
fi
