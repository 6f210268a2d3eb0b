"""Integration fixtures: real images built from busybox-static, hpcrun run as the
unprivileged test user (tests/setup-host.sh creates it) through setpriv."""

import os
import pwd
import shutil
import subprocess
import time

import pytest

HPCRUN = os.environ.get("HPCRUN_BIN", "/opt/hpcrun-venv/bin/hpcrun")
USER = os.environ.get("HPCRUN_TEST_USER", "hpctest")
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared")
TESTDATA = os.path.normpath(os.environ.get("HPCRUN_TESTDATA", os.path.join(SHARED, "testdata", "sif")))


def user():
    if os.getuid() != 0:
        return pwd.getpwuid(os.getuid())
    return pwd.getpwnam(USER)


def user_env(extra=None):
    pw = user()
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": pw.pw_dir,
        "USER": pw.pw_name,
        "LOGNAME": pw.pw_name,
        "LANG": "C.UTF-8",
        "XDG_CACHE_HOME": os.path.join(WORK, "cache", pw.pw_name),
    }
    if os.path.exists(TEST_CONFIG):  # shared containers leave 1 s after their last task
        env["HPCRUN_CONFIG"] = TEST_CONFIG
    env.update(extra or {})
    return env


def as_user(argv, pw=None):
    """argv run as the test user (or as pw, another user: root only) through setpriv."""
    if pw is None and os.getuid() != 0:
        return list(argv)
    pw = pw or user()
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--inh-caps=-all", "--"] + list(
        argv
    )


def hpcrun(*args, env=None, input=None, cwd=None, timeout=60, text=True):
    """Run hpcrun as the test user; returns CompletedProcess."""
    return subprocess.run(
        as_user([HPCRUN, *args]),
        env=user_env(env),
        input=input,
        capture_output=True,
        cwd=cwd or WORK_USER,
        timeout=timeout,
        text=text,
    )


