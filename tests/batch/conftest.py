import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integration"))
from hpcrun_testlib import images, no_leaks, utmp  # noqa: E402,F401  (shared fixtures)

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def slurm():
    """A real one-node Slurm (munge, slurmctld, slurmd) started by tests/slurm-up.sh."""
    if os.getuid() != 0:
        pytest.fail("the Slurm tests start slurmctld/slurmd and need root (CI runs as root)")
    r = subprocess.run(["bash", os.path.join(HERE, "..", "slurm-up.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return True
