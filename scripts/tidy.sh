#!/usr/bin/env bash
# clang-tidy (the repo's .clang-tidy) over the library's C++ sources, with the
# compile commands of a configured build (default build-test).
#   scripts/tidy.sh [BUILD_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:-$ROOT/build-test}"
CT="${CLANG_TIDY:-$(command -v clang-tidy-14 || command -v clang-tidy || true)}"
[ -n "$CT" ] || { echo "tidy.sh: clang-tidy not found (Debian: apt-get install clang-tidy-14)" >&2; exit 1; }
[ -f "$BUILD/compile_commands.json" ] || { echo "tidy.sh: no $BUILD/compile_commands.json (configure first)" >&2; exit 1; }
cd "$ROOT"
mapfile -t files < <(git ls-files 'src/*.cpp')
# GCC-only warning flags of the kernels are unknown to clang: not findings.
printf '%s\n' "${files[@]}" | xargs -P "${JOBS:-$(nproc)}" -n 1 "$CT" -p "$BUILD" --quiet \
  --extra-arg=-Wno-unknown-warning-option 2>/dev/null
echo "clang-tidy: ${#files[@]} files clean"
