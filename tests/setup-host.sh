#!/usr/bin/env bash
# Prepare a Debian 12 machine for hpcrun (idempotent; run as root):
# system packages, a venv in /opt/hpcrun-venv with hpcrun installed from this tree,
# an unprivileged user with /etc/subuid and /etc/subgid ranges, usable /dev/fuse.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
VENV=${HPCRUN_VENV:-/opt/hpcrun-venv}
TEST_USER=${HPCRUN_TEST_USER:-hpctest}

if [ "$(id -u)" != 0 ]; then
    echo "setup-host.sh: run as root (it installs packages and creates the test user)" >&2
    exit 2
fi

pkgs="squashfuse squashfs-tools fuse3 uidmap busybox-static python3-venv python3-dev util-linux zstd docker-registry skopeo mmdebstrap"
missing=$(dpkg-query -W -f='${Package} ${Status}\n' $pkgs 2>/dev/null | awk '$4 != "installed" {print $1}' || true)
if ! dpkg-query -W $pkgs >/dev/null 2>&1 || [ -n "$missing" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >/dev/null
fi

# Debian's python3, not a per-user interpreter: the test user must be able to run it.
[ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv "$VENV"
if ! id "$TEST_USER" >/dev/null 2>&1; then
    useradd -m -s /bin/bash "$TEST_USER"
fi
# The tests must run the tree being edited: an editable install when the test user can
# read this checkout, else a copy (tests/integration/hpcrun_testlib.py refuses a stale one).
if setpriv --reuid="$TEST_USER" --regid="$(id -g "$TEST_USER")" --clear-groups test -r "$here/hpcrun/cli.py"; then
    editable=(-e "$here[test]" --config-settings editable_mode=compat)
else
    editable=("$here[test]")
fi
"$VENV/bin/pip" install -q --disable-pip-version-check "${editable[@]}" 2>&1 | grep -v '^WARNING: Location' || true
# The workflow tools that call `apptainer` (tests/integration/test_workflows.py and
# test_apptainer_cli.py), from PyPI (about a minute on a fresh venv; seconds once there).
"$VENV/bin/pip" install -q --disable-pip-version-check "snakemake>=9,<10" "cwltool>=3.1,<4" "spython>=0.3,<0.4" \
    "reframe-hpc>=4,<5" 2>&1 | grep -v '^WARNING: Location\|DEPRECATION' || true
"$VENV/bin/python" -m compileall -q "$VENV/lib" >/dev/null || true

uid=$(id -u "$TEST_USER")
grep -q "^$TEST_USER:" /etc/subuid 2>/dev/null || echo "$TEST_USER:$((100000 + uid * 65536)):65536" >> /etc/subuid
grep -q "^$TEST_USER:" /etc/subgid 2>/dev/null || echo "$TEST_USER:$((100000 + uid * 65536)):65536" >> /etc/subgid

# A second user without subordinate ids (--fakeroot must then map root only).
id "${TEST_USER}2" >/dev/null 2>&1 || useradd -m -s /bin/bash -K SUB_UID_COUNT=0 -K SUB_GID_COUNT=0 "${TEST_USER}2"
sed -i "/^${TEST_USER}2:/d" /etc/subuid /etc/subgid

# Clusters ship /dev/fuse as 0666; a fresh VM may have 0600.
[ -e /dev/fuse ] && chmod 0666 /dev/fuse
echo "setup-host.sh: ready (venv $VENV, test user $TEST_USER)"
