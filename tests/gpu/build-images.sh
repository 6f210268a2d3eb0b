#!/bin/bash
# Build the images tests/gpu/device-check.sh runs, on the development machine (Debian 12,
# as root, gcc, busybox-static, squashfs-tools; no network needed). They are small:
#   busybox-glibc.sif  busybox + the host's glibc + cudacheck (a C probe)      (~2 MiB)
#   debian-python.sif  the host's Debian python3.11 and its stdlib + cuda_check.py (~15 MiB)
# Usage: tests/gpu/build-images.sh [OUTDIR]   (default tests/gpu/images)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/images}
hpcrun=${HPCRUN_BIN:-hpcrun}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

copy_with_libs() {  # copy_with_libs ROOT FILE...: the files and the shared libraries they need
    local root=$1; shift
    for f in "$@"; do
        mkdir -p "$root$(dirname "$f")"
        cp -aL "$f" "$root$f"
        ldd "$f" 2>/dev/null | awk '/=> \//{print $3} /^\t\/.*ld-linux/{print $1}' | while read -r lib; do
            mkdir -p "$root$(dirname "$lib")"
            [ -e "$root$lib" ] || cp -L "$lib" "$root$lib"
        done
    done
}

skeleton() {
    local root=$1
    mkdir -p "$root"/{bin,sbin,usr/bin,etc,dev,proc,sys,tmp,var/tmp,home,root,opt,.singularity.d/env}
    cp /bin/busybox "$root/bin/busybox"
    for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"; done
    printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
    printf 'root:x:0:\n' > "$root/etc/group"
}

# 1. busybox + glibc (nvidia-smi from the host needs glibc's libc, libm, libdl, libpthread, librt)
r=$work/bb; skeleton "$r"
gcc -O2 -o "$work/cudacheck" "$here/cudacheck.c"
copy_with_libs "$r" "$work/cudacheck"
mv "$r$work/cudacheck" "$r/usr/bin/cudacheck"
for l in libc.so.6 libm.so.6 libdl.so.2 libpthread.so.0 librt.so.1 libgcc_s.so.1; do
    p=/lib/x86_64-linux-gnu/$l; [ -e "$p" ] && cp -L "$p" "$r/lib/x86_64-linux-gnu/$l" 2>/dev/null || true
done
"$hpcrun" build -F "$out/busybox-glibc.sif" "$r" >/dev/null

# 2. Debian's python3 (the host's: Debian 12) with its standard library, no tests
r=$work/py; skeleton "$r"
copy_with_libs "$r" /usr/bin/python3.11
ln -sf python3.11 "$r/usr/bin/python3"
mkdir -p "$r/usr/lib"
tar -C /usr/lib --exclude=test --exclude=__pycache__ --exclude=idlelib --exclude=tkinter \
    --exclude=ensurepip --exclude=lib2to3 -cf - python3.11 | tar -C "$r/usr/lib" -xf -
for so in /usr/lib/python3.11/lib-dynload/*.so; do copy_with_libs "$r" "$so"; done
cp "$here/cuda_check.py" "$r/opt/cuda_check.py"
"$hpcrun" build -F "$out/debian-python.sif" "$r" >/dev/null

ls -l "$out"
