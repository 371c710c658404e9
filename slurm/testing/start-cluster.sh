#!/usr/bin/env bash
# Start (or check) the single-machine Slurm test cluster used by tests/test_slurm*.py.
#
#   slurm/testing/start-cluster.sh          # install if needed, start, wait for idle nodes
#   eval "$(slurm/testing/start-cluster.sh)"   # same, and export SLURM_CONF in this shell
#   slurm/testing/stop-cluster.sh           # stop what this started
#
# What it runs (as root, no systemd needed): a private munged (own key and
# socket), slurmctld, and one slurmd per emulated node (`slurmd -N name`), all
# on this machine, with config, logs, spool and pid files under
# $PROV4ML_SLURM_DIR (default /tmp/prov4ml-slurm); see common.sh for all the
# settings. Nothing in /etc/slurm or /etc/munge is used or changed; the node
# names are appended to /etc/hosts (127.0.0.1) so that jobs can resolve them.
#
# Clients need `SLURM_CONF=$PROV4ML_SLURM_DIR/etc/slurm.conf`. On success stdout
# is exactly two shell lines (also in $PROV4ML_SLURM_DIR/env.sh for sourcing):
#   export SLURM_CONF='/tmp/prov4ml-slurm/etc/slurm.conf'
#   export PROV4ML_SLURM_STATUS=started      (or already-up)
# Progress and errors go to stderr.
#
# Idempotent: when the cluster is already up with the same config and all its
# nodes are idle/allocated, it does nothing. Otherwise it stops the daemons
# named by its pid files, wipes the runtime state (a stale StateSaveLocation
# makes slurmctld exit), and starts afresh.
#
# Exit codes: 0 up; 77 Slurm cannot be installed here (tests skip, except in
# CI); 1 failed to start (logs are printed to stderr); 2 bad settings.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$HERE/common.sh"

for arg in "$@"; do
    case "$arg" in
        -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

if ! [[ "$P4S_NODES" =~ ^[1-9][0-9]*$ && "$P4S_CPUS" =~ ^[1-9][0-9]*$ && "$P4S_GPUS" =~ ^[0-9]+$ ]]; then
    echo "PROV4ML_SLURM_NODES, _CPUS must be positive integers, _GPUS a non-negative one" >&2
    exit 2
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "start-cluster: cannot run the test cluster: needs root (daemons, /etc/hosts, munge user)" >&2
    exit 77
fi
rc=0
"$HERE/install-slurm.sh" || rc=$?
if [ "$rc" -ne 0 ]; then
    exit "$rc"
fi

p4s_lock
export SLURM_CONF="$P4S_CONF"

emit_env() {
    echo "export SLURM_CONF='$P4S_CONF'"
    echo "export PROV4ML_SLURM_STATUS=$1"
}

# ---------------------------------------------------------------- config ---
HOST="$(hostname -s 2>/dev/null || hostname)"
last=$((P4S_PORT_BASE + P4S_NODES - 1))
if [ "$P4S_NODES" -eq 1 ]; then
    NODES="${P4S_PREFIX}1"
    PORTS="$P4S_PORT_BASE"
else
    NODES="${P4S_PREFIX}[1-${P4S_NODES}]"
    PORTS="[${P4S_PORT_BASE}-${last}]"
fi
if [ "$P4S_GPUS" -gt 0 ]; then
    GRES="Gres=gpu:$P4S_GPUS "
    # Slurm drops GPUs without File=, so each fake GPU is a device node (see below).
    GRES_LINE="NodeName=$NODES Name=gpu File=$P4S_DIR/fake-gpu/gpu[0-$((P4S_GPUS - 1))]"
    [ "$P4S_GPUS" -eq 1 ] && GRES_LINE="NodeName=$NODES Name=gpu File=$P4S_DIR/fake-gpu/gpu0"
else
    GRES=""
    GRES_LINE="# (no fake GPUs: PROV4ML_SLURM_GPUS=0)"
