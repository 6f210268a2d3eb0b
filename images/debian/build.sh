#!/bin/sh
# Debian 12 with Python, built unprivileged from debian.def (Bootstrap: debootstrap: hpcrun
# runs mmdebstrap in its unshare mode through your /etc/subuid range).
# Usage: images/debian/build.sh OUT.sif [EXTRA_PACKAGES...]   (needs: mmdebstrap, uidmap)
set -eu
out=$1; shift
here=$(cd "$(dirname "$0")" && pwd)
hpcrun build --force --quiet --build-arg "EXTRA=$*" "$out" "$here/debian.def"
