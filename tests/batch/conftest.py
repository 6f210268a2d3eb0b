import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integration"))
from hpcrun_testlib import images, no_leaks, utmp  # noqa: E402,F401  (shared fixtures)

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def slurm():
    """A real multi-node Slurm (munge, slurmctld, one slurmd per node namespace) started by
    tests/slurm-up.sh, in the configuration HPCRUN_SLURM_PROCTRACK names (cgroup by default)."""
    if os.getuid() != 0:
        pytest.fail("the Slurm tests start slurmctld/slurmd and need root (CI runs as root)")
    r = subprocess.run(["bash", os.path.join(HERE, "..", "slurm-up.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return True


@pytest.fixture(scope="session")
def proctrack(slurm):
    """'cgroup' or 'linuxproc': how the running Slurm tracks a step's processes."""
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("ProctrackType"))
    return line.split("/")[-1].strip()


@pytest.fixture(scope="session")
def nodes(slurm):
    """The node names, in order (node1, node2, ...)."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, check=True).stdout
    return sorted(set(out.split()), key=lambda n: (len(n), n))
