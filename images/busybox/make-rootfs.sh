#!/bin/sh
# Make a tiny root file system from Debian's busybox-static: the demo and test image.
# Usage: make-rootfs.sh DIR   (DIR must not exist; runs as any user)
set -eu
dir=$1
busybox=${BUSYBOX:-/bin/busybox}
[ -e "$dir" ] && { echo "make-rootfs.sh: $dir exists" >&2; exit 2; }
mkdir -p "$dir"
cd "$dir"
mkdir -p bin sbin usr/bin etc dev proc sys tmp var/tmp home root .singularity.d/env
cp "$busybox" bin/busybox
for applet in $(bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > etc/passwd
printf 'root:x:0:\nnogroup:x:65534:\n' > etc/group
printf 'NAME="hpcrun busybox demo"\nID=busybox\n' > etc/os-release
# Apptainer-style metadata, so `hpcrun run` and the image environment work as there.
printf 'export DEMO_IMAGE=busybox\n' > .singularity.d/env/90-environment.sh
printf '{"org.label-schema.name": "hpcrun busybox demo"}\n' > .singularity.d/labels.json
cat > .singularity.d/runscript <<'RUN'
#!/bin/sh
echo "Hello from the hpcrun busybox demo: I am $(id -un) (uid $(id -u)) in $(pwd)"
if [ $# -gt 0 ]; then exec "$@"; fi
RUN
chmod 755 .singularity.d/runscript
