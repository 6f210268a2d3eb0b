"""Other schedulers (not installable here): their job templates parse, and their rank/host
variables reach the container, with each scheduler's environment emulated."""

import os
import subprocess

import pytest

from hpcrun_testlib import hpcrun

BATCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "batch")

EMULATED = {
    "pbs": {"PBS_JOBID": "17.server", "PBS_NODEFILE": "/tmp/nodes", "PBS_O_WORKDIR": "/tmp", "PBS_TASKNUM": "1"},
    "lsf": {"LSB_JOBID": "42", "LSB_HOSTS": "n1 n1", "LSB_DJOB_NUMPROC": "2"},
    "htcondor": {"_CONDOR_SCRATCH_DIR": "/tmp/condor", "_CONDOR_SLOT": "slot1_1"},
    "flux": {"FLUX_JOB_ID": "f2ytb", "FLUX_TASK_RANK": "3", "FLUX_URI": "local:///tmp/flux"},
    "pmi": {
        "PMI_RANK": "1",
        "PMI_SIZE": "4",
        "PMIX_RANK": "1",
        "OMPI_COMM_WORLD_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    },
}


@pytest.mark.parametrize("name", sorted(EMULATED))
def test_scheduler_variables_pass_through(images, name):
    env = EMULATED[name]
    r = hpcrun("exec", images["sif"], "env", env=env)
    assert r.returncode == 0, r.stderr
    inside = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    assert {k: inside.get(k) for k in env} == env


@pytest.mark.parametrize(
    "path",
    [
        "slurm/single.sbatch",
        "slurm/array.sbatch",
        "slurm/multi.sbatch",
        "slurm/image.sbatch",
        "slurm/epilog.sh",
        "pbs/job.pbs",
        "lsf/job.lsf",
        "flux/job.sh",
    ],
)
def test_job_scripts_parse(path):
    shell = "sh" if path.endswith("epilog.sh") else "bash"
    r = subprocess.run([shell, "-n", os.path.join(BATCH, path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_htcondor_submit_file_has_the_required_commands():
    with open(os.path.join(BATCH, "htcondor", "job.sub")) as f:
        keys = {line.split("=", 1)[0].strip() for line in f if "=" in line and not line.startswith("#")}
    assert {"executable", "arguments", "output", "error", "log"} <= keys
