"""Node-level sharing (--sharens): tasks join one container instead of each making one.
Real namespaces and squashfuse, as the unprivileged test user."""

import os
import signal
import time

from hpcrun_testlib import WORK, hpcrun, spawn, user, user_processes, wait_gone

NS = "echo $(readlink /proc/self/ns/user) $(readlink /proc/self/ns/mnt)"


def daemons():
    return [p for p, comm in user_processes() if comm.startswith("squashfuse")]


def run_dir():
    return f"/tmp/hpcrun-{user().pw_uid}"


def start_many(n, *args, cmd=NS + "; sleep 1.5", env=None):
    procs = [spawn(*args, "sh", "-c", cmd, env=env) for _ in range(n)]
    return procs


def finish(procs):
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 0, stderr
        out.append(stdout.strip())
    return out


def test_tasks_share_one_container_and_one_mount(images):
    procs = start_many(4, "exec", "--sharens", images["sif"])
    assert wait_gone(lambda: len(daemons()) == 0, 10)  # wait until something runs
    time.sleep(0.5)
    assert len(daemons()) == 1, user_processes()
    ids = finish(procs)
    assert len(set(ids)) == 1 and ids[0].startswith("user:["), ids
    # The host's namespaces are not what the tasks saw.
    assert ids[0] != f"{os.readlink('/proc/self/ns/user')} {os.readlink('/proc/self/ns/mnt')}"


def test_without_sharing_every_task_has_its_own(images):
    ids = finish(start_many(3, "exec", images["sif"], cmd=NS))
    assert len(set(ids)) == 3, ids


def test_slurm_steps_share_automatically_unless_told_not_to(images):
    env = {"SLURM_STEP_ID": "0", "SLURM_JOB_ID": "1"}  # what srun sets; tests/batch runs real steps
    ids = finish(start_many(3, "exec", images["sif"], env=env))
    assert len(set(ids)) == 1, ids
    ids = finish(start_many(3, "exec", "--no-sharens", images["sif"], env=env))
    assert len(set(ids)) == 3, ids


def test_different_options_mean_different_containers(images, utmp):
    a = spawn("exec", "--sharens", images["sif"], "sh", "-c", NS + "; sleep 1")
    b = spawn("exec", "--sharens", "--bind", f"{utmp}:/mnt", images["sif"], "sh", "-c", NS + "; sleep 1")
    ids = finish([a, b])
    assert ids[0] != ids[1]


def test_each_task_keeps_its_own_command_env_and_status(images):
    a = spawn("exec", "--sharens", "--env", "WHO=a", images["sif"], "sh", "-c", NS + "; sleep 1; echo $WHO; exit 3")
    b = spawn("exec", "--sharens", "--env", "WHO=b", images["sif"], "sh", "-c", NS + "; sleep 1; echo $WHO")
    out_a, _ = a.communicate(timeout=30)
    out_b, _ = b.communicate(timeout=30)
    assert a.returncode == 3 and out_a.split()[2:] == ["a"]
    assert b.returncode == 0 and out_b.split()[2:] == ["b"]
    assert out_a.split()[:2] == out_b.split()[:2]  # one container


def test_warm_container_is_reused_within_the_idle_timeout_then_goes(images, utmp):
    conf = utmp / "idle.yaml"
    conf.write_text("share_idle_timeout: 4\n")
    env = {"HPCRUN_CONFIG": str(conf)}
    first = hpcrun("-v", "exec", "--sharens", images["sif"], "sh", "-c", NS, env=env)
    second = hpcrun("-v", "exec", "--sharens", images["sif"], "sh", "-c", NS, env=env)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert "started shared container" in first.stderr
    assert "joined shared container" in second.stderr  # the mount stayed warm
    assert first.stdout == second.stdout
    assert len(daemons()) == 1
    assert wait_gone(lambda: user_processes(), 15), user_processes()
    assert wait_gone(lambda: os.path.exists(run_dir()), 5)
    third = hpcrun("-v", "exec", "--sharens", images["sif"], "true", env=env)
    assert "started shared container" in third.stderr  # a new one after the keeper left


