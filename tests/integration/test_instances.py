"""Named instances: instance start|run|list|stop and exec instance://NAME. Real
namespaces and squashfuse, as the unprivileged test user."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from hpcrun_testlib import HPCRUN, WORK, as_user, hpcrun, user, user_env, user_processes, wait_gone


@pytest.fixture(scope="module")
def inst_image(images):
    """A squashfs whose startscript runs `sleep ARG` (and ignores SIGINT with ARG=trap)."""
    root = os.path.join(WORK, "instroot")
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(images["sandbox"], root, symlinks=True)
    path = os.path.join(root, ".singularity.d/startscript")
    with open(path, "w") as f:
        f.write(
            '#!/bin/sh\nif [ "$1" = trap ]; then trap "" INT; shift; fi\n'
            'echo "startscript:$*"; echo "to stderr" >&2\nexec sleep "${1:-1000}"\n'
        )
    os.chmod(path, 0o755)
    out = os.path.join(WORK, "instance.sqfs")
    subprocess.run(
        ["mksquashfs", root, out, "-noappend", "-quiet", "-all-root", "-no-progress"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    os.chmod(out, 0o644)
    return out


def live_processes():
    """The test user's processes but zombies (exited, waiting for the host's init to reap them)."""
    out = []
    for pid, comm in user_processes():
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append((pid, comm))
        except OSError:
            pass
    return out


def run_dir():
    return f"/tmp/hpcrun-{user().pw_uid}"


def state(name):
    with open(f"{run_dir()}/instance-{name}.json") as f:
        return json.load(f)


def one_line_error(r, code=2):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcrun: error: "), r.stderr
    return lines[0]


def start(image, name, *args, opts=()):
    r = hpcrun("instance", "start", *opts, image, name, *args)
    assert r.returncode == 0, r.stderr
    return r


def stop_all():
    hpcrun("instance", "stop", "--all", "-t", "1")


@pytest.fixture
def cleanup():
    yield
    stop_all()


def test_start_list_exec_sees_startscript_stop_leaves_nothing(inst_image, cleanup):
    start(inst_image, "web", "1234")
    listed = hpcrun("instance", "list")
    assert listed.returncode == 0, listed.stderr
    head, row = listed.stdout.splitlines()
    assert head.split() == ["INSTANCE", "NAME", "PID", "IP", "IMAGE"]
    name, pid, image = row.split()
    assert name == "web" and image == inst_image
    with open(f"/proc/{pid}/comm") as f:
        assert f.read().strip() == "hpcrun-init"
    # A joining task is in the instance's PID namespace: PID 1 is its init, the startscript runs.
    for _ in range(50):  # the startscript may not have reached its `exec sleep` yet
        ps = hpcrun("exec", "instance://web", "ps", "-o", "pid,args")
        assert ps.returncode == 0, ps.stderr
        if any(line.split()[1:] == ["sleep", "1234"] for line in ps.stdout.splitlines()[1:]):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the startscript's sleep never ran: {ps.stdout}")
    assert ps.stdout.splitlines()[1].split()[0] == "1"
    r = hpcrun("instance", "stop", "web")
    assert r.returncode == 0, r.stderr
    assert "stopping web instance of" in r.stderr
    # stop returns when nothing of it is left: no process, no FUSE mount, no socket or state
    assert live_processes() == []
    assert not os.path.exists(run_dir())
    assert hpcrun("instance", "list").stdout.splitlines() == ["INSTANCE NAME    PID    IP    IMAGE"]


def test_list_json_has_apptainers_shape(inst_image, cleanup):
    start(inst_image, "j1")
    r = hpcrun("instance", "list", "--json")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('{\n\t"instances": [')  # Go's encoder, indented with tabs
    data = json.loads(r.stdout)
    [entry] = data["instances"]
    assert set(entry) == {"instance", "pid", "img", "ip", "logErrPath", "logOutPath"}
    assert entry["instance"] == "j1" and entry["img"] == inst_image and isinstance(entry["pid"], int)
    assert entry["pid"] == state("j1")["pid"]


def test_startscript_output_goes_to_the_log_files_list_names(inst_image, cleanup):
    start(inst_image, "logs", "4321")
    [entry] = json.loads(hpcrun("instance", "list", "--json").stdout)["instances"]
    home = user().pw_dir
    assert entry["logOutPath"].startswith(home + "/") and entry["logOutPath"].endswith("/logs.out")
    assert wait_gone(lambda: "startscript:4321" not in open(entry["logOutPath"]).read(), 10)
    assert wait_gone(lambda: "to stderr" not in open(entry["logErrPath"]).read(), 10)
    lines = hpcrun("instance", "list", "--logs").stdout.splitlines()
    assert lines[1].split() == ["logs", str(entry["pid"]), entry["logErrPath"]]
    assert lines[2].split() == [entry["logOutPath"]]


def test_joining_task_has_its_own_env_and_the_instances_mounts_and_uid(inst_image, utmp, cleanup):
    (utmp / "data").write_text("bound\n")
    start(inst_image, "envi", opts=["--env", "WHO=instance", "-B", f"{utmp}:/mnt"])
    r = hpcrun(
        "exec",
        "--env",
        "WHO=joiner",
        "instance://envi",
        "sh",
        "-c",
        "echo $WHO; cat /mnt/data; id -u; tr '\\0' '\\n' < /proc/2/environ | grep ^WHO=",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["joiner", "bound", str(user().pw_uid), "WHO=instance"]
    r = hpcrun("exec", "instance://envi", "sh", "-c", "echo ${WHO-unset} $JOINER_MARK", env={"JOINER_MARK": "mine"})
    assert r.stdout.split() == ["unset", "mine"], r.stderr


def test_fakeroot_instance_joiners_are_root(inst_image, cleanup):
    start(inst_image, "fr", opts=["--fakeroot"])
    r = hpcrun("exec", "instance://fr", "id", "-u")
    assert (r.returncode, r.stdout.strip()) == (0, "0"), r.stderr


def test_exit_status_of_the_joining_command(inst_image, cleanup):
    start(inst_image, "st")
    r = hpcrun("exec", "instance://st", "sh", "-c", "exit 7")
    assert r.returncode == 7, r.stderr


def test_stop_all_stops_every_instance(inst_image):
    start(inst_image, "a1")
    start(inst_image, "a2")
    assert [ln.split()[0] for ln in hpcrun("instance", "list").stdout.splitlines()[1:]] == ["a1", "a2"]
    r = hpcrun("instance", "stop", "--all")
    assert r.returncode == 0, r.stderr
    assert live_processes() == []
    assert not os.path.exists(run_dir())


def test_stop_kills_what_ignores_the_signal_after_the_timeout(inst_image):
    start(inst_image, "stubborn", "trap", "1000")
    r = hpcrun("instance", "stop", "-t", "1", "stubborn")
    assert r.returncode == 0, r.stderr
    assert live_processes() == []


def test_stop_with_signal_name(inst_image):
    start(inst_image, "sig", "trap", "1000")  # ignores SIGINT, Apptainer's default; TERM ends it
    r = hpcrun("instance", "stop", "-s", "TERM", "-t", "60", "sig")
    assert r.returncode == 0, r.stderr
    assert live_processes() == []


def test_duplicate_name_is_one_line_and_the_first_stays(inst_image, cleanup):
    start(inst_image, "dup")
    first = state("dup")["pid"]
    line = one_line_error(hpcrun("instance", "start", inst_image, "dup"))
    assert "instance dup already exists" in line
    assert state("dup")["pid"] == first
    assert hpcrun("exec", "instance://dup", "true").returncode == 0


@pytest.mark.parametrize("name", ["a/b", "sp ace", "", "x" * 65, "a*b", "ü"])
def test_bad_names_are_one_line(inst_image, name):
    line = one_line_error(hpcrun("instance", "start", inst_image, name))
    assert "is not a valid instance name" in line
    assert not os.path.exists(run_dir())


def test_missing_instance_is_one_line(images):
    assert "no instance nope" in one_line_error(hpcrun("instance", "stop", "nope"))
    assert "no instance nope" in one_line_error(hpcrun("exec", "instance://nope", "true"))
    assert "no instance" in one_line_error(hpcrun("instance", "stop", "--all"))
    r = hpcrun("instance", "list")
    assert (r.returncode, r.stdout) == (0, "INSTANCE NAME    PID    IP    IMAGE\n")
    assert not os.path.exists(run_dir())


def test_missing_image_and_stats_are_one_line(images):
    one_line_error(hpcrun("instance", "start", os.path.join(WORK, "nope.sif"), "x"), 252)
    assert "cgroup" in one_line_error(hpcrun("instance", "stats", "x"))
    assert not os.path.exists(run_dir())


def test_instance_survives_the_starting_shell(inst_image, cleanup):
    # The shell's pipes close when it exits: the instance holds none of them.
    p = subprocess.Popen(
        as_user(["setsid", "sh", "-c", f'"{HPCRUN}" instance start "{inst_image}" bg; echo done']),
        env=user_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    out, err = p.communicate(timeout=60)
    assert (p.returncode, out) == (0, "done\n"), err
    r = hpcrun("exec", "instance://bg", "ps", "-o", "args")
    assert "sleep 1000" in r.stdout, r.stderr


def test_killed_keeper_is_cleaned_up_by_list(inst_image):
    start(inst_image, "dead")
    os.kill(state("dead")["keeper"], signal.SIGKILL)
    assert wait_gone(lambda: user_processes(), 10), user_processes()  # the instance goes with it
    r = hpcrun("instance", "list")
    assert r.stdout.splitlines()[1:] == [], r.stdout
    assert not os.path.exists(run_dir())


def test_instance_run_runs_the_runscript_and_stays(images, cleanup):
    start_run = hpcrun("instance", "run", images["sif"], "runner", "x")
    assert start_run.returncode == 0, start_run.stderr
    r = hpcrun("instance", "list", "runner")
    assert [ln.split()[0] for ln in r.stdout.splitlines()[1:]] == ["runner"]
    r = hpcrun("run", "instance://runner", "a", "b")
    assert r.stdout.strip() == "runscript:a b", r.stderr


def test_sandbox_instance_without_startscript_holds_the_container(images, cleanup):
    start(images["sandbox"], "sb")
    r = hpcrun("exec", "instance://sb", "sh", "-c", "echo $IMAGE_VAR; ps -o pid,args | wc -l")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "from_image"
    r = hpcrun("instance", "stop", "sb")
    assert r.returncode == 0, r.stderr
    assert live_processes() == []


def test_pid_file(inst_image, utmp, cleanup):
    d = utmp / "pids"
    d.mkdir()
    os.chown(d, user().pw_uid, user().pw_gid)
    start(inst_image, "pf", opts=["--pid-file", str(d / "pid")])
    assert int((d / "pid").read_text()) == state("pf")["pid"]


def test_spython_client_instance_start_list_stop(inst_image, utmp, cleanup):
    pytest.importorskip("spython")  # the acceptance test of issue 9; `pip install spython`
    bindir = utmp / "bin"
    bindir.mkdir()
    real = os.path.join(os.path.dirname(HPCRUN), "singularity")
    if os.path.exists(real):  # installed with hpcrun (issue 9's command-line part)
        os.symlink(real, bindir / "singularity")
    else:  # a stand-in until then: spython first runs `singularity --version`
        (bindir / "singularity").write_text(
            f'#!/bin/sh\n[ "$1" = --version ] && {{ echo "singularity version 3.11.0"; exit 0; }}\n'
            f'exec "{HPCRUN}" "$@"\n'
        )
        os.chmod(bindir / "singularity", 0o755)
    code = f"""
from spython.main import Client
inst = Client.instance({inst_image!r}, name="spy", quiet=True)
print("started", inst.name)
print("listed", [i.name for i in Client.instances(quiet=True)])
out = Client.execute(inst, ["echo", "inside"], quiet=True)
print("exec", out.strip() if isinstance(out, str) else out)
print("stop", inst.stop())
print("after", Client.instances(quiet=True))
"""
    python = os.path.join(os.path.dirname(HPCRUN), "python")
    r = subprocess.run(
        as_user([python, "-c", code]),
        env=user_env({"PATH": f"{bindir}:/usr/bin:/bin"}),
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:4] == ["started spy", "listed ['spy']", "exec inside", "stop 0"], (r.stdout, r.stderr)
    assert lines[4] == "after []", r.stdout
    assert live_processes() == []
