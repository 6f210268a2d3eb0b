#!/bin/sh
# Slurm Epilog: report (and, where safe, remove) anything a job's hpcrun left on the node.
# hpcrun leaves no mounts on the host (they live in the container's namespace) and removes
# its --unsquash trees itself, so this should find nothing but warm shared containers:
# a keeper (process name hpcrun-keeper) stays share_idle_timeout seconds after its last
# task so that the user's next step or job finds the image mounted; it leaves by itself.
# With END_KEEPERS=1 below, keepers and their squashfuse daemons are ended at once when
# the user has no other job on this node (no warm mounts between jobs, then).
# Install: Epilog=/path/to/epilog.sh in slurm.conf.
END_KEEPERS=${HPCRUN_EPILOG_END_KEEPERS:-0}
user=${SLURM_JOB_USER:-}
[ -n "$user" ] || exit 0
log() { logger -t hpcrun-epilog "job ${SLURM_JOB_ID:-?}: $*" 2>/dev/null || true; }
# Images this job staged with stage-image.sh (in /tmp or /dev/shm; add the site's own).
for d in /tmp /dev/shm ${HPCRUN_STAGE_DIRS:-}; do
    [ -n "${SLURM_JOB_ID:-}" ] || break
    for f in "$d/hpcrun-stage-$SLURM_JOB_ID-"*; do
        [ -f "$f" ] && [ "$(stat -c %U "$f")" = "$user" ] && rm -f "$f"
    done
done
# The job keeper (SPANK plugin's `warm`) and its job's keepers were killed with the job:
# their sockets and locks, all named job-ID*, go. As the user: the directory is theirs,
# so nothing in it can point root anywhere.
uid=${SLURM_JOB_UID:-}
if [ -n "${SLURM_JOB_ID:-}" ] && [ -n "$uid" ] && [ "$uid" != 0 ]; then
    # shellcheck disable=SC2016  # expanded by the user's shell
    setpriv --reuid="$uid" --regid="$(id -g "$uid")" --clear-groups -- sh -c '
        cd "/dev/shm/hpcrun-$1" 2>/dev/null || exit 0
        rm -f "job-$2.sock" "job-$2-"*
        cd / && rmdir "/dev/shm/hpcrun-$1" 2>/dev/null' sh "$uid" "$SLURM_JOB_ID" || true
fi
# Anything else of the user's still running here (another job, a login) may be using what
# follows: then touch nothing. (No squeue: Slurm advises against its commands in epilogs.)
others=$(ps -u "$user" -o comm= 2>/dev/null | grep -vxE 'hpcrun-keeper|squashfuse_ll|squashfuse' | head -1)
[ -z "$others" ] || exit 0
for d in "${TMPDIR:-/tmp}"/hpcrun-unsquash-* /tmp/hpcrun-unsquash-*; do
    [ -d "$d" ] || continue
    [ "$(stat -c %U "$d")" = "$user" ] || continue
    log "removing leftover $d"
    chmod -R u+rwX "$d" 2>/dev/null; rm -rf "$d"
done
if [ "$END_KEEPERS" = 1 ]; then
    pkill -TERM -u "$user" -x hpcrun-keeper 2>/dev/null && log "ended warm shared containers"
fi
exit 0
