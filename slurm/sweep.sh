#!/usr/bin/env bash
# A Ray Tune sweep on a Slurm allocation: a Ray head on the first node, a Ray worker on
# each other node (one srun step each, `ray start --block`), then the sweep driver
# `python -m iqa_dist.tune --address HEAD_IP:PORT` here in the batch script. Ray is
# stopped by ending those steps (never `ray stop`: it kills every Ray on the machine,
# other users' and other jobs' too), so nothing is left running.
#
#   mkdir -p runs/slurm && IQA_SWEEP_CONFIG=configs/sweep.yaml sbatch --nodes=2 slurm/sweep.sh
#
# With several nodes the sweep's storage_path must be on a shared file system.
#
# Preemption: 120 s before the time limit Slurm sends SIGUSR1 to this script (B:USR1@120;
# by hand: `scancel --signal=USR1 --batch JOB`). The script stops the sweep driver as
# Ctrl-C would (Tune saves the sweep; running trials keep their last epoch's checkpoint),
# stops Ray, and requeues the job (`scontrol requeue`, at most IQA_MAX_REQUEUES times). The
# requeued job (SLURM_RESTART_COUNT > 0) resumes the sweep Tune saved (`--resume auto`):
# finished trials stay done, interrupted ones continue from their last checkpoint.
#
# Environment (all optional):
#   IQA_SWEEP_CONFIG  sweep YAML (default configs/sweep.yaml)
#   IQA_ARGS          extra arguments of iqa_dist.tune, split on blanks (e.g. "--resume")
#   GPUS_PER_NODE     GPUs Ray may use on each node (default: the job's GPUs per node, from
#                     Slurm's variables, CUDA_VISIBLE_DEVICES or nvidia-smi; 0, said in the
#                     log, when none is allocated or visible). The sweep runs at most
#                     nodes x GPUS_PER_NODE / (resources_per_trial.workers x gpu) trials at once
#                     (iqa_dist.tune lowers max_concurrent to that, and refuses a sweep
#                     whose trials need GPUs the cluster does not have).
#   IQA_RAY_TMP       Ray's temp dir on every node; keep it short, Ray's unix socket paths
#                     under it must fit in 107 bytes (default /tmp/ray-$SLURM_JOB_ID). Removed
#                     on success, kept (for its logs) when the sweep failed.
#   RAY_START_TIMEOUT seconds to wait for all nodes to join (default 180)
#   RAY_AUTH_MODE     default "disabled", as iqa_dist.tune sets for its own driver; both
#                     sides must agree (with "token", the head and the driver share
#                     ~/.ray/auth_token)
#   IQA_TUNE_MODULE   driver module (default iqa_dist.tune; tests use a stand-in)
#   VENV, IQA_PORT, IQA_HEAD_IP, IQA_MAX_REQUEUES: see slurm/common.sh (the job's ports:
#                     GCS at IQA_PORT, Ray's other fixed ports at +1..+7, workers at +10..+99)
#
#SBATCH --job-name=iqa-sweep
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

SWEEP_CONFIG=${IQA_SWEEP_CONFIG:-configs/sweep.yaml}
GPUS_PER_NODE=$(iqa_gpus_per_node)
if [[ -z $GPUS_PER_NODE ]]; then
    iqa_log "no GPU allocated or visible on this node: Ray gets 0 GPUs (set GPUS_PER_NODE if that is wrong)"
    GPUS_PER_NODE=0
fi
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
RAY_TMP=${IQA_RAY_TMP:-/tmp/ray-$SLURM_JOB_ID}
TIMEOUT=${RAY_START_TIMEOUT:-180}
HEAD=$(iqa_head_node)
HEAD_IP=$(iqa_head_ip "$HEAD")
PORT=$(iqa_port)
ADDRESS=$HEAD_IP:$PORT
CPUS=$(iqa_step_cpus)
read -r -a EXTRA <<<"${IQA_ARGS:-}"
if ((${SLURM_RESTART_COUNT:-0} > 0)); then
    EXTRA+=(--resume auto)  # requeued: continue the sweep, if Tune had saved it before the stop
fi
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
export RAY_TMPDIR=$RAY_TMP RAY_USAGE_STATS_ENABLED=0

# Ports of this job only, so that two sweeps can share a node.
RAY_COMMON=(--block --temp-dir="$RAY_TMP" --num-cpus="$CPUS" --num-gpus="$GPUS_PER_NODE"
    --node-manager-port=$((PORT + 6)) --object-manager-port=$((PORT + 7))
    --min-worker-port=$((PORT + 10)) --max-worker-port=$((PORT + 99))
    --dashboard-agent-listen-port=$((PORT + 2)) --dashboard-agent-grpc-port=$((PORT + 3))
    --runtime-env-agent-port=$((PORT + 4)) --metrics-export-port=$((PORT + 5)))
