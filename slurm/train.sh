#!/usr/bin/env bash
# Train on one or more GPU nodes: one `accelerate launch` per node, GPUS_PER_NODE ranks each.
#
#   mkdir -p runs/slurm && sbatch slurm/train.sh                       # from the repo root
#   IQA_CONFIG=configs/small.yaml sbatch --nodes=2 slurm/train.sh
#   IQA_ARGS="--epochs 5 --lr 2e-5" sbatch -p a100 --gres=gpu:4 slurm/train.sh
#
# The #SBATCH lines are defaults for a GPU cluster; command-line options override them
# (a CPU-only test cluster: `sbatch -p debug --gres=none -c 2 --mem=4G ...`). The output
# folder runs/slurm must exist before sbatch (Slurm opens the log before the script runs).
# CPUs: the one task per node needs ranks x (1 + the config's loader `workers`) CPUs
# (8 x 3 = 24 of the 32 below); the script warns in one line when it got fewer.
#
# Preemption: 120 s before the time limit Slurm sends SIGUSR1 to this script (B:USR1@120);
# it is passed to every rank, the trainer saves a checkpoint and exits with code 99
# ("preempted, requeue me"), and this script requeues the job, which continues from
# RUN_DIR (`--resume latest`). See iqa_run_preemptible in slurm/common.sh.
#
# Environment (all optional):
#   IQA_CONFIG         train config (default configs/tiny.yaml)
#   IQA_LAUNCH_CONFIG  accelerate config file (default launch/multi_gpu.yaml; CPU tests:
#                      launch/cpu_2proc.yaml)
#   IQA_ARGS           extra trainer arguments, split on blanks (e.g. "--epochs 3")
#   IQA_RUN_DIR        run directory, kept across requeues (default runs/slurm-$SLURM_JOB_ID)
#   GPUS_PER_NODE      ranks per node (default: the job's GPUs per node, from Slurm's
#                      variables, CUDA_VISIBLE_DEVICES or nvidia-smi: iqa_gpus_per_node in
#                      slurm/common.sh); the script stops when none of them says
#   IQA_CPU            1: train on CPUs (exports ACCELERATE_USE_CPU=true; give GPUS_PER_NODE)
#   IQA_TRAIN_MODULE   python module run by accelerate (default iqa_dist.train; tests
#                      use a stand-in)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds the launcher gives the ranks to save after a
#                      signal before it kills them (default 90: below the 120 s warning)
#   VENV, IQA_PORT, IQA_MAX_REQUEUES: see slurm/common.sh
#
#SBATCH --job-name=iqa-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm/%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
[[ -f slurm/common.sh ]] || { echo "slurm/common.sh not found in $PWD: submit from the repository root" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source slurm/common.sh
[[ -n ${SLURM_JOB_ID:-} ]] || iqa_die "submit with sbatch (needs a Slurm allocation)"
iqa_setup

CONFIG=${IQA_CONFIG:-configs/tiny.yaml}
LAUNCH_CONFIG=${IQA_LAUNCH_CONFIG:-launch/multi_gpu.yaml}
RUN_DIR=${IQA_RUN_DIR:-runs/slurm-$SLURM_JOB_ID}
GPUS_PER_NODE=$(iqa_gpus_per_node)
if [[ -z $GPUS_PER_NODE || $GPUS_PER_NODE == 0 ]]; then
    iqa_die "no GPUs found for this job (submit with --gres=gpu:N or --gpus-per-node=N, or set GPUS_PER_NODE; with IQA_CPU=1 it is the number of CPU ranks per node)"
fi
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
HEAD=$(iqa_head_node)
PORT=$(iqa_port)
read -r -a EXTRA <<<"${IQA_ARGS:-}"
# The loader workers per rank, as the trainer will read them (config file, then IQA_ARGS).
WORKERS=$(python -c 'import sys; from iqa_dist.config import parse_config; print(parse_config(sys.argv[1:]).workers)' \
    --config "$CONFIG" "${EXTRA[@]}" 2>/dev/null) || WORKERS=""
[[ -n $WORKERS ]] && iqa_check_cpus "$GPUS_PER_NODE" "$WORKERS"

[[ ${IQA_CPU:-0} == 1 ]] && export ACCELERATE_USE_CPU=true
# The launchers (torch-elastic agents) pass these signals on to the ranks; SIGUSR1 is not
# among torch's defaults, and without it the agent dies of it and its ranks are killed.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-90}

iqa_log "run dir $RUN_DIR, $NNODES node(s) x $GPUS_PER_NODE rank(s), head $HEAD:$PORT, restart ${SLURM_RESTART_COUNT:-0}"
LAUNCH=(--config_file "$LAUNCH_CONFIG" --num_machines "$NNODES"
    --num_processes "$((NNODES * GPUS_PER_NODE))"
    --main_process_ip "$HEAD" --main_process_port "$PORT")
TRAIN=(-m "${IQA_TRAIN_MODULE:-iqa_dist.train}" --config "$CONFIG" --run_dir "$RUN_DIR" --resume latest)

# One task per node; each evaluates its own $SLURM_NODEID (single quotes) as machine rank.
# No --kill-on-bad-exit: when a node's ranks die, the survivors must live long enough to
# say which rank was lost (iqa_dist/liveness.py); they exit by themselves (code 3) within
# 0.6 x dist_timeout_s of the config, so the step still ends in bounded time.
iqa_run_preemptible "$RUN_DIR" \
    srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 \
    --cpus-per-task="$(iqa_step_cpus)" --kill-on-bad-exit=0 \
    bash -c 'exec accelerate launch --machine_rank "$SLURM_NODEID" "$@"' accelerate-launch \
    "${LAUNCH[@]}" "${TRAIN[@]}" "${EXTRA[@]}"
