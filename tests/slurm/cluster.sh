#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for the tests and for trying the scripts.
#
#   bash tests/slurm/cluster.sh up     # install (Debian packages) if needed, configure, start
#   bash tests/slurm/cluster.sh down   # stop the daemons by their pid files
#   export SLURM_CONF=/tmp/distrnn-slurm/slurm.conf   # then sbatch, srun, squeue, scontrol work
#
# Nodes n1 and n2 both live on 127.0.0.1 (distinct slurmd ports); no systemd, so munged, slurmctld
# and slurmd are started by hand. Needs root.
set -euo pipefail

STATE="${DISTRNN_SLURM_STATE:-/tmp/distrnn-slurm}"
CONF="$STATE/slurm.conf"
NODES=(n1 n2)

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
    local cpus mem
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 4 ))  # MB per node, a quarter each
    mkdir -p "$STATE/ctld" "$STATE/log"
    cat >"$CONF" <<EOF
ClusterName=distrnn-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again only once its old credential expired (default 120 s); starting it
# earlier (scontrol update StartTime=now) failed here with "Job credential revoked".
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerParameters=defer_batch
MinJobAge=600
KillWait=10
NodeName=n1 NodeAddr=127.0.0.1 Port=17001 CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port=17002 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

start_munge() {
    if [ -f "$STATE/munged.pid" ] && kill -0 "$(cat "$STATE/munged.pid")" 2>/dev/null; then
        return
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    pgrep -u munge -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
    sleep 0.5
    pgrep -u munge -x munged | head -n 1 >"$STATE/munged.pid"
}

up() {
    if [ -f "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
        echo "SLURM cluster already up (SLURM_CONF=$CONF)"
        return
    fi
    install
    rm -rf "$STATE"  # a fresh cluster: no jobs left from an earlier run
    write_conf
    start_munge
    export SLURM_CONF="$CONF"
    slurmctld -f "$CONF"
    for node in "${NODES[@]}"; do
        mkdir -p "$STATE/spool-$node"
        slurmd -f "$CONF" -N "$node"
    done
    for _ in $(seq 60); do
        if [ "$(sinfo -h -o '%t' -p debug 2>/dev/null | sort -u)" = "idle" ]; then
            echo "SLURM cluster up: nodes ${NODES[*]} idle (SLURM_CONF=$CONF)"
            return
        fi
        sleep 1
    done
    echo "SLURM cluster did not come up; logs in $STATE/log" >&2
    sinfo >&2 || true
    exit 1
}

stop_pidfile() {
    local file=$1
    [ -f "$file" ] || return 0
    local pid
    pid=$(cat "$file")
    if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

down() {
    for node in "${NODES[@]}"; do stop_pidfile "$STATE/slurmd-$node.pid"; done
    stop_pidfile "$STATE/slurmctld.pid"
    stop_pidfile "$STATE/munged.pid"
    echo "SLURM cluster down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
