"""The hpcrun SPANK plugin (batch/slurm/spank): srun/sbatch --hpcrun-image on the real
one-node Slurm, as the unprivileged test user. tests/slurm-up.sh builds the plugin and
registers it in plugstack.conf; HPCRUN_SPANK_BIN points it at the hpcrun under test
(plugstack.conf names the site default, /opt/hpcrun-venv/bin/hpcrun)."""

import os
import shutil
import subprocess

from hpcrun_testlib import HPCRUN, WORK_USER, as_user, user, user_env

BATCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "batch", "slurm")

# Only the image has this file: proves a task ran inside it, not on the host.
IN_IMAGE = "test -f /.singularity.d/labels.json && echo in-image || echo on-host"


def run(args, timeout=120, env=None):
    e = {"PATH": f"{os.path.dirname(HPCRUN)}:/usr/local/bin:/usr/bin:/bin", "HPCRUN_SPANK_BIN": HPCRUN}
    e.update(env or {})
    return subprocess.run(
        as_user(args), env=user_env(e), cwd=WORK_USER, capture_output=True, text=True, timeout=timeout
    )


def test_plugin_is_registered(slurm, images):
    r = run(["srun", "--help"])
    assert "--hpcrun-image=IMAGE" in r.stdout and "--hpcrun-run" in r.stdout, r.stdout + r.stderr


def test_every_task_runs_in_the_image_as_the_user(slurm, images):
    r = run(
        [
            "srun",
            "-n",
            "2",
            f"--hpcrun-image={images['sif']}",
            "sh",
            "-c",
            f"echo $SLURM_PROCID $SLURM_NTASKS $(id -u) $({IN_IMAGE}) $(cat /.singularity.d/labels.json)",
        ]
    )
    assert r.returncode == 0, r.stderr
    rows = sorted(line.split(None, 4) for line in r.stdout.splitlines())
    assert [row[:4] for row in rows] == [
        ["0", "2", str(user().pw_uid), "in-image"],
        ["1", "2", str(user().pw_uid), "in-image"],
    ], r.stdout
    assert all("busybox-test" in row[4] for row in rows)


def test_without_the_option_tasks_run_on_the_host(slurm, images):
    r = run(["srun", "-n", "1", "sh", "-c", f"{IN_IMAGE}; id -u"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["on-host", str(user().pw_uid)]


def test_step_exit_status_is_the_commands(slurm, images):
    r = run(["srun", "-n", "1", f"--hpcrun-image={images['sif']}", "sh", "-c", f"{IN_IMAGE}; exit 5"])
    assert r.returncode == 5, r.stdout + r.stderr
    assert r.stdout.strip() == "in-image"


def test_missing_image_is_one_clear_error(slurm, images):
    missing = os.path.join(WORK_USER, "no-such.sif")
    r = run(["srun", "-n", "1", f"--hpcrun-image={missing}", "true"])
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if not line.startswith("srun:")]
    assert len(ours) == 1 and "image not found" in ours[0] and missing in ours[0], r.stderr


def test_missing_hpcrun_is_one_clear_error(slurm, images):
    for path, msg in (
        ("/nonexistent/hpcrun", "cannot run /nonexistent/hpcrun"),
        ("hpcrun", "must be an absolute path"),
    ):
        r = run(["srun", "-n", "1", f"--hpcrun-image={images['sif']}", "true"], env={"HPCRUN_SPANK_BIN": path})
        assert r.returncode == 127, r.stderr
        ours = [line for line in r.stderr.splitlines() if not line.startswith("srun:")]
        assert len(ours) == 1 and msg in ours[0], r.stderr


def test_options_and_runscript(slurm, images):
    r = run(
        [
            "srun",
            "-n",
            "1",
            f"--hpcrun-image={images['sif']}",
            "--hpcrun-options=--env FOO=from-plugin -q",
            "sh",
            "-c",
            "echo $FOO",
        ]
    )
    assert (r.returncode, r.stdout.strip()) == (0, "from-plugin"), r.stderr
    r = run(["srun", "-n", "1", f"--hpcrun-image={images['sif']}", "--hpcrun-run", "a", "b"])
    assert (r.returncode, r.stdout.strip()) == (0, "runscript:a b"), r.stderr


def test_run_without_image_is_refused(slurm, images):
    r = run(["srun", "-n", "1", "--hpcrun-run", "true"])
    assert r.returncode == 2 and "need --hpcrun-image" in r.stderr, r.stderr


def test_sbatch_directive_puts_every_step_in_the_image(slurm, images, utmp):
    os.chmod(utmp, 0o777)
    job = os.path.join(str(utmp), "job.sh")
    with open(job, "w") as f:
        f.write(
            f"#!/bin/sh\n#SBATCH --hpcrun-image={images['sif']}\n#SBATCH -n 2\n"
            f"echo batch $({IN_IMAGE})\n"  # the script itself stays on the host (it calls srun)
            f"srun -n 2 sh -c 'echo step$SLURM_PROCID $({IN_IMAGE})'\n"
            "srun -n 1 sh -c 'exit 4'\n"
        )
    os.chmod(job, 0o755)
    out = os.path.join(str(utmp), "out.txt")
    r = run(["sbatch", "--wait", "-o", out, job], timeout=180)
    assert r.returncode == 4, r.stdout + r.stderr
    with open(out) as f:
        text = f.read()
    lines = [line for line in text.splitlines() if not line.startswith("srun:")]
    assert lines[0] == "batch on-host", text
    assert sorted(lines[1:]) == ["step0 in-image", "step1 in-image"], text


def test_image_sbatch_template_with_image_on_the_command_line(slurm, images, utmp):
    """batch/slurm/image.sbatch: sbatch's --hpcrun-image overrides the template's #SBATCH one."""
    os.chmod(utmp, 0o777)
    job = os.path.join(str(utmp), "image.sbatch")
    shutil.copy(os.path.join(BATCH, "image.sbatch"), job)
    os.chmod(job, 0o755)
    out = os.path.join(str(utmp), "out.txt")
    r = run(
        [
            "sbatch",
            "--wait",
            f"--hpcrun-image={images['sif']}",
            "-o",
            out,
            job,
            "sh",
            "-c",
            f"echo $SLURM_PROCID $({IN_IMAGE}); exit 3",
        ],
        timeout=180,
    )
    assert r.returncode == 3, r.stdout + r.stderr
    with open(out) as f:
        text = f.read()
    rows = sorted(line for line in text.splitlines() if not line.startswith("srun:"))
    assert rows == ["0 in-image", "1 in-image"], text
