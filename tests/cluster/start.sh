#!/usr/bin/env bash
# Bring up a one-node SLURM cluster on this machine for the cluster tests (as root).
#
#   tests/cluster/start.sh     # idempotent: does nothing when the cluster is up and configured
#   tests/cluster/start.sh 2   # the same, plus a 2-node cluster in network namespaces for the
#                              # multi-node tests (tests/cluster/multinode.sh; clients: tests/cluster/mn)
#   tests/cluster/stop.sh      # cancels all jobs, stops the daemons of both, removes the namespaces
#
# Debian 12 packages (Slurm 22.05), no systemd: munged, slurmctld and slurmd are started
# by hand. Partition `debug` (default) holds the one node (NodeAddr=127.0.0.1). Process
# tracking: proctrack/cgroup + task/cgroup (cgroup v1) when a smoke-test step runs with
# it, else proctrack/linuxproc + task/none (which lets daemonised children escape a job).
#
# Environment:
#   SLURM_START_TIMEOUT  seconds to wait for the node to become idle (default 30)
#   SLURM_PROCTRACK      cgroup | linuxproc: use this, no fallback (default: try cgroup)
#   SLURM_DEF_MEM        DefMemPerCPU in MB (default 1024), so that jobs share the node
# Files: /etc/slurm/slurm.conf, /etc/slurm/cgroup.conf, logs in /var/log/slurm/,
# job completion records in /var/log/slurm/jobcomp.log (no slurmdbd, hence no sacct).
set -euo pipefail

