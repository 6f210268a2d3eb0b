#!/usr/bin/env bash
# Start a one-node Slurm on this machine for the tests (idempotent; as root):
# munge, slurmctld and slurmd from Debian, configured for loopback with this host's CPUs.
set -euo pipefail
pkgs="slurmctld slurmd slurm-client munge libpmix-dev libslurm-dev gcc"   # libpmix: srun --mpi=pmix; libslurm-dev, gcc: SPANK plugin
if ! dpkg-query -W $pkgs >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >/dev/null
fi
here=$(cd "$(dirname "$0")/.." && pwd)
host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
chown slurm: /var/spool/slurmctld /var/log/slurm 2>/dev/null || true
# batch/slurm/epilog.sh as the node's Epilog (it removes images staged with stage-image.sh).
install -m 0755 "$here/batch/slurm/epilog.sh" /etc/slurm/hpcrun-epilog.sh
old_conf=$(cat /etc/slurm/slurm.conf 2>/dev/null || true)
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=hpcruntest
Epilog=/etc/slurm/hpcrun-epilog.sh
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=30
SlurmdTimeout=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
CONF
rm -f /etc/slurm/cgroup.conf
[ -s /etc/munge/munge.key ] || (dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null)
chown munge: /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
# The hpcrun SPANK plugin (srun/sbatch --hpcrun-image), before the daemons start.
# Its own file under plugstack.conf.d, so other plugstack entries stay untouched;
# `optional`, so a plugin that fails to load never stops srun. slurmstepd and srun
# read plugstack.conf at every step and the plugin has no slurmd hooks, so a running
# slurmd needs no restart for it.
bash "$here/batch/slurm/spank/build.sh" /usr/local/lib/hpcrun/hpcrun_spank.so >/dev/null
mkdir -p /etc/slurm/plugstack.conf.d
include='include /etc/slurm/plugstack.conf.d/*.conf'
grep -qxF "$include" /etc/slurm/plugstack.conf 2>/dev/null || echo "$include" >> /etc/slurm/plugstack.conf
line='optional /usr/local/lib/hpcrun/hpcrun_spank.so hpcrun=/opt/hpcrun-venv/bin/hpcrun'
if [ "$(cat /etc/slurm/plugstack.conf.d/hpcrun.conf 2>/dev/null)" != "$line" ]; then
    echo "$line" > /etc/slurm/plugstack.conf.d/hpcrun.conf.new
    mv -f /etc/slurm/plugstack.conf.d/hpcrun.conf.new /etc/slurm/plugstack.conf.d/hpcrun.conf
fi
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
if [ "$old_conf" != "$(cat /etc/slurm/slurm.conf)" ] && pgrep -x slurmctld >/dev/null; then
    scontrol reconfigure || true     # running daemons read the changed slurm.conf
fi
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
# Ready means a job step really runs; a slurmd left from before (or still shutting
# down) is replaced once.
for attempt in 1 2 3; do
    for _ in $(seq 30); do
        sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)$' && break
        scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    if timeout 30 srun -N1 -n1 -t 1 true >/dev/null 2>&1; then
        srun --help 2>/dev/null | grep -q -- --hpcrun-image ||
            echo "slurm-up.sh: warning: the hpcrun SPANK plugin did not load (srun --help has no --hpcrun-image)" >&2
        echo "slurm-up.sh: one-node Slurm ready on $host ($cpus CPUs)"
        exit 0
    fi
    pkill -x slurmd || true
    for _ in $(seq 20); do pgrep -x slurmd >/dev/null || break; sleep 0.5; done
    slurmd
    sleep 2
done
echo "slurm-up.sh: Slurm did not come up; see /var/log/slurm/" >&2
sinfo >&2 || true
exit 1
