#!/usr/bin/env bash
# CI: a one-node SLURM cluster on this machine (Debian's slurm-wlm and munge), for tests/test_cluster.py.
# Installs the packages when missing, writes /etc/slurm/slurm.conf (one node: this host, all its cores, a
# default partition), starts munged, slurmctld and slurmd, and waits until `sinfo` shows the node idle.
# Idempotent: run it again and it only (re)starts what is not running, or what runs an outdated configuration.
# Needs root. Usage: .ci/slurm-setup.sh   (then CELLSEG_REQUIRE_SLURM=1 make test)
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "slurm-setup: run as root (it installs packages and starts daemons)" >&2
    exit 1
fi

if ! command -v sbatch >/dev/null || ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt_log=$(mktemp)
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge; } >"$apt_log" 2>&1; then
        cat "$apt_log" >&2
        echo "slurm-setup: installing slurm-wlm and munge failed" >&2
        exit 1
    fi
    rm -f "$apt_log"
fi

host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
real_mb=$((mem_mb * 9 / 10))   # below the machine's, or slurmd marks the node invalid

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
conf=$(mktemp)
cat >"$conf" <<CONF
# written by .ci/slurm-setup.sh: a one-node SLURM for CI
ClusterName=cellseg-ci
SlurmctldHost=$host
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
KillWait=30
MinJobAge=300
NodeName=$host CPUs=$cpus RealMemory=$real_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

changed=0
if ! cmp -s "$conf" /etc/slurm/slurm.conf; then
    install -m 0644 "$conf" /etc/slurm/slurm.conf
    changed=1
fi
rm -f "$conf"

running() {  # running PIDFILE: the daemon whose pid the file names is alive
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop() {  # stop PIDFILE: end the daemon the file names, and wait for it
    local pid i
    running "$1" || return 0
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}

# munge: the key, then the daemon (as root: --force accepts root-owned directories)
if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then
        mungekey -c -f -k /etc/munge/munge.key
    else
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chmod 0400 /etc/munge/munge.key
fi
if ! running /run/munge/munged.pid; then
    munged --force --pid-file=/run/munge/munged.pid 2>/dev/null \
        || munged --force
fi

if [[ $changed -eq 1 ]]; then
    stop /run/slurmd.pid
    stop /run/slurmctld.pid
fi
running /run/slurmctld.pid || slurmctld
running /run/slurmd.pid || slurmd

for ((i = 0; i < 120; i++)); do
    state=$(sinfo --noheader --nodes="$host" --format=%T 2>/dev/null || true)
    case $state in
        idle | mixed | allocated) echo "slurm-setup: node $host is $state ($cpus CPUs, ${real_mb} MB)"; exit 0 ;;
        down* | drain* | fail*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.5
done
echo "slurm-setup: the node did not become idle; sinfo says '${state:-nothing}'" >&2
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
