# Shared by slurm/train.sh, slurm/sweep.sh and slurm/pack.sh: sourced, never run.
#
# Slurm runs a *copy* of a batch script (from its spool directory), so the scripts find
# this file relative to the submit directory: submit from the repository root.
#
# Environment read here:
#   VENV      virtual environment to activate if it exists (default .venv)
#   IQA_PORT  first of a block of 100 TCP ports for this job (default 20000 + 100 * (job id
#             % 100), so that jobs sharing a node do not collide; below Linux's ephemeral range)
#   IQA_HEAD_IP  address of the first node for Ray (default: its name resolved by getent)
#   IQA_MAX_REQUEUES  requeue a preempted training or sweep at most this many times (default 50)
# shellcheck shell=bash

iqa_log() { echo "[$(date +%H:%M:%S)] ${SLURM_JOB_NAME:-iqa}[${SLURM_JOB_ID:-local}]: $*" >&2; }
iqa_die() { iqa_log "error: $*"; exit 2; }

# Activate the virtual environment (if there is one) and make the log folder.
iqa_setup() {
    local venv=${VENV:-.venv}
    if [[ -f $venv/bin/activate ]]; then
        # shellcheck disable=SC1091
        source "$venv/bin/activate"
    fi
    mkdir -p runs/slurm
    iqa_log "on $(hostname -s), nodes ${SLURM_JOB_NODELIST:-none}, python $(command -v python || echo none)"
}

# The first node of the allocation: rendezvous host of accelerate and the Ray head.
iqa_head_node() { scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1; }

iqa_head_ip() {  # NODE
    if [[ -n ${IQA_HEAD_IP:-} ]]; then echo "$IQA_HEAD_IP"; return; fi
    local ip
    ip=$(getent ahostsv4 "$1" | awk 'NR == 1 {print $1}')
    [[ -n $ip ]] || iqa_die "cannot resolve $1 (set IQA_HEAD_IP)"
    echo "$ip"
}

iqa_port() { echo "${IQA_PORT:-$((20000 + 100 * (SLURM_JOB_ID % 100)))}"; }

# CPUs for each task of a step, passed explicitly: "The number of cpus per task specified
# for salloc or sbatch is not automatically inherited by srun" (srun(1), Slurm 22.05).
iqa_step_cpus() { echo "${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}"; }