def test_killing_the_keeper_does_not_break_running_tasks(images):
    p = spawn(
        "exec", "--sharens", images["sif"], "sh", "-c", "sleep 1.5; cat /.singularity.d/labels.json"
    )  # not read before: FUSE must serve it
    assert wait_gone(lambda: len(daemons()) == 0, 10)
    time.sleep(0.5)
    keepers = [pid for pid, comm in user_processes() if comm == "hpcrun-keeper"]
    assert len(keepers) == 1, user_processes()
    os.kill(keepers[0], signal.SIGKILL)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err  # the FUSE daemon serves until the mount is gone
    assert "busybox-test" in out
    # The next task finds the dead keeper's socket, starts a new one.
    r = hpcrun("exec", "--sharens", images["sif"], "true")
    assert r.returncode == 0, r.stderr


def test_fakeroot_tasks_share_the_subuid_mapping(images):
    procs = start_many(
        2,
        "exec",
        "--sharens",
        "--fakeroot",
        images["sif"],
        cmd="id -u; cat /proc/self/uid_map | tr -s ' ' | tr '\\n' ' '; sleep 1",
    )
    out = finish(procs)
    assert out[0] == out[1]
    assert out[0].startswith("0\n"), out
    start = [ln.split(":")[1] for ln in open("/etc/subuid") if ln.startswith(user().pw_name + ":")][0]
    assert out[0].split()[:6] == ["0", "0", str(user().pw_uid), "1", "1", start], out  # 0 -> you, 1.. -> subuids


def test_writable_tmpfs_is_one_layer_for_all_tasks(images):
    a = spawn(
        "exec", "--sharens", "--writable-tmpfs", images["sif"], "sh", "-c", "echo hello > /note; sleep 2"
    )  # / is the upper layer's, ours
    time.sleep(1)
    b = hpcrun("exec", "--sharens", "--writable-tmpfs", images["sif"], "cat", "/note")
    a.communicate(timeout=30)
    assert b.returncode == 0 and b.stdout == "hello\n", b.stderr


def test_keeper_errors_are_the_tasks_errors(images):
    with open(images["squashfs"], "rb") as f:
        data = bytearray(f.read())
    data[96 : len(data) - 4096] = b"\xa5" * (len(data) - 4096 - 96)  # a valid superblock, garbage after
    bad = os.path.join(WORK, "share-corrupt.sqfs")
    with open(bad, "wb") as f:
        f.write(data)
    os.chmod(bad, 0o644)
    r = hpcrun("exec", "--sharens", bad, "true")
    assert r.returncode == 252, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcrun: error: ") and bad in lines[0], r.stderr
    assert not daemons() and not os.path.exists(run_dir())  # the failed keeper left nothing


def test_pid_namespaces_stay_per_task_in_a_shared_container(images):
    cmd = NS + "; sleep 1; echo $$ $(ls -d /proc/[0-9]* | wc -l)"
    out = finish(start_many(2, "exec", "--sharens", "--pid", images["sif"], cmd=cmd))
    rows = [o.split() for o in out]
    assert rows[0][0] == rows[1][0]  # one user namespace (and one image mount)...
    assert rows[0][1] != rows[1][1]  # ...but each its own copy of the mounts, for
    assert all(int(r[3]) < 10 for r in rows), rows  # its own /proc of its own PID namespace


def test_a_killed_keepers_files_are_swept_by_the_next_keeper(images, utmp):
    a = spawn("exec", "--sharens", images["sif"], "sleep", "1")
    assert wait_gone(lambda: not [c for _, c in user_processes() if c == "hpcrun-keeper"], 10)
    for pid, comm in user_processes():
        if comm == "hpcrun-keeper":
            os.kill(pid, signal.SIGKILL)
    a.communicate(timeout=30)
    assert len(os.listdir(run_dir())) == 2  # its socket and lock stay behind
    # Another container (other options): its keeper removes them, then its own files.
    r = hpcrun("exec", "--sharens", "--bind", f"{utmp}:/mnt", images["sif"], "true")
    assert r.returncode == 0, r.stderr
    assert wait_gone(lambda: os.path.exists(run_dir()), 5), os.listdir(run_dir())
