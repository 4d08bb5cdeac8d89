#!/usr/bin/env bash
# Builds everything and runs every test: the C++ suite (GoogleTest, via ctest),
# the same suite under AddressSanitizer + UndefinedBehaviorSanitizer, and the
# Python suite (pytest: differential against ONNX Runtime's QMoE kernel and
# against the float64 reference). Sets up its own venv with pinned versions.
#   scripts/test.sh             # everything
#   scripts/test.sh --quick     # skip the sanitizer build and the 60 s fuzz run
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
quick=0
for a in "$@"; do
  case "$a" in
    --quick) quick=1 ;;
    *) echo "usage: scripts/test.sh [--quick]" >&2; exit 2 ;;
  esac
done
ensure_deb nlohmann-json3-dev clang-format-14 clang-tidy-14
ensure_venv "$ROOT/scripts/requirements-build.txt" "$ROOT/tests/python/requirements.txt"

say "clang-format (.clang-format) and ruff (pyproject.toml)"
CLANG_FORMAT=clang-format-14 "$ROOT/scripts/format.sh" --check
"$VENV/bin/ruff" check "$ROOT"

say "C++ build + tests (Release)"
configure_build "$ROOT/build-test" -DCMAKE_BUILD_TYPE=Release -DQMOE_BUILD_TESTS=ON -DQMOE_WERROR=ON
cmake --build "$ROOT/build-test" -j "$JOBS"
(cd "$ROOT/build-test" && ctest --output-on-failure -j "$JOBS")

say "clang-tidy (.clang-tidy) on the library sources"
CLANG_TIDY=clang-tidy-14 "$ROOT/scripts/tidy.sh" "$ROOT/build-test"

say "find_package(qmoe): install, then build and run examples/quickstart.cpp against the installed tree"
rm -rf "$ROOT/build-install" "$ROOT/build-consumer"
cmake --install "$ROOT/build-test" --prefix "$ROOT/build-install" >/dev/null
cmake -S "$ROOT/tests/consumer" -B "$ROOT/build-consumer" -G Ninja -DCMAKE_PREFIX_PATH="$ROOT/build-install" >/dev/null
cmake --build "$ROOT/build-consumer"
"$ROOT/build-consumer/quickstart"

if [ "$quick" = 0 ]; then
  say "C++ tests under ASan + UBSan"
  configure_build "$ROOT/build-asan" -DCMAKE_BUILD_TYPE=Debug -DQMOE_SANITIZE=ON -DQMOE_BUILD_TESTS=ON -DQMOE_WERROR=ON \
    -DQMOE_BUILD_BENCH=OFF -DQMOE_BUILD_CLI=OFF
  cmake --build "$ROOT/build-asan" --target qmoe_tests -j "$JOBS"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$ROOT/build-asan/tests/cpp/qmoe_tests" --gtest_brief=1

  # libFuzzer on the file reader (clang, ASan + UBSan) from tests/fuzz/corpus.
  "$ROOT/scripts/fuzz.sh" 60
fi

say "Python package (pip install .) + pytest"
"$PY" -m pip install -q --no-build-isolation "$ROOT"
"$PY" -m pytest "$ROOT/tests/python" -q
