#!/usr/bin/env bash
# The main job, on a fresh Debian 12 machine (run as root; idempotent): set the machine
# up, then as the unprivileged user build the busybox demo image and run commands in it.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
bash "$here/tests/setup-host.sh"
USER_NAME=${HPCRUN_TEST_USER:-hpctest}
HPCRUN=/opt/hpcrun-venv/bin/hpcrun
out=/tmp/hpcrun-demo
rm -rf "$out"
install -d -o "$USER_NAME" -m 0755 "$out"
as_user() { setpriv --reuid="$USER_NAME" --regid="$USER_NAME" --init-groups --inh-caps=-all -- \
            env -i PATH=/usr/bin:/bin HOME="$(getent passwd "$USER_NAME" | cut -d: -f6)" \
            USER="$USER_NAME" LOGNAME="$USER_NAME" "$@"; }
cd "$out"
install -m 0755 "$here/images/busybox/make-rootfs.sh" "$out/"   # the checkout may be private
as_user sh "$out/make-rootfs.sh" "$out/rootfs"
as_user "$HPCRUN" build "$out/busybox.sif" "$out/rootfs"
echo "--- hpcrun run busybox.sif"
as_user "$HPCRUN" run "$out/busybox.sif"
echo "--- hpcrun exec busybox.sif sh -c 'id; cat /etc/os-release; ls /'"
as_user "$HPCRUN" exec "$out/busybox.sif" sh -c 'id; cat /etc/os-release; ls /'