def spawn(*args, env=None, **kw):
    return subprocess.Popen(
        as_user([HPCRUN, *args]),
        env=user_env(env),
        cwd=WORK_USER,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def user_processes():
    """(pid, comm) of every process of the test user other than those of pytest."""
    uid = user().pw_uid
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{p}").st_uid == uid:
                with open(f"/proc/{p}/comm") as f:
                    out.append((int(p), f.read().strip()))
        except OSError:
            pass
    return out


def running(pid):
    """pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pred, timeout=10):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not pred():
            return True
        time.sleep(0.05)
    return False


WORK = os.environ.get("HPCRUN_TEST_WORK", "/tmp/hpcrun-it")  # separate runs may use their own
WORK_USER = os.path.join(WORK, "work")
TEST_CONFIG = os.path.join(WORK, "test-config.yaml")


def make_rootfs(root, singularity=True):
    os.makedirs(root)
    for d in ("bin", "sbin", "usr/bin", "etc", "dev", "proc", "sys", "tmp", "var/tmp", "home", "root", "opt"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    shutil.copy("/bin/busybox", os.path.join(root, "bin/busybox"))
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True).stdout.split()
    for a in applets:
        if a != "busybox":
            os.symlink("busybox", os.path.join(root, "bin", a))
    with open(os.path.join(root, "etc/passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    with open(os.path.join(root, "etc/group"), "w") as f:
        f.write("root:x:0:\nnogroup:x:65534:\n")
    # hostile symlinks: the runtime must resolve them inside the image
    os.symlink("/", os.path.join(root, "escape-abs"))
    os.symlink("../../../../../../tmp", os.path.join(root, "opt/escape-rel"))
    if singularity:
        os.makedirs(os.path.join(root, ".singularity.d/env"))
        with open(os.path.join(root, ".singularity.d/env/90-environment.sh"), "w") as f:
            f.write("export IMAGE_VAR=from_image\nexport OVERRIDDEN=image\n")
        with open(os.path.join(root, ".singularity.d/labels.json"), "w") as f:
            f.write('{"org.label-schema.name": "busybox-test", "maintainer": "hpcrun"}')
        with open(os.path.join(root, ".singularity.d/runscript"), "w") as f:
            f.write('#!/bin/sh\necho "runscript:$*"\n')
        os.chmod(os.path.join(root, ".singularity.d/runscript"), 0o755)


CHECKOUT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))


def check_not_stale():
    """The hpcrun the test user runs must be this checkout's code (an editable install),
    or a copy identical to it: a stale installed copy would test something else."""
    probe = "import hpcrun, os; print(os.path.dirname(os.path.realpath(hpcrun.__file__)))"
    python = os.path.join(os.path.dirname(HPCRUN), "python")
    r = subprocess.run(as_user([python, "-c", probe]), capture_output=True, text=True, cwd="/", env=user_env())
    installed = r.stdout.strip()
    mine = os.path.join(CHECKOUT, "hpcrun")
    if r.returncode != 0:
        pytest.exit(f"{HPCRUN}: cannot import hpcrun as {USER}: {r.stderr.strip()}", returncode=3)
    if os.path.realpath(installed) == os.path.realpath(mine):
        return
    import filecmp

    for dirpath, dirnames, filenames in os.walk(mine):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), mine)
                other = os.path.join(installed, rel)
                if not os.path.exists(other) or not filecmp.cmp(os.path.join(mine, rel), other, shallow=False):
                    pytest.exit(
                        f"the hpcrun installed in {HPCRUN} is not this checkout's ({rel} differs): "
                        "run `bash tests/setup-host.sh`",
                        returncode=3,
                    )


@pytest.fixture(scope="session")
def images():
    """{'squashfs': path, 'sif': path, 'sandbox': path, 'plain': path (no .singularity.d)}"""
    from hpcrun.images.sif import write_sif

    check_not_stale()
    if os.path.exists(WORK):
        subprocess.run(["rm", "-rf", WORK], check=True)
    # what an earlier, interrupted session's killed keepers left
    subprocess.run(["rm", "-rf", f"/tmp/hpcrun-{user().pw_uid}"], check=True)
    os.makedirs(WORK_USER)
    os.chmod(WORK, 0o755)
    pw = user()
    os.chown(WORK_USER, pw.pw_uid, pw.pw_gid)
    with open(TEST_CONFIG, "w") as f:
        f.write("share_idle_timeout: 1\n")
    os.makedirs(os.path.join(WORK, "cache"), mode=0o777)
    os.chmod(os.path.join(WORK, "cache"), 0o777)
    root = os.path.join(WORK, "rootfs")
    plain = os.path.join(WORK, "plainfs")
    make_rootfs(root)
    make_rootfs(plain, singularity=False)
    out = {"sandbox": root}
    for name, src in (("squashfs", root), ("plain", plain)):
        path = os.path.join(WORK, f"{name}.sqfs")
        subprocess.run(
            ["mksquashfs", src, path, "-noappend", "-quiet", "-all-root", "-no-progress"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        out[name] = path
    out["sif"] = os.path.join(WORK, "busybox.sif")
    write_sif(out["sif"], out["squashfs"])
    subprocess.run(["chmod", "-R", "a+rX", WORK], check=True)
    return out


def _owner(path):
    try:
        return os.lstat(path).st_uid
    except FileNotFoundError:
        return None


def build_def_image(images, name, definition):
    """Build WORK/NAME/NAME.sif as the test user from a definition file whose
    `From: base.sif` is the busybox SIF: the stand-in for an image of Apptainer's e2e
    test data. -> its path."""
    d = os.path.join(WORK, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    shutil.copy(images["sif"], os.path.join(d, "base.sif"))
    with open(os.path.join(d, name + ".def"), "w") as f:
        f.write(definition)
    os.chown(d, user().pw_uid, user().pw_gid)
    subprocess.run(["chmod", "-R", "a+rX", d], check=True)
    out = os.path.join(d, name + ".sif")
    r = hpcrun("build", "-F", out, os.path.join(d, name + ".def"), cwd=d, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.fixture(autouse=True)
def no_leaks():
    """Every integration test must leave no process of the test user and no temp tree."""
    yield
    assert wait_gone(lambda: user_processes(), 10), f"left behind: {user_processes()}"
    left = [d for d in os.listdir("/tmp") if d.startswith("hpcrun-unsquash-") and _owner("/tmp/" + d) == user().pw_uid]
    assert not left, f"temporary sandboxes left behind: {left}"
    run_dir = f"/tmp/hpcrun-{user().pw_uid}"  # shared containers' sockets and locks
    assert wait_gone(lambda: os.path.exists(run_dir), 5), f"left behind: {os.listdir(run_dir)}"


@pytest.fixture
def utmp(images, request):
    """A fresh directory the test user can read (pytest's tmp_path is private to root)."""
    import pathlib
    import re

    path = pathlib.Path(WORK) / "t" / re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.chmod(path.parent, 0o755)
    os.chmod(path, 0o755)
    return path


@pytest.fixture
def bdir(utmp):
    """A per-test directory the test user can write (builds put OUT there)."""
    os.chmod(utmp, 0o777)
    return utmp
