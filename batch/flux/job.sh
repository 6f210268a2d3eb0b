#!/bin/bash
# Flux: run one container per task; FLUX_TASK_RANK and FLUX_JOB_ID pass through.
# Usage: flux batch -n 4 job.sh IMAGE COMMAND [ARGS...]
#    or: flux run -n 4 hpcrun exec IMAGE COMMAND [ARGS...]
set -eu
image=$1; shift
flux run -n "${FLUX_JOB_NNODES:-1}" hpcrun exec "$image" "$@"
