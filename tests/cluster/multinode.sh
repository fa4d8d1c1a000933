#!/usr/bin/env bash
# A real N-node SLURM cluster on this one machine (as root), for the multi-node tests.
#
#   tests/cluster/multinode.sh start [N]   # N >= 2 nodes (default 2); idempotent
#   tests/cluster/multinode.sh stop        # removes everything start made
#   tests/cluster/multinode.sh status
#   tests/cluster/mn CMD...                # run a client (sbatch, squeue, srun ...) against it
#
# Called by tests/cluster/start.sh N (N >= 2) and tests/cluster/stop.sh. It is separate
# from the one-node cluster of start.sh (own config, ports, state, munged socket), so the
# single-node tests keep their cluster and both can run at once.
#
# Layout (documentation range 198.51.100.0/24, never this machine's own network):
#   bridge iqa-br0 (198.51.100.254) in the root namespace, no route anywhere else;
#   network + UTS namespace iqa-ctl   (198.51.100.1,  hostname iqa-ctl):   slurmctld;
#   network + UTS namespace iqa-nodeI (198.51.100.1I, hostname iqa-nodeI): slurmd of node I;
#   each namespace: a veth pair (iqa0 inside, iqa-h-* on the bridge) and its own loopback.
#   Names in /etc/hosts (lines tagged "# iqa-multinode"), seen by every namespace.
#   Clients run inside iqa-ctl (tests/cluster/mn): a namespace cannot reach the root
#   namespace's bridge address here.
#   Two slurmd on one kernel cannot share cgroup paths: proctrack/linuxproc + task/none.
#   A private munged (socket /run/slurm-iqa/munge/munge.socket, the machine's key).
#   Files: /etc/slurm-iqa/slurm.conf (SLURM_CONF), /var/lib/slurm-iqa, /run/slurm-iqa,
#   logs in /var/log/slurm-iqa (kept by stop for post-mortems; removed by the next start).
set -euo pipefail

ACTION=${1:-status}
N=${2:-2}
NET=198.51.100
BR=iqa-br0
CONF_DIR=/etc/slurm-iqa
CONF=$CONF_DIR/slurm.conf
STATE=/var/lib/slurm-iqa
RUN=/run/slurm-iqa
LOG=/var/log/slurm-iqa
MUNGE_SOCKET=$RUN/munge/munge.socket
TAG="# iqa-multinode"
TIMEOUT=${SLURM_START_TIMEOUT:-60}
export SLURM_CONF=$CONF

say() { echo "multinode.sh: $*" >&2; }
pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
in_ctl() { nsenter --net=/run/netns/iqa-ctl "$@"; }
nodes_in_conf() { awk '/^NodeName=/{sub("NodeName=", "", $1); print $1}' "$CONF" 2>/dev/null; }