STEP_PIDS=() DRIVER="" STOPPED="" PREEMPTED="" REQUEUE=""

cleanup() {
    local rc=$? pid
    trap - EXIT
    if ((${#STEP_PIDS[@]})); then
        iqa_log "stopping Ray (srun steps ${STEP_PIDS[*]})"
        # SIGTERM makes srun end its step: Slurm kills every process in it (ray start,
        # gcs_server, raylet, workers), even those that left the process tree.
        kill -TERM "${STEP_PIDS[@]}" 2>/dev/null || true
        for _ in $(seq 60); do
            alive=""
            for pid in "${STEP_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
            [[ -n $alive ]] || break
            sleep 0.5
        done
        for pid in "${STEP_PIDS[@]}"; do
            if kill -0 "$pid" 2>/dev/null; then
                iqa_log "srun $pid still running after 30 s: cancelling the job's steps"
                squeue -h -s -j "$SLURM_JOB_ID" -o %i | grep -v -E '\.(batch|extern)$' | xargs -r scancel --signal=KILL || true
                break
            fi
        done
        wait "${STEP_PIDS[@]}" 2>/dev/null || true
    fi
    if [[ -n $REQUEUE ]]; then rc=0; fi  # the sweep is saved: its Ray logs are not needed
    if [[ $rc == 0 ]]; then rm -rf "$RAY_TMP"; else iqa_log "Ray logs kept in $RAY_TMP on $HEAD"; fi
    # Only now, with Ray stopped: the requeued job starts its own on the same ports.
    if [[ -n $REQUEUE ]]; then _iqa_requeue || rc=99; fi
    iqa_log "exit $rc"
    exit "$rc"
}
# SIGTERM makes the driver stop Tune as Ctrl-C does (iqa_dist.tune.fit). Once only: a second
# one would cut Tune's saving of the sweep short.
stop_driver() {
    [[ -n $DRIVER && -z $STOPPED ]] || return 0
    STOPPED=1
    kill -TERM "$DRIVER" 2>/dev/null || true
}
on_usr1() {
    _IQA_TRAPPED=1 PREEMPTED=1
    iqa_log "got SIGUSR1: stopping the sweep (Tune saves it), then requeueing"
    stop_driver
}
trap cleanup EXIT
trap 'exit 143' TERM
trap on_usr1 USR1

iqa_log "Ray head on $HEAD ($ADDRESS), $NNODES node(s), $CPUS CPUs and $GPUS_PER_NODE GPUs each, temp dir $RAY_TMP," \
    "restart ${SLURM_RESTART_COUNT:-0}"
srun --nodes=1 --ntasks=1 -w "$HEAD" --cpus-per-task="$CPUS" --kill-on-bad-exit=1 \
    ray start --head --node-ip-address="$HEAD_IP" --port="$PORT" \
    --ray-client-server-port=$((PORT + 1)) --include-dashboard=false "${RAY_COMMON[@]}" &
STEP_PIDS+=($!)
if ((NNODES > 1)); then
    srun --nodes=$((NNODES - 1)) --ntasks=$((NNODES - 1)) --ntasks-per-node=1 --exclude="$HEAD" \
        --cpus-per-task="$CPUS" --kill-on-bad-exit=1 \
        ray start --address="$ADDRESS" "${RAY_COMMON[@]}" &
    STEP_PIDS+=($!)
fi

# Wait (bounded) until every node has joined.
end=$((SECONDS + TIMEOUT))
while :; do
    nodes=$(ray status --address "$ADDRESS" 2>/dev/null | grep -c -E '^ *1 node_' || true)
    ((nodes >= NNODES)) && break
    for pid in "${STEP_PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null || iqa_die "a Ray step exited before the cluster was up"
    done
    ((SECONDS < end)) || iqa_die "only ${nodes:-0} of $NNODES Ray node(s) up after ${TIMEOUT}s"
    sleep 2
done
iqa_log "Ray cluster up: $nodes node(s)"

if [[ -n $PREEMPTED ]]; then REQUEUE=1; exit 99; fi  # signalled while Ray was starting
# In the background, so that SIGTERM (scancel, time limit) is passed on at once: Slurm
# signals only the batch shell itself, not its children.
python -m "${IQA_TUNE_MODULE:-iqa_dist.tune}" --config "$SWEEP_CONFIG" --address "$ADDRESS" "${EXTRA[@]}" &
DRIVER=$!
trap '_IQA_TRAPPED=1; iqa_log "got SIGTERM: stopping the sweep driver"; stop_driver' TERM
if [[ -n $PREEMPTED ]]; then stop_driver; fi  # signalled as it started
iqa_wait "$DRIVER"
# A sweep that ended anyway (done, or failed before the stop) is not requeued.
if [[ -n $PREEMPTED && $IQA_RC != 0 ]]; then REQUEUE=1; fi
exit "$IQA_RC"
