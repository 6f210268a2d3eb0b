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