fi
mkdir -p "$P4S_DIR/etc"
sed -e "s|@GRES_LINE@|$GRES_LINE|" "$HERE/gres.conf.in" >"$P4S_DIR/etc/gres.conf.new"
sed -e "s|@GRES@|$GRES|g" \
    -e "s|@CLUSTER@|$P4S_CLUSTER|g" \
    -e "s|@HOST@|$HOST|g" \
    -e "s|@CTLD_PORT@|$P4S_CTLD_PORT|g" \
    -e "s|@DIR@|$P4S_DIR|g" \
    -e "s|@NODES@|$NODES|g" \
    -e "s|@PORTS@|$PORTS|g" \
    -e "s|@CPUS@|$P4S_CPUS|g" \
    -e "s|@PARTITION@|$P4S_PARTITION|g" \
    "$HERE/slurm.conf.in" >"$P4S_DIR/etc/slurm.conf.new"

# --------------------------------------------------------------- health ----
# All daemons alive (by pid file) and sinfo lists every node as usable.
nodes_ready() {
    local out n
    out=$(timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null) || return 1
    n=$(echo "$out" | awk '$2 ~ /^(idle|mixed|allocated|completing)$/' | wc -l)
    [ "$n" -eq "$P4S_NODES" ]
}

cluster_healthy() {
    p4s_pid_alive "$P4S_MUNGE_PID" munged >/dev/null || return 1
    p4s_pid_alive "$P4S_CTLD_PID" slurmctld >/dev/null || return 1
    local node
    for node in $(p4s_node_names); do
        p4s_pid_alive "$P4S_DIR/run/slurmd-$node.pid" slurmd >/dev/null || return 1
    done
    nodes_ready
}

if [ -f "$P4S_CONF" ] && cmp -s "$P4S_CONF" "$P4S_DIR/etc/slurm.conf.new" \
        && cmp -s "$P4S_DIR/etc/gres.conf" "$P4S_DIR/etc/gres.conf.new" && cluster_healthy; then
    rm -f "$P4S_DIR/etc/slurm.conf.new" "$P4S_DIR/etc/gres.conf.new"
    p4s_log "already up: $P4S_NODES node(s) on cluster '$P4S_CLUSTER' (SLURM_CONF=$P4S_CONF)"
    emit_env already-up
    exit 0
fi

fail() {
    p4s_log "FAILED: $*"
    p4s_print_logs
    sinfo -N 2>&1 | sed 's/^/[sinfo] /' >&2 || true
    p4s_log "logs are under $P4S_DIR/log and $P4S_MUNGE_DIR; stop with $HERE/stop-cluster.sh"
    exit 1
}

t0=$(date +%s.%N)

# ------------------------------------------------------- stop and wipe -----
p4s_stop_daemons
rm -rf "${P4S_DIR:?}/ctld-state" "$P4S_DIR/spool" "$P4S_DIR/log" "$P4S_DIR/run" "$P4S_MUNGE_DIR"
mkdir -p "$P4S_DIR/ctld-state" "$P4S_DIR/log" "$P4S_DIR/run" "$P4S_MUNGE_DIR"
for node in $(p4s_node_names); do mkdir -p "$P4S_DIR/spool/$node"; done
rm -rf "${P4S_DIR:?}/fake-gpu"
if [ "$P4S_GPUS" -gt 0 ]; then
    mkdir -p "$P4S_DIR/fake-gpu"
    for ((i = 0; i < P4S_GPUS; i++)); do
        # A character device like /dev/null (1:3) keeps slurmd from complaining;
        # where mknod is not allowed an empty file works too (with a log error).
        mknod "$P4S_DIR/fake-gpu/gpu$i" c 1 3 2>/dev/null || : >"$P4S_DIR/fake-gpu/gpu$i"
    done
fi
chmod 0755 "$P4S_DIR"
mv -f "$P4S_DIR/etc/slurm.conf.new" "$P4S_CONF"
mv -f "$P4S_DIR/etc/gres.conf.new" "$P4S_DIR/etc/gres.conf"
chmod 0644 "$P4S_CONF" "$P4S_DIR/etc/gres.conf"

