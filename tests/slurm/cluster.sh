#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for the tests and for trying the scripts. Needs root.
#
#   bash tests/slurm/cluster.sh up     # install (Debian packages) if needed, configure, start
#   bash tests/slurm/cluster.sh down   # stop everything it started, remove its namespaces and wrappers
#   export PATH=/tmp/distrnn-slurm/bin:$PATH   # then sbatch, srun, squeue, scontrol, ... reach the cluster
#   export SLURM_CONF=/tmp/distrnn-slurm/slurm.conf   # without the wrappers: run the real commands inside
#   nsenter --net=/run/netns/distrnn-ctl sinfo          #   the controller's namespace
#
# Each node has a network stack of its own, as on a cluster: slurmd of node nX runs in the network
# namespace distrnn-nX, whose only interface besides lo is eth0 (10.202.0.11 for n1, .12 for n2), one
# end of a veth pair whose other end is plugged into the bridge br0 in the namespace distrnn-ctl, which
# holds the controller's address 10.202.0.1 and slurmctld. So srun tasks of different nodes (gloo, the
# rendezvous) talk over that network, and the host name still resolves to 127.0.0.1, not to a node's
# address. Every address is inside these namespaces; nothing is routed to or from the host's network.
# munged runs in the root namespace with a socket and key of this cluster's own (its unix socket works
# from every network namespace); no systemd, so every daemon is started by hand, and stopped by its pid.
#
# The root namespace cannot reach 10.202.0.1, so `up` writes wrappers into $STATE/bin for the client
# commands: run from the root namespace they run the real command inside distrnn-ctl, run inside one of
# the cluster's namespaces (a job's srun and scontrol, which find the wrappers in the PATH sbatch
# passed on) they run it directly; either way with SLURM_CONF=$STATE/slurm.conf.
# DISTRNN_SLURM_STATE (default /tmp/distrnn-slurm) is the state folder: config, logs, spool, wrappers.
# The namespace names and addresses are fixed: one such cluster per machine (`up` refuses while the
# namespaces run another state folder's daemons, `down` then leaves them; else `down` removes them and
# whatever still runs in them).
# `up` removes everything it made if a step fails; every wait is bounded in time.
set -euo pipefail

STATE="${DISTRNN_SLURM_STATE:-/tmp/distrnn-slurm}"
CONF="$STATE/slurm.conf"
BIN="$STATE/bin"
MUNGE="$STATE/munge"
NODES=(n1 n2)
NET=10.202.0             # a /24 that exists only inside the namespaces below
CTL_NS=distrnn-ctl
CTL_ADDR="$NET.1"
CLIENTS=(sbatch srun salloc squeue scontrol scancel sinfo sacct sstat sattach sbcast sprio sshare sdiag)

node_ns() { echo "distrnn-$1"; }
node_addr() { echo "$NET.$((10 + ${1#n}))"; }  # n1 -> .11, n2 -> .12

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && command -v ip >/dev/null && command -v nsenter >/dev/null; then
        return
    fi
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq
    timeout 600 apt-get install -y -qq slurmctld slurmd slurm-client munge iproute2 util-linux >/dev/null
}

# --- the network ------------------------------------------------------------------------------------------

ip_() { timeout 30 ip "$@"; }

make_network() {
    ip_ netns add "$CTL_NS"
    ip_ -n "$CTL_NS" link set lo up
    ip_ -n "$CTL_NS" link add br0 type bridge
    ip_ -n "$CTL_NS" addr add "$CTL_ADDR/24" dev br0
    ip_ -n "$CTL_NS" link set br0 up
    local node ns
    for node in "${NODES[@]}"; do
        ns=$(node_ns "$node")
        ip_ netns add "$ns"
        ip_ -n "$ns" link set lo up
        # the pair is made in the node's namespace; its other end (named after the node) goes to the bridge
        ip_ -n "$ns" link add eth0 type veth peer name "veth-$node"
        ip_ -n "$ns" link set "veth-$node" netns "$CTL_NS"
        ip_ -n "$CTL_NS" link set "veth-$node" master br0
        ip_ -n "$CTL_NS" link set "veth-$node" up
        ip_ -n "$ns" addr add "$(node_addr "$node")/24" dev eth0
        ip_ -n "$ns" link set eth0 up
    done
}