die() {
    say "FAILED: $*"
    local f
    for f in "$LOG"/*.log; do [[ -f $f ]] && { echo "---- tail $f" >&2; tail -n 12 "$f" >&2; }; done
    stop >/dev/null 2>&1 || true
    exit 1
}

# ------------------------------------------------------------------ stop
kill_ns_processes() {  # NS: every process in that network namespace (ours only)
    local ns=$1 pids
    [[ -e /run/netns/$ns ]] || return 0
    pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
    [[ -n ${pids// } ]] || return 0
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 25); do
        pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
        [[ -n ${pids// } ]] || return 0
        sleep 0.2
    done
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.3
}

stop() {
    local ns pid
    if [[ -e /run/netns/iqa-ctl ]] && pid_alive $RUN/slurmctld.pid; then
        jobs=$(timeout 10 nsenter --net=/run/netns/iqa-ctl squeue -h -o %A 2>/dev/null | sort -u || true)
        # shellcheck disable=SC2086
        [[ -n $jobs ]] && timeout 10 nsenter --net=/run/netns/iqa-ctl scancel $jobs 2>/dev/null
        for _ in $(seq 20); do
            [[ -z $(timeout 5 nsenter --net=/run/netns/iqa-ctl squeue -h -t R,CG -o %A 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    # Job processes, slurmd and slurmctld all live in our namespaces.
    for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^iqa-(node[0-9]+|ctl)$/ {print $1}'); do
        kill_ns_processes "$ns"
        ip netns delete "$ns" 2>/dev/null || true
    done
    if pid_alive $RUN/munge/munged.pid; then
        pid=$(cat $RUN/munge/munged.pid)
        kill "$pid" 2>/dev/null
        for _ in $(seq 25); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E '^iqa-h-' || true); do
        ip link delete "$link" 2>/dev/null || true
    done
    ip link delete $BR 2>/dev/null || true
    if grep -q "$TAG" /etc/hosts; then
        # /etc/hosts may be a bind mount: rewrite in place, never replace the file
        grep -v "$TAG" /etc/hosts >/tmp/.iqa-hosts.$$ && cat /tmp/.iqa-hosts.$$ >/etc/hosts
        rm -f /tmp/.iqa-hosts.$$
    fi
    rm -rf "$STATE" "$RUN" "$CONF_DIR"
    echo "multinode cluster stopped"
}

# ------------------------------------------------------------------ start
slurm_conf() {  # N
    local cpus mem i
    cpus=$(slurmd -C | head -n1 | grep -o 'CPUs=[0-9]*' | cut -d= -f2)
    mem=$(slurmd -C | head -n1 | grep -o 'RealMemory=[0-9]*' | cut -d= -f2)
    cat <<EOF
# Written by iqa_dist tests/cluster/multinode.sh: $1 nodes on one machine, for tests.
ClusterName=iqamn
SlurmctldHost=iqa-ctl($NET.1)
SlurmctldPort=6917
SlurmdPort=6918
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
ReturnToService=2
# Two slurmd on one kernel cannot share cgroup paths; daemonised children can escape a job.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=5,bf_interval=5
EnforcePartLimits=ALL
JobRequeue=1
# Job ids apart from the one-node cluster's: jobs name /tmp/ray-JOBID and runs/slurm-JOBID.
FirstJobId=100000
MinJobAge=900
KillWait=10
UnkillableStepTimeout=60
SlurmdTimeout=60
SlurmctldTimeout=60
InactiveLimit=0
Waittime=0
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
EOF
    for i in $(seq "$1"); do
        echo "NodeName=iqa-node$i NodeAddr=$NET.$((10 + i)) CPUs=$cpus RealMemory=$((mem / $1)) State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=iqa-node[1-$1] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
}

add_ns() {  # NAME IP SHORT
    local ns=$1 ip=$2 short=$3
    ip netns add "$ns"
    ip link add "iqa-h-$short" type veth peer name "iqa-p-$short"
    ip link set "iqa-p-$short" netns "$ns"
    ip -n "$ns" link set "iqa-p-$short" name iqa0
    ip -n "$ns" addr add "$ip/24" dev iqa0
    ip -n "$ns" link set iqa0 up
    ip -n "$ns" link set lo up
    ip link set "iqa-h-$short" master $BR
    ip link set "iqa-h-$short" up
    echo "$ip $ns $TAG" >>/etc/hosts
}

all_idle() {  # N
    local states
    states=$(in_ctl sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2 == "idle"' | wc -l)
    [[ $states == "$1" ]]
}

start() {
    [[ $(id -u) == 0 ]] || { say "must run as root"; exit 1; }
    ((N >= 2)) || { say "N must be at least 2 (the one-node cluster is tests/cluster/start.sh)"; exit 1; }
    command -v slurmctld >/dev/null || { say "slurm is not installed: run tests/cluster/start.sh first"; exit 1; }
    if [[ -f $CONF ]] && [[ $(slurm_conf "$N") == "$(cat "$CONF")" ]] && pid_alive $RUN/slurmctld.pid \
        && pid_alive $RUN/munge/munged.pid && all_idle "$N"; then
        echo "multinode cluster up: $N nodes ($(in_ctl sinfo -h -N -o %N | tr '\n' ' '))"
        return 0
    fi
    stop >/dev/null 2>&1 || true
    rm -rf "$LOG"
    mkdir -p "$CONF_DIR" "$STATE/ctld" "$RUN/munge" "$LOG"
    chown munge:munge "$RUN/munge"
    chmod 0755 "$RUN/munge"
    touch "$LOG/munged.log" && chown munge:munge "$LOG/munged.log"
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    runuser -u munge -- /usr/sbin/munged --force --socket="$MUNGE_SOCKET" --pid-file="$RUN/munge/munged.pid" \
        --log-file="$LOG/munged.log" --seed-file="$RUN/munge/munged.seed" || die "munged did not start"
    for _ in $(seq 50); do munge -S "$MUNGE_SOCKET" -n </dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1 && break; sleep 0.1; done

    slurm_conf "$N" >"$CONF"
    ip link add $BR type bridge
    ip addr add $NET.254/24 dev $BR
    ip link set $BR up
    add_ns iqa-ctl $NET.1 ctl
    local i
    for i in $(seq "$N"); do add_ns "iqa-node$i" "$NET.$((10 + i))" "n$i"; mkdir -p "$STATE/iqa-node$i"; done

    # slurmctld insists that its host name is SlurmctldHost: a UTS namespace of its own.
    nsenter --net=/run/netns/iqa-ctl unshare --uts bash -c 'hostname iqa-ctl && exec /usr/sbin/slurmctld -i' \
        || die "slurmctld did not start"
    for _ in $(seq 50); do in_ctl scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
    for i in $(seq "$N"); do
        nsenter --net="/run/netns/iqa-node$i" unshare --uts bash -c \
            "hostname iqa-node$i && exec /usr/sbin/slurmd -N iqa-node$i" || die "slurmd of iqa-node$i did not start"
    done
    local end=$((SECONDS + TIMEOUT))
    until all_idle "$N"; do
        ((SECONDS < end)) || die "nodes not idle after ${TIMEOUT}s: $(in_ctl sinfo -h -N -o '%N %T' | tr '\n' ' ')"
        sleep 0.5
    done
    # A step on every node proves the whole chain (munge credentials, slurmd, srun's ports).
    local out
    out=$(timeout 30 nsenter --net=/run/netns/iqa-ctl srun -N "$N" -n "$N" -t 1 -J mn-smoke hostname 2>&1) \
        || die "smoke test 'srun -N $N hostname' failed: $out"
    echo "multinode cluster up: $N nodes ($(echo "$out" | sort | tr '\n' ' '))"
}

case $ACTION in
    start) start ;;
    stop) stop ;;
    status)
        if pid_alive $RUN/slurmctld.pid; then in_ctl sinfo -N; else echo "multinode cluster down"; exit 1; fi ;;
    *) say "usage: $0 start [N] | stop | status"; exit 2 ;;
esac
