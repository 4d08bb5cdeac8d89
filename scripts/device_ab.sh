#!/usr/bin/env bash
# Build-time knobs measured against each other in one device call. After
# scripts/device_gpu.sh has configured and built BUILD (default build-gpu),
# each variant recompiles the library objects it names in place with its -D
# flags, relinks TARGETS (default _core, the Python extension; a quoted,
# space-separated list for several), runs COMMAND (with QMOE_AB_LABEL set to the
# variant's label, e.g. to name its output files),
# and puts the objects back as configured before the next variant (and at the
# end), so every variant starts from the configured build.
#
#   scripts/device_ab.sh [--build DIR] [--target "T..."] -- COMMAND VARIANT...
#   VARIANT = label=[stem:NAME=VALUE[,stem:NAME=VALUE...]]
#             (stem: a file of src/cuda without .cu; an empty list is the build as configured)
#
#   scripts/device_ab.sh -- 'python3 bench/gpu_timeline.py --tokens 1,16 --calls 40' base= \
#       ring16=gemm_decode:QMOE_DECODE_RING_MT1=16 trigger=route:QMOE_ROUTE_EARLY_TRIGGER=1 \
#       fc2x4=gemm_table:QMOE_DECODE_FC2_BLOCKS_PER_SM=4
#
# The knobs are the QMOE_* macros with an #ifndef default in src/cuda (grep
# "build-time knob"). Exit status: 0 when every variant built and its command
# succeeded, else 1 (the later variants still run).
set -uo pipefail
build=build-gpu target=_core
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build="$2"; shift ;;
    --target) target="$2"; shift ;;
    --) shift; break ;;
    *) echo "usage: scripts/device_ab.sh [--build DIR] [--target T] -- COMMAND VARIANT..." >&2; exit 2 ;;
  esac
  shift
done
[ $# -ge 2 ] || { echo "device_ab.sh: a command and at least one variant" >&2; exit 2; }
command="$1"; shift
[ -f "$build/build.ninja" ] || { echo "device_ab.sh: $build is not a configured build (run scripts/device_gpu.sh)" >&2; exit 2; }
export PYTHONPATH="$PWD/$build/python${PYTHONPATH:+:$PYTHONPATH}"

touched=()  # objects compiled with extra flags, to put back
object_of() { echo "CMakeFiles/qmoe.dir/src/cuda/$1.cu.o"; }
compile() {  # compile OBJECT [FLAGS...]: the object's own command from the build, plus FLAGS
  local obj="$1"; shift
  local cmd
  cmd=$(ninja -C "$build" -t commands "$obj" | tail -1)
  [ -n "$cmd" ] || { echo "device_ab.sh: no build command for $obj in $build" >&2; return 1; }
  (cd "$build" && eval "$cmd $*")
}
restore() {
  local obj ok=0
  for obj in "${touched[@]}"; do compile "$obj" || ok=1; done
  touched=()
  # shellcheck disable=SC2086 # the targets are words
  [ $ok = 0 ] && ninja -C "$build" $target >/dev/null
}

status=0
for variant in "$@"; do
  label="${variant%%=*}"
  spec="${variant#*=}"
  [ "$label" != "$variant" ] && [ -n "$label" ] || { echo "device_ab.sh: expected label=..., got '$variant'" >&2; exit 2; }
  echo "== variant $label${spec:+ ($spec)}"
  declare -A flags=()
  IFS=',' read -ra items <<<"$spec"
  for item in "${items[@]}"; do
    [ -n "$item" ] || continue
    stem="${item%%:*}" def="${item#*:}"
    if [ "$stem" = "$item" ] || [ ! -f "src/cuda/$stem.cu" ] || ! [[ "$def" =~ ^QMOE_[A-Z0-9_]+=[A-Za-z0-9_]+$ ]]; then
      echo "device_ab.sh: '$item' is not stem:QMOE_NAME=VALUE with src/cuda/stem.cu" >&2
      exit 2
    fi
    flags[$stem]="${flags[$stem]:-} -D$def"
  done
  built=1
  for stem in "${!flags[@]}"; do
    obj=$(object_of "$stem")
    touched+=("$obj")
    # shellcheck disable=SC2086 # the flags are words
    compile "$obj" ${flags[$stem]} || built=0
  done
  unset flags
  # shellcheck disable=SC2086 # the targets are words
  if [ $built = 1 ] && ninja -C "$build" $target >/dev/null; then
    QMOE_AB_LABEL="$label" bash -c "$command" || status=1
  else
    echo "device_ab.sh: variant $label did not build" >&2
    status=1
  fi
  restore || { echo "device_ab.sh: could not put $build back as configured" >&2; exit 1; }
done
exit $status
