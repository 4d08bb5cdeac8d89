# Shared by scripts/*.sh: a project-local Python venv with pinned tools.
# Sourced, not run. Sets ROOT, VENV, PY and puts the venv's cmake/ninja first on PATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QMOE_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
JOBS="${QMOE_JOBS:-$(nproc 2>/dev/null || echo 2)}"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# ensure_venv REQUIREMENTS_FILE...: create the venv once, (re)install when a requirements file changed.
ensure_venv() {
  if [ ! -x "$PY" ]; then
    say "creating Python venv in $VENV"
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
  fi
  local stamp="$VENV/.qmoe-req-stamp" want
  want="$(cat "$@" | sha256sum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    say "installing pinned Python packages: $*"
    local args=()
    for f in "$@"; do args+=(-r "$f"); done
    "$PY" -m pip install -q "${args[@]}"
    echo "$want" > "$stamp"
  fi
  export PATH="$VENV/bin:$PATH"
}

# configure_build DIR [cmake args...]
configure_build() {
  local dir="$1"; shift
  local launcher=()
  if command -v ccache >/dev/null 2>&1; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
  cmake -S "$ROOT" -B "$dir" -G Ninja "${launcher[@]}" "$@" >/dev/null
}

# ensure_deb PACKAGE...: install Debian packages that are missing (the build
# needs nlohmann-json3-dev; the fuzz target clang's libFuzzer runtime).
ensure_deb() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing Debian packages: ${missing[*]}"
  local sudo=()
  [ "$(id -u)" -ne 0 ] && sudo=(sudo)
  "${sudo[@]}" apt-get install -y -q "${missing[@]}" >/dev/null || {
    "${sudo[@]}" apt-get update -q >/dev/null && "${sudo[@]}" apt-get install -y -q "${missing[@]}" >/dev/null
  }
}
