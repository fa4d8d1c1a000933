#!/usr/bin/env bash
# The one-command GPU check (issues 12 and 18): 7 minutes on one H100 by our estimate
# (--budget_s), a smoke run of the same code on a CPU. Writes gpu_check.md, gpu_check.json
# (both rewritten after every part), and each part's folder and log under OUT_DIR.
#
#   bash tests/gpu/check.sh [OUT_DIR [--smoke] [--workers N] [--budget_s S] [--collect DIR]]
#   (OUT_DIR default: $OUT, else ./gpu_check)
#
# --collect DIR: the check ends within 9 minutes whatever happens (timeout; GPU_CHECK_TIMEOUT_S
# sets the seconds), then DIR gets
# gpu_check.md, gpu_check.json and gpu_check_parts.tgz (the logs and each part's result
# files, no checkpoints or shards): three files, for a machine that returns only a few.
#
# Wheels in .whl/ (tests/gpu/wheels.sh) are installed first into a temporary site, those
# whose package this Python lacks only: the GPU machine's image has no network.
# Exit status 1 when a part failed (its row says why in one line; its log has the rest).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
out="$(realpath -m "${1:-${OUT:-gpu_check}}")"
python="${PYTHON:-python3}"
[ -x "$repo/.venv/bin/python" ] && python="${PYTHON:-$repo/.venv/bin/python}"
cd "$repo"
site=""
if compgen -G "$repo/.whl/*.whl" >/dev/null; then
    site="$(mktemp -d)"
    trap 'rm -rf "$site"' EXIT
    # the wheels whose distribution is not installed: the image's own versions stay
    mapfile -t lacking < <("$python" - "$repo"/.whl/*.whl <<'PY'
import importlib.metadata, sys
for wheel in sys.argv[1:]:
    try:
        importlib.metadata.version(wheel.rsplit("/", 1)[-1].split("-")[0])
    except importlib.metadata.PackageNotFoundError:
        print(wheel)
PY
)
    if [ "${#lacking[@]}" -gt 0 ]; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${lacking[@]}"
        echo "installed from .whl into $site: $(printf '%s ' "${lacking[@]##*/}")"
    fi
fi
# this checkout's iqa_dist, installed or not, then the carried wheels
export PYTHONPATH="$repo${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"  # one GPU: the figures are per GPU
export PYTHONUNBUFFERED=1
args=() collect=""
set -- "${@:2}"
while [ $# -gt 0 ]; do
    if [ "$1" = --collect ]; then collect="$(realpath -m "$2")"; shift 2; else args+=("$1"); shift; fi
done
if [ -z "$collect" ]; then
    "$python" -m iqa_dist.bench gpu --out "$out" "${args[@]}"  # e.g. --smoke, --workers N, --budget_s S
    exit 0  # set -e: a failed check has exited with its status already
fi
status=0
timeout --kill-after=10 "${GPU_CHECK_TIMEOUT_S:-540}" "$python" -m iqa_dist.bench gpu --out "$out" "${args[@]}" || status=$?
mkdir -p "$collect"
cp "$out"/gpu_check.md "$out"/gpu_check.json "$collect"/ || status=1
(cd "$out" && tar czf "$collect/gpu_check_parts.tgz" logs $(find . -path './part-*' \( -name result.json -o \
    -name results.json -o -name trainer.json \) -printf '%P\n')) || status=1
exit "$status"