namespaces() { echo "$CTL_NS"; for node in "${NODES[@]}"; do node_ns "$node"; done; }

ns_exists() { ip_ netns list 2>/dev/null | awk '{print $1}' | grep -qx "$1"; }

# A process that runs (a zombie does not: this machine's init may leave daemons' zombies unreaped).
running() { local stat; stat=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) && [ -n "$stat" ] && [ "${stat%% *}" != Z ]; }

ns_pids() { local pid; for pid in $(ip_ netns pids "$1" 2>/dev/null || true); do running "$pid" && echo "$pid"; done; }

# Processes still in a namespace (job steps whose slurmd is gone, ...): TERM, then KILL after 5 s.
kill_ns_processes() {
    local ns=$1 pids deadline=$((SECONDS + 5))
    pids=$(ns_pids "$ns")
    [ -n "$pids" ] || return 0
    # shellcheck disable=SC2086
    kill $pids 2>/dev/null || true
    while [ -n "$(ns_pids "$ns")" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
    pids=$(ns_pids "$ns")
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
}

# Whether a namespace runs slurmctld or slurmd of another state folder's cluster (another $CONF).
foreign_daemons() {
    local pid
    for pid in $(ns_pids "$1"); do
        case "$(cat "/proc/$pid/comm" 2>/dev/null)" in slurmctld | slurmd) ;; *) continue ;; esac
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "-f $CONF " || return 0
    done
    return 1
}

# The first of this cluster's namespaces that runs another cluster's daemons (printed); fails if none does.
foreign_namespace() {
    local ns
    for ns in $(namespaces); do
        if ns_exists "$ns" && foreign_daemons "$ns"; then
            echo "$ns"
            return 0
        fi
    done
    return 1
}

remove_network() {
    local ns
    if ns=$(foreign_namespace); then
        echo "network namespace $ns runs the daemons of a cluster with another state folder than $STATE;" \
             "left as it is (run down with that DISTRNN_SLURM_STATE)" >&2
        return 0
    fi
    for ns in $(namespaces); do
        ns_exists "$ns" || continue
        kill_ns_processes "$ns"
        ip_ netns del "$ns" || echo "could not delete network namespace $ns" >&2  # takes its veths and bridge
    done
}

# --- the daemons ------------------------------------------------------------------------------------------

write_conf() {
    local cpus mem node
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 4 ))  # MB per node, a quarter each
    mkdir -p "$STATE/ctld" "$STATE/log"
    cat >"$CONF" <<EOF
ClusterName=distrnn-test
# "localhost" matches any host name (slurmctld refuses to start on a host its name does not match);
# the address is the one clients connect to, the bridge's in $CTL_NS.
SlurmctldHost=localhost($CTL_ADDR)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again only once its old credential expired (default 120 s; 5 s is the least
# SLURM takes, src/common/slurm_cred.c); starting it earlier (scontrol update StartTime=now) failed here with
# "Job credential revoked".
# socket: this cluster's own munged, not the machine's.
AuthInfo=cred_expire=5,socket=$MUNGE/munge.socket
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
# bf_interval/sched_interval: a requeued job may start once its credential expired (5 s, above), but it then
# waited for the next backfill pass (default every 30 s): measured here, 33 s from requeue to start.
SchedulerParameters=defer_batch,bf_interval=1,sched_interval=2
MinJobAge=600
KillWait=10
EOF
    for node in "${NODES[@]}"; do
        echo "NodeName=$node NodeAddr=$(node_addr "$node") CPUs=$cpus RealMemory=$mem State=UNKNOWN" >>"$CONF"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" >>"$CONF"
}

start_munge() {
    mkdir -p "$MUNGE"
    chown munge:munge "$MUNGE"
    chmod 755 "$MUNGE"
    dd if=/dev/urandom of="$MUNGE/munge.key" bs=1024 count=1 status=none
    chown munge:munge "$MUNGE/munge.key"
    chmod 400 "$MUNGE/munge.key"
    timeout 30 runuser -u munge -- /usr/sbin/munged --socket="$MUNGE/munge.socket" --key-file="$MUNGE/munge.key" \
        --pid-file="$MUNGE/munged.pid" --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed"
    local deadline=$((SECONDS + 5))
    while [ "$SECONDS" -lt "$deadline" ]; do
        [ -S "$MUNGE/munge.socket" ] && [ -s "$MUNGE/munged.pid" ] && return
        sleep 0.1
    done
    echo "munged did not start" >&2
    return 1
}

