"""Bind semantics held against Apptainer's (e2e/actions/actions.go: actionBinds and
friends; internal/pkg/runtime/engine/apptainer/container_linux.go), run for real as the
unprivileged test user."""

import os

from hpcrun_testlib import hpcrun, user

BIND_ERROR = 253


def _own(*paths):
    pw = user()
    for p in paths:
        os.chown(p, pw.pw_uid, pw.pw_gid)


# 1. Bind sources are resolved on the host before anything moves.


def test_bind_source_that_is_an_absolute_symlink(images, utmp):
    """-B LINK:/mnt where LINK -> an absolute directory path (bubblewrap's
    resolve_symlinks_in_ops; Apptainer binds what the host path names)."""
    real = utmp / "real"
    real.mkdir()
    (real / "f").write_text("through the link")
    link = utmp / "link"
    link.symlink_to(str(real))  # absolute target
    r = hpcrun("exec", "-B", f"{link}:/mnt", images["sif"], "cat", "/mnt/f")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "through the link"


def test_bind_source_file_symlink_same_path(images, utmp):
    """-B LINK (no destination): bound at LINK's own path, with the target's content."""
    (utmp / "target").write_text("file content")
    link = utmp / "flink"
    link.symlink_to(str(utmp / "target"))
    r = hpcrun("exec", "-B", str(link), images["sif"], "cat", str(link))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "file content"


