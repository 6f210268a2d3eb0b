"""Apptainer's action regressions, ported: e2e/actions/regressions.go (apptainer/apptainer).
Each test is named after Apptainer's (issueNNNN, the Singularity/Apptainer issue number).
Left out: image caching over http (issue4823), config edits (issue5631), images from
Docker Hub (issue1848 runs on our image instead, issue1868), xattrs (issue5399), and
issue5455 (--writable-tmpfs creating an entry in a root-owned directory of a sandbox: the
kernel's overlayfs cannot copy up a directory whose owner is not mapped in the user
namespace, EOVERFLOW; Apptainer passes it with its setuid starter. README lists it.)"""

import os
import shutil

from hpcrun_testlib import hpcrun, user
from test_e2e_actions import image  # noqa: F401  (the e2e/testdata/Apptainer stand-in)


def ok(r):
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def env_lines(r):
    return ok(r).stdout.splitlines()


def sandbox_of(image, bdir):  # noqa: F811
    box = bdir / "sandbox"
    ok(hpcrun("build", "--force", "--sandbox", str(box), image, timeout=120))
    return box


def test_issue4488(image):  # noqa: F811
    """No file descriptor leaks into the container: 0, 1, 2 and the one ls opens."""
    assert ok(hpcrun("exec", image, "ls", "-1", "/proc/self/fd")).stdout == "0\n1\n2\n3\n"


def test_issue4587(image, bdir):  # noqa: F811
    """A working directory that is the home does not hide a custom --home."""
    home = user().pw_dir
    (bdir / "canary_file").touch()
    r = hpcrun("exec", "--home", f"{bdir}:{home}", image, "test", "-f", f"{home}/canary_file", cwd=home)
    assert r.returncode == 0, r.stderr


def test_issue4755(image, bdir):  # noqa: F811
    """A file in the image at the working directory's parent does not break the start."""
    box = sandbox_of(image, bdir)
    work = bdir / "work"
    work.mkdir()
    os.chmod(work, 0o777)
    inside = box / str(bdir).lstrip("/")
    inside.mkdir(parents=True)
    (inside / "underlay-test").touch()
    ok(hpcrun("exec", str(box), "true", cwd=str(work)))


def test_issue4768(image, utmp):  # noqa: F811
    """A working directory whose last element is a link to '.' is the directory itself."""
    os.symlink(".", utmp / "symlink")
    assert ok(hpcrun("exec", image, "pwd", cwd=str(utmp / "symlink"))).stdout == f"{utmp}\n"


def test_issue4836(image, utmp):  # noqa: F811
    """A working directory reached through a symlinked element is the resolved one."""
    (utmp / "dir" / "child").mkdir(parents=True)
    os.symlink(utmp / "dir", utmp / "symlink")
    r = ok(hpcrun("exec", image, "pwd", cwd=str(utmp / "symlink" / "child")))
    assert r.stdout == f"{utmp}/dir/child\n"


def test_issue5228(image):  # noqa: F811
    """--home / (nobody's home) is not mounted over the whole container."""
    ok(hpcrun("exec", "--home", "/", image, "/bin/true"))


def test_issue5211(image):  # noqa: F811
    """--fakeroot --contain: the home is not bound under /root; HOME is /root."""
    canary = os.path.join(user().pw_dir, "issue5211-canary")
    os.makedirs(canary, exist_ok=True)
    try:
        ok(hpcrun("exec", "--fakeroot", "--contain", image, "test", "!", "-d", "/root/issue5211-canary"))
        assert ok(hpcrun("exec", "--fakeroot", "--contain", image, "sh", "-c", "echo $HOME")).stdout == "/root\n"
    finally:
        os.rmdir(canary)


def test_issue5271(image):  # noqa: F811
    """--writable-tmpfs: a new directory at the root."""
    ok(hpcrun("exec", "--writable-tmpfs", image, "mkdir", "/e2e-dir"))


