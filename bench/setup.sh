#!/usr/bin/env bash
# What bench/compare.py needs besides tests/setup-host.sh (idempotent; as root):
# ch-run, Charliecloud's C runtime, from Debian.
set -euo pipefail
if ! command -v ch-run >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq charliecloud-runtime >/dev/null
fi
echo "bench/setup.sh: ch-run $(ch-run --version 2>&1)"
