"""hpcrun inside real Slurm jobs, submitted as the unprivileged test user."""

import os
import shutil
import subprocess
import time

from hpcrun_testlib import HPCRUN, WORK_USER, as_user, user, user_env, user_processes, wait_gone

BATCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "batch", "slurm")


def run(args, timeout=120, env=None):
    env = user_env({"PATH": f"{os.path.dirname(HPCRUN)}:/usr/local/bin:/usr/bin:/bin", **(env or {})})
    return subprocess.run(as_user(args), env=env, cwd=WORK_USER, capture_output=True, text=True, timeout=timeout)


def script(utmp, name):
    """Copy a batch/slurm script where the test user can read it."""
    dst = os.path.join(str(utmp), name)
    shutil.copy(os.path.join(BATCH, name), dst)
    os.chmod(dst, 0o755)
    os.chmod(utmp, 0o777)
    return dst


def test_srun_tasks_see_their_own_rank_variables(slurm, images):
    r = run(
        [
            "srun",
            "-n",
            "2",
            HPCRUN,
            "exec",
            images["sif"],
            "sh",
            "-c",
            "echo $SLURM_PROCID $SLURM_LOCALID $SLURM_NTASKS $SLURM_JOB_ID $(id -un) $(pwd)",
        ]
    )
    assert r.returncode == 0, r.stderr
    rows = sorted(line.split() for line in r.stdout.splitlines())
    assert [row[:3] for row in rows] == [["0", "0", "2"], ["1", "1", "2"]]
    assert rows[0][3] == rows[1][3] and rows[0][3].isdigit()
    assert all(row[4] == user().pw_name and row[5] == WORK_USER for row in rows)


def test_step_exit_status_is_the_commands(slurm, images):
    r = run(["srun", "-n", "1", HPCRUN, "exec", images["sif"], "sh", "-c", "exit 5"])
    assert r.returncode == 5


def test_sbatch_job_exit_status_and_output(slurm, images, utmp):
    job = script(utmp, "single.sbatch")
    out = os.path.join(str(utmp), "out-%j.txt")
    r = run(["sbatch", "--wait", "-o", out, job, images["sif"], "sh", "-c", "echo in-job $SLURM_JOB_ID; exit 3"])
    assert r.returncode == 3, r.stdout + r.stderr
    jobid = r.stdout.split()[-1]
    with open(out.replace("%j", jobid)) as f:
        assert f.read().split()[:2] == ["in-job", jobid]


