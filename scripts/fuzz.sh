#!/usr/bin/env bash
# Fuzzes the qmoe file reader (tests/fuzz/fuzz_file.cpp) with libFuzzer under
# AddressSanitizer + UndefinedBehaviorSanitizer, starting from the checked-in
# seed corpus (tests/fuzz/corpus; copied to a temporary folder, so the run
# never writes into the repository). Exits non-zero on any crash, sanitizer
# report, leak, timeout or out-of-memory; the reproducer is left in
# build-fuzz/artifacts/ (run it again: build-fuzz/tests/fuzz/fuzz_file FILE).
#   scripts/fuzz.sh            # 60 seconds
#   scripts/fuzz.sh 3600       # an hour
# Extra libFuzzer flags: QMOE_FUZZ_FLAGS="-jobs=2 -workers=2" scripts/fuzz.sh 600
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
seconds="${1:-60}"
case "$seconds" in
  ''|*[!0-9]*) echo "usage: scripts/fuzz.sh [SECONDS]" >&2; exit 2 ;;
esac
# clang's libFuzzer and sanitizer runtimes (libclang_rt.fuzzer*.a).
ensure_deb clang libclang-rt-14-dev nlohmann-json3-dev
command -v cmake >/dev/null && command -v ninja >/dev/null || ensure_deb cmake ninja-build

build="$ROOT/build-fuzz"
say "fuzz build (clang, ASan + UBSan, libFuzzer) in $build"
CC=clang CXX=clang++ configure_build "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" -DQMOE_FUZZ=ON -DQMOE_SANITIZE=ON -DQMOE_CUDA=OFF \
  -DQMOE_BUILD_TESTS=OFF -DQMOE_BUILD_BENCH=OFF -DQMOE_BUILD_CLI=OFF
cmake --build "$build" --target fuzz_file -j "$JOBS"

work="$(mktemp -d "${TMPDIR:-/tmp}/qmoe-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cp -r "$ROOT/tests/fuzz/corpus" "$work/corpus"
mkdir -p "$build/artifacts"
say "fuzzing the file reader for ${seconds}s from $(ls "$work/corpus" | wc -l) seed files"
# libFuzzer exits non-zero on a crash, leak, timeout or OOM; set -e passes that on.
# Inputs stay under 10 KB (the largest seed), so one allocation above 64 MB is
# the reader allocating what a size field claims: -malloc_limit_mb reports it.
ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}" \
UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}" \
  "$build/tests/fuzz/fuzz_file" -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=64 -timeout=10 \
  -dict="$ROOT/tests/fuzz/file.dict" -artifact_prefix="$build/artifacts/" -print_final_stats=1 \
  ${QMOE_FUZZ_FLAGS:-} "$work/corpus"
say "fuzz: no crash in ${seconds}s"