def test_issue5465(image, bdir):  # noqa: F811
    """/etc/hosts and /etc/localtime that are links to a directory: their binds are not
    fatal, with and without --contain."""
    box = sandbox_of(image, bdir)
    (box / "dir").mkdir()
    for name in ("localtime", "hosts"):
        p = box / "etc" / name
        if p.is_symlink() or p.exists():
            p.unlink()
        os.symlink("/dir", p)
    ok(hpcrun("exec", str(box), "true"))
    ok(hpcrun("exec", "--contain", str(box), "true"))


def test_issue5599(image, utmp):  # noqa: F811
    """Binds from APPTAINER_BIND and --bind add up in the container's $APPTAINER_BIND."""
    r = hpcrun("exec", "--bind", f"{utmp}:/mnt", image, "env", env={"APPTAINER_BIND": f"{utmp}:/srv"})
    assert "APPTAINER_BIND=/mnt,/srv" in env_lines(r)


def test_issue3501(image, utmp):  # noqa: F811
    """--mount ...,nonested stays out of $APPTAINER_BIND; --bind's are in it."""
    hidden = f"type=bind,source={utmp},destination=/hidden,nonested"
    r = hpcrun("exec", "--mount", hidden, image, "env")
    assert not [line for line in env_lines(r) if line.startswith("APPTAINER_BIND=") and "/hidden" in line]
    r = hpcrun("exec", "--bind", f"{utmp}:/visible", "--mount", hidden, image, "env")
    lines = env_lines(r)
    assert "APPTAINER_BIND=/visible" in lines, lines


def test_issue3502(image):  # noqa: F811
    """--fakeroot: whoami is root."""
    assert ok(hpcrun("exec", "--fakeroot", image, "whoami")).stdout == "root\n"


def test_issue6165(image, utmp):  # noqa: F811
    """--contain with a file bound at its own path (a source-only --bind)."""
    (utmp / "file").touch()
    r = ok(hpcrun("exec", "--contain", "--bind", str(utmp / "file"), image, "test", "-f", str(utmp / "file")))
    assert "already in the mount point list" not in r.stderr


def test_issue619(image):  # noqa: F811
    """A bind inside another bind: --bind /var,/var/lib/apt."""
    assert os.path.isdir("/var/lib/apt")
    ok(hpcrun("exec", "--bind", "/var,/var/lib/apt", image, "true"))


def test_issue1848(image):  # noqa: F811
    """The container's /etc/passwd ends with the caller's own line, as the host has it."""
    pw = user()
    want = f"{pw.pw_name}:x:{pw.pw_uid}:{pw.pw_gid}:{pw.pw_gecos}:{pw.pw_dir}:{pw.pw_shell}\n"
    assert ok(hpcrun("exec", image, "tail", "-1", "/etc/passwd")).stdout == want


ISSUE_1097_DEF = """Bootstrap: localimage
From: base.sif

%setup
    mv "${APPTAINER_ROOTFS}/var/tmp" "${APPTAINER_ROOTFS}/var/tmpold"
    ln -s ../tmp "${APPTAINER_ROOTFS}/var/tmp"
"""


def test_issue1097(image, bdir):  # noqa: F811
    """An image whose /var/tmp links to /tmp: the host's /var/tmp is not bound over the
    container's /tmp (which stays the host's /tmp)."""
    shutil.copy(image, bdir / "base.sif")
    (bdir / "issue_1097.def").write_text(ISSUE_1097_DEF)
    out = bdir / "issue_1097.sif"
    ok(hpcrun("build", str(out), str(bdir / "issue_1097.def"), cwd=str(bdir), timeout=180))
    var_canary, tmp_canary = "/var/tmp/issue-1097-canary", str(bdir / "tmp-canary")
    with open(var_canary, "w") as f:
        f.write("host var/tmp\n")
    (bdir / "tmp-canary").write_text("host tmp\n")
    os.chmod(var_canary, 0o644)
    try:
        assert hpcrun("exec", str(out), "cat", var_canary).returncode == 1
        assert ok(hpcrun("exec", str(out), "cat", tmp_canary)).stdout == "host tmp\n"
    finally:
        os.unlink(var_canary)
