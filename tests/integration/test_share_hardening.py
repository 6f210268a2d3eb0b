"""Shared containers against what other users create and against their own failures:
a squatted rendezvous, a task killed while its keeper starts, a FUSE daemon that dies.
Real namespaces and squashfuse, as the unprivileged test user."""

import os
import pwd
import signal
import textwrap
import time

import pytest

from hpcrun_testlib import USER, hpcrun, spawn, user, user_processes, wait_gone, running

NS = "echo $(readlink /proc/self/ns/user) $(readlink /proc/self/ns/mnt)"
STEP = {"SLURM_STEP_ID": "0", "SLURM_JOB_ID": "1"}  # a Slurm step: sharing is automatic
RUNTIME = 254


def tmp_dir():
    return f"/tmp/hpcrun-{user().pw_uid}"


def shm_dir():
    return f"/dev/shm/hpcrun-{user().pw_uid}"


def other():
    return pwd.getpwnam(USER + "2")  # tests/setup-host.sh makes it


def one_line(r, code, *words):
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def nothing_left(*squatted):
    """No process of the test user and none of its run directories (squats are not ours)."""
    assert wait_gone(lambda: user_processes(), 10), user_processes()
    for d in {tmp_dir(), shm_dir()} - set(squatted):
        assert wait_gone(lambda: os.path.lexists(d), 5), os.listdir(d)


def remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)
    elif os.path.lexists(path):
        os.unlink(path)


@pytest.fixture
def squat(images, utmp):
    """squat(path, form): root makes `path` in a hostile form; removed after the test."""
    made = []
    remove(shm_dir())

    def make(path, form):
        o, me = other(), user()
        if form == "foreign dir":
            os.mkdir(path, 0o700)
            os.chown(path, o.pw_uid, o.pw_gid)
        elif form == "foreign open dir":
            os.mkdir(path)
            os.chmod(path, 0o1777)
            os.chown(path, o.pw_uid, o.pw_gid)
        elif form == "ours, mode 0755":
            os.mkdir(path)
            os.chmod(path, 0o755)
            os.chown(path, me.pw_uid, me.pw_gid)
        elif form == "symlink to a private dir of ours":
            target = utmp / "target"
            target.mkdir(mode=0o700)
            os.chown(target, me.pw_uid, me.pw_gid)
            os.symlink(target, path)
            os.lchown(path, o.pw_uid, o.pw_gid)
        elif form == "file":
            with open(path, "w") as f:
                f.write("x")
            os.chown(path, o.pw_uid, o.pw_gid)
        elif form == "fifo":
            os.mkfifo(path, 0o666)
            os.chown(path, o.pw_uid, o.pw_gid)
        made.append((path, os.lstat(path)))

    yield make
    for path, st in made:  # untouched by us: still the squatter's, as it was
        now = os.lstat(path)
        assert (now.st_ino, now.st_uid, now.st_mode) == (st.st_ino, st.st_uid, st.st_mode), path
        remove(path)
    remove(shm_dir())


FORMS = ["foreign dir", "foreign open dir", "ours, mode 0755", "symlink to a private dir of ours", "file", "fifo"]


@pytest.mark.parametrize("form", FORMS)
def test_a_squatted_run_dir_does_not_fail_the_step(images, squat, form):
    squat(tmp_dir(), form)
    r = hpcrun("exec", images["sif"], "echo", "hello", env=STEP, timeout=30)
    one_line(r, 0, "hpcrun: note: ", tmp_dir(), shm_dir())
    assert r.stdout == "hello\n"
    nothing_left(tmp_dir())


def test_tasks_still_share_through_the_fallback(images, squat):
    squat(tmp_dir(), "foreign dir")
    procs = [spawn("exec", images["sif"], "sh", "-c", NS + "; sleep 1.5", env=STEP) for _ in range(2)]
    ids = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        ids.append(out)
    assert ids[0] == ids[1] and ids[0].startswith("user:["), ids
    nothing_left(tmp_dir())


