#!/bin/sh
# Slurm Epilog: report (and remove) anything a job's hpcrun left on the node. hpcrun
# leaves no mounts on the host (they live in the container's namespace) and removes its
# --unsquash trees itself, so this should find nothing; it logs what it finds.
# Install: Epilog=/path/to/epilog.sh in slurm.conf.
user=${SLURM_JOB_USER:-}
[ -n "$user" ] || exit 0
for d in "${TMPDIR:-/tmp}"/hpcrun-unsquash-* /tmp/hpcrun-unsquash-*; do
    [ -d "$d" ] || continue
    [ "$(stat -c %U "$d")" = "$user" ] || continue
    logger -t hpcrun-epilog "job ${SLURM_JOB_ID:-?}: removing leftover $d" 2>/dev/null || true
    chmod -R u+rwX "$d" 2>/dev/null; rm -rf "$d"
done
pkill -KILL -u "$user" -x squashfuse_ll 2>/dev/null && \
    logger -t hpcrun-epilog "job ${SLURM_JOB_ID:-?}: killed leftover squashfuse_ll" 2>/dev/null
exit 0
