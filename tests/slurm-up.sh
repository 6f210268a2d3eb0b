#!/usr/bin/env bash
# Start a test Slurm on this machine (idempotent; as root): munge and slurmctld on the
# host, and N slurmd (HPCRUN_SLURM_NODES, default 3), each a "node" of its own:
#   - network namespace hpcnodeK, a veth pair to the bridge hpcslurm0 (10.77.0.1 on the
#     host, node K at 10.77.0.(10+K)), so srun, PMIx and MPI talk TCP between nodes;
#   - UTS namespace (hostname nodeK), mount namespace with its own spool directory and
#     its own /dev/shm (node-local storage; /tmp, /home and the checkout are the shared
#     file system, as on a cluster);
#   - cgroup namespace rooted at /hpcnodeK in every cgroup v1 controller, with those
#     controllers mounted fresh there, so the nodes' job cgroups never meet.
# HPCRUN_SLURM_PROCTRACK=cgroup (default: proctrack/cgroup + task/cgroup, PrologFlags=contain,
# as production sites run it) or linuxproc (proctrack/linuxproc, task/none).
# A different configuration than the running one restarts every daemon. Stop: slurm-down.sh.
set -euo pipefail
pkgs="slurmctld slurmd slurm-client munge libpmix-dev libslurm-dev gcc iproute2"   # libpmix: srun --mpi=pmix; libslurm-dev, gcc: SPANK plugin
if ! dpkg-query -W $pkgs >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >/dev/null
fi
here=$(cd "$(dirname "$0")/.." && pwd)
nodes=${HPCRUN_SLURM_NODES:-3}
track=${HPCRUN_SLURM_PROCTRACK:-cgroup}
case "$track" in
    cgroup) proctrack=proctrack/cgroup task=task/cgroup,task/affinity flags=PrologFlags=contain ;;
    linuxproc) proctrack=proctrack/linuxproc task=task/none flags= ;;
    *) echo "slurm-up.sh: HPCRUN_SLURM_PROCTRACK must be cgroup or linuxproc" >&2; exit 2 ;;
