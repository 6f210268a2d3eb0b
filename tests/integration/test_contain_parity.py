"""--contain and friends as Apptainer does them (issue 10): the minimal /dev, --no-mount
with --contain, -W/--workdir and -S/--scratch on disk. Each test names the Apptainer e2e
case it ports (apptainer/apptainer e2e/...)."""

import os
import shutil
import subprocess

import pytest

from hpcrun_testlib import HPCRUN, WORK_USER, as_user, hpcrun, make_rootfs, user, user_env

# what Apptainer's addDevMount puts in a contained /dev without a terminal (and no --ipc)
MINIMAL_DEV = {"fd", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty", "urandom", "zero"}


def ok(r):
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r.stdout


def one_line(r, code, *words):
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def mounts_at(images, *opts, cwd=None):
    """The mount points the container has (from its /proc/self/mountinfo)."""
    out = ok(hpcrun("exec", *opts, images["sif"], "cat", "/proc/self/mountinfo", cwd=cwd))
    return {line.split()[4] for line in out.splitlines()}


def own_dir(path):
    """A directory of the test user's (a workdir must be the caller's own)."""
    os.makedirs(path)
    pw = user()
    os.chown(path, pw.pw_uid, pw.pw_gid)
    return path


# e2e/config/config.go MountDevMinimal (`mount dev = minimal`, which --contain implies):
# no host block devices; only the devices Apptainer's addDevMount binds, and they work.
@pytest.mark.parametrize("flag", ["--contain", "-c", "--containall"])
def test_contain_gives_the_minimal_dev(images, flag):
    mqueue = {"mqueue"} if flag == "--containall" else set()  # with its own IPC namespace
    assert set(ok(hpcrun("exec", flag, images["sif"], "ls", "-A", "/dev")).split()) == MINIMAL_DEV | mqueue
    script = (
        "echo gone > /dev/null && head -c 5 /dev/zero | wc -c && head -c 7 /dev/urandom | wc -c"
        " && head -c 3 /dev/random | wc -c && test -d /dev/fd/ && readlink /dev/stdout"
        " && touch /dev/shm/x && test -k /dev/shm && readlink /dev/ptmx"
    )
    assert ok(hpcrun("exec", flag, images["sif"], "sh", "-c", script)).split() == [
        "5",
        "7",
        "3",
        "/proc/self/fd/1",
        "pts/ptmx",
    ]


# e2e/config/config.go MountDevMinimal / MountDevYes: a host block device is there only
# without --contain.
def test_host_devices_only_without_contain(images):
    host_dev = next((d for d in ("loop0", "full", "kmsg") if os.path.exists("/dev/" + d)), None)
    if host_dev is None:
        pytest.skip("the host has none of /dev/loop0, /dev/full, /dev/kmsg")
    assert hpcrun("exec", images["sif"], "test", "-e", "/dev/" + host_dev).returncode == 0
    assert hpcrun("exec", "-c", images["sif"], "test", "-e", "/dev/" + host_dev).returncode == 1


# addDevMount: /dev/pts is a new devpts instance (newinstance,ptmxmode=0666): a pty opened
# in it is number 0 of that instance, not one of the host's.
def test_contain_devpts_is_a_new_instance(images):
    out = ok(hpcrun("exec", "-c", images["sif"], "sh", "-c", "exec 3<>/dev/ptmx; ls /dev/pts"))
    assert out.split() == ["0", "ptmx"]
    out = ok(hpcrun("exec", "-c", images["sif"], "grep", " /dev/pts ", "/proc/self/mountinfo"))
    assert len(out.splitlines()) == 1 and "ptmxmode=666" in out and "mode=620" in out, out


# e2e/actions/actions.go actionNoMount "devpts" (testContained) and e2e/config/config.go
# MountDevPtsNo: --no-mount devpts leaves it out of the minimal /dev.
def test_no_mount_devpts_with_contain(images):
    assert hpcrun("exec", "-c", "--no-mount", "devpts", images["sif"], "test", "-d", "/dev/pts").returncode == 1
    assert "/dev/pts" not in mounts_at(images, "-c", "--no-mount", "devpts")


# addDevMount: with --ipc (--containall) the contained /dev has its own /dev/mqueue.
def test_containall_has_mqueue(images):
    assert "/dev/mqueue" in mounts_at(images, "--containall")
    assert "/dev/mqueue" not in mounts_at(images, "-c")


# addDevMount: the caller's terminal is bound at /dev/console, /dev/tty works. A real
# terminal from the host's script(1) (the busybox image has no pty program of its own).
def test_contain_with_a_terminal(images):
    if shutil.which("script") is None:
        pytest.skip("no script(1) on the host to give the run a terminal")
    inner = f"{HPCRUN} exec -c {images['sif']} sh -c 'test /dev/console -ef /proc/self/fd/0 && echo to-tty > /dev/tty'"
    r = subprocess.run(
        as_user(["script", "-qec", inner, "/dev/null"]),
        env=user_env(),
        cwd=WORK_USER,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0 and "to-tty" in r.stdout, (r.returncode, r.stdout, r.stderr)


# A user bind of a host device under the minimal /dev gets its mount point there
# (actionBinds: Apptainer adds such a device to the contained /dev).
def test_contain_device_bind(images):
    out = ok(
        hpcrun("exec", "-c", "-B", "/dev/full", images["sif"], "sh", "-c", "ls -A /dev; head -c 2 /dev/full | wc -c")
    )
    assert set(out.split()) == MINIMAL_DEV | {"full", "2"}


# e2e/actions/actions.go actionNoMount "tmp" and "home" with testContained: --no-mount is
# honoured under --contain (no mount on /tmp, /var/tmp, home; the image's own stay).
def test_no_mount_tmp_with_contain(images):
    points = mounts_at(images, "-c", "--no-mount", "tmp")
    assert "/tmp" not in points and "/var/tmp" not in points
    assert {"/tmp", "/var/tmp"} <= mounts_at(images, "-c")


def test_no_mount_home_with_contain(images):
    home = user().pw_dir
    assert home not in mounts_at(images, "-c", "--no-mount", "home", cwd="/")
    assert home in mounts_at(images, "-c", cwd="/")


# e2e/actions/actions.go actionExecMultiProfile ContainOnly, WorkdirOnly,
# WorkdirContainTmp, WorkdirContainVarTmp, WorkdirContainHome.
def test_workdir_with_contain_holds_tmp_var_tmp_and_home(images, utmp):
    wd = own_dir(str(utmp / "wd"))
    for sub in ("tmp", "var_tmp", "home"):
        own_dir(os.path.join(wd, sub))
        with open(os.path.join(wd, sub, "marker"), "w"):
            pass
    img = images["sif"]
    assert hpcrun("exec", "--contain", img, "test", "-f", "/tmp/marker").returncode == 1
    assert hpcrun("exec", "--workdir", wd, img, "test", "-f", "/tmp/marker").returncode == 1
    ok(hpcrun("exec", "--workdir", wd, "--contain", img, "test", "-f", "/tmp/marker"))
    ok(hpcrun("exec", "--workdir", wd, "--contain", img, "test", "-f", "/var/tmp/marker"))
    ok(hpcrun("exec", "--workdir", wd, "--contain", img, "sh", "-c", "test -f $HOME/marker"))
    ok(hpcrun("exec", "--contain", img, "true", env={"APPTAINER_WORKDIR": wd}))


# WorkdirTmpBind/WorkdirVarTmpBind (actionBinds): what the command writes lands in
# DIR/tmp, DIR/var_tmp, DIR/home, made by hpcrun with Apptainer's modes; without -W it is
# in memory (a tmpfs), nothing on disk.
def test_workdir_dirs_are_made_and_written(images, utmp):
    wd = own_dir(str(utmp / "wd"))
    ok(
        hpcrun(
            "exec",
            "-c",
            "-W",
            wd,
            images["sif"],
            "sh",
            "-c",
            "echo a > /tmp/a && echo b > /var/tmp/b && echo c > $HOME/c",
        )
    )
    for sub, name, mode in (("tmp", "a", 0o1777), ("var_tmp", "b", 0o1777), ("home", "c", 0o700)):
        st = os.stat(os.path.join(wd, sub))
        assert st.st_uid == user().pw_uid and st.st_mode & 0o7777 == mode, (sub, oct(st.st_mode))
        with open(os.path.join(wd, sub, name)) as f:
            assert f.read() == name + "\n"
    out = ok(hpcrun("exec", "-c", images["sif"], "sh", "-c", "grep ' /tmp ' /proc/self/mounts"))
    assert out.split()[2] == "tmpfs"


# e2e/actions/actions.go relWorkdirScratch and ScratchWorkdirBind's layout: -S DIR lives
# in WORKDIR/scratch/DIR; a relative workdir is taken from the working directory.
def test_scratch_in_workdir(images, utmp):
    parent = own_dir(str(utmp / "p"))
    own_dir(os.path.join(parent, "mysubdir"))
    ok(
        hpcrun(
            "exec",
            "--contain",
            "--workdir",
            "./mysubdir",
            "--scratch",
            "/myscratch",
            images["sif"],
            "sh",
            "-c",
            "echo s > /myscratch/f",
            cwd=parent,
        )
    )
    with open(os.path.join(parent, "mysubdir", "scratch", "myscratch", "f")) as f:
        assert f.read() == "s\n"
    # without -W: in memory
    out = ok(hpcrun("exec", "-S", "/myscratch", images["sif"], "sh", "-c", "grep ' /myscratch ' /proc/self/mounts"))
    assert out.split()[2] == "tmpfs"


# The directories made in DIR are the caller's own and never followed through a link:
# a planted link or a directory of another user is refused with one line (253).
def test_workdir_refuses_links_and_foreign_dirs(images, utmp):
    img = images["sif"]
    target = own_dir(str(utmp / "elsewhere"))
    wd = own_dir(str(utmp / "wd"))
    os.symlink(target, os.path.join(wd, "tmp"))
    one_line(hpcrun("exec", "-c", "-W", wd, img, "true"), 253, "--workdir", "tmp", "symbolic link")
    assert os.listdir(target) == []  # nothing made through the link
    os.symlink(wd, str(utmp / "wdlink"))
    one_line(hpcrun("exec", "-c", "-W", str(utmp / "wdlink"), img, "true"), 253, "--workdir", "symbolic link")
    one_line(hpcrun("exec", "-c", "-W", str(utmp), img, "true"), 253, "--workdir", "not yours")  # root's
    wd2 = own_dir(str(utmp / "wd2"))
    os.mkdir(os.path.join(wd2, "tmp"))  # made by root inside the user's directory
    one_line(hpcrun("exec", "-c", "-W", wd2, img, "true"), 253, "--workdir", "not yours")
    wd3 = own_dir(str(utmp / "wd3"))
    with open(os.path.join(wd3, "var_tmp"), "w"):
        pass
    one_line(hpcrun("exec", "-c", "-W", wd3, img, "true"), 253, "--workdir", "not a directory")
    one_line(hpcrun("exec", "-c", "-W", str(utmp / "missing"), img, "true"), 253, "--workdir")


# A workdir named through a symlinked parent (/scratch -> /lustre/... on clusters) is
# fine: only the last component and what hpcrun makes in it must not be links.
def test_workdir_under_a_symlinked_parent(images, utmp):
    real = own_dir(str(utmp / "real"))
    os.symlink(real, str(utmp / "link"))
    wd = own_dir(os.path.join(real, "wd"))
    ok(hpcrun("exec", "-c", "-W", str(utmp / "link" / "wd"), images["sif"], "sh", "-c", "echo x > /tmp/x"))
    assert os.path.exists(os.path.join(wd, "tmp", "x"))


def squash(root, out, launch_line=False):
    """A squashfs of root at out; launch_line: as Singularity 2.x wrote its images."""
    sq = out + ".sqfs"
    subprocess.run(
        ["mksquashfs", root, sq, "-noappend", "-quiet", "-all-root", "-no-progress"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    if not launch_line:
        os.chmod(sq, 0o644)
        return sq
    with open(out, "wb") as f, open(sq, "rb") as s:
        f.write(b"#!/usr/bin/env run-singularity\n" + s.read())
    os.chmod(out, 0o644)
    return out


# Apptainer's legacy-environment test file (e2e/testdata/regressions/legacy-environment)
LEGACY_ENV = """if test -z "$APPTAINER_INIT"; then
    PATH="/canary/path:$PATH"
    PS1="$PS1"
    APPTAINER_INIT=1
    export PATH PS1 APPTAINER_INIT
fi
export OLD_VAR=from-environment
"""


# e2e/env/regressions.go issue5426: an image without /.singularity.d (Singularity < 2.3)
# has its /environment sourced, which can set PATH; with /.singularity.d/env it is not.
@pytest.mark.parametrize("launch_line", [False, True], ids=["squashfs", "singularity2-launch-line"])
def test_old_image_environment_is_sourced(images, utmp, launch_line):
    root = str(utmp / "old")
    make_rootfs(root, singularity=False)
    with open(os.path.join(root, "environment"), "w") as f:
        f.write(LEGACY_ENV)
    img = squash(root, str(utmp / "old.img"), launch_line)
    out = ok(hpcrun("exec", img, "/bin/sh", "-c", 'echo "$PATH"; echo "$OLD_VAR"')).splitlines()
    assert out[0].startswith("/canary/path:") and out[1] == "from-environment", out
    # --cleanenv does not stop it (it is the image's environment)
    assert ok(hpcrun("exec", "-e", img, "/bin/sh", "-c", 'echo "$OLD_VAR"')).strip() == "from-environment"

    # with /.singularity.d/env the file is not sourced (Apptainer's action script)
    root = str(utmp / "new")
    make_rootfs(root)
    with open(os.path.join(root, "environment"), "w") as f:
        f.write("export OLD_VAR=from-environment\n")
    img = squash(root, str(utmp / "new.img"), launch_line)
    out = ok(hpcrun("exec", img, "/bin/sh", "-c", 'echo "$IMAGE_VAR:${OLD_VAR-unset}"')).strip()
    assert out == "from_image:unset"
