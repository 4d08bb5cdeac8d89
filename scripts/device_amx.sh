#!/usr/bin/env bash
# On the lent GPU host (16-core Xeon with AMX): build the CPU engine, test the
# AMX-BF16 kernels with each loop (QMOE_AMX_LOOP, src/cpu/kernels/amx_loop.h),
# and time the loops against each other on gpt-oss-20b at accuracy_level 3:
# T = 512 and 4096 for current and new, a second round at T = 512 with the
# per-phase profile, the thread scaling of the faster loop at T = 512, then (time
# permitting) the panel loop's variants new-k2 / new-k8 at T = 512. Logs (and JSON) under $OUT
# (default ./out/device). Meant to finish in under 6 minutes on 16 cores: every
# `qmoe bench` spends ~15 s synthesizing the layer, so optional steps are skipped
# once BUDGET_S seconds have passed.
#   OUT=dir THREADS=16 JOBS=16 BUDGET_S=320 EXTRA="new-k2 new-k8" scripts/device_amx.sh
set -uo pipefail
OUT="${OUT:-$PWD/out/device}"
THREADS="${THREADS:-16}"
JOBS="${JOBS:-16}"
BUDGET_S="${BUDGET_S:-320}"
EXTRA="${EXTRA:-new-k2 new-k8}"
MODEL=gpt-oss-20b
mkdir -p "$OUT"
exec > >(tee "$OUT/amx_log.txt") 2>&1
SECONDS=0
left() { [ "$SECONDS" -lt "$BUDGET_S" ] || { echo "(skipped: ${SECONDS}s used, budget ${BUDGET_S}s) $*"; return 1; }; }

echo "== machine"; date; nproc; grep -m1 "model name" /proc/cpuinfo
grep -o -w -E "amx_tile|amx_int8|amx_bf16|avx512_vnni|avx512_bf16" /proc/cpuinfo | sort -u | tr '\n' ' '; echo
grep -q -w amx_bf16 /proc/cpuinfo || echo "NOTE: no AMX-BF16 here: level 3 runs in float32, the AMX tests skip and the loops are not exercised"

echo "== build (build-amx)"
launcher=(); command -v ccache >/dev/null 2>&1 && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S . -B build-amx -G Ninja -DCMAKE_BUILD_TYPE=Release -DQMOE_CUDA=OFF -DQMOE_BUILD_BENCH=OFF "${launcher[@]}" >/dev/null &&
  ninja -C build-amx -j "$JOBS" qmoe_cli qmoe_tests | tail -1 || exit 1
Q=./build-amx/qmoe
$Q info | head -6
echo "(${SECONDS}s)"

echo "== tests: AMX loops (every loop, and bit-for-bit against each other), threads, pool"
for loop in current new; do
  echo "-- QMOE_AMX_LOOP=$loop"
  QMOE_AMX_LOOP=$loop ./build-amx/tests/cpp/qmoe_tests --gtest_brief=1 \
    --gtest_filter='*Bf16*:Threads.*:ThreadPool.*:Parity.*' 2>&1 | tail -n 12
done
echo "-- everything else, once (QMOE_AMX_LOOP=new)"
QMOE_AMX_LOOP=new ./build-amx/tests/cpp/qmoe_tests --gtest_brief=1 --gtest_filter='-*Bf16*:Threads.*:ThreadPool.*:Parity.*' 2>&1 | tail -n 6
echo "(${SECONDS}s)"

# bench LOOP NAME ARGS...: one `qmoe bench` at level 3 with $THREADS threads; table to $OUT/NAME.txt,
# profile lines (QMOE_PROFILE=1 runs) to $OUT/NAME.prof.
bench() {
  local loop=$1 name=$2; shift 2
  QMOE_AMX_LOOP=$loop $Q bench --model $MODEL --accuracy-level 3 "$@" >"$OUT/$name.txt" 2>"$OUT/$name.prof"
  grep -E "^ +T |^ +[0-9]+ +[0-9]+ " "$OUT/$name.txt" | sed "s/^/  [$name] /"
}
# median_ms NAME T: the median ms column of row T in NAME's table ('*' noise marks dropped).
median_ms() { awk -v t="$2" '$1 == t && $2 ~ /^[0-9]+$/ { gsub(/\*/, "", $4); print $4 }' "$OUT/$1.txt" | head -1; }
profile() {
  python3 - "$OUT/$1.prof" <<'EOF' 2>/dev/null || tail -n 3 "$OUT/$1.prof"
import re, statistics, sys
d = {}
for line in open(sys.argv[1]):
    if line.startswith("qmoe profile:"):
        for k, v in re.findall(r"(\S+) ([0-9.]+) ms", line):
            d.setdefault(k, []).append(float(v))
print("  " + "  ".join(f"{k} {statistics.median(v):.2f}" for k, v in d.items()) + f"   (median ms over {len(next(iter(d.values()), []))} calls)")
EOF
}

echo "== round 1: $MODEL, $THREADS threads, level 3, T = 512 and 4096"
for loop in current new; do
  extra=(); [ $loop = current ] || extra=(--no-ceilings)
  bench "$loop" "r1_$loop" --threads "$THREADS" --tokens 512,4096 --max-time 4 --json "$OUT/amx_$loop.json" "${extra[@]}"
done
echo "(${SECONDS}s)"

echo "== round 2: T = 512 again with QMOE_PROFILE=1 (per-phase ms)"
for loop in current new; do
  left "round 2 $loop" || continue
  QMOE_PROFILE=1 bench "$loop" "r2_$loop" --threads "$THREADS" --tokens 512 --max-time 4 --no-ceilings --ref-tokens 0
  profile "r2_$loop"
done
echo "(${SECONDS}s)"

echo "== summary: T = 512 median ms per loop (round 1 / round 2), T = 4096"
best=""; best_ms=""
for loop in current new; do
  a=$(median_ms "r1_$loop" 512 2>/dev/null); b=$(median_ms "r2_$loop" 512 2>/dev/null); c=$(median_ms "r1_$loop" 4096 2>/dev/null)
  printf "  %-8s T=512 %8s / %-8s T=4096 %s\n" "$loop" "${a:--}" "${b:--}" "${c:--}"
  for v in $a $b; do
    if [ -z "$best_ms" ] || awk -v x="$v" -v y="$best_ms" 'BEGIN { exit !(x < y) }'; then best=$loop; best_ms=$v; fi
  done
done
echo "  fastest at T=512: ${best:-none} (${best_ms:--} ms)"
echo "(${SECONDS}s)"

echo "== thread scaling, QMOE_AMX_LOOP=${best:-current}, T = 512"
for t in 1 2 4 8 16; do
  left "threads $t" || break
  bench "${best:-current}" "scale_$t" --threads "$t" --tokens 512 --min-time 1 --max-time 3 --no-ceilings --ref-tokens 0 |
    grep -v " T " | sed "s/^  \[scale_$t\]/  threads $t:/"
done
echo "(${SECONDS}s)"

echo "== extra loops (panel with 2 and 8 K steps), T = 512, $THREADS threads, if time is left"
for loop in $EXTRA; do
  left "$loop" || break
  bench "$loop" "x_$loop" --threads "$THREADS" --tokens 512 --max-time 4 --no-ceilings --ref-tokens 0
done
echo "== done in ${SECONDS}s; logs in $OUT"