NODES=${1:-1}
[[ $NODES =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [NODES]" >&2; exit 2; }
TIMEOUT=${SLURM_START_TIMEOUT:-30}
DEF_MEM=${SLURM_DEF_MEM:-1024}
CONF=/etc/slurm/slurm.conf
CGCONF=/etc/slurm/cgroup.conf
LOGDIR=/var/log/slurm
RUNDIR=/run/slurm
HERE=$(cd "$(dirname "$0")" && pwd)

say() { echo "start.sh: $*" >&2; }
die() {
    say "FAILED: $*"
    local f
    for f in "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" /var/log/munge/munged.log; do
        if [[ -f $f ]]; then echo "---- tail $f" >&2; tail -n 15 "$f" >&2; fi
    done
    "$HERE/stop.sh" --one-node >/dev/null 2>&1 || true  # leave nothing half-started
    exit 1
}
[[ $(id -u) == 0 ]] || { say "must run as root"; exit 1; }

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_state() { sinfo -h -N -o %T 2>/dev/null | head -n1; }
proctrack_of() { awk -F= '/^ProctrackType=/{sub("proctrack/", "", $2); print $2}' "$CONF" 2>/dev/null; }
# NODES >= 2: the multi-node cluster as well (NODES = 1 stops one left from before).
multinode() {
    if ((NODES >= 2)); then
        "$HERE/multinode.sh" start "$NODES" || exit 1
    else
        "$HERE/multinode.sh" stop >/dev/null 2>&1 || true
    fi
}
status_line() {
    echo "slurm up: node $(hostname -s) $(node_state), partition debug," \
        "proctrack/$(proctrack_of), $(sinfo -V)"
}

slurm_conf() {  # $1 = cgroup | linuxproc; prints slurm.conf
    local proctrack=proctrack/linuxproc task=task/none
    [[ $1 == cgroup ]] && proctrack=proctrack/cgroup task=task/cgroup
    cat <<EOF
# Written by iqa_dist tests/cluster/start.sh: one node, for tests.
ClusterName=iqa
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire + 1 s before it may start again (default 120 s).
AuthInfo=cred_expire=10
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=$RUNDIR/slurmctld.pid
SlurmdPidFile=$RUNDIR/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
ReturnToService=2
ProctrackType=$proctrack
TaskPlugin=$task
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# Without it each job is given the whole node's memory and jobs run one at a time.
DefMemPerCPU=$DEF_MEM
SchedulerType=sched/backfill
# Submit-to-start under a second; a requeued job's begin time is only noticed by a
# periodic pass (sched_interval, bf_interval: default 60 s and 30 s).
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=5,bf_interval=5
# Refuse impossible requests at submission instead of leaving them pending forever.
EnforcePartLimits=ALL
JobRequeue=1
# Keep finished jobs in 'scontrol show job' (no sacct here) for 15 minutes.
MinJobAge=900
KillWait=10
UnkillableStepTimeout=60
SlurmdTimeout=120
SlurmctldTimeout=60
InactiveLimit=0
Waittime=0
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGDIR/jobcomp.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
$NODE_LINE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

CGROUP_CONF="# Written by iqa_dist tests/cluster/start.sh.
CgroupPlugin=cgroup/v1
IgnoreSystemd=yes
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no"

# ---------------------------------------------------------------- packages
if ! command -v slurmctld >/dev/null; then
    say "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    pkgs=(slurmctld slurmd slurm-client munge)
    apt-get install -y --no-install-recommends "${pkgs[@]}" >/tmp/slurm-apt.log 2>&1 || {
        apt-get update >>/tmp/slurm-apt.log 2>&1 &&
            apt-get install -y --no-install-recommends "${pkgs[@]}" >>/tmp/slurm-apt.log 2>&1
    } || { tail -n 20 /tmp/slurm-apt.log >&2; die "apt-get install failed (log: /tmp/slurm-apt.log)"; }
fi

# ---------------------------------------------------------------- host name
HOST=$(hostname -s)
if ! getent hosts "$HOST" >/dev/null; then
    say "adding $HOST to /etc/hosts"
    echo "127.0.0.1 $HOST" >>/etc/hosts
fi
NODE_LINE=$(slurmd -C | head -n1)
[[ $NODE_LINE == NodeName=* ]] || die "unexpected 'slurmd -C' output: $NODE_LINE"

# ---------------------------------------------------------------- already up?
if pid_alive "$RUNDIR/slurmctld.pid" && pid_alive "$RUNDIR/slurmd.pid" && pid_alive /run/munge/munged.pid \
    && [[ $(node_state) =~ ^(idle|mixed|allocated|completing) ]]; then
    running=$(proctrack_of)
    if [[ -z ${SLURM_PROCTRACK:-} || $SLURM_PROCTRACK == "$running" ]] \
        && [[ $(slurm_conf "$running") == "$(cat "$CONF")" ]]; then
        status_line
        multinode
        exit 0
    fi
    say "configuration changed: restarting"
fi
# Anything half-started (or a changed configuration): stop it and start again.
"$HERE/stop.sh" --one-node >/dev/null 2>&1 || true

# ---------------------------------------------------------------- munge
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
runuser -u munge -- /usr/sbin/munged --force || die "munged did not start"
for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n </dev/null | unmunge >/dev/null 2>&1 || die "munge does not work"

# ---------------------------------------------------------------- slurmctld, slurmd
mkdir -p "$RUNDIR" "$LOGDIR" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd
chown slurm:slurm "$RUNDIR" "$LOGDIR" /var/lib/slurm/slurmctld

start_daemons() {
    /usr/sbin/slurmctld -i || return 1
    for _ in $(seq 50); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
    /usr/sbin/slurmd || return 1
    local end=$((SECONDS + TIMEOUT))
    while ((SECONDS < end)); do
        [[ $(node_state) == idle ]] && return 0
        pid_alive "$RUNDIR/slurmd.pid" || { sleep 0.5; pid_alive "$RUNDIR/slurmd.pid" || return 1; }
        sleep 0.5
    done
    say "node not idle after ${TIMEOUT}s (state: $(node_state))"
    return 1
}

stop_slurm_daemons() {
    local f pid
    for f in "$RUNDIR/slurmd.pid" "$RUNDIR/slurmctld.pid"; do
        pid_alive "$f" || continue
        pid=$(cat "$f")
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    done
}

smoke_test() {  # a step must start (cgroup setup happens at step launch, not at slurmd start)
    timeout 20 srun -N1 -n1 -t 1 -J start-smoke true >/dev/null 2>&1
}

try_mode() {
    slurm_conf "$1" >"$CONF"
    # slurmd 22.05 loads the cgroup plugin named in cgroup.conf even with linuxproc:
    # without cgroups, no cgroup.conf (its default, autodetect, is tried instead).
    if [[ $1 == cgroup ]]; then echo "$CGROUP_CONF" >"$CGCONF"; else rm -f "$CGCONF"; fi
    start_daemons && smoke_test
}

mode=${SLURM_PROCTRACK:-cgroup}
if ! try_mode "$mode"; then
    [[ $mode == cgroup && -z ${SLURM_PROCTRACK:-} ]] || die "slurm did not come up with proctrack/$mode"
    say "proctrack/cgroup did not work here; falling back to proctrack/linuxproc + task/none"
    grep -i -E "error|fatal" "$LOGDIR/slurmd.log" 2>/dev/null | tail -n 5 >&2 || true
    stop_slurm_daemons
    try_mode linuxproc || die "slurm did not come up with proctrack/linuxproc either"
fi
status_line
multinode
