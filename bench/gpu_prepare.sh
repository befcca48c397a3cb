#!/usr/bin/env bash
# Prepare the GPU check's call, here (no GPU needed): fills .gpu/ (each example's model files without weights, data
# files that do not travel) and .whl/ (wheels of what the GPU machine lacks), both git-ignored through
# .git/info/exclude; checks the wheels install for CPython 3.12; prints the size that will travel and the device call.
#
#   bash bench/gpu_prepare.sh            # then make the `run` call it prints
#   bash bench/gpu_prepare.sh --clean    # empty .gpu/ and .whl/ first
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || { echo "gpu_prepare.sh: no $PY (make setup first)" >&2; exit 2; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = "--clean" ]; then rm -rf .gpu .whl; fi

EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
for p in /.gpu/ /.whl/; do grep -qxF "$p" "$EXCLUDE" 2>/dev/null || echo "$p" >>"$EXCLUDE"; done

"$PY" bench/gpu_assets.py prepare || { echo "gpu_prepare.sh: preparing .gpu/ and .whl/ failed" >&2; exit 1; }

# every wheel must install for CPython 3.12 on x86-64 Linux, with no index (what the GPU machine will do)
CHECK=$(mktemp -d)
if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$CHECK" \
     --python-version 3.12 --implementation cp --only-binary=:all: \
     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 .whl/*.whl; then
  echo "gpu_prepare.sh: the wheels in .whl/ do not install for CPython 3.12 (see above)" >&2; rm -rf "$CHECK"; exit 1
fi
rm -rf "$CHECK"

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
bytes() { [ $# -gt 0 ] && du -cb "$@" 2>/dev/null | tail -1 | cut -f1 || echo 0; }
mapfile -t TREE < <(git ls-files --cached --others --exclude-standard | while read -r f; do [ -f "$f" ] && echo "$f"; done)
T=$(printf '%s\0' "${TREE[@]}" | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
G=$(bytes .gpu); W=$(bytes .whl)
TOTAL=$((T + G + W))
echo
echo "travels: working tree $(mib "$T") (${#TREE[@]} files: tracked + untracked not ignored) + .gpu $(mib "$G") + .whl $(mib "$W") = $(mib $TOTAL) of 64 MiB"
[ "$TOTAL" -lt $((64 * 1048576)) ] || { echo "gpu_prepare.sh: over 64 MiB: ignore or carry less" >&2; exit 1; }
CMD='bash bench/gpu_check.sh $OUT/gpucheck 2>&1 | tee $OUT/gpucheck.log; exit ${PIPESTATUS[0]}'
echo
echo "device call (tool device, verb run):"
echo "  command:   $CMD"
echo "  carry:     [\".gpu\", \".whl\"]"
echo "  timeout_s: 600     (the check budgets 540 s for itself; the figures come back under \$OUT/gpucheck/)"
