"""The recipes in images/: Debian with Python, and the MPI image run under srun --mpi=pmix
(the hybrid model: Open MPI in the image, launched by the host's Slurm). Both are built
unprivileged with mmdebstrap (packages from Debian) and hpcrun build."""

import os
import shutil
import subprocess

import pytest

from hpcrun_testlib import HPCRUN, WORK, as_user, hpcrun, user, user_env

IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "images")


def build_recipe(name, out):
    """Run images/NAME/build.sh as the test user from a copy it can read."""
    work = os.path.join(WORK, "recipes")
    os.makedirs(work, exist_ok=True)
    os.chmod(work, 0o777)
    dst = os.path.join(work, name)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(os.path.join(IMAGES, name), dst)
    subprocess.run(["chmod", "-R", "a+rwX", dst], check=True)
    env = user_env({"PATH": f"{os.path.dirname(HPCRUN)}:/usr/bin:/bin"})
    r = subprocess.run(
        as_user(["sh", os.path.join(dst, "build.sh"), out]),
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def mpi_image(images):
    return build_recipe("mpi", os.path.join(WORK, "recipes", "mpi.sif"))


def test_debian_python_image(images):
    out = build_recipe("debian", os.path.join(WORK, "recipes", "debian.sif"))
    r = hpcrun("exec", out, "python3", "-c", "import getpass, sys; print(sys.version_info[0], getpass.getuser())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["3", user().pw_name]


def srun_mpi(mpi_image, *srun_args):
    """`srun --mpi=pmix SRUN_ARGS hpcrun run IMAGE` as the test user -> (result, its rank
    lines sorted); the step must succeed."""
    env = user_env({"PATH": f"{os.path.dirname(HPCRUN)}:/usr/bin:/bin"})
    r = subprocess.run(
        as_user(["srun", "--mpi=pmix", *srun_args, HPCRUN, "run", mpi_image]),
        env=env,
        cwd=os.path.join(WORK, "work"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r, sorted(ln for ln in r.stdout.splitlines() if ln.startswith("rank "))


def test_mpi_hello_under_srun_pmix(slurm, mpi_image):
    r, lines = srun_mpi(mpi_image, "-n", "2")
    node = lines[0].split(":")[0].split()[-1]  # srun -n 2: both ranks on one node
    assert [ln.split(":")[0] for ln in lines] == [f"rank 0 of 2 on {node}", f"rank 1 of 2 on {node}"]
    assert all(ln.endswith("sum of ranks 1") for ln in lines)
    assert "PMIX ERROR" not in r.stderr  # the PMIx server directory is bound in
    # Both ranks joined one container (automatic in Slurm steps): one user namespace, so
    # Open MPI's cross-memory attach works between them.
    assert "different user namespaces" not in r.stderr, r.stderr


def test_mpi_hello_across_two_nodes(slurm, mpi_image):
    """Open MPI in the image, one rank on each of two nodes: TCP between the nodes' network
    namespaces, PMIx from the host's Slurm."""
    r, lines = srun_mpi(mpi_image, "-N", "2", "-n", "2")
    heads = [ln.split(":")[0] for ln in lines]  # which two nodes: whichever Slurm chose
    assert [h.rsplit(" on ", 1)[0] for h in heads] == ["rank 0 of 2", "rank 1 of 2"], r.stdout
    nodes = {h.rsplit(" on ", 1)[1] for h in heads}
    assert len(nodes) == 2 and nodes <= {"node1", "node2", "node3"}, r.stdout
    assert all(ln.endswith("sum of ranks 1") for ln in lines), r.stdout
