#!/usr/bin/env bash
# Install Slurm (slurmctld, slurmd, client tools) and MUNGE from the distribution
# packages, for the single-machine test cluster started by start-cluster.sh.
#
# Idempotent: exits 0 at once, without touching apt, when every needed binary is
# already on PATH.
#
# Exit codes:
#   0   installed (or already present)
#   77  Slurm cannot be installed here (not root, no apt-get, apt failed);
#       the test suite turns this into a skip, except under CI where it fails.
set -uo pipefail

CANNOT_INSTALL=77
NEEDED=(slurmctld slurmd munged munge unmunge sinfo srun sbatch scontrol squeue scancel)

# /usr/sbin is not on every root PATH (e.g. `su` without `-`).
export PATH="$PATH:/usr/sbin:/sbin"

missing=()
for b in "${NEEDED[@]}"; do
    command -v "$b" >/dev/null 2>&1 || missing+=("$b")
done
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

echo "install-slurm: missing ${missing[*]}; installing with apt-get" >&2
if [ "$(id -u)" -ne 0 ]; then
    echo "install-slurm: cannot install Slurm: not root (need root for apt-get)" >&2
    exit "$CANNOT_INSTALL"
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-slurm: cannot install Slurm: no apt-get on this machine" >&2
    exit "$CANNOT_INSTALL"
fi

export DEBIAN_FRONTEND=noninteractive
# Keep the packages' init scripts from starting system-wide daemons during the
# install (there is no init system here anyway; our daemons are started by
# start-cluster.sh with private config, sockets and state). policy-rc.d is only
# created if absent and removed again afterwards.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && made_policy=1
fi
# shellcheck disable=SC2317,SC2329  # invoked by the trap (SC2317 in older shellcheck)
cleanup() { [ "$made_policy" -eq 1 ] && rm -f "$policy"; }
trap cleanup EXIT

PKGS=(slurmctld slurmd slurm-client munge)
if ! apt-get install -y --no-install-recommends "${PKGS[@]}" >/tmp/prov4ml-slurm-apt.log 2>&1; then
    # Package lists may be missing or stale: refresh once and retry.
    if ! { apt-get update && apt-get install -y --no-install-recommends "${PKGS[@]}"; } \
            >>/tmp/prov4ml-slurm-apt.log 2>&1; then
        tail -n 30 /tmp/prov4ml-slurm-apt.log >&2
        echo "install-slurm: cannot install Slurm: apt-get failed (log: /tmp/prov4ml-slurm-apt.log)" >&2
        exit "$CANNOT_INSTALL"
    fi
fi

for b in "${NEEDED[@]}"; do
    if ! command -v "$b" >/dev/null 2>&1; then
        echo "install-slurm: cannot install Slurm: '$b' still missing after apt-get" >&2
        exit "$CANNOT_INSTALL"
    fi
done
echo "install-slurm: installed ${PKGS[*]}" >&2
exit 0
