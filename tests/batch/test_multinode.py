"""hpcrun across the nodes of the test cluster (tests/slurm-up.sh: one slurmd per network,
UTS and mount namespace), as the unprivileged test user."""

import os
import subprocess

from test_slurm import run, staged_job

from hpcrun_testlib import HPCRUN, user, user_processes, wait_gone

RANK = "echo rank=$SLURM_PROCID node=$SLURM_NODEID host=$(hostname) ns=$(readlink /proc/self/ns/mnt)"


def test_ranks_on_three_nodes_see_their_node_and_rank(slurm, nodes, images):
    r = run(["srun", "-N", "3", "-n", "6", HPCRUN, "exec", images["sif"], "sh", "-c", RANK])
    assert r.returncode == 0, r.stderr
    rows = [dict(f.split("=", 1) for f in ln.split()) for ln in r.stdout.splitlines()]
    rows.sort(key=lambda d: int(d["rank"]))
    assert [d["rank"] for d in rows] == [str(i) for i in range(6)], r.stdout
    by_node = {}
    for d in rows:
        by_node.setdefault(d["host"], []).append(d)
    assert sorted(by_node) == nodes[:3], r.stdout
    for host, ds in by_node.items():
        assert len(ds) == 2 and {d["node"] for d in ds} == {str(nodes.index(host))}, r.stdout
        assert len({d["ns"] for d in ds}) == 1, r.stdout  # the node's tasks share one container
    assert len({ds[0]["ns"] for ds in by_node.values()}) == 3, r.stdout  # one per node


def test_stage_image_to_node_local_disk(slurm, images, utmp):
    """stage-image.sh sbcasts the image to each node's own /dev/shm (private to the node);
    every node's tasks run from there; the epilog removes it on every node."""
    text, staged = staged_job(
        utmp, images["sif"], ["-N", "3", "--ntasks-per-node=1"], ["/dev/shm"], "echo $(hostname) $HPCRUN_CONTAINER"
    )
    assert staged and staged[0].startswith("/dev/shm/hpcrun-stage-"), text
    assert sorted(ln for ln in text.splitlines() if ln.startswith("node")) == [
        f"node{k} {staged[0]}" for k in (1, 2, 3)
    ], text
    assert not os.path.exists(staged[0])  # node-local: not on the host's /dev/shm
    left = run(["srun", "-N", "3", "--ntasks-per-node=1", "sh", "-c", "ls /dev/shm | grep -c hpcrun-stage- || true"])
    assert left.stdout.split() == ["0", "0", "0"], left.stdout + left.stderr  # the epilog removed it everywhere


def _job_cgroups(uid):
    """The job cgroups of the user left on any node."""
    found = []
    for root, dirs, _ in os.walk("/sys/fs/cgroup/freezer"):
        found += [os.path.join(root, d) for d in dirs if d.startswith("job_") and root.endswith(f"uid_{uid}")]
    return found


def test_scancel_of_a_three_node_job_leaves_nothing_on_any_node(slurm, images, utmp):
    os.chmod(utmp, 0o777)
    r = run(
        [
            "sbatch",
            "-N",
            "3",
            "--ntasks-per-node=2",
            "-o",
            "/dev/null",
            "--wrap",
            f"srun {HPCRUN} exec {images['sif']} sh -c 'sleep 300'",
        ]
    )
    assert r.returncode == 0, r.stderr
    jobid = r.stdout.split()[-1]
    try:
        assert wait_gone(lambda: [c for _, c in user_processes()].count("sleep") < 6, 60), user_processes()
        assert [c for _, c in user_processes()].count("squashfuse_ll") == 3  # one container per node
    finally:
        subprocess.run(["scancel", jobid], check=True)
    assert wait_gone(lambda: user_processes(), 30), user_processes()
    assert wait_gone(lambda: _job_cgroups(user().pw_uid), 30), _job_cgroups(user().pw_uid)
    assert not os.path.exists(f"/tmp/hpcrun-{user().pw_uid}")
