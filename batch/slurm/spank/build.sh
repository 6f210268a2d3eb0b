#!/usr/bin/env bash
# Build the hpcrun SPANK plugin against the installed Slurm headers and install it.
#   bash build.sh [DESTDIR_FILE]     default /usr/local/lib/hpcrun/hpcrun_spank.so
# Needs gcc and Slurm's spank.h (Debian: apt-get install libslurm-dev). Rebuild after
# every major Slurm upgrade: the SPANK ABI is only stable within a release.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dest=${1:-/usr/local/lib/hpcrun/hpcrun_spank.so}
if [ ! -f /usr/include/slurm/spank.h ]; then
    echo "build.sh: /usr/include/slurm/spank.h missing (apt-get install libslurm-dev)" >&2
    exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# No -lslurm: slurmstepd/srun/sbatch provide the spank_* symbols when they load us.
gcc -std=gnu99 -O2 -Wall -Wextra -Wno-unused-parameter -fPIC -shared \
    -o "$tmp/hpcrun_spank.so" "$here/hpcrun_spank.c"
if cmp -s "$tmp/hpcrun_spank.so" "$dest"; then
    echo "build.sh: $dest is up to date"
    exit 0
fi
mkdir -p "$(dirname "$dest")"
# Install by rename so a running srun/slurmstepd never maps a half-written file.
install -m 0755 "$tmp/hpcrun_spank.so" "$dest.new"
mv -f "$dest.new" "$dest"
echo "build.sh: installed $dest"
