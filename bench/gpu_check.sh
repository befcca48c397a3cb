#!/usr/bin/env bash
# The GPU check (issue #19): each GPU branch of tuneforge run once, in under 10 minutes on one GPU, its figures under OUTDIR.
#
#   bash bench/gpu_check.sh OUTDIR                 # on the machine with the GPU (see bench/gpu_prepare.sh for the call)
#   bash bench/gpu_check.sh OUTDIR --dry-run       # on a CPU, tiny settings: proves the script's plumbing
#   options: --budget SECONDS (whole check; default GPU 540, dry run 1500)  --models auto|real|standin
#            --only run:sentiment,serve,... (a rerun of some steps)  --work DIR (runs, stand-in models; big files)
#
# Steps (bench/gpu_check.py says more): env; models (real, or random stand-ins of the same size from .gpu/); each
# task's example config on device auto / precision auto (bf16 on the GPU), shortened, the estimate against the actual;
# `tuneforge serve` answering requests; the LLM serving bench at 8 clients; FSDP (skipped on 1 GPU). Each step is
# time-boxed and recorded, a failed one does not stop the others; OUTDIR/summary.json holds them all.
# Before the steps: the Python that has torch (.venv/bin/python here, python3 there; $PYTHON overrides it), src/ on
# PYTHONPATH when tuneforge is not installed, and the wheels in .whl/ that this machine lacks installed (no network).
set -u

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
[ $# -ge 1 ] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0 ;; -*) echo "gpu_check.sh: the first argument is OUTDIR" >&2; usage >&2; exit 2 ;; esac
OUTDIR=$1
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
mkdir -p "$OUTDIR" || { echo "gpu_check.sh: cannot create $OUTDIR" >&2; exit 2; }
OUTDIR=$(cd "$OUTDIR" && pwd)

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
else PY=$(command -v python3) || { echo "gpu_check.sh: no python3" >&2; exit 2; }
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if ! "$PY" -c 'import tuneforge' 2>/dev/null; then
  export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -d "$ROOT/.whl" ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  SITE=${TUNEFORGE_GPUCHECK_SITE:-/tmp/tuneforge-gpucheck-site}
  if ! "$PY" "$ROOT/bench/gpu_assets.py" install "$ROOT/.whl" "$SITE" --record "$OUTDIR/install.json"; then
    echo "gpu_check.sh: installing the carried wheels failed (see $OUTDIR/install.json); going on" >&2
  fi
  [ -d "$SITE" ] && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "gpu_check.sh: $("$PY" --version 2>&1) at $PY; PYTHONPATH=${PYTHONPATH:-}"
exec "$PY" "$ROOT/bench/gpu_check.py" "$OUTDIR" "$@"
