#!/usr/bin/env bash
# Stop the test Slurm of slurm-up.sh (idempotent; as root): every slurmd and its job
# steps, slurmctld, the nodes' namespaces, veth pairs, bridge and cgroups. munged stays
# (other software may use it). Also stops a one-node slurmd of older slurm-up.sh versions.
set -uo pipefail
state=/var/lib/hpcrun-slurm
stop() {   # stop PID (a daemon named NAME) and wait for it
    local pid=$1 name=$2
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 0
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 40); do [ -d "/proc/$pid" ] || return 0; sleep 0.25; done
    kill -KILL "$pid" 2>/dev/null
}
for f in "$state"/node*/slurmd.pid /run/slurmd.pid; do
    [ -s "$f" ] && stop "$(cat "$f")" slurmd
    rm -f "$f"
done
stop "$(cat /run/slurmctld.pid 2>/dev/null)" slurmctld
# Job steps outlive slurmd; what is left in a node's cgroups goes with it.
for c in /sys/fs/cgroup/*/hpcnode*; do
    [ -d "$c" ] || continue
    for _ in 1 2 3; do
        pids=$(find "$c" -name cgroup.procs -exec cat {} + 2>/dev/null)
        [ -z "$pids" ] && break
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null
        sleep 0.5
    done
    find "$c" -depth -type d -exec rmdir {} + 2>/dev/null
done
for ns in $(ip netns list 2>/dev/null | awk '/^hpcnode[0-9]+/ {print $1}'); do ip netns delete "$ns"; done
for l in $(ip -o link show 2>/dev/null | awk -F': ' '$2 ~ /^hpcveth[0-9]+@/ {sub(/@.*/, "", $2); print $2}'); do
    ip link delete "$l" 2>/dev/null
done
ip link delete hpcslurm0 2>/dev/null
echo "slurm-down.sh: test Slurm stopped"
exit 0