def test_with_every_run_dir_squatted_tasks_run_privately(images, squat):
    squat(tmp_dir(), "foreign dir")
    squat(shm_dir(), "fifo")
    procs = [spawn("exec", images["sif"], "sh", "-c", NS + "; sleep 1", env=STEP) for _ in range(2)]
    ids = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "not sharing this container" in lines[0], err
        assert f"not yours (owner {other().pw_uid})" in lines[0], err
        ids.append(out)
    assert ids[0] != ids[1], ids  # two private containers
    nothing_left(tmp_dir(), shm_dir())


def test_quiet_silences_the_note(images, squat):
    squat(tmp_dir(), "foreign dir")
    r = hpcrun("-q", "exec", images["sif"], "true", env=STEP, timeout=30)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    nothing_left(tmp_dir())


# ---- failures of the keeper's own start and of its FUSE daemon ----


def config(utmp, script, name="squashfuse-wrapper"):
    """A config naming `script` as the FUSE daemon; returns the env that selects it."""
    wrapper = utmp / name
    wrapper.write_text(textwrap.dedent(script).lstrip())
    wrapper.chmod(0o755)
    conf = utmp / f"{name}.yaml"
    conf.write_text(f"share_idle_timeout: 1\nsquashfuse: [{wrapper}]\n")
    return {"HPCRUN_CONFIG": str(conf)}


def squashfuse_ll():
    return next(p for p in ("/usr/bin/squashfuse_ll", "/usr/local/bin/squashfuse_ll") if os.path.exists(p))


def kill_when_the_keeper_listens(p):
    def no_socket():
        try:
            return not any(n.endswith(".sock") for n in os.listdir(tmp_dir()))
        except OSError:
            return True

    assert wait_gone(no_socket, 20), user_processes()
    os.kill(p.pid, signal.SIGKILL)  # setpriv execs hpcrun: this is the task itself
    p.communicate(timeout=30)
    assert p.returncode == -signal.SIGKILL


def test_a_task_killed_while_its_keeper_starts_leaves_nothing(images, utmp):
    # The daemon takes a second to serve: the task dies while its keeper builds.
    env = config(
        utmp,
        f"""
        #!/bin/sh
        sleep 1
        exec {squashfuse_ll()} "$@"
    """,
    )
    p = spawn("exec", "--sharens", images["sif"], "sleep", "30", env=env)
    kill_when_the_keeper_listens(p)
    nothing_left()  # the keeper served nobody for share_idle_timeout, then left


def test_a_keeper_that_failed_after_its_task_died_removes_its_files(images, utmp):
    env = config(
        utmp,
        """
        #!/bin/sh
        sleep 1
        echo "squashfuse: cannot do it" >&2
        exit 1
    """,
    )
    p = spawn("exec", "--sharens", images["sif"], "sleep", "30", env=env)
    kill_when_the_keeper_listens(p)
    nothing_left()


def test_a_keeper_whose_squashfuse_died_is_replaced(images):
    a = spawn("exec", "--sharens", images["sif"], "sleep", "30")
    assert wait_gone(lambda: not [c for _, c in user_processes() if c == "hpcrun-keeper"], 20)
    fuse = [pid for pid, comm in user_processes() if comm.startswith("squashfuse")]
    assert len(fuse) == 1, user_processes()
    os.kill(fuse[0], signal.SIGKILL)
    assert wait_gone(lambda: running(fuse[0]), 10)
    for _ in range(2):  # the next tasks get a fresh, working container
        r = hpcrun("exec", "--sharens", images["sif"], "cat", "/.singularity.d/labels.json")
        assert r.returncode == 0, r.stderr
        assert "busybox-test" in r.stdout
    a.terminate()
    a.communicate(timeout=30)
    nothing_left()