# ------------------------------------------------------------ /etc/hosts ---
missing_hosts=()
for node in $(p4s_node_names); do
    getent hosts "$node" >/dev/null 2>&1 || missing_hosts+=("$node")
done
if [ "${#missing_hosts[@]}" -gt 0 ]; then
    if echo "127.0.0.1 ${missing_hosts[*]}  # prov4ml-slurm test cluster" >>/etc/hosts 2>/dev/null; then
        p4s_log "added to /etc/hosts: ${missing_hosts[*]}"
    else
        p4s_log "WARNING: cannot add ${missing_hosts[*]} to /etc/hosts; jobs will not resolve node names"
    fi
fi

# ----------------------------------------------------------------- munge ---
if ! id munge >/dev/null 2>&1; then
    fail "no 'munge' user (is the munge package installed?)"
fi
chown munge:munge "$P4S_MUNGE_DIR"
chmod 0755 "$P4S_MUNGE_DIR"   # clients (slurm, as root) connect to the socket here
key="$P4S_MUNGE_DIR/munge.key"
# A fresh key per start (never the system's /etc/munge/munge.key).
if ! runuser -u munge -- mungekey --create --keyfile="$key" >/dev/null 2>&1 || [ ! -s "$key" ]; then
    dd if=/dev/urandom of="$key" bs=1024 count=1 status=none   # munge < 0.5.14 has no mungekey
fi
chown munge:munge "$key"
chmod 0400 "$key"
runuser -u munge -- munged 9>&- \
    --key-file="$key" \
    --socket="$P4S_MUNGE_SOCKET" \
    --pid-file="$P4S_MUNGE_PID" \
    --log-file="$P4S_MUNGE_DIR/munged.log" \
    --seed-file="$P4S_MUNGE_DIR/munged.seed" \
    || fail "munged did not start"
for ((i = 0; i < 50; i++)); do
    [ -S "$P4S_MUNGE_SOCKET" ] && break
    sleep 0.1
done
if ! munge -n -S "$P4S_MUNGE_SOCKET" | unmunge -S "$P4S_MUNGE_SOCKET" >/dev/null 2>&1; then
    fail "munge credential round trip failed"
fi

# ------------------------------------------------------------- slurmctld ---
slurmctld -c -f "$P4S_CONF" 9>&- || fail "slurmctld did not start"
deadline=$(( $(date +%s) + P4S_TIMEOUT ))
grace=$(( $(date +%s) + 3 ))   # time for the daemon to write its pid file
until timeout 5 scontrol ping 2>/dev/null | grep -q "is UP"; do
    if [ "$(date +%s)" -ge "$grace" ] && ! p4s_pid_alive "$P4S_CTLD_PID" slurmctld >/dev/null; then
        fail "slurmctld exited"
    fi
    [ "$(date +%s)" -lt "$deadline" ] || fail "slurmctld not answering after ${P4S_TIMEOUT} s"
    sleep 0.2
done

# ---------------------------------------------------------------- slurmd ---
for node in $(p4s_node_names); do
    slurmd -N "$node" -f "$P4S_CONF" 9>&- || fail "slurmd -N $node did not start"
done

until nodes_ready; do
    for node in $(p4s_node_names); do
        if ! p4s_pid_alive "$P4S_DIR/run/slurmd-$node.pid" slurmd >/dev/null \
                && [ -s "$P4S_DIR/run/slurmd-$node.pid" ]; then
            fail "slurmd for $node exited"
        fi
    done
    [ "$(date +%s)" -lt "$deadline" ] || fail "nodes not idle after ${P4S_TIMEOUT} s"
    sleep 0.2
done

emit_env started >"$P4S_DIR/env.sh"
elapsed=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
p4s_log "up in ${elapsed} s: $(sinfo -h -N -o '%N:%T' | tr '\n' ' ')(SLURM_CONF=$P4S_CONF)"
emit_env started
