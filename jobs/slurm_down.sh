#!/usr/bin/env bash
# Tear down the throwaway Slurm cluster of jobs/slurm_up.sh: cancel its jobs, stop slurmd, slurmctld and munged,
# remove its state and /etc/slurm/slurm.conf (only if slurm_up.sh wrote it). The packages stay installed.
set -uo pipefail

STATE=${HPCFL_SLURM_STATE:-/var/tmp/hpcfl-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by hpcfl jobs/slurm_up.sh"

[ "$(id -u)" = 0 ] || { echo "slurm_down: error: run as root" >&2; exit 1; }
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    echo "slurm_down: error: $CONF was not written by jobs/slurm_up.sh: leaving this cluster alone" >&2
    exit 1
fi
command -v scancel >/dev/null && scancel --user=root >/dev/null 2>&1
stop() {  # stop a daemon by name, waiting up to 10 s
    pkill -x "$1" 2>/dev/null || return 0
    for _ in $(seq 50); do pgrep -x "$1" >/dev/null || return 0; sleep 0.2; done
    pkill -9 -x "$1" 2>/dev/null
}
stop slurmd
stop slurmctld
stop munged
rm -rf "$STATE"
rm -f "$CONF"
# shared-memory segments that killed MPICH jobs left behind (no job runs now)
rm -f /dev/shm/mpich_shm_* 2>/dev/null
echo "slurm_down: stopped; state removed"
