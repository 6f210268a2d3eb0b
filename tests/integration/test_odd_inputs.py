"""Odd inputs end as one line with a documented exit code (never 255 or a hang), and the
command starts with the host's default signal dispositions."""

import json
import os
import pwd
import shutil
import signal
import struct
import subprocess

import pytest

from hpcrun_testlib import HPCRUN, WORK, as_user, hpcrun, user, user_env, user_processes, wait_gone, running

USAGE, IMAGE, BIND, RUNTIME = 2, 252, 253, 254
EVIL = "x\nroot2:x:0:0::/:/bin/sh"


def one_line(r, code, *words):
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def chown_tree(path, name):
    pw = pwd.getpwnam(name)
    subprocess.run(["chown", "-R", f"{pw.pw_uid}:{pw.pw_gid}", str(path)], check=True)


# 1. A FIFO or a device as the image: open() would block.


@pytest.mark.parametrize(
    "argv",
    [
        ("exec", "{fifo}", "true"),
        ("exec", "/dev/zero", "true"),
        ("exec", "/dev/tty", "true"),
        ("inspect", "{fifo}"),
        ("sif", "list", "{fifo}"),
        ("sif", "header", "/dev/zero"),
        ("run", "{link}"),
    ],
    ids=[
        "exec-fifo",
        "exec-dev-zero",
        "exec-dev-tty",
        "inspect-fifo",
        "sif-list-fifo",
        "sif-header-dev-zero",
        "run-link-to-fifo",
    ],
)
def test_fifo_or_device_as_image(utmp, argv):
    """Refused after a stat, never opened (a device's open may act), saying what it is."""
    fifo = utmp / "fifo"
    os.mkfifo(fifo)
    os.chmod(fifo, 0o666)
    os.symlink(fifo, utmp / "link")
    argv = [a.format(fifo=fifo, link=utmp / "link") for a in argv]
    path = argv[-2] if argv[0] == "exec" else argv[-1]
    kind = "a character device" if path.startswith("/dev/") else "a FIFO"
    one_line(hpcrun(*argv, timeout=20), IMAGE, f"{path} is {kind}")


# 2. Bind destinations the kernel cannot name.


@pytest.mark.parametrize(
    "dst",
    [
        "/" + "a" * 300,
        "/aaaaaaaa" * 600,
        # passes the plan's check, fails once /root is put in front
        "/" + "a" * 254 + ("/" + "a" * 254) * 15 + "/" + "b" * (4094 - 255 * 16),
    ],
    ids=["name-max", "path-max", "path-max-in-container"],
)
def test_bind_destination_too_long(images, dst):
    one_line(hpcrun("exec", "-B", f"/tmp:{dst}", images["sif"], "true"), BIND, "bind destination")


def test_home_destination_too_long(images):
    one_line(hpcrun("exec", "--home", "/tmp:/" + "h" * 300, images["sif"], "true"), BIND, "bind destination")


# 3. Huge metadata files: inspect reads at most 1 MiB of each.

MIB = 1 << 20
AS_LIMIT = 256 * MIB  # hpcrun inspect needs ~100 MB of address space; a 1 GiB read fails


def limited(*args):
    return subprocess.run(
        ["prlimit", f"--as={AS_LIMIT}", "--", *as_user([HPCRUN, *args])],
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def sparse(path, size):
    with open(path, "ab") as f:
        f.truncate(size)


def huge_sandbox(root, size):
    meta = root / ".singularity.d"
    (meta / "env").mkdir(parents=True)
    with open(meta / "runscript", "w") as f:
        f.write("#!/bin/sh\necho big\n")
    sparse(meta / "runscript", size)
    sparse(meta / "env" / "90-environment.sh", size)  # a file inspect shows, as Apptainer
    (meta / "labels.json").write_text('{"a": "b"}')
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)


def check_truncated(r, size):
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("#!/bin/sh\necho big\n")
    assert f"truncated: {size} bytes, inspect shows the first 1 MiB]" in r.stdout
    assert MIB < len(r.stdout) < 2 * MIB + 4096


