#!/usr/bin/env bash
# Stop the Slurm test cluster started by start-cluster.sh: cancels its jobs,
# then ends only the daemons named by its own pid files (slurmd per node,
# slurmctld, munged) under $PROV4ML_SLURM_DIR (default /tmp/prov4ml-slurm).
# Logs and config stay in place for inspection; start-cluster.sh wipes them.
#   --purge   also delete $PROV4ML_SLURM_DIR
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$HERE/common.sh"

PURGE=0
for arg in "$@"; do
    case "$arg" in
        --purge) PURGE=1 ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

if [ ! -d "$P4S_DIR" ]; then
    p4s_log "nothing to stop ($P4S_DIR does not exist)"
    exit 0
fi
p4s_lock
p4s_stop_daemons
if [ "$PURGE" -eq 1 ]; then
    rm -rf "${P4S_DIR:?}/etc" "$P4S_DIR/ctld-state" "$P4S_DIR/spool" "$P4S_DIR/log" \
        "$P4S_DIR/run" "$P4S_MUNGE_DIR" "$P4S_DIR/env.sh"
    rm -f "$P4S_DIR/.lock"
    rmdir "$P4S_DIR" 2>/dev/null || p4s_log "left $P4S_DIR (not empty)"
fi
p4s_log "stopped"