esac
host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 / nodes ))
state=/var/lib/hpcrun-slurm          # per-node spool directories, the nodes' pid files
mkdir -p /etc/slurm /var/spool/slurmd /var/spool/slurmctld /var/log/slurm /run/munge "$state"
chown slurm: /var/spool/slurmctld /var/log/slurm 2>/dev/null || true
# batch/slurm/epilog.sh as the nodes' Epilog (it removes images staged with stage-image.sh).
install -m 0755 "$here/batch/slurm/epilog.sh" /etc/slurm/hpcrun-epilog.sh
names="node[1-$nodes]"
[ "$nodes" -gt 1 ] || names=node1
conf=$(cat <<CONF
ClusterName=hpcruntest
Epilog=/etc/slurm/hpcrun-epilog.sh
SlurmctldHost=$host(10.77.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/var/spool/slurmd/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
ProctrackType=$proctrack
TaskPlugin=$task
$flags
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
KillWait=5
InactiveLimit=0
# a finished job's record lives 300 s (Slurm's default): sbatch --wait polls up to every 32 s and
# returned 0 ("no longer found") for a job purged between two polls (the time-limit test)
MinJobAge=300
SlurmdTimeout=30
NodeName=$names NodeHostname=$names CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
CONF
)
# NodeAddr: node K at 10.77.0.(10+K)
addrs=$(seq -s, -f '10.77.0.%g' 11 $((10 + nodes)))
conf=${conf/State=UNKNOWN/NodeAddr=$addrs State=UNKNOWN}
cgconf="CgroupPlugin=cgroup/v1
ConstrainCores=yes
ConstrainRAMSpace=no
ConstrainDevices=no"
# PMIx's per-step client directory on node-local storage: /tmp is the nodes' shared file system.
mpiconf="PMIxCliTmpDirBase=/dev/shm"
[ -s /etc/munge/munge.key ] || (dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null)
chown munge: /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
# The hpcrun SPANK plugin (srun/sbatch --hpcrun-image), before the daemons start.
# Its own file under plugstack.conf.d, so other plugstack entries stay untouched;
# `optional`, so a plugin that fails to load never stops srun.
bash "$here/batch/slurm/spank/build.sh" /usr/local/lib/hpcrun/hpcrun_spank.so >/dev/null
mkdir -p /etc/slurm/plugstack.conf.d
include='include /etc/slurm/plugstack.conf.d/*.conf'
grep -qxF "$include" /etc/slurm/plugstack.conf 2>/dev/null || echo "$include" >> /etc/slurm/plugstack.conf
line='optional /usr/local/lib/hpcrun/hpcrun_spank.so hpcrun=/opt/hpcrun-venv/bin/hpcrun warm'
if [ "$(cat /etc/slurm/plugstack.conf.d/hpcrun.conf 2>/dev/null)" != "$line" ]; then
    echo "$line" > /etc/slurm/plugstack.conf.d/hpcrun.conf.new
    mv -f /etc/slurm/plugstack.conf.d/hpcrun.conf.new /etc/slurm/plugstack.conf.d/hpcrun.conf
fi
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged

alive() { [ -s "$1" ] && [ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" = "$2" ]; }
running=yes
alive /run/slurmctld.pid slurmctld || running=no
for k in $(seq "$nodes"); do alive "$state/node$k/slurmd.pid" slurmd || running=no; done
if [ "$(cat /etc/slurm/slurm.conf 2>/dev/null)" != "$conf" ] ||
    [ "$(cat /etc/slurm/cgroup.conf 2>/dev/null)" != "$cgconf" ] ||
    [ "$(cat /etc/slurm/mpi.conf 2>/dev/null)" != "$mpiconf" ] || [ $running = no ]; then
    bash "$here/tests/slurm-down.sh" >/dev/null   # another configuration, or a daemon gone: start afresh
    echo "$conf" > /etc/slurm/slurm.conf
    echo "$cgconf" > /etc/slurm/cgroup.conf
    echo "$mpiconf" > /etc/slurm/mpi.conf
    # The bridge, and one network namespace and veth pair per node.
    ip link add hpcslurm0 type bridge 2>/dev/null || true
    ip addr replace 10.77.0.1/24 dev hpcslurm0
    ip link set hpcslurm0 up
    slurmctld
    for k in $(seq "$nodes"); do
        ns=hpcnode$k
        ip netns add $ns
        ip link add hpcveth$k type veth peer name eth0 netns $ns
        ip link set hpcveth$k master hpcslurm0 up
        ip -n $ns addr add 10.77.0.$((10 + k))/24 dev eth0
        ip -n $ns link set eth0 up
        ip -n $ns link set lo up
        ip -n $ns route add default via 10.77.0.1
        mkdir -p "$state/node$k"
        # The node's cgroups: /hpcnodeK in each v1 controller (cpuset needs its cpus and mems first).
        for c in /sys/fs/cgroup/*/; do
            c=${c%/}
            [ "$(stat -f -c %T "$c")" = cgroupfs ] && [ -f "$c/tasks" ] || continue
            mkdir -p "$c/hpcnode$k"
            [ -f "$c/cpuset.cpus" ] && cat "$c/cpuset.cpus" > "$c/hpcnode$k/cpuset.cpus" && cat "$c/cpuset.mems" > "$c/hpcnode$k/cpuset.mems"
        done
        # shellcheck disable=SC2016  # expanded by the node's shell
        setsid sh -c '
            k=$1 state=$2
            for c in /sys/fs/cgroup/*/hpcnode$k; do echo $$ > "$c/cgroup.procs"; done
            exec nsenter --net=/run/netns/hpcnode$k unshare --uts --mount --cgroup --propagation private sh -c "
                set -e
                hostname node$k
                for c in /sys/fs/cgroup/*/hpcnode$k; do
                    d=\${c%/hpcnode$k}; opt=\$(basename \$d)
                    [ \$opt = systemd ] && opt=none,name=systemd
                    umount \$d && mount -t cgroup -o \$opt cgroup \$d
                done
                mount --bind $state/node$k /var/spool/slurmd
                mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
                exec slurmd -N node$k
            "' sh "$k" "$state" </dev/null >>/var/log/slurm/node-start.log 2>&1
    done
fi
# Ready means a job step really runs on every node.
for attempt in 1 2 3; do
    for _ in $(seq 60); do
        [ "$(sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated)$')" = "$nodes" ] && break
        scontrol update nodename="$names" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    if timeout 60 srun -N "$nodes" -t 1 true >/dev/null 2>&1; then
        srun --help 2>/dev/null | grep -q -- --hpcrun-image ||
            echo "slurm-up.sh: warning: the hpcrun SPANK plugin did not load (srun --help has no --hpcrun-image)" >&2
        echo "slurm-up.sh: Slurm ready: $names ($cpus CPUs each, $proctrack) on $host"
        exit 0
    fi
    sleep 2
done
echo "slurm-up.sh: Slurm did not come up; see /var/log/slurm/" >&2
sinfo -N >&2 || true
exit 1
