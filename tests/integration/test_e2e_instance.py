"""Apptainer's instance tests, ported: e2e/instance/instance.go (apptainer/apptainer), user
profile. The image stands in for e2e/testdata/Apptainer: its %startscript is an echo
server on port $1 (busybox nc), its %runscript Apptainer's. Contain (-c -W DIR) is in
test_contain_parity.py; the SCIF app server in test_scif.py."""

import os
import signal
import socket
import time

import pytest
from hpcrun_testlib import build_def_image, hpcrun, user, user_processes, wait_gone

PORT = 11372  # instanceStartPort

E2E_DEF = """Bootstrap: localimage
From: base.sif

%startscript
    # Echo back strings sent on port $1
    exec nc -ll -p $1 -e /bin/cat  # busybox's nc: -ll, not -k

%runscript
    echo "Running command: $*"
    exec "$@"
"""


@pytest.fixture(scope="module")
def image(images):
    return build_def_image(images, "e2e-instance", E2E_DEF)


@pytest.fixture
def stop_all():
    yield
    hpcrun("instance", "stop", "--all", "-t", "1")
    assert wait_gone(lambda: user_processes(), 10), user_processes()


def ok(r):
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def echo(port):
    """instance.go echo(): a line sent to the server comes back."""
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"b\n")
                assert s.recv(16) == b"b\n"
                return
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def names():
    r = ok(hpcrun("instance", "list"))
    return sorted(line.split()[0] for line in r.stdout.splitlines()[1:])


def test_BasicEchoServer(image, stop_all):
    ok(hpcrun("instance", "start", image, "echo1", str(PORT)))
    echo(PORT)
    ok(hpcrun("instance", "stop", "echo1"))
    assert names() == []


@pytest.mark.parametrize("cmd", ["start", "run"])
def test_BasicOptions(image, bdir, stop_all, cmd):
    (bdir / "hello").write_text("world")
    args = ["-H", f"{bdir}:/home/temp", "--hostname", "echoserver99", "-e", image, "testbasic", str(PORT + 1)]
    ok(hpcrun("instance", cmd, *args))
    assert ok(hpcrun("exec", "instance://testbasic", "cat", "/home/temp/hello")).stdout == "world"
    assert ok(hpcrun("exec", "instance://testbasic", "hostname")).stdout == "echoserver99\n"
    r = ok(hpcrun("exec", "instance://testbasic", "sh", "-c", "echo $APPTAINER_INSTANCE"))
    assert r.stdout == "testbasic\n"
    ok(hpcrun("instance", "stop", "testbasic"))


def test_CreateManyInstances_StopAll(image, stop_all):
    for i in range(10):
        ok(hpcrun("instance", "start", image, f"echo{i + 1}", str(PORT + 10 + i)))
        echo(PORT + 10 + i)
    assert names() == sorted(f"echo{i + 1}" for i in range(10))
    ok(hpcrun("instance", "stop", "--all"))
    assert names() == []


def test_InstanceRun(image, stop_all):
    """instance run runs the runscript; its output is in the .out log Apptainer keeps."""
    ok(hpcrun("instance", "run", image, "testtrue", "true"))
    log = os.path.join(user().pw_dir, ".apptainer/instances/logs", socket.gethostname(), user().pw_name, "testtrue.out")
    deadline = time.monotonic() + 10
    while "Running command: true" not in (open(log).read() if os.path.exists(log) else ""):
        assert time.monotonic() < deadline, f"{log}: no runscript output"
        time.sleep(0.1)
    ok(hpcrun("instance", "stop", "testtrue"))


@pytest.mark.parametrize("cmd", ["start", "run"])
def test_GhostInstance(image, bdir, stop_all, cmd):
    """A second instance of one name is refused; once its keeper is SIGKILLed, the name
    is free again."""
    pidfile = bdir / "pid"
    ok(hpcrun("instance", cmd, "--pid-file", str(pidfile), image, "ghost"))
    r = hpcrun("instance", cmd, image, "ghost")
    assert r.returncode != 0 and "ghost" in r.stderr and "exists" in r.stderr, r.stderr
    pid = int(pidfile.read_text())
    with open(f"/proc/{pid}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the "master": our keeper
    os.kill(ppid, signal.SIGKILL)
    assert wait_gone(lambda: user_processes(), 10), user_processes()
    ok(hpcrun("instance", cmd, image, "ghost"))
    ok(hpcrun("instance", "stop", "ghost"))


def test_ShareNSMode(image, utmp):
    """Two --sharens runs at once, both write into one bound file."""
    (utmp / "file").touch()
    os.chmod(utmp / "file", 0o666)
    from hpcrun_testlib import spawn

    args = ["exec", "--bind", f"{utmp}/file:/canary/file", "--sharens", image, "sh", "-c"]
    procs = [spawn(*args, "echo 0 >> /canary/file; sleep 1") for _ in range(2)]
    for p in procs:
        p.communicate(timeout=60)
        assert p.returncode == 0
    assert (utmp / "file").read_text().splitlines() == ["0", "0"]


def test_InstanceWithConfigDir(image, bdir, stop_all):
    """APPTAINER_CONFIGDIR moves the instance's files: here its logs (the state itself
    lives in hpcrun's private run directory, not in the config directory)."""
    env = {"APPTAINER_CONFIGDIR": str(bdir)}
    ok(hpcrun("instance", "run", image, "movedConfig", "true", env=env))
    ok(hpcrun("exec", "instance://movedConfig", "id", env=env))
    ok(hpcrun("instance", "stop", "movedConfig", env=env))
    logs = bdir / "instances" / "logs" / socket.gethostname() / user().pw_name
    assert sorted(os.listdir(logs)) == ["movedConfig.err", "movedConfig.out"]
