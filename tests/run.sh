#!/usr/bin/env bash
# Set up the machine (idempotent) and run every check as CI does, as root: ruff (lint and
# format), the unit tests as root and as the unprivileged test user, then the integration
# and Slurm tests (they run hpcrun as the test user; the build tests also as root).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
VENV=${HPCRUN_VENV:-/opt/hpcrun-venv}
TEST_USER=${HPCRUN_TEST_USER:-hpctest}
export HPCRUN_BIN=${HPCRUN_BIN:-$VENV/bin/hpcrun}   # the hpcrun the integration tests run
bash "$here/tests/setup-host.sh"
bash "$here/tests/slurm-up.sh"      # a real three-node Slurm (proctrack/cgroup) for tests/batch
cd "$here"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
pytest=("$VENV/bin/python" -m pytest -q -p no:cacheprovider)
"${pytest[@]}" tests/unit
# The unit tests once more without privilege (a copy, with the shared SIF test data beside
# it, if the test user can't read this tree).
tree=$here
as_user=(setpriv --reuid="$TEST_USER" --regid="$(id -g "$TEST_USER")" --init-groups --inh-caps=-all)
data="$here/../shared/testdata"
if ! "${as_user[@]}" test -r "$here/tests/unit/conftest.py" || { [ -d "$data" ] && ! "${as_user[@]}" test -r "$data/sif"; }; then
    base=$(mktemp -d /tmp/hpcrun-unit-XXXXXX)
    trap 'rm -rf "$base"' EXIT
    tree=$base/main
    mkdir "$tree"
    cp -a "$here/hpcrun" "$here/conf" "$here/tests" "$here/pyproject.toml" "$here/setup.cfg" "$tree/"
    if [ -d "$data" ]; then mkdir "$base/shared" && cp -a "$data" "$base/shared/"; fi
    chmod -R a+rX "$base"
fi
(cd / && "${as_user[@]}" env -i PATH=/usr/bin:/bin HOME="$(getent passwd "$TEST_USER" | cut -d: -f6)" LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 "${pytest[@]}" "$tree/tests/unit")
"${pytest[@]}" tests/integration tests/batch "$@"
# The second Slurm configuration (proctrack/linuxproc: keepers outlive steps, warm across
# them): the tests where the two differ, then back to the default for whoever comes next.
trap '[ -z "${base:-}" ] || rm -rf "$base"; bash "$here/tests/slurm-up.sh" >/dev/null' EXIT
HPCRUN_SLURM_PROCTRACK=linuxproc "${pytest[@]}" tests/batch/test_slurm.py tests/batch/test_multinode.py \
    -k "share or warm or concurrent or scancel or time_limit or three_nodes"
