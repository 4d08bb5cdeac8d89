#!/usr/bin/env bash
# clang-format (the repo's .clang-format) over every tracked C++/CUDA source.
#   scripts/format.sh          # reformat in place
#   scripts/format.sh --check  # list unformatted files and fail (CI: scripts/test.sh)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CF="${CLANG_FORMAT:-$(command -v clang-format-14 || command -v clang-format || true)}"
[ -n "$CF" ] || { echo "format.sh: clang-format not found (Debian: apt-get install clang-format-14)" >&2; exit 1; }
cd "$ROOT"
mapfile -t files < <(git ls-files '*.cpp' '*.h' '*.cu' '*.cuh' '*.hpp')
if [ "${1:-}" = "--check" ]; then
  bad=()
  for f in "${files[@]}"; do "$CF" --dry-run -Werror "$f" >/dev/null 2>&1 || bad+=("$f"); done
  if [ "${#bad[@]}" -gt 0 ]; then
    echo "format.sh: ${#bad[@]} file(s) not formatted with .clang-format ($("$CF" --version)); run scripts/format.sh:" >&2
    printf '  %s\n' "${bad[@]}" >&2
    exit 1
  fi
  echo "clang-format: ${#files[@]} files formatted"
else
  "$CF" -i "${files[@]}"
fi
