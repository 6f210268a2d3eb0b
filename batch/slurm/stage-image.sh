#!/bin/sh
# Stage an image to node-local storage once per job: in a batch script (or salloc shell),
#     IMG=$(stage-image.sh /shared/app.sif)
#     srun hpcrun exec "$IMG" ./solver
# sbcast reads the shared file system once and broadcasts the file over Slurm's tree to
# every node of the job, instead of every rank reading it there. Prints the node-local
# path (the same on every node). The epilog (epilog.sh) removes it when the job ends.
# DIR (second argument, or $HPCRUN_STAGE_DIR) defaults to /tmp; it must exist on the nodes.
set -eu
me=stage-image.sh
[ $# -ge 1 ] || { echo "$me: usage: $me IMAGE [DIR]" >&2; exit 2; }
src=$1
dir=${2:-${HPCRUN_STAGE_DIR:-/tmp}}
[ -n "${SLURM_JOB_ID:-}" ] || { echo "$me: run me inside a job (sbatch or salloc)" >&2; exit 2; }
[ -f "$src" ] && [ -r "$src" ] || { echo "$me: $src: no readable image file" >&2; exit 2; }
dst="$dir/hpcrun-stage-$SLURM_JOB_ID-$(basename "$src")"
sbcast --force --preserve "$src" "$dst" >&2 || { echo "$me: sbcast of $src to $dst failed" >&2; exit 1; }
echo "$dst"
