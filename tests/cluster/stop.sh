#!/usr/bin/env bash
# Stop the SLURM clusters of tests/cluster/start.sh (as root). First the multi-node one
# (tests/cluster/multinode.sh stop: its jobs, daemons, namespaces, links, /etc/hosts lines
# and state; skipped with --one-node), then the one-node one: cancel every job, wait for
# their processes to end, then stop slurmd, slurmctld and munged (by the pids in their pid
# files). Leaves no process behind; exits 1 and lists them if any remain.
#
# Environment:
#   SLURM_STOP_TIMEOUT  seconds to wait for jobs to end before killing them (default 30)
set -uo pipefail

TIMEOUT=${SLURM_STOP_TIMEOUT:-30}
RUNDIR=/run/slurm
say() { echo "stop.sh: $*" >&2; }
HERE=$(cd "$(dirname "$0")" && pwd)
if [[ ${1:-} != --one-node ]]; then
    "$HERE/multinode.sh" stop || say "multinode.sh stop failed"
fi
ROOT_NET=$(readlink /proc/self/ns/net)
pid_of() { [[ -f $1 ]] && cat "$1"; }
alive() { [[ -n $1 ]] && kill -0 "$1" 2>/dev/null; }

# Processes of jobs: the step daemons and everything in Slurm's cgroups.
job_pids() {
    local p
    # only this cluster's: not those of the multi-node cluster's namespaces
    for p in $(pgrep -x slurmstepd); do [[ $(readlink /proc/$p/ns/net 2>/dev/null) == "$ROOT_NET" ]] && echo "$p"; done
    cat /sys/fs/cgroup/freezer/slurm/uid_*/job_*/step_*/cgroup.procs 2>/dev/null
    cat /sys/fs/cgroup/freezer/slurm/uid_*/job_*/step_*/task_*/cgroup.procs 2>/dev/null
}

stop_pid() {  # pid name: TERM, wait up to 10 s, then KILL
    local pid=$1 name=$2
    alive "$pid" || return 0
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do alive "$pid" || return 0; sleep 0.2; done
    say "$name ($pid) ignored SIGTERM: killing it"
    kill -9 "$pid" 2>/dev/null
    sleep 0.2
}

ctld=$(pid_of $RUNDIR/slurmctld.pid)
slurmd=$(pid_of $RUNDIR/slurmd.pid)
munged=$(pid_of /run/munge/munged.pid)

# ---------------------------------------------------------------- jobs
if alive "$ctld"; then
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u)
    if [[ -n $jobs ]]; then
        say "cancelling jobs: $(echo $jobs)"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null
    fi
fi
end=$((SECONDS + TIMEOUT))
while ((SECONDS < end)); do
    [[ -z $(job_pids) ]] && { ! alive "$ctld" || [[ -z $(squeue -h -t R,CG -o %A 2>/dev/null) ]]; } && break
    sleep 0.5
done
left=$(job_pids | sort -u)
if [[ -n $left ]]; then
    say "job processes still there after ${TIMEOUT}s, killing: $(echo $left)"
    # shellcheck disable=SC2086
    kill -9 $left 2>/dev/null
    sleep 0.5
fi

# ---------------------------------------------------------------- daemons
stop_pid "$slurmd" slurmd
stop_pid "$ctld" slurmctld
stop_pid "$munged" munged
rm -f $RUNDIR/slurmd.pid $RUNDIR/slurmctld.pid

left=$( { job_pids; for p in $slurmd $ctld $munged; do alive "$p" && echo "$p"; done; } | sort -u)
if [[ -n $left ]]; then
    say "processes left:"
    # shellcheck disable=SC2086
    ps -o pid,ppid,stat,cmd -p $(echo $left | tr ' ' ,) >&2
    exit 1
fi
echo "slurm stopped"
