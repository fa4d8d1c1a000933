#!/usr/bin/env bash
# Pack a large data set into shards with an array job, then merge and verify.
#
#   DATASET=koniq-10k ROOT=/data/koniq10k OUT=shards/koniq-10k PACK_ARGS="--resize seed" \
#       bash slurm/pack.sh          # or: sbatch slurm/pack.sh (the same, as a tiny job)
#
# Run outside an array job, this script submits itself twice and exits:
#   1. an array of PACK_SLICES tasks; task I runs
#        python -m iqa_dist.pack --dataset $DATASET --root $ROOT --out $OUT --slice I/N
#      (writes every N-th shard starting at I);
#   2. a job that starts when every task succeeded (--dependency=afterok) and runs
#        python -m iqa_dist.pack --dataset $DATASET --root $ROOT --out $OUT --merge --verify
#      (joins the slices into the manifest and checks the shards).
# It prints both job ids. To do it by hand instead:
#   a=$(sbatch --parsable --array=0-7 slurm/pack.sh)
#   PACK_STEP=merge sbatch --dependency=afterok:$a slurm/pack.sh
#
# Environment:
#   DATASET, ROOT, OUT  as for `python -m iqa_dist.pack` (required; ROOT may be empty for
#                       the demo set)
#   PACK_ARGS     further options for every task and the merge, split on blanks, the same
#                 for all (e.g. "--resize seed --shard_size 500 --seed 0")
#   PACK_SLICES   number of array tasks (default 8)
#   PACK_PARALLEL at most this many tasks at once (default: all)
#   PACK_STEP     merge: run the merge (set by the submitter for its second job)
#   PACK_SBATCH   extra sbatch options for both jobs, split on blanks (e.g. "-p cpu")
#   VENV          see slurm/common.sh
#
#SBATCH --job-name=iqa-pack
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=12:00:00
#SBATCH --output=runs/slurm/%x-%A_%a.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
[[ -f slurm/common.sh ]] || { echo "slurm/common.sh not found in $PWD: run from the repository root" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source slurm/common.sh
iqa_setup

: "${DATASET:?set DATASET}" "${OUT:?set OUT}"
read -r -a EXTRA <<<"${PACK_ARGS:-}"
PACK=(python -m iqa_dist.pack --dataset "$DATASET" --out "$OUT")
[[ -n ${ROOT:-} ]] && PACK+=(--root "$ROOT")

if [[ -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
    # One slice; indices counted from the array's first, whatever it is.
    I=$((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}))
    N=${SLURM_ARRAY_TASK_COUNT:?}
    iqa_log "packing slice $I/$N of $DATASET into $OUT"
    exec "${PACK[@]}" --slice "$I/$N" --workers "$(iqa_step_cpus)" "${EXTRA[@]}"
elif [[ ${PACK_STEP:-} == merge ]]; then
    iqa_log "merging the slices of $OUT and verifying"
    exec "${PACK[@]}" --merge --verify "${EXTRA[@]}"
else
    # Submitter. Slurm runs a copy of a batch script: find the original for resubmission.
    SCRIPT=slurm/pack.sh
    [[ -f $SCRIPT ]] || iqa_die "$SCRIPT not found in $PWD"
    N=${PACK_SLICES:-8}
    read -r -a SB <<<"${PACK_SBATCH:-}"
    ARRAY=0-$((N - 1))
    [[ -n ${PACK_PARALLEL:-} ]] && ARRAY+=%$PACK_PARALLEL
    a=$(sbatch --parsable --array="$ARRAY" "${SB[@]}" "$SCRIPT")
    a=${a%%;*}
    m=$(PACK_STEP=merge sbatch --parsable --dependency=afterok:"$a" --kill-on-invalid-dep=yes \
        --job-name=iqa-pack-merge --output="runs/slurm/%x-%j.out" "${SB[@]}" "$SCRIPT")
    m=${m%%;*}
    iqa_log "submitted array job $a ($N slices) and merge job $m (after $a succeeds)"
    echo "$a $m"
fi
