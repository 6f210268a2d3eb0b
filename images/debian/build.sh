#!/bin/sh
# Debian 12 with Python, built unprivileged: mmdebstrap (its unshare mode uses your
# /etc/subuid range) writes a root file system tarball, hpcrun builds the SIF from it.
# Usage: images/debian/build.sh OUT.sif [EXTRA_PACKAGES...]   (needs: mmdebstrap, uidmap)
set -eu
out=$1; shift
tmp=$(mktemp -d "${TMPDIR:-/tmp}/hpcrun-debian-XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM
include=python3
for p in "$@"; do include="$include,$p"; done
mmdebstrap --quiet --mode=unshare --variant=minbase --include="$include" bookworm "$tmp/rootfs.tar"
hpcrun build --force --quiet "$out" "$tmp/rootfs.tar"