def test_localtime_symlink_is_bound(images):
    """Apptainer binds the host's /etc/localtime (addBindsMount); on Debian it is a
    symlink into /usr/share/zoneinfo, which was silently skipped."""
    assert os.path.islink("/etc/localtime"), "the host's /etc/localtime is expected to be a symlink here"
    with open("/etc/localtime", "rb") as f:
        host = f.read()
    r = hpcrun("exec", images["sif"], "cat", "/etc/localtime", text=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout == host


def test_home_under_a_symlinked_directory(images, utmp):
    """$HOME=/.../symhome/USER where symhome is a symlink (homes on GPFS/Lustre behind
    a /home link): the home is bound at $HOME, with the real directory's content."""
    real = utmp / "realhomes"
    (real / "u").mkdir(parents=True)
    (real / "u" / "f").write_text("home file\n")
    _own(real / "u")
    (utmp / "symhome").symlink_to(str(real))
    home = f"{utmp}/symhome/u"
    r = hpcrun("exec", images["sif"], "sh", "-c", "cat ~/f; echo written > ~/g; echo $HOME", env={"HOME": home})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["home", "file", home]
    assert (real / "u" / "g").read_text() == "written\n"


# 2. --writable on a sandbox never changes the sandbox's tree.


def _listing(top):
    """Every entry under top with what a change would touch (not atime)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        for name in sorted(dirnames + filenames):
            st = os.lstat(os.path.join(dirpath, name))
            out.append(
                (os.path.relpath(os.path.join(dirpath, name), top), st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns)
            )
    st = os.lstat(top)
    return sorted(out) + [(".", st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns)]


def _own_sandbox(images, utmp, whole=True):
    """A copy of the test sandbox for the test user: all of it, or (whole=False) only the
    top directory, its inner directories left to root (a sandbox built by root, chowned)."""
    import subprocess

    sb = utmp / "sb"
    subprocess.run(["cp", "-a", images["sandbox"], str(sb)], check=True)
    pw = user()
    if whole:
        subprocess.run(["chown", "-R", f"{pw.pw_uid}:{pw.pw_gid}", str(sb)], check=True)
    else:
        os.chown(sb, pw.pw_uid, pw.pw_gid)
    return sb


def test_writable_sandbox_not_modified_by_default_mounts(images, utmp):
    """actionBinds runs --writable on the user's sandbox: the home (/home/USER, missing in
    the image) is shown on a staged tmpfs base, as Apptainer without overlay does, and
    nothing is created in the sandbox."""
    sb = _own_sandbox(images, utmp)
    before = _listing(sb)
    r = hpcrun("exec", "--writable", str(sb), "sh", "-c", "echo ~; test -d ~ && echo home-ok")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [user().pw_dir, "home-ok"]
    assert _listing(sb) == before


def test_writable_sandbox_bind_to_missing_destination_refused(images, utmp):
    """actionBinds SimpleDirWritableKO / SimpleFileWritableKO / CustomHomeBindWritableKO:
    a bind whose destination is missing in a --writable sandbox is refused (Apptainer:
    "destination ... doesn't exist in container"); the sandbox is left as it was."""
    sb = _own_sandbox(images, utmp)
    canary = utmp / "canary"
    canary.mkdir()
    (canary / "file").write_text("c")
    before = _listing(sb)
    for args in (
        ["-B", f"{canary}:/canary"],
        ["-B", f"{canary / 'file'}:/canary/file"],
        ["--home", f"{canary}:/canary"],
    ):
        r = hpcrun("exec", "--writable", *args, str(sb), "true")
        assert r.returncode == BIND_ERROR, r.stderr
        assert len(r.stderr.splitlines()) == 1 and "/canary" in r.stderr and "does not exist" in r.stderr, r.stderr
        assert _listing(sb) == before


def test_writable_sandbox_bind_to_existing_destination(images, utmp):
    """actionBinds SimpleDirWritableOK / SimpleFileWritableOK: a destination that exists
    (here through the host's /tmp, bound by default) is bound as usual."""
    sb = _own_sandbox(images, utmp)
    canary = utmp / "canary"
    canary.mkdir()
    (canary / "file").write_text("c")
    before = _listing(sb)
    for spec, path in (
        (str(canary), f"{canary}/file"),
        (str(canary / "file"), f"{canary}/file"),
        (f"{canary}:/opt", "/opt/file"),
    ):
        r = hpcrun("exec", "--writable", "-B", spec, str(sb), "cat", path)
        assert r.returncode == 0, (spec, r.stderr)
        assert r.stdout == "c"
    assert _listing(sb) == before


def test_writable_sandbox_with_root_owned_inner_directories(images, utmp):
    """A sandbox built by root and chowned at its top only: --writable still runs (the
    home is staged, /etc/passwd bound from memory), and changes nothing in it."""
    sb = _own_sandbox(images, utmp, whole=False)
    before = _listing(sb)
    r = hpcrun("exec", "--writable", str(sb), "sh", "-c", "id -un; test -d ~ && echo home-ok")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [user().pw_name, "home-ok"]
    assert _listing(sb) == before
    r = hpcrun("exec", "--writable", "-B", f"{utmp}:/new/dir", str(sb), "true")
    assert r.returncode == BIND_ERROR and len(r.stderr.splitlines()) == 1, r.stderr
    assert _listing(sb) == before


# 3. Escaped commas and colons in bind specs.


def test_bind_file_with_comma_and_colon(images, utmp):
    """actionBinds BindFileWithCommaOK / BindFileWithColonOK, by -B and by APPTAINER_BIND."""
    (utmp / "file,comma").write_text("comma")
    (utmp / "file:colon").write_text("colon")
    comma = str(utmp / "file,comma").replace(",", "\\,")
    colon = str(utmp / "file:colon").replace(":", "\\:")
    r = hpcrun("exec", "-B", f"{comma}:/c1,{colon}:/c2", images["sif"], "cat", "/c1", "/c2")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "commacolon"
    r = hpcrun("exec", images["sif"], "cat", "/c1", "/c2", env={"APPTAINER_BIND": f"{comma}:/c1,{colon}:/c2"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == "commacolon"


# 4. Destinations inside other mounts.


def _canary(utmp):
    canary = utmp / "canary"
    canary.mkdir()
    (canary / "file").write_text("canary")
    return canary


def test_bind_inside_scratch_directory(images, utmp):
    """actionBinds ScratchTmpfsBind: `--scratch /scratch --bind DIR:/scratch/dir`; the
    mount point is made in the scratch tmpfs (ours), mounted before the user's binds."""
    canary = _canary(utmp)
    r = hpcrun(
        "exec", "--scratch", "/scratch", "-B", f"{canary}:/scratch/dir", images["sif"], "cat", "/scratch/dir/file"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "canary"


def test_bind_inside_contained_home(images, utmp):
    """--contain gives a home in memory: a bind inside it gets its mount point there."""
    canary = _canary(utmp)
    home = user().pw_dir
    r = hpcrun("exec", "--contain", "-B", f"{canary}:{home}/canary", images["sif"], "cat", f"{home}/canary/file")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "canary"


def test_nested_binds_shallowest_first_and_never_written_on_host(images, utmp):
    """Apptainer mounts user binds shallowest destination first: -B A:/mnt/sub -B B:/mnt
    shows A at /mnt/sub even when given in that order. A destination missing inside a
    host bind (actionBinds NestedBindDir, CustomHomeBind) is where hpcrun differs:
    Apptainer creates it in the bind's source on the host, hpcrun refuses in one line
    and never writes there."""
    canary = _canary(utmp)
    outer = utmp / "outer"
    (outer / "sub").mkdir(parents=True)
    (outer / "sub" / "file").write_text("outer")
    r = hpcrun("exec", "-B", f"{canary}:/mnt/sub", "-B", f"{outer}:/mnt", images["sif"], "cat", "/mnt/sub/file")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "canary"
    home = utmp / "home"
    home.mkdir()
    for args in (
        ["-B", f"{canary}:/canary", "-B", f"{canary}:/canary/dir2"],
        ["--home", f"{home}:/home/e2e", "-B", f"{canary}:/home/e2e/canaryRO"],
    ):
        r = hpcrun("exec", *args, images["sif"], "true")
        assert r.returncode == BIND_ERROR, r.stderr
        assert len(r.stderr.splitlines()) == 1 and "does not exist" in r.stderr, r.stderr
    assert sorted(os.listdir(canary)) == ["file"] and os.listdir(home) == []


# 5. The working directory is not bound over the home.


def test_custom_home_run_from_home_shows_source(images, utmp):
    """--home SRC:$HOME run from $HOME: the container's $HOME is SRC, not the real home
    bound again as the working directory (Apptainer skips a cwd already mounted)."""
    src = utmp / "customhome"
    src.mkdir()
    (src / "mark").write_text("custom\n")
    home = user().pw_dir
    r = hpcrun("exec", "--home", f"{src}:{home}", images["sif"], "sh", "-c", "cat mark; pwd", cwd=home)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["custom", home]
