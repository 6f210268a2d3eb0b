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
bash "$here/tests/slurm-up.sh"      # a real one-node Slurm for tests/batch
cd "$here"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
pytest=("$VENV/bin/python" -m pytest -q -p no:cacheprovider)
"${pytest[@]}" tests/unit
# The unit tests once more without privilege (a copy if the test user can't read this tree).
tree=$here
if ! setpriv --reuid="$TEST_USER" --regid="$(id -g "$TEST_USER")" --clear-groups test -r "$here/tests/unit/conftest.py"; then
    tree=$(mktemp -d /tmp/hpcrun-unit-XXXXXX)
    cp -a "$here/hpcrun" "$here/conf" "$here/tests" "$here/pyproject.toml" "$here/setup.cfg" "$tree/"
    chmod -R a+rX "$tree"
    trap 'rm -rf "$tree"' EXIT
fi
(cd / && setpriv --reuid="$TEST_USER" --regid="$(id -g "$TEST_USER")" --init-groups --inh-caps=-all \
    env -i PATH=/usr/bin:/bin HOME="$(getent passwd "$TEST_USER" | cut -d: -f6)" LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 "${pytest[@]}" "$tree/tests/unit")
exec "${pytest[@]}" tests/integration tests/batch "$@"
