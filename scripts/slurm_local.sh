#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for testing the sweep launcher (tests/test_slurm.py).
#
#   sudo scripts/slurm_local.sh install   # Debian/Ubuntu packages: slurmctld slurmd slurm-client munge
#   sudo scripts/slurm_local.sh start     # idempotent: write slurm.conf, start munged, slurmctld, slurmd; wait idle
#   scripts/slurm_local.sh status         # exit 0 when the node answers and is usable
#   sudo scripts/slurm_local.sh stop      # cancel every job, stop the daemons this script started
#
# Runs as root (SlurmUser=root), proctrack/linuxproc and task/none (no cgroups, works in containers), one node
# named after this host with all its CPUs, one partition "debug". State, logs and pid files live under
# $FLOWSWEEP_SLURM_DIR (default /tmp/flowsweep-slurm); the configuration goes to /etc/slurm/slurm.conf, where
# the Debian tools look for it. Do not use on a machine that already runs a SLURM cluster.
set -euo pipefail

STATE_DIR=${FLOWSWEEP_SLURM_DIR:-/tmp/flowsweep-slurm}
CONF=/etc/slurm/slurm.conf
HOST=$(hostname -s)
CPUS=$(nproc)
PARTITION=debug

die() { echo "slurm_local: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" -eq 0 ] || die "$1 needs root (SlurmUser=root, daemons, /etc/slurm)"; }

running() {  # running <pidfile>: the process in the pid file is alive
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

write_conf() {
    mkdir -p "$STATE_DIR"/{ctld,d,log} /etc/slurm
    local tmp
    tmp=$(mktemp /etc/slurm/.slurm.conf.XXXXXX)
    cat >"$tmp" <<EOF
# Written by flowsweep scripts/slurm_local.sh: a one-node test cluster.
ClusterName=flowsweep
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# Quick turnaround for tests: short kill grace, requeued jobs eligible at once, finished jobs kept a while.
KillWait=2
MinJobAge=600
InactiveLimit=0
Waittime=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$tmp" "$CONF"
    chmod 644 "$CONF"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
    [ -f /etc/munge/munge.key ] || die "/etc/munge/munge.key missing (install munge: $0 install)"
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
    # munged refuses to run as root; the munge user owns its key and socket.
    su -s /bin/sh munge -c "/usr/sbin/munged" || die "munged did not start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
    die "munged started but does not answer"
}

wait_idle() {
    for _ in $(seq 100); do
        state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null | head -1 || true)
        case "$state" in
            idle|mix|alloc) return 0 ;;
            drain*|down*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.2
    done
    die "node $HOST not usable (state: ${state:-no answer}); see $STATE_DIR/log/"
}

cmd_install() {
    need_root install
    command -v slurmctld >/dev/null && command -v munged >/dev/null && { echo "already installed"; return; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge
}

cmd_start() {
    need_root start
    command -v slurmctld >/dev/null || die "slurmctld not installed (run: $0 install)"
    if cmd_status >/dev/null 2>&1; then echo "already running: node $HOST, partition $PARTITION"; return; fi
    write_conf
    start_munge
    running "$STATE_DIR/slurmctld.pid" || slurmctld -f "$CONF" || die "slurmctld did not start"
    running "$STATE_DIR/slurmd.pid" || slurmd -f "$CONF" || die "slurmd did not start"
    wait_idle
    echo "running: node $HOST ($CPUS CPUs), partition $PARTITION; logs in $STATE_DIR/log"
}

cmd_status() {
    running "$STATE_DIR/slurmctld.pid" && running "$STATE_DIR/slurmd.pid" || { echo "not running"; return 1; }
    sinfo -h -o "%P %t %C" || return 1
}

cmd_stop() {
    need_root stop
    scancel --full --quiet --partition "$PARTITION" 2>/dev/null || true
    for daemon in slurmd slurmctld; do
        pidfile="$STATE_DIR/$daemon.pid"
        if running "$pidfile"; then
            pid=$(cat "$pidfile")
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
    echo "stopped"
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    status) cmd_status ;;
    stop) cmd_stop ;;
    *) echo "usage: $0 {install|start|status|stop}" >&2; exit 2 ;;
esac
