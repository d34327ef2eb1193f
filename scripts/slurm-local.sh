#!/usr/bin/env bash
# A single-node Slurm on this machine, for tests and trying `estpipe submit` (see docs/clusters.md).
#
#   scripts/slurm-local.sh start    install slurm + munge when missing, configure, start, wait idle
#   scripts/slurm-local.sh stop     stop slurmd, slurmctld and munged; remove their pid files
#   scripts/slurm-local.sh status   print the node state (exit 1 when Slurm is not answering)
#
# Runs as root, with no systemd: the daemons are started directly. Idempotent: `start` on a running
# Slurm only waits for the node to be idle (after restarting slurmctld and slurmd when the
# configuration it writes has changed). Loopback only: slurmctld and slurmd listen on 127.0.0.1
# (what `localhost` resolves to), munged on a unix socket; one partition `debug` on node `localhost`.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
WAIT_SECONDS=${SLURM_LOCAL_WAIT:-60}

log() { echo "slurm-local: $*" >&2; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        log "must run as root (it installs packages and starts daemons)"
        exit 2
    fi
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    log "installing slurmctld slurmd slurm-client munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

# Prints "changed" when the configuration differs from the one in place.
write_conf() {
    local cpus mem
    # nproc honours OMP_NUM_THREADS and OMP_THREAD_LIMIT: the node has every core whatever the
    # caller's OpenMP setting (a dask nanny leaves OMP_NUM_THREADS=1 behind in its parent).
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    # `slurmd -C` prints the node's real memory; Slurm refuses a node that claims more than it has.
    mem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
    mem=${mem:-1000}
    install -d /etc/slurm
    cat >"$CONF.new" <<EOF
# Written by estpipe scripts/slurm-local.sh: a single-node Slurm for tests.
ClusterName=ci
SlurmctldHost=localhost
# Bind to the address the node name resolves to (localhost: 127.0.0.1), not to every address:
# NoCtldInAddrAny for slurmctld, NoInAddrAny for slurmd, slurmstepd and srun.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# cgroup tracking makes jobs "complete" without running here; linuxproc really runs them.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default a job with no --mem takes the whole node and jobs run one at a time.
DefMemPerCPU=1000
ReturnToService=2
MpiDefault=none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    if [ -f "$CONF" ] && cmp -s "$CONF" "$CONF.new"; then
        rm -f "$CONF.new"
    else
        mv "$CONF.new" "$CONF"
        echo changed
    fi
}

# A daemon killed earlier can linger as a zombie (nothing reaps it here), and kill -0 still
# succeeds on a zombie: look at its state instead.
pid_alive() {
    local pid state
    [ -f "$1" ] || return 1
    pid=$(cat "$1")
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

# The daemons live on after this script: they must not keep the caller's open files. munged keeps
# every descriptor it inherits, so one started under `flock LOCK bash slurm-local.sh start` held
# LOCK for its whole life. Keep stdin/out/err and bash's own script descriptor (255).
close_inherited_fds() {
    local fd
    for fd in /proc/$$/fd/*; do
        fd=${fd##*/}
        case $fd in
            0 | 1 | 2 | 255) ;;
            *) eval "exec $fd>&-" 2>/dev/null || true ;;
        esac
    done
}

node_state() { timeout 5 sinfo -h -o %T 2>/dev/null | head -1 || true; }

start() {
    need_root
    install_packages
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o slurm -g slurm /var/spool/slurmctld /var/log/slurm
    install -d /var/spool/slurmd
    if [ "$(write_conf)" = changed ] && { pid_alive /run/slurmctld.pid || pid_alive /run/slurmd.pid; }; then
        # the daemons read the configuration (and bind their ports) only when they start
        log "configuration changed: restarting slurmctld and slurmd"
        stop_daemons /run/slurmd.pid /run/slurmctld.pid
    fi
    [ -f /etc/munge/munge.key ] || { log "creating /etc/munge/munge.key"; mungekey -c 2>/dev/null || create-munge-key -f; }
    close_inherited_fds
    pid_alive /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
    pid_alive /run/slurmctld.pid || /usr/sbin/slurmctld
    pid_alive /run/slurmd.pid || /usr/sbin/slurmd -N localhost
    local state deadline=$((SECONDS + WAIT_SECONDS))
    while :; do
        state=$(node_state)
        case "$state" in
            idle | mixed | allocated) break ;;
            drain* | down*)
                # A node left drained by an earlier run: return it to service.
                scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true ;;
        esac
        if [ $SECONDS -ge $deadline ]; then
            log "the node is not idle after ${WAIT_SECONDS}s (state: '${state:-no answer}'); see /var/log/slurm/"
            exit 1
        fi
        sleep 0.5
    done
    log "up: node localhost is $state (partition debug)"
}

# Stop the daemons of the given pid files, waiting (bounded) for each to end.
stop_daemons() {
    local f i
    for f in "$@"; do
        if pid_alive "$f"; then
            kill -TERM "$(cat "$f")" 2>/dev/null || true
        fi
    done
    for f in "$@"; do
        for i in $(seq 50); do pid_alive "$f" || break; sleep 0.1; done
    done
    # A stale pid file breaks a later start and package removal.
    rm -f /run/slurmd.pid /run/slurmctld.pid
}

stop() {
    stop_daemons /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid
    log "stopped"
}

status() {
    local state
    state=$(node_state)
    if [ -z "$state" ]; then
        echo "not running"
        exit 1
    fi
    echo "localhost: $state"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
