"""A build killed or interrupted half-way leaves nothing: no work directory next to OUT,
no OUT, no process (unpacking children and tools die with hpcrun); as root and as the user."""

import io
import os
import signal
import subprocess
import tarfile
import time

import pytest

from hpcrun_testlib import HPCRUN, WORK, spawn, wait_gone


def many_files_tar(path, n=40000):
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            ti = tarfile.TarInfo(f"d{i % 100}/f{i}")
            ti.size = 64
            tar.addfile(ti, io.BytesIO(b"x" * 64))
    os.chmod(path, 0o644)


def start(builder, *args):
    if builder == "user":
        return spawn("build", *args)
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/root", "LANG": "C.UTF-8"}
    return subprocess.Popen(
        [HPCRUN, "build", *args], env=env, cwd=WORK, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def work_dirs(d):
    return [n for n in os.listdir(d) if n.startswith(".hpcrun-build-")]


def unpacking(d):
    """True once the build's rootfs holds some of the tarball's directories."""
    for w in work_dirs(d):
        try:
            if len(os.listdir(os.path.join(d, w, "rootfs"))) > 5:
                return True
        except OSError:
            pass
    return False


@pytest.mark.parametrize("builder", ["root", "user"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_build_leaves_nothing(images, bdir, builder, sig):
    src = bdir / "many.tar"
    many_files_tar(src)
    out = bdir / "out.sif"
    p = start(builder, str(out), str(src))
    end = time.monotonic() + 60
    while not unpacking(bdir) and p.poll() is None and time.monotonic() < end:
        time.sleep(0.02)
    assert p.poll() is None, "the build ended before it could be interrupted: " + p.stderr.read()
    os.kill(p.pid, sig)
    _out, err = p.communicate(timeout=30)
    assert wait_gone(lambda: work_dirs(bdir), 10), f"left behind: {work_dirs(bdir)}"
    assert not out.exists()
    if sig == signal.SIGTERM:
        assert p.returncode == 128 + signal.SIGTERM, err
        assert err.strip().splitlines() == [f"hpcrun: error: build interrupted by signal {int(sig)}"], err
    assert wait_gone(lambda: mentioning(str(bdir)), 10), f"left running: {mentioning(str(bdir))}"


def mentioning(text):
    """Processes (of any user: root builds too) whose command line names text."""
    out = []
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and int(p) != os.getpid():
            out.append((int(p), cmd[:120]))
    return out
