"""Signals, SIGKILL of hpcrun, and nothing left behind."""

import os
import select
import signal
import time

import pytest

from hpcrun_testlib import hpcrun, spawn, user_processes, wait_gone

LOOP = 'trap "echo got-$SIG; exit 7" {sig}; echo ready; while :; do sleep 0.05; done'


def wait_ready(proc, timeout=20):
    end = time.monotonic() + timeout
    line = ""
    while time.monotonic() < end:
        r, _, _ = select.select([proc.stdout], [], [], 0.2)
        if r:
            line = proc.stdout.readline()
            if line.strip() == "ready":
                return
        if proc.poll() is not None:
            break
    raise AssertionError(f"container did not start: {line!r} {proc.stderr.read()}")


@pytest.mark.parametrize("sig", ["TERM", "INT", "HUP", "QUIT", "USR1", "USR2"])
@pytest.mark.parametrize("pidns", [False, True])
def test_signals_reach_the_command(images, sig, pidns):
    flags = ["--pid"] if pidns else []
    proc = spawn("exec", *flags, images["sif"], "sh", "-c", LOOP.format(sig=sig), env={"SIG": sig})
    wait_ready(proc)
    proc.send_signal(getattr(signal, "SIG" + sig))
    out, err = proc.communicate(timeout=20)
    assert out.strip() == f"got-{sig}", err
    assert proc.returncode == 7


def test_sigkill_of_hpcrun_takes_command_and_fuse_daemon(images):
    proc = spawn("exec", images["sif"], "sh", "-c", "sleep 300 & sleep 300 & echo ready; wait")
    try:
        wait_ready(proc)
        two = wait_gone(lambda: [c for _, c in user_processes()].count("sleep") != 2, 10)
        names = [c for _, c in user_processes()]
        assert two and "squashfuse_ll" in names, names
    finally:
        proc.kill()
        proc.wait()
    assert wait_gone(lambda: user_processes(), 10), user_processes()


@pytest.mark.parametrize("init", [[], ["--no-init"]], ids=["guardian", "command-is-pid-1"])
def test_sigkill_in_pid_namespace(images, init):
    proc = spawn("exec", "--pid", *init, images["sif"], "sh", "-c", "sleep 300 & echo ready; wait")
    wait_ready(proc)
    proc.kill()
    proc.wait()
    assert wait_gone(lambda: user_processes(), 10), user_processes()


def test_no_init_background_children_end_with_pid_1(images):
    r = hpcrun("exec", "--pid", "--no-init", images["sif"], "sh", "-c", "sleep 300 & echo $$")
    assert r.stdout.strip() == "1" and r.returncode == 0, r.stderr
    assert wait_gone(lambda: [c for _, c in user_processes() if c == "sleep"], 10)


def test_sigkill_during_unsquash_removes_sandbox(images):
    proc = spawn("exec", "--unsquash", images["sif"], "sh", "-c", "echo ready; sleep 300")
    wait_ready(proc)
    assert any(d.startswith("hpcrun-unsquash-") for d in os.listdir("/tmp"))
    proc.kill()
    proc.wait()
    assert wait_gone(lambda: [d for d in os.listdir("/tmp") if d.startswith("hpcrun-unsquash-")], 10)


def test_background_children_do_not_outlive_the_container(images):
    r = hpcrun("exec", images["sif"], "sh", "-c", "sleep 300 & echo started")
    assert r.stdout.strip() == "started" and r.returncode == 0
    assert not [c for _, c in user_processes() if c == "sleep"]
