#!/usr/bin/env bash
# The one-command GPU check (issue 12, section 4): at most 8 minutes on one GPU, a smoke
# run of the same code on a CPU. Writes gpu_check.md, gpu_check.json and each part's log.
#
#   bash tests/gpu/check.sh [OUT_DIR [--smoke] [--workers N]]   (OUT_DIR default: $OUT, else ./gpu_check)
#
# Exit status 1 when a part failed (its row says why in one line; its log has the rest).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
out="$(realpath -m "${1:-${OUT:-gpu_check}}")"
python="${PYTHON:-python3}"
[ -x "$repo/.venv/bin/python" ] && python="${PYTHON:-$repo/.venv/bin/python}"
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's iqa_dist, installed or not
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"  # one GPU: the figures are per GPU
export PYTHONUNBUFFERED=1
exec "$python" -m iqa_dist.bench gpu --out "$out" "${@:2}"  # e.g. --smoke, --workers N
