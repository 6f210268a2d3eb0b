#!/bin/sh
# Build the MPI-ready image unprivileged. Usage: images/mpi/build.sh OUT.sif
# (needs: mmdebstrap, uidmap; downloads Open MPI and gcc from Debian)
set -eu
out=$(realpath -m "$1")
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/hpcrun-mpi-XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM
mmdebstrap --quiet --mode=unshare --variant=minbase \
    --include=openmpi-bin,libopenmpi-dev,gcc,libc6-dev bookworm "$tmp/debian-mpi.tar"
cp "$here/mpi.def" "$here/hello.c" "$tmp/"
hpcrun build --force --quiet "$out" "$tmp/mpi.def"