def test_job_array_elements(slurm, images, utmp):
    job = script(utmp, "array.sbatch")
    out = os.path.join(str(utmp), "arr-%a.txt")
    r = run(
        [
            "sbatch",
            "--wait",
            "--array=0-2",
            "-o",
            out,
            job,
            images["sif"],
            "sh",
            "-c",
            "echo task=$SLURM_ARRAY_TASK_ID",
        ],
        timeout=180,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for i in range(3):
        with open(out.replace("%a", str(i))) as f:
            assert f.read().strip() == f"task={i}"


def test_scancel_leaves_nothing_behind(slurm, images, utmp):
    job = script(utmp, "single.sbatch")
    r = run(["sbatch", "-o", "/dev/null", job, images["sif"], "sh", "-c", "sleep 300 & sleep 300"])
    assert r.returncode == 0, r.stderr
    jobid = r.stdout.split()[-1]
    try:
        assert wait_gone(lambda: [c for _, c in user_processes()].count("sleep") < 2, 60), user_processes()
        assert "squashfuse_ll" in [c for _, c in user_processes()]
    finally:
        subprocess.run(["scancel", jobid], check=True)
    assert wait_gone(lambda: user_processes(), 30), user_processes()
    end = time.monotonic() + 30
    while (
        time.monotonic() < end
        and subprocess.run(["squeue", "-h", "-j", jobid], capture_output=True, text=True).stdout.strip()
    ):
        time.sleep(0.5)


def test_check_on_every_node_as_one_step(slurm, nodes):
    """hpcrun check as a job-wide preflight: one task per node, each reports its node."""
    r = run(["srun", "-N", str(len(nodes)), "--ntasks-per-node=1", HPCRUN, "check"])
    assert r.returncode == 0, r.stdout + r.stderr
    for node in nodes:
        assert f"{node}: ok   unprivileged user namespaces" in r.stdout, r.stdout


NS = "echo $(readlink /proc/self/ns/user) $(readlink /proc/self/ns/mnt)"
COUNT_FUSE = (
    'n=0; for d in /proc/[0-9]*; do [ "$(stat -c %u $d 2>/dev/null)" = $(id -u) ] && '
    "grep -q squashfuse $d/comm 2>/dev/null && n=$((n+1)); done; echo fuse=$n"
)


def test_step_tasks_share_one_container_automatically(slurm, images):
    r = run(["srun", "-O", "-n", "4", HPCRUN, "exec", images["sif"], "sh", "-c", NS + "; " + COUNT_FUSE + "; sleep 1"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 8
    assert len({ln for ln in lines if ln.startswith("user:")}) == 1, lines  # one user+mount namespace
    assert {ln for ln in lines if not ln.startswith("user:")} == {"fuse=1"}, lines  # one FUSE mount


def test_step_tasks_without_sharing(slurm, images):
    r = run(["srun", "-O", "-n", "4", HPCRUN, "exec", "--no-sharens", images["sif"], "sh", "-c", NS])
    assert r.returncode == 0, r.stderr
    assert len(set(r.stdout.splitlines())) == 4, r.stdout


def test_time_limit_leaves_nothing_behind(slurm, images, utmp):
    """A job killed at its time limit (Slurm's minimum: 1 minute) by SIGTERM, then SIGKILL
    after KillWait: no process, mount, keeper or run directory stays."""
    os.chmod(utmp, 0o777)
    out = os.path.join(str(utmp), "limit.txt")
    r = run(
        [
            "sbatch",
            "--wait",
            "-n",
            "2",
            "-t",
            "1",
            "-o",
            out,
            "--wrap",
            f"srun -n 2 {HPCRUN} exec {images['sif']} sh -c 'echo started; sleep 600'",
        ],
        timeout=240,
    )
    assert r.returncode != 0, r.stdout  # killed, not finished
    with open(out) as f:
        text = f.read()
    assert text.count("started") == 2 and "TIME LIMIT" in text, text
    assert wait_gone(lambda: user_processes(), 30), user_processes()
    assert not os.path.exists(f"/tmp/hpcrun-{user().pw_uid}")


def staged_job(utmp, image, sbatch_opts, stage_args, task):
    """An sbatch job that stages IMAGE with batch/slurm/stage-image.sh (STAGE_ARGS after the
    image), prints `staged=PATH`, then runs `srun hpcrun exec PATH sh -c TASK`.
    -> (the job's output, the staged paths it printed); the job must succeed."""
    stage = script(utmp, "stage-image.sh")
    out = os.path.join(str(utmp), "stage.txt")
    staging = " ".join([stage, image, *stage_args])
    wrap = f"IMG=$({staging}) || exit 9; echo staged=$IMG; srun {HPCRUN} exec $IMG sh -c '{task}'"
    r = run(["sbatch", "--wait", *sbatch_opts, "-o", out, "--wrap", wrap], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(out) as f:
        text = f.read()
    return text, [ln.split("=", 1)[1] for ln in text.splitlines() if ln.startswith("staged=")]


def test_stage_image_with_sbcast(slurm, images, utmp):
    """batch/slurm/stage-image.sh copies the image node-locally once per job; the ranks run
    the staged copy; the epilog removes it when the job ends."""
    text, staged = staged_job(utmp, images["sif"], ["-n", "2"], [], "echo rank=$SLURM_PROCID $HPCRUN_CONTAINER")
    assert staged and staged[0].startswith("/tmp/hpcrun-stage-") and staged[0].endswith("-busybox.sif"), text
    assert sorted(ln for ln in text.splitlines() if ln.startswith("rank=")) == [
        f"rank=0 {staged[0]}",
        f"rank=1 {staged[0]}",
    ], text
    assert wait_gone(lambda: os.path.exists(staged[0]), 30), "the epilog did not remove the staged image"


def test_pmix_steps_of_a_job_reuse_one_warm_container(slurm, proctrack, images, utmp):
    """Each --mpi=pmix step has its own PMIx directory; its parent is bound, so the second
    step joins the container the first left warm (and still sees its own directory).
    Under cgroup tracking the job keeper (SPANK `warm`) keeps it in the extern step."""
    os.chmod(utmp, 0o777)
    conf = os.path.join(str(utmp), "idle.yaml")
    with open(conf, "w") as f:
        f.write("share_idle_timeout: 5\n")
    out = os.path.join(str(utmp), "pmix.txt")
    step = (
        f"srun --mpi=pmix -n 1 {HPCRUN} -v exec {images['sif']} "
        "sh -c 'test -d $PMIX_SERVER_TMPDIR && echo sees=$PMIX_SERVER_TMPDIR'"
    )
    r = run(["sbatch", "--wait", "-o", out, "--wrap", f"{step} && {step}"], env={"HPCRUN_CONFIG": conf})
    assert r.returncode == 0, r.stdout + r.stderr
    with open(out) as f:
        text = f.read()
    seen = [ln.split("=", 1)[1] for ln in text.splitlines() if ln.startswith("sees=")]
    assert len(seen) == 2 and seen[0] != seen[1], text  # two steps, two PMIx directories
    said = [ln.split()[1:] for ln in text.splitlines() if "shared container" in ln]
    assert [w[0] for w in said] == ["started", "joined"] and said[0][-1] == said[1][-1], text
    assert said[0][-1].startswith("job-") == (proctrack == "cgroup"), text  # cgroup: the job keeper's


def test_concurrent_steps_of_a_job_never_break_each_other(slurm, images, utmp):
    """Under cgroup tracking every process of a step dies with it, its keeper and FUSE
    daemon included. Step B starts while step A runs, A ends first, and B still reads
    its image afterwards: B never depended on A's keeper."""
    os.chmod(utmp, 0o777)
    u, img, out = str(utmp), images["sif"], os.path.join(str(utmp), "steps.txt")
    step = f"srun -n 1 --exact {HPCRUN} -v exec {img} sh -c"
    job = (
        f"{step} 'touch {u}/a-up; while [ ! -e {u}/b-up ]; do sleep 0.1; done; echo A-done' & a=$!; "
        f"while [ ! -e {u}/a-up ]; do sleep 0.1; done; "
        f"{step} 'touch {u}/b-up; while [ ! -e {u}/a-gone ]; do sleep 0.1; done; sleep 1; "
        "cat /.singularity.d/labels.json >/dev/null && ls /bin/ >/dev/null && echo B-reads' & b=$!; "
        f"wait $a; echo A=$?; touch {u}/a-gone; wait $b; echo B=$?"
    )
    r = run(["sbatch", "--wait", "-N", "1", "-n", "2", "-o", out, "--wrap", job], timeout=120)
    with open(out) as f:
        text = f.read()
    assert r.returncode == 0, text
    lines = text.splitlines()
    assert {"A-done", "A=0", "B-reads", "B=0"} <= set(lines), text
    assert wait_gone(lambda: user_processes(), 30), user_processes()


def node_has(node, *paths):
    """Those of paths that exist on node (in its own mount namespace: its /dev/shm)."""
    pid = subprocess.run(["pgrep", "-f", f"slurmd -N {node}$"], capture_output=True, text=True).stdout.split()[0]
    found = subprocess.run(
        ["nsenter", "-t", pid, "-m", "sh", "-c", 'for p; do [ -e "$p" ] && echo "$p"; done; true', "sh", *paths],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return found.split()


def job_gone(jobid):
    out = subprocess.run(["squeue", "-h", "-j", jobid], capture_output=True, text=True).stdout.strip()
    return not out


def leftovers(node):
    """What a job with warm containers could leave: processes, the run directories."""
    uid = user().pw_uid
    return user_processes() + node_has(node, f"/dev/shm/hpcrun-{uid}", f"/tmp/hpcrun-{uid}")


WARM_STEP = (
    "srun -n 1 sh -c 't0=$(date +%s%N); {hpcrun} -v exec {img} readlink /proc/self/ns/mnt; "
    "echo ms=$(( ($(date +%s%N) - t0) / 1000000 ))'"
)


def test_second_step_of_a_job_joins_the_warm_container(slurm, proctrack, images, utmp):
    """Under cgroup tracking a step's keeper would die with the step; the job keeper (the
    SPANK plugin's `warm`, in the job's extern step) starts it instead, so the second step
    joins the container the first built (same mount namespace), and the job's end leaves
    no process, socket, lock or directory on the node."""
    os.chmod(utmp, 0o777)
    out = os.path.join(str(utmp), "warm.txt")
    step = WARM_STEP.format(hpcrun=HPCRUN, img=images["sif"])
    r = run(["sbatch", "--wait", "-N", "1", "-w", "node2", "-o", out, "--wrap", f"{step} && {step}"])
    with open(out) as f:
        text = f.read()
    assert r.returncode == 0, text + r.stderr
    said = [ln.split()[1:] for ln in text.splitlines() if "shared container" in ln]
    ns = [ln for ln in text.splitlines() if ln.startswith("mnt:")]
    ms = [int(ln[3:]) for ln in text.splitlines() if ln.startswith("ms=")]
    print(f"{proctrack}: first step's hpcrun {ms[0]} ms, second (warm) {ms[1]} ms")
    assert [w[0] for w in said] == ["started", "joined"] and said[0][-1] == said[1][-1], text
    assert len(ns) == 2 and ns[0] == ns[1], text  # one container: the same mount namespace
    if proctrack == "cgroup":
        assert said[0][-1].startswith("job-"), text  # kept by the job keeper, not a step
        assert wait_gone(lambda: leftovers("node2"), 30), leftovers("node2")


def test_fakeroot_with_a_subuid_range_runs_in_a_warm_job(slurm, proctrack, images, utmp):
    """--fakeroot with the user's subuid range maps it with the setuid newuidmap, which a
    keeper started by the job keeper (no_new_privs, inherited) could not use: such a plan
    shares within its step only. Both steps run as root inside, with the range mapped."""
    os.chmod(utmp, 0o777)
    out = os.path.join(str(utmp), "fakeroot.txt")
    step = f"srun -n 1 {HPCRUN} exec --fakeroot {images['sif']} sh -c 'id -u; wc -l < /proc/self/uid_map'"
    r = run(["sbatch", "--wait", "-N", "1", "-w", "node2", "-o", out, "--wrap", f"{step} && {step}"])
    with open(out) as f:
        text = f.read()
    assert r.returncode == 0, text + r.stderr
    assert text.split() == ["0", "2", "0", "2"], text  # root, and two lines: root and the range
    if proctrack == "cgroup":
        assert wait_gone(lambda: leftovers("node2"), 30), leftovers("node2")


def test_scancel_of_a_warm_job_leaves_nothing(slurm, proctrack, images, utmp):
    """scancel while the job keeper's keeper serves a running second step: every process
    goes with the job, the epilog removes the sockets and locks they leave."""
    os.chmod(utmp, 0o777)
    u, img = str(utmp), images["sif"]
    step = WARM_STEP.format(hpcrun=HPCRUN, img=img)
    job = f"{step}; srun -n 1 {HPCRUN} exec {img} sh -c 'touch {u}/second-up; sleep 300'"
    r = run(["sbatch", "-N", "1", "-w", "node3", "-o", "/dev/null", "--wrap", job])
    assert r.returncode == 0, r.stderr
    jobid = r.stdout.split()[-1]
    try:
        assert wait_gone(lambda: not os.path.exists(f"{u}/second-up"), 60)
        uid = user().pw_uid
        if proctrack == "cgroup":
            assert node_has("node3", f"/dev/shm/hpcrun-{uid}/job-{jobid}.sock")
    finally:
        subprocess.run(["scancel", jobid], check=True)
    assert wait_gone(lambda: not job_gone(jobid), 60)
    assert wait_gone(lambda: leftovers("node3"), 30), leftovers("node3")
