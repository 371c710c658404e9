# shellcheck shell=bash disable=SC2034  # settings used by the scripts that source this
# Shared settings and helpers for start-cluster.sh / stop-cluster.sh.
# Sourced, not executed. All settings come from the environment:
#
#   PROV4ML_SLURM_DIR         runtime state: config, logs, spool, pid files,
#                             MUNGE key/socket        [/tmp/prov4ml-slurm]
#   PROV4ML_SLURM_NODES       number of emulated nodes             [2]
#   PROV4ML_SLURM_CPUS        CPUs per emulated node               [2]
#   PROV4ML_SLURM_GPUS        FAKE GPUs (gres, no devices) per node [2]
#   PROV4ML_SLURM_CLUSTER     ClusterName                          [prov4ml]
#   PROV4ML_SLURM_PARTITION   the (only, default) partition        [debug]
#   PROV4ML_SLURM_NODE_PREFIX node names are PREFIX1..PREFIXn      [p4ml-n]
#   PROV4ML_SLURM_CTLD_PORT   slurmctld port                       [16817]
#   PROV4ML_SLURM_PORT_BASE   slurmd ports PORT_BASE..+n-1         [17001]
#   PROV4ML_SLURM_TIMEOUT     seconds to wait for the nodes        [60]

export PATH="$PATH:/usr/sbin:/sbin"

P4S_DIR="${PROV4ML_SLURM_DIR:-/tmp/prov4ml-slurm}"
P4S_NODES="${PROV4ML_SLURM_NODES:-2}"
P4S_CPUS="${PROV4ML_SLURM_CPUS:-2}"
P4S_GPUS="${PROV4ML_SLURM_GPUS:-2}"
P4S_CLUSTER="${PROV4ML_SLURM_CLUSTER:-prov4ml}"
P4S_PARTITION="${PROV4ML_SLURM_PARTITION:-debug}"
P4S_PREFIX="${PROV4ML_SLURM_NODE_PREFIX:-p4ml-n}"
P4S_CTLD_PORT="${PROV4ML_SLURM_CTLD_PORT:-16817}"
P4S_PORT_BASE="${PROV4ML_SLURM_PORT_BASE:-17001}"
P4S_TIMEOUT="${PROV4ML_SLURM_TIMEOUT:-60}"

case "$P4S_DIR" in
    /*) ;;
    *) echo "PROV4ML_SLURM_DIR must be an absolute path (got '$P4S_DIR')" >&2; exit 2 ;;
esac
P4S_DIR="${P4S_DIR%/}"
if [ -z "$P4S_DIR" ]; then
    echo "PROV4ML_SLURM_DIR must not be /" >&2; exit 2
fi

P4S_CONF="$P4S_DIR/etc/slurm.conf"
P4S_MUNGE_DIR="$P4S_DIR/munge"
P4S_MUNGE_SOCKET="$P4S_MUNGE_DIR/munge.socket"
P4S_MUNGE_PID="$P4S_MUNGE_DIR/munged.pid"
P4S_CTLD_PID="$P4S_DIR/run/slurmctld.pid"

p4s_log() { echo "[prov4ml-slurm] $*" >&2; }

p4s_node_names() {
    local i
    for ((i = 1; i <= P4S_NODES; i++)); do echo "${P4S_PREFIX}${i}"; done
}

# Take the cluster lock (fd 9) so concurrent start/stop calls serialise.
p4s_lock() {
    mkdir -p "$P4S_DIR"
    exec 9>"$P4S_DIR/.lock"
    if ! flock -w 300 9; then
        p4s_log "could not take lock $P4S_DIR/.lock within 300 s"
        exit 1
    fi
}

# p4s_pid_alive PIDFILE COMM -> prints the pid and returns 0 when the pid file
# names a live process whose command name is COMM (guards against pid reuse).
p4s_pid_alive() {
    local pidfile=$1 comm=$2 pid
    [ -s "$pidfile" ] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [ -n "$pid" ] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ] || return 1
    echo "$pid"
}

# p4s_kill_pidfiles COMM:PIDFILE... : SIGTERM every daemon named by a PIDFILE
# (only if it really is a COMM process), wait up to 15 s for all of them, then
# SIGKILL what is left. Removes the pid files. The daemons take ~2 s each to
# exit, so they are signalled together.
p4s_kill_pidfiles() {
    local arg comm f pid i
    local pids=()
    for arg in "$@"; do
        comm=${arg%%:*}
        f=${arg#*:}
        if pid=$(p4s_pid_alive "$f" "$comm"); then
            p4s_log "stopping $comm (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    for ((i = 0; i < 150 && ${#pids[@]} > 0; i++)); do
        local left=()
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null && left+=("$pid")
        done
        pids=("${left[@]}")
        [ "${#pids[@]}" -eq 0 ] || sleep 0.1
    done
    for pid in "${pids[@]}"; do
        p4s_log "pid $pid ignored SIGTERM for 15 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    done
    for arg in "$@"; do
        rm -f "${arg#*:}"
    done
}

# Stop everything this cluster's pid files name: running jobs first (so no
# slurmstepd is left behind), then the slurmds, slurmctld and munged.
p4s_stop_daemons() {
    local f i
    if [ -f "$P4S_CONF" ] && p4s_pid_alive "$P4S_CTLD_PID" slurmctld >/dev/null; then
        local jobs
        jobs=$(SLURM_CONF="$P4S_CONF" timeout 10 squeue -h -o %i 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            p4s_log "cancelling jobs: ${jobs//$'\n'/ }"
            # shellcheck disable=SC2086
            SLURM_CONF="$P4S_CONF" timeout 10 scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do
                [ -z "$(SLURM_CONF="$P4S_CONF" timeout 5 squeue -h -o %i 2>/dev/null)" ] && break
                sleep 0.2
            done
        fi
    fi
    # The Slurm daemons together, then munged (they authenticate through it).
    local daemons=("slurmctld:$P4S_CTLD_PID")
    for f in "$P4S_DIR"/run/slurmd-*.pid; do
        [ -e "$f" ] && daemons+=("slurmd:$f")
    done
    p4s_kill_pidfiles "${daemons[@]}"
    p4s_kill_pidfiles "munged:$P4S_MUNGE_PID"
    return 0
}

p4s_print_logs() {
    local f
    for f in "$P4S_MUNGE_DIR"/munged.log "$P4S_DIR"/log/*.log; do
        [ -f "$f" ] || continue
        echo "----- $f (last 40 lines) -----" >&2
        tail -n 40 "$f" >&2
    done
}