# ------------------------------------------------------------------ sizing
# iqa_gpus_per_node: the GPUs this job has on a node, from the first source that answers:
# GPUS_PER_NODE (the user's word), SLURM_GPUS_ON_NODE (--gres=gpu:N), SLURM_GPUS_PER_NODE
# (--gpus-per-node=[type:]N), SLURM_JOB_GPUS (the allocated indices), CUDA_VISIBLE_DEVICES
# (when set; empty means none), nvidia-smi (every GPU the job's cgroup lets it see).
# Prints nothing when none answers: the caller decides whether that is an error, instead
# of falling back to a number that silently under- or over-uses the node.
iqa_gpus_per_node() {
    local n
    if [[ -n ${GPUS_PER_NODE:-} ]]; then n=$GPUS_PER_NODE
    elif [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then n=$SLURM_GPUS_ON_NODE
    elif [[ -n ${SLURM_GPUS_PER_NODE:-} ]]; then n=${SLURM_GPUS_PER_NODE##*:}
    elif [[ -n ${SLURM_JOB_GPUS:-} ]]; then n=$(_iqa_count_list "$SLURM_JOB_GPUS")
    elif [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then n=$(_iqa_count_list "$CUDA_VISIBLE_DEVICES")
    elif command -v nvidia-smi >/dev/null 2>&1; then n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    else return 0
    fi
    [[ $n =~ ^[0-9]+$ ]] || iqa_die "GPUs per node: '$n' is not a number (set GPUS_PER_NODE)"
    echo "$n"
}

_iqa_count_list() { local IFS=,; local -a items; read -r -a items <<<"$1"; echo "${#items[@]}"; }

# iqa_check_cpus RANKS WORKERS: warn (one line) when the CPUs of this job's task on a node
# cannot feed RANKS ranks that each run a main process and WORKERS loader processes.
iqa_check_cpus() {
    local have need=$(($1 * (1 + $2)))
    have=$(iqa_step_cpus)
    if ((have < need)); then
        iqa_log "warning: $have CPU(s) per node for $1 rank(s) x (1 + $2 loader workers) = $need: the loaders will" \
            "starve the GPUs; submit with --cpus-per-task=$need or lower workers"
    fi
}

# iqa_wait PID: wait for a background process even when a trap interrupts `wait` (a
# trap that should not end the wait sets _IQA_TRAPPED=1); its exit code lands in IQA_RC.
# Bash keeps a finished child's status, so waiting again after a trap is safe.
iqa_wait() {
    while :; do
        _IQA_TRAPPED=""
        wait "$1" && IQA_RC=0 || IQA_RC=$?
        [[ -n $_IQA_TRAPPED ]] || break
    done
}

# ------------------------------------------------------------------ preemption
# iqa_run_preemptible RUN_DIR CMD...
#
# Runs CMD (an srun of the training step) in the background and waits for it, so that a
# trap runs at once (bash runs traps only between commands, `wait` is interrupted). On
# USR1 (from `#SBATCH --signal=B:USR1@120`, or `scancel --signal=USR1 --batch JOB`) the
# signal is passed once to srun, which passes it to every task of the step on every node:
# the `accelerate launch` processes. These are torch-elastic agents, which pass it on to
# their ranks only for the signals named in PET_SIGNALS_TO_HANDLE (train.sh adds SIGUSR1;
# an unhandled SIGUSR1 kills the agent, and Slurm then kills the ranks). Slurm itself, with
# proctrack/cgroup, signals only the tasks (processes whose parent is slurmstepd), never
# their children, so the forwarding chain is needed.
#
# The trainer checkpoints and exits with code 99 ("preempted, requeue me",
# iqa_dist.checkpoint.EXIT_PREEMPTED). A launcher turns a rank's 99 into its own failure
# (exit 1), so each rank also leaves RUN_DIR/preempted/rank-N.json: the step counts as
# preempted when it exits with 99 or those files are there. Then the job is requeued
# (`scontrol requeue`: same job id, so the same RUN_DIR, and `--resume latest` continues)
# and this function returns 0. Otherwise it returns the step's exit code.
#
# SIGTERM (scancel, time limit, preemption by Slurm) reaches every step's tasks from Slurm
# directly; the batch shell only keeps waiting so that the step can save in KillWait, and
# then does NOT requeue (unless USR1 came first): `scontrol requeue` would still succeed
# and turn a user's scancel into a restart. Slurm requeues jobs it preempts itself when
# PreemptMode=REQUEUE.
iqa_run_preemptible() {
    local run_dir=$1 rc
    shift
    _IQA_STEP_PID="" _IQA_SIGNALLED="" _IQA_FORWARDED="" _IQA_TERMINATED=""
    trap '_iqa_on_signal USR1' USR1
    trap '_iqa_on_signal TERM' TERM
    # Markers of an earlier attempt would make a crash look like a preemption (and requeue
    # it forever); the trainer removes them too, but only once it got that far.
    rm -rf "$run_dir/preempted"
    if [[ -n $_IQA_SIGNALLED ]]; then
        iqa_log "signalled before the step started"
        _iqa_requeue && return 0 || return 99
    fi
    "$@" &
    _IQA_STEP_PID=$!
    [[ -n $_IQA_SIGNALLED ]] && _iqa_forward
    iqa_wait "$_IQA_STEP_PID"
    rc=$IQA_RC
    trap - USR1 TERM
    iqa_log "step exited with code $rc"
    if [[ $rc == 99 ]] || compgen -G "$run_dir/preempted/rank-*.json" >/dev/null; then
        if [[ -n $_IQA_TERMINATED && -z $_IQA_SIGNALLED ]]; then
            iqa_log "checkpoint saved, but the job was terminated by Slurm (SIGTERM): not requeueing"
            return 99
        fi
        _iqa_requeue && return 0 || return 99
    fi
    [[ -n $_IQA_SIGNALLED && $rc != 0 ]] && iqa_log "signalled, but the step did not report a checkpoint (code $rc)"
    return "$rc"
}

_iqa_on_signal() {
    _IQA_TRAPPED=1
    iqa_log "got SIG$1"
    [[ $1 == TERM ]] && _IQA_TERMINATED=1
    [[ $1 == USR1 ]] || return 0
    _IQA_SIGNALLED=1
    [[ -n $_IQA_STEP_PID ]] && _iqa_forward
    return 0
}

_iqa_forward() {
    # Once only: a second signal would interrupt the agents' own shutdown of the ranks.
    [[ -z $_IQA_FORWARDED ]] || return 0
    _IQA_FORWARDED=1
    iqa_log "forwarding SIGUSR1 to the step (srun pid $_IQA_STEP_PID)"
    kill -s USR1 "$_IQA_STEP_PID" 2>/dev/null || true
}

_iqa_requeue() {
    local n=${SLURM_RESTART_COUNT:-0} max=${IQA_MAX_REQUEUES:-50}
    if ((n >= max)); then
        iqa_log "preempted, but not requeued: already restarted $n times (IQA_MAX_REQUEUES=$max)"
        return 1
    fi
    iqa_log "preempted: requeueing job $SLURM_JOB_ID (restart $((n + 1)))"
    if scontrol requeue "$SLURM_JOB_ID"; then
        return 0
    fi
    iqa_log "scontrol requeue failed"
    return 1
}
