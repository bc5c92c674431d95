#!/usr/bin/env bash
# Bring up a throwaway one-node Slurm cluster on this machine, to try hpcfl's job scripts and sweeps for real
# (docs/cluster.md, "A Slurm cluster on your own machine"). Debian/Ubuntu, as root, no systemd needed:
#
#   sudo bash jobs/slurm_up.sh        # installs slurm-wlm and munge if missing, starts munged, slurmctld, slurmd
#   sbatch ... / squeue / sacct ...   # (tests/test_slurm.py uses it)
#   sudo bash jobs/slurm_down.sh      # stops the daemons and removes the cluster's state
#
# What it sets up: one node (this host) in one partition "debug", with 4 job slots per core so that a 3- to 6-rank
# hpcfl job fits on a 2-core laptop (cores are shared: fine for trying, not for timing), jobs that can be
# requeued, no accounting database (sacct answers from slurmctld's memory only while a job is recent), and
# srun's default MPI plugin left to the job scripts (jobs/templates/ pick pmi2 for the MPICH the README installs).
# It writes /etc/slurm/slurm.conf and refuses to replace one it did not write. Every step fails loudly: the
# script exits non-zero with the step and the daemon logs when the node does not come up.
set -euo pipefail

STATE=${HPCFL_SLURM_STATE:-/var/tmp/hpcfl-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by hpcfl jobs/slurm_up.sh"
SLOTS_PER_CORE=${HPCFL_SLURM_SLOTS_PER_CORE:-4}

say() { echo "slurm_up: $*"; }
fail() {
    echo "slurm_up: error: $*" >&2
    for log in "$STATE"/log/*.log; do [ -f "$log" ] && { echo "--- $log" >&2; tail -n 20 "$log" >&2; }; done
    exit 1
}

[ "$(id -u)" = 0 ] || fail "run as root (it installs packages and starts daemons)"
t0=$(date +%s)

# 1. packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
        || ! command -v sbatch >/dev/null; then
    command -v apt-get >/dev/null || fail "slurm-wlm and munge are missing and this is not a Debian-like system"
    say "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null; } \
        || fail "apt-get could not install slurm-wlm and munge"
fi

# 2. munge, with a key of its own
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged || fail "munged did not start"
fi
for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n </dev/null | unmunge >/dev/null 2>&1 || fail "munge does not work (munge -n | unmunge)"

# 3. slurm.conf, sized to this machine
host=$(hostname -s)
cores=$(nproc)
mem_mb=$(awk '/MemTotal/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    fail "$CONF exists and was not written by this script: not replacing it (this script is for throwaway machines)"
fi
mkdir -p /etc/slurm "$STATE"/ctld "$STATE"/d "$STATE"/log
# Job ids that no earlier incarnation of this cluster used: MPICH names its shared-memory segments after the job
# step, and a segment left in /dev/shm by a killed job (MPI_Abort under srun ends ranks with SIGKILL) made a
# later job with the same id fail in MPI_Init ("Invalid GenQ flag") or hang there.
first_job_id=$(( $(date +%s) % 50000000 + 1000 ))
cat > "$CONF" <<EOF
$MARK on $(date -Is): a throwaway one-node cluster; jobs/slurm_down.sh removes it.
ClusterName=hpcfl
FirstJobId=$first_job_id
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
InactiveLimit=0
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$((cores * SLOTS_PER_CORE)) RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF

# 4. the daemons
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld || fail "slurmctld did not start"
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd || fail "slurmd did not start"
for _ in $(seq 100); do
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
    case "$state" in idle*|mixed*|allocated*) break ;; esac
    if [ "$state" = "down" ] || [ "$state" = "drained" ] || [ "$state" = "down*" ]; then
        scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 0.2
done
case "$state" in idle*|mixed*|allocated*) ;; *) fail "node $host is '$state', not idle, after 20 s" ;; esac
say "node $host idle: $((cores * SLOTS_PER_CORE)) slots, partition debug, $(($(date +%s) - t0)) s; srun --mpi=list: $(srun --mpi=list 2>&1 | tr -s ' \n' ' ')"