def test_a_leaving_keeper_spares_its_successors_files(images):
    # The keeper is stopped while its squashfuse dies and a task connects: resumed, it
    # must answer that task 'dead', and once that task has started a new keeper it must
    # not remove the new keeper's socket or lock as it leaves.
    a = spawn("exec", "--sharens", images["sif"], "sleep", "30")
    assert wait_gone(lambda: not [c for _, c in user_processes() if c == "hpcrun-keeper"], 20)
    [keeper] = [pid for pid, comm in user_processes() if comm == "hpcrun-keeper"]
    [fuse] = [pid for pid, comm in user_processes() if comm.startswith("squashfuse")]
    os.kill(keeper, signal.SIGSTOP)
    try:
        os.kill(fuse, signal.SIGKILL)
        b = spawn("-v", "exec", "--sharens", images["sif"], "sh", "-c", "sleep 3; echo b")
        time.sleep(1)  # b connects and waits for its answer
    finally:
        os.kill(keeper, signal.SIGCONT)
    assert wait_gone(lambda: running(keeper), 10)  # the old keeper left...
    d = hpcrun("-v", "exec", "--sharens", images["sif"], "echo", "d")
    assert d.returncode == 0 and d.stdout == "d\n", d.stderr
    assert "joined shared container" in d.stderr, d.stderr  # ...sparing b's new keeper
    out, err = b.communicate(timeout=30)
    assert b.returncode == 0 and out == "b\n", err
    assert "started shared container" in err, err
    a.terminate()
    a.communicate(timeout=30)
    nothing_left()


@pytest.mark.parametrize("share", ["--no-sharens", "--sharens"])
def test_squashfuse_killed_while_mounting(images, utmp, share):
    env = config(
        utmp,
        """
        #!/bin/sh
        kill -9 $$
    """,
    )
    r = hpcrun("exec", share, images["sif"], "true", env=env)
    one_line(r, RUNTIME, "squashfuse was killed (signal 9) while mounting", images["sif"])
    nothing_left()


# A FUSE daemon that answers the mount's first directory listing and dies at the first
# lookup: the file system goes away while the container is being set up.
FAKE_DAEMON = """
    #!/usr/bin/python3 -SE
    import os, signal, struct, sys
    fd = int(sys.argv[-1].rsplit("/", 1)[1])
    HOW = "{how}"

    def reply(unique, error=0, payload=b""):
        os.write(fd, struct.pack("<IiQ", 16 + len(payload), error, unique) + payload)

    while True:
        req = os.read(fd, (1 << 20) + 4096)
        length, op, unique, node = struct.unpack_from("<IIQQ", req)
        if op == 26:     # INIT
            major, minor, readahead = struct.unpack_from("<III", req, 40)
            reply(unique, 0, struct.pack("<IIIIHHIIHHI28x", 7, 31, readahead, 0, 12, 9, 131072, 1, 32, 0, 0))
        elif op == 27:   # OPENDIR
            reply(unique, 0, struct.pack("<QII", 1, 0, 0))
        elif op in (28, 29):   # READDIR (nothing), RELEASEDIR
            reply(unique)
        elif op == 3:    # GETATTR
            attr = struct.pack("<QQQQQQIIIIIIIIII", 1, 0, 0, 0, 0, 0, 0, 0, 0, 0o40755, 2, 0, 0, 0, 4096, 0)
            reply(unique, 0, struct.pack("<QII", 0, 0, 0) + attr)
        elif op == 1:    # LOOKUP: the container is being set up; die now
            if HOW == "signal":
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(3)
        elif op not in (2, 36, 42):   # FORGET, INTERRUPT, BATCH_FORGET get no answer
            reply(unique, -38)        # ENOSYS
"""


@pytest.mark.parametrize("how", ["signal", "exit"])
@pytest.mark.parametrize("share", ["--no-sharens", "--sharens"])
def test_squashfuse_dying_while_the_container_is_set_up(images, utmp, share, how):
    env = config(utmp, FAKE_DAEMON.format(how=how), name="fake-squashfuse")
    r = hpcrun("exec", share, images["sif"], "true", env=env)
    one_line(r, RUNTIME, "squashfuse", images["sif"])
    assert ("killed (signal 9)" if how == "signal" else "exited (status 3)") in r.stderr
    nothing_left()