def test_inspect_huge_metadata_in_a_sandbox(utmp):
    root = utmp / "sandbox"
    huge_sandbox(root, 9 << 30)
    check_truncated(limited("inspect", "-r", str(root)), 9 << 30)
    r = limited("inspect", "-e", str(root))
    assert r.returncode == 0 and "truncated: 9663676416 bytes" in r.stdout, r.stderr[-2000:]
    assert limited("inspect", str(root)).stdout == "a: b\n"


def test_inspect_huge_metadata_in_squashfs_and_sif(images, utmp):
    from hpcrun.images.sif import write_sif

    root = utmp / "sandbox"
    huge_sandbox(root, 1 << 30)  # mksquashfs reads the holes: 1 GiB keeps the test short
    sqfs, sif_path = utmp / "huge.sqfs", utmp / "huge.sif"
    subprocess.run(
        ["mksquashfs", str(root), str(sqfs), "-noappend", "-quiet", "-no-progress", "-all-root"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    write_sif(str(sif_path), str(sqfs))
    for path in (sqfs, sif_path):
        os.chmod(path, 0o644)
        check_truncated(limited("inspect", "-r", str(path)), 1 << 30)
        r = limited("inspect", "-e", str(path))
        assert r.returncode == 0 and "truncated: 1073741824 bytes" in r.stdout, r.stderr[-2000:]


def add_object(path, datatype, size, slot=1):
    """Add a used descriptor of `datatype` whose data is `size` bytes of holes at the end."""
    with open(path, "r+b") as f:
        head = f.read(128)
        doffset = struct.unpack_from("<q", head, 0x60)[0]
        end = os.fstat(f.fileno()).st_size
        f.seek(doffset + slot * 585)
        f.write(
            struct.pack(
                "<i?IIIqqqqqqq128s384s", datatype, True, slot + 1, 0xF0000000, 0, end, size, size, 0, 0, 0, 0, b"", b""
            )
        )
        f.truncate(end + size)


def test_inspect_huge_sif_objects(images, utmp):
    path = str(utmp / "deffile.sif")
    shutil.copy(images["sif"], path)
    add_object(path, 0x4001, 9 << 30)  # a definition file object of 9 GiB
    os.chmod(path, 0o644)
    r = limited("inspect", "-d", path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[hpcrun: SIF object 2 truncated: 9663676416 bytes, inspect shows the first 1 MiB]" in r.stdout
    assert MIB < len(r.stdout) < MIB + 4096
    path = str(utmp / "labels.sif")
    shutil.copy(images["sif"], path)
    add_object(path, 0x4003, 9 << 30)  # labels: useless cut short, refused
    os.chmod(path, 0o644)
    one_line(limited("inspect", path), IMAGE, "SIF object 2", "larger than 1 MiB")


def test_inspect_huge_labels_json(utmp):
    root = utmp / "sandbox"
    (root / ".singularity.d").mkdir(parents=True)
    sparse(root / ".singularity.d" / "labels.json", 9 << 30)
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    one_line(limited("inspect", str(root)), IMAGE, "labels.json", "larger than 1 MiB")


# 4. SIF times out of range.


def set_times(path, t):
    with open(path, "r+b") as f:
        f.seek(0x40)
        f.write(struct.pack("<qq", t, t))  # header ctime, mtime
        doffset = struct.unpack("<q", os.pread(f.fileno(), 8, 0x60))[0]
        f.seek(doffset + 41)
        f.write(struct.pack("<qq", -t, -t))  # the partition's descriptor ctime, mtime


@pytest.mark.parametrize(
    "t,when",  # as Go's time.Unix(t, 0).UTC() prints them (siftool)
    [
        (2**62, "146138514283-06-19 07:45:04 +0000 UTC"),
        (-(2**62), "-146138510344-07-14 16:14:56 +0000 UTC"),
        (2**63 - 1, "292277026596-12-04 15:30:07 +0000 UTC"),
    ],
)
def test_sif_times_out_of_range(images, utmp, t, when):
    path = str(utmp / "times.sif")
    shutil.copy(images["sif"], path)
    set_times(path, t)
    os.chmod(path, 0o644)
    r = hpcrun("sif", "header", path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert f"Created At:           {when}\n" in r.stdout
    r = hpcrun("sif", "header", "--json", path)
    assert r.returncode == 0 and json.loads(r.stdout)["Modified At"] == when
    for args in (("sif", "list", path), ("sif", "list", "--json", path), ("inspect", path)):
        r = hpcrun(*args)
        assert r.returncode == 0 and r.stderr == "", (args, r.stderr)
    r = hpcrun("exec", path, "echo", "ran")
    assert (r.returncode, r.stdout) == (0, "ran\n"), r.stderr


# 5. --writable on a sandbox that is not ours.


@pytest.mark.parametrize("owner", ["root", "second"])
@pytest.mark.parametrize("fakeroot", [False, True])
def test_writable_on_another_users_sandbox(images, utmp, owner, fakeroot):
    path = utmp / "theirs"
    shutil.copytree(images["sandbox"], path, symlinks=True)
    if owner == "second":
        chown_tree(path, user().pw_name + "2")
    os.chmod(path, 0o755)
    before = sorted(os.listdir(path))
    args = ["exec", "--writable"] + (["--fakeroot"] if fakeroot else []) + [str(path), "touch", "/x"]
    one_line(hpcrun(*args), USAGE, f"--writable: {path} is not writable by you")
    assert sorted(os.listdir(path)) == before
    chown_tree(path, user().pw_name)  # the same tree, ours: written in place
    r = hpcrun(*args)
    assert r.returncode == 0, r.stderr
    assert (path / "x").exists()


# 6. Names with newlines or ':' never add lines to /etc/passwd or /etc/group.


def image_lines(images, name):
    with open(os.path.join(images["sandbox"], "etc", name)) as f:
        return f.read().splitlines()


def test_home_with_newline_adds_no_passwd_line(images):
    r = hpcrun("exec", "--no-home", images["sif"], "cat", "/etc/passwd", env={"HOME": "/tmp\n" + EVIL[2:]})
    assert r.returncode == 0, r.stderr
    assert "root2" not in r.stdout
    assert r.stdout.splitlines() == image_lines(images, "passwd")  # the caller's line is dropped


def test_user_without_passwd_entry_and_evil_user(images):
    """$USER is only used when the uid has no passwd entry (sssd down): 54321 has none."""
    with pytest.raises(KeyError):
        pwd.getpwuid(54321)
    argv = [
        "setpriv",
        "--reuid=54321",
        "--regid=54321",
        "--clear-groups",
        "--inh-caps=-all",
        "--",
        HPCRUN,
        "exec",
        "--no-home",
        images["sif"],
        "sh",
        "-c",
        "cat /etc/passwd; echo ==; cat /etc/group",
    ]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/", "USER": EVIL, "LANG": "C.UTF-8"}
    r = subprocess.run(argv, env=env, capture_output=True, text=True, cwd="/", timeout=60)
    assert r.returncode == 0, r.stderr
    passwd, group = r.stdout.split("==\n")
    assert "root2" not in r.stdout
    assert passwd.splitlines() == image_lines(images, "passwd")
    assert group.splitlines() == image_lines(images, "group") + ["group54321:x:54321:"]


# 8. The command starts with default signal dispositions and an empty mask.


def defaults(ignore=()):
    """preexec_fn: start hpcrun as a login shell would, every signal default, empty mask,
    then ignore `ignore` (as nohup does SIGHUP)."""

    def reset():
        for s in range(1, signal.NSIG):
            if s not in (signal.SIGKILL, signal.SIGSTOP):
                try:
                    signal.signal(s, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass
        for s in ignore:
            signal.signal(s, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])

    return reset


def run_group(argv, timeout=30, **kw):
    """Run in a session of its own; on timeout kill the whole session and fail."""
    proc = subprocess.Popen(
        argv, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=user_env(), **kw
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{argv} did not end within {timeout} s")
    return proc.returncode, out, err


@pytest.mark.parametrize("extra", [[], ["--pid"], ["--sharens"]], ids=["plain", "pid", "sharens"])
def test_pipeline_ends_with_sigpipe(images, extra):
    cmd = (
        " ".join(as_user([HPCRUN, "exec", *extra, images["sif"]]))
        + " sh -c 'while :; do echo y; done' 2>/dev/null | head -1; echo status=${PIPESTATUS[0]}"
    )
    code, out, err = run_group(["bash", "-c", cmd], preexec_fn=defaults())
    assert (code, out) == (0, "y\nstatus=141\n"), err


def sig_lines(out):
    return {
        k: v.strip() for k, v in (ln.split(":", 1) for ln in out.splitlines() if ln.startswith(("SigIgn", "SigBlk")))
    }


@pytest.mark.parametrize("extra", [[], ["--pid"], ["--sharens"]], ids=["plain", "pid", "sharens"])
def test_command_starts_with_default_dispositions(images, extra):
    argv = as_user([HPCRUN, "exec", *extra, images["sif"], "cat", "/proc/self/status"])
    code, out, err = run_group(argv, preexec_fn=defaults())
    assert code == 0, err
    assert sig_lines(out) == {"SigIgn": "0" * 16, "SigBlk": "0" * 16}


def test_nohup_keeps_sighup_ignored(images):
    argv = as_user([HPCRUN, "exec", images["sif"], "cat", "/proc/self/status"])
    code, out, err = run_group(argv, preexec_fn=defaults(ignore=[signal.SIGHUP]))
    assert code == 0, err
    assert sig_lines(out) == {"SigIgn": f"{1 << (signal.SIGHUP - 1):016x}", "SigBlk": "0" * 16}


# 9. --unsquash: the tree and unsquashfs go with hpcrun, whatever ends it; a full disk says so.


@pytest.fixture(scope="module")
def big_image(images):
    """A squashfs of 300 MB of incompressible data, stored uncompressed: extracting it
    takes about a second, long enough to kill hpcrun in the middle."""
    top = os.path.join(WORK, "big")
    path = os.path.join(WORK, "big.sqfs")
    if not os.path.exists(path):
        os.makedirs(top, exist_ok=True)
        with open(os.path.join(top, "blob"), "wb") as f:
            for _ in range(300):
                f.write(os.urandom(MIB))
        subprocess.run(
            ["mksquashfs", top, path, "-noD", "-noappend", "-quiet", "-no-progress", "-all-root"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        shutil.rmtree(top)
        os.chmod(path, 0o644)
    return path


def unsquashfs_children(pid):
    found = []
    for p, comm in user_processes():
        if comm == "unsquashfs":
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(p)
    return found


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["KILL", "TERM", "INT"])
def test_signal_during_unsquash_leaves_nothing(big_image, bdir, sig):
    tmp = bdir / "tmp"
    tmp.mkdir()
    chown_tree(tmp, user().pw_name)
    try:
        proc = subprocess.Popen(
            as_user([HPCRUN, "exec", "--unsquash", big_image, "true"]),
            env=user_env({"TMPDIR": str(tmp)}),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=defaults(),
        )
        assert wait_gone(lambda: not unsquashfs_children(proc.pid), 20), "unsquashfs never started"
        extracting = unsquashfs_children(proc.pid)
        os.kill(proc.pid, sig)
        proc.communicate(timeout=30)
        assert proc.returncode == (130 if sig == signal.SIGINT else -sig), proc.returncode
        assert wait_gone(lambda: [p for p in extracting if running(p)], 10), "unsquashfs outlived hpcrun"
        assert wait_gone(lambda: os.listdir(tmp), 10), f"left in TMPDIR: {os.listdir(tmp)}"
    finally:
        subprocess.run(["rm", "-rf", str(tmp)])


@pytest.mark.skipif(os.getuid() != 0, reason="mounting a small tmpfs needs root")
def test_unsquash_into_a_full_tmpdir(images, bdir):
    tmp = bdir / "small"
    tmp.mkdir()
    pw = user()
    subprocess.run(
        [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            f"size=1m,uid={pw.pw_uid},gid={pw.pw_gid},mode=0700",
            "hpcrun-odd-small",
            str(tmp),
        ],
        check=True,
    )
    try:
        r = hpcrun("-q", "exec", "--unsquash", images["sif"], "true", env={"TMPDIR": str(tmp)})
        line = one_line(r, RUNTIME, f"disk full: no space left in {tmp} to extract {images['sif']}")
        assert "(needs ~" in line and "MiB)" in line and "corrupt" not in line
        assert os.listdir(tmp) == []
    finally:
        subprocess.run(["umount", str(tmp)], check=True)
