#!/usr/bin/env bash
# Set up the machine (idempotent) and run the whole test suite as root; the
# integration tests run hpcrun as the unprivileged test user.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/tests/setup-host.sh"
bash "$here/tests/slurm-up.sh"      # a real one-node Slurm for tests/batch
cd "$here"
exec /opt/hpcrun-venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