# The pid in a pid file, if that process still runs the named program (a pid file outlives its process).
live_pid() {
    local file=$1 name=$2 pid
    [ -s "$file" ] || return 1
    pid=$(cat "$file")
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] && running "$pid" || return 1
    echo "$pid"
}

stop_pidfile() {
    local file=$1 name=$2 pid
    if pid=$(live_pid "$file" "$name"); then
        kill "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 5))
        while running "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
        running "$pid" && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

# Only the network namespace: `ip netns exec` also remounts /sys, which hides /sys/fs/cgroup from slurmd.
in_ns() { local ns=$1; shift; timeout 30 nsenter --net="/run/netns/$ns" "$@"; }

sinfo_states() { in_ns "$CTL_NS" timeout 10 sinfo -h -o '%t' -p debug 2>/dev/null | sort -u; }

write_wrappers() {
    local tmp="$BIN.tmp" cmd real
    rm -rf "$tmp"
    mkdir -p "$tmp"
    for cmd in "${CLIENTS[@]}"; do
        real=$(command -v "$cmd") || continue
        cat >"$tmp/$cmd" <<EOF
#!/bin/sh
# Written by tests/slurm/cluster.sh up: $real against the test cluster, whose controller is reachable
# only from the cluster's network namespaces.
export SLURM_CONF=$CONF
case "\$(ip netns identify \$\$ 2>/dev/null)" in
    $(namespaces | paste -sd '|')) exec $real "\$@" ;;
    *) exec nsenter --net=/run/netns/$CTL_NS $real "\$@" ;;
esac
EOF
        chmod 755 "$tmp/$cmd"
    done
    mv "$tmp" "$BIN"
}

cluster_answers() {
    live_pid "$STATE/slurmctld.pid" slurmctld >/dev/null && [ -x "$BIN/sinfo" ] \
        && timeout 15 "$BIN/sinfo" -h >/dev/null 2>&1
}

failed_up() {
    local status=$?
    trap - EXIT INT TERM
    echo "SLURM cluster did not come up; logs in $STATE/log and $MUNGE; removing what was made" >&2
    tail -n 20 "$STATE/log/"*.log >&2 2>/dev/null || true
    down >&2 || true
    exit $(( status == 0 ? 1 : status ))
}

up() {
    if cluster_answers; then
        echo "SLURM cluster already up (export PATH=$BIN:\$PATH)"
        return
    fi
    local ns
    if ns=$(foreign_namespace); then
        echo "network namespace $ns runs the daemons of a cluster with another state folder than $STATE;" \
             "run this script's down with that DISTRNN_SLURM_STATE first" >&2
        exit 1
    fi
    install
    trap failed_up EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    down >/dev/null  # what an earlier run left behind (a failed up, a killed script)
    rm -rf "$STATE"  # a fresh cluster: no jobs left from an earlier run
    make_network
    write_conf
    start_munge
    export SLURM_CONF="$CONF"
    in_ns "$CTL_NS" slurmctld -f "$CONF"
    local node
    for node in "${NODES[@]}"; do
        mkdir -p "$STATE/spool-$node"
        in_ns "$(node_ns "$node")" slurmd -f "$CONF" -N "$node"
    done
    local deadline=$((SECONDS + 60))
    until [ "$(sinfo_states)" = "idle" ]; do
        [ "$SECONDS" -lt "$deadline" ] || break
        sleep 1
    done
    if [ "$(sinfo_states)" != "idle" ]; then
        in_ns "$CTL_NS" timeout 10 sinfo >&2 || true
        exit 1
    fi
    write_wrappers
    trap - EXIT INT TERM
    local addrs=()
    for node in "${NODES[@]}"; do addrs+=("$node=$(node_addr "$node")"); done
    echo "SLURM cluster up: nodes ${addrs[*]} idle, controller $CTL_ADDR; export PATH=$BIN:\$PATH"
}

down() {
    local node
    for node in "${NODES[@]}"; do stop_pidfile "$STATE/slurmd-$node.pid" slurmd; done
    stop_pidfile "$STATE/slurmctld.pid" slurmctld
    remove_network
    stop_pidfile "$MUNGE/munged.pid" munged
    rm -rf "$BIN" "$BIN.tmp"
    echo "SLURM cluster down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
