"""hpcrun build --sandbox, --fakeroot, file owners from rootfs tarballs, Bootstrap: debootstrap
(its errors; the real Debian build is tests/batch/test_images_mpi.py). Each result is run."""

import io
import os
import pwd
import shutil
import subprocess
import tarfile

import pytest

from hpcrun_testlib import HPCRUN, USER, as_user, hpcrun, user_env
from test_build import make_oci_layout

USER2 = USER + "2"  # tests/setup-host.sh gives this one no /etc/subuid range


def hpcrun2(*args, cwd):
    """hpcrun as the second test user (no subordinate ids)."""
    pw = pwd.getpwnam(USER2)
    return subprocess.run(
        as_user([HPCRUN, *args], pw),
        capture_output=True,
        text=True,
        cwd=cwd,
        env=user_env({"HOME": pw.pw_dir, "USER": USER2, "LOGNAME": USER2}),
        timeout=120,
    )


def as_test_user(*argv, cwd):
    pw = pwd.getpwnam(USER)
    return subprocess.run(
        ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--", *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def one_line(r, code, word):
    assert r.returncode == code, (r.returncode, r.stdout + r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and word in r.stderr and "Traceback" not in r.stderr, r.stderr


def no_work_dirs(d):
    return not [n for n in os.listdir(d) if n.startswith(".hpcrun-build-")]


def owned_tarball(path, images):
    """The busybox rootfs plus /opt/owned (5:6, 0750) holding a setuid file and a link (7:8)."""
    with tarfile.open(path, "w") as tar:
        tar.add(images["sandbox"], arcname=".", filter=lambda ti: None if ".singularity.d" in ti.name else ti)
        for name, kind, uid in (("opt/owned", "dir", 5), ("opt/owned/f", "file", 5), ("opt/owned/l", "sym", 7)):
            ti = tarfile.TarInfo(name)
            ti.uid, ti.gid, ti.mtime = uid, uid + 1, 1700000000
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o750
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, "f"
            else:
                ti.size, ti.mode = 3, 0o4755
            tar.addfile(ti, io.BytesIO(b"abc") if kind == "file" else None)
    os.chmod(path, 0o644)


SANDBOX_DEF = """Bootstrap: localimage
From: base.sif

%post
    mkdir -p /opt/ro/sub && echo post > /opt/ro/sub/f
    chown -R 5:6 /opt/ro && chmod 0500 /opt/ro/sub /opt/ro

%runscript
    echo "def sandbox $*"
"""


def test_sandbox_from_every_source_kind(images, bdir):
    """Directory, SIF, tarball, OCI layout and definition file (whose %post leaves read-only
    directories of other ids): each sandbox runs, takes --writable, and rm -rf removes it."""
    shutil.copy(images["sif"], bdir / "base.sif")
    (bdir / "app.def").write_text(SANDBOX_DEF)
    owned_tarball(str(bdir / "rootfs.tar"), images)
    make_oci_layout(str(bdir / "layout"), images)
    subprocess.run(["chmod", "-R", "a+rX", str(bdir)], check=True)
    sources = {
        "dir": images["sandbox"],
        "sif": images["sif"],
        "tar": str(bdir / "rootfs.tar"),
        "oci": f"oci:{bdir / 'layout'}:v1",
        "def": str(bdir / "app.def"),
    }
    for kind, src in sources.items():
        out = bdir / f"sb-{kind}"
        r = hpcrun("build", "--sandbox", str(out), src)
        assert r.returncode == 0, (kind, r.stderr)
        assert out.is_dir() and (out / ".singularity.d").is_dir(), kind
        r = hpcrun("exec", "--writable", str(out), "sh", "-c", "echo w > /written; id -u")
        assert r.returncode == 0 and r.stdout.strip() == str(pwd.getpwnam(USER).pw_uid), (kind, r.stderr)
        assert (out / "written").read_text() == "w\n"
        assert os.stat(out / "written").st_uid == pwd.getpwnam(USER).pw_uid
        if kind == "def":
            r = hpcrun("run", str(out), "x")
            assert r.stdout.strip() == "def sandbox x", r.stderr
            assert hpcrun("exec", str(out), "cat", "/opt/ro/sub/f").stdout == "post\n"
        if kind == "oci":
            assert hpcrun("run", str(out)).stdout.strip() == "entry default-cmd"
        r = as_test_user("rm", "-rf", str(out), cwd=str(bdir))
        assert r.returncode == 0 and not out.exists(), (kind, r.stderr)
    assert no_work_dirs(bdir)


def test_sandbox_out_exists_needs_force(images, bdir):
    out = bdir / "sb"
    out.mkdir()
    (out / "old-marker").write_text("old")
    os.chmod(out, 0o777)
    one_line(hpcrun("build", "--sandbox", str(out), images["sandbox"]), 2, "exists")
    assert (out / "old-marker").exists()
    r = hpcrun("build", "--sandbox", "--force", str(out), images["sandbox"])
    assert r.returncode == 0, r.stderr
    assert not (out / "old-marker").exists() and no_work_dirs(bdir)
    assert hpcrun("run", str(out), "y").stdout.strip() == "runscript:y"
    # and a SIF built where a sandbox was refuses the same way
    one_line(hpcrun("build", str(out), images["sandbox"]), 2, "exists")


def test_tarball_keeps_owners_through_subuid_range(images, bdir):
    owned_tarball(str(bdir / "rootfs.tar"), images)
    out = str(bdir / "owned.sif")
    r = hpcrun("build", out, str(bdir / "rootfs.tar"))
    assert r.returncode == 0, r.stderr
    listing = subprocess.run(["unsquashfs", "-o", "32768", "-lln", out], capture_output=True, text=True).stdout
    rows = {
        ln.split()[-1] if "->" not in ln else ln.split()[-3]: ln.split()[:2]
        for ln in listing.splitlines()
        if "squashfs-root/opt/owned" in ln
    }
    assert rows == {
        "squashfs-root/opt/owned": ["drwxr-x---", "5/6"],
        "squashfs-root/opt/owned/f": ["-rwsr-xr-x", "5/6"],
        "squashfs-root/opt/owned/l": ["lrwxrwxrwx", "7/8"],
    }, listing
    r = hpcrun("exec", "--fakeroot", out, "stat", "-c", "%u:%g %a", "/opt/owned", "/opt/owned/f", "/bin/busybox")
    assert r.stdout.split("\n")[:3] == ["5:6 750", "5:6 4755", "0:0 755"], r.stdout + r.stderr
    assert hpcrun("exec", out, "echo", "ran").stdout == "ran\n"
    # the same tarball under a definition file: %files and %post (root of the same mapping)
    # work among those owners, and they survive with %post's own
    (bdir / "t.def").write_text(
        "Bootstrap: localimage\nFrom: rootfs.tar\n%files\nhi.txt /opt/owned/hi.txt\n"
        "%post\n    echo post > /opt/owned/g && chown 9:9 /opt/owned/g\n"
    )
    (bdir / "hi.txt").write_text("hi\n")
    subprocess.run(["chmod", "-R", "a+rX", str(bdir)], check=True)
    out = str(bdir / "def.sif")
    r = hpcrun("build", out, str(bdir / "t.def"))
    assert r.returncode == 0, r.stderr
    r = hpcrun(
        "exec",
        "--fakeroot",
        out,
        "stat",
        "-c",
        "%u:%g",
        "/opt/owned",
        "/opt/owned/f",
        "/opt/owned/g",
        "/opt/owned/hi.txt",
    )
    assert r.stdout.split() == ["5:6", "5:6", "9:9", "0:0"], r.stdout + r.stderr
    # a SIF as the source (localimage, or given directly) keeps them too
    again = str(bdir / "again.sif")
    r = hpcrun("build", again, out)
    assert r.returncode == 0, r.stderr
    r = hpcrun("exec", "--fakeroot", again, "stat", "-c", "%u:%g %a", "/opt/owned", "/opt/owned/f", "/opt/owned/g")
    assert r.stdout.split("\n")[:3] == ["5:6 750", "5:6 4755", "9:9 644"], r.stdout + r.stderr
    assert no_work_dirs(bdir)


def test_tarball_without_subuid_range_falls_back_with_note(images, bdir):
    owned_tarball(str(bdir / "rootfs.tar"), images)
    out = str(bdir / "noowners.sif")
    r = hpcrun2("build", out, str(bdir / "rootfs.tar"), cwd=str(bdir))
    assert r.returncode == 0, r.stderr
    assert "lose their owner" in r.stderr and "subuid range" in r.stderr, r.stderr
    r = hpcrun2("exec", out, "echo", "ran", cwd=str(bdir))
    assert r.returncode == 0 and r.stdout == "ran\n", r.stdout + r.stderr
    listing = subprocess.run(["unsquashfs", "-o", "32768", "-lln", out], capture_output=True, text=True).stdout
    assert [ln for ln in listing.splitlines() if ln.endswith("opt/owned/f")][0].split()[1] == "0/0"
    assert no_work_dirs(bdir)


def test_fakeroot_flag_requires_a_subuid_range(images, bdir):
    shutil.copy(images["sif"], bdir / "base.sif")
    (bdir / "chown.def").write_text("Bootstrap: localimage\nFrom: base.sif\n%post\n    mkdir /o && chown 5:6 /o\n")
    subprocess.run(["chmod", "-R", "a+rX", str(bdir)], check=True)
    out = bdir / "fr.sif"
    one_line(
        hpcrun2("build", "--fakeroot", str(out), str(bdir / "chown.def"), cwd=str(bdir)),
        251,
        "--fakeroot: no range for " + USER2,
    )
    assert not out.exists() and no_work_dirs(bdir)
    r = hpcrun("build", "--fakeroot", str(out), str(bdir / "chown.def"))
    assert r.returncode == 0, r.stderr
    assert hpcrun("exec", "--fakeroot", str(out), "stat", "-c", "%u:%g", "/o").stdout.strip() == "5:6"
    # without the flag the second user still builds (root mapped to them only), with a note
    (bdir / "plain.def").write_text("Bootstrap: localimage\nFrom: base.sif\n%post\n    touch /p\n")
    os.chmod(bdir / "plain.def", 0o644)
    r = hpcrun2("build", str(bdir / "p.sif"), str(bdir / "plain.def"), cwd=str(bdir))
    assert r.returncode == 0 and "no /etc/subuid range" in r.stderr, r.stderr
    assert hpcrun2("exec", str(bdir / "p.sif"), "ls", "/p", cwd=str(bdir)).stdout.strip() == "/p"


@pytest.mark.parametrize(
    "body,who,code,word",
    [
        ("Bootstrap: debootstrap\nMirrorURL: http://deb.debian.org/debian\n", 1, 2, "needs an 'OSVersion:'"),
        ("Bootstrap: debootstrap\nOSVersion: bookworm\n", 2, 251, "Bootstrap: debootstrap needs a range"),
    ],
)
def test_debootstrap_errors(images, bdir, body, who, code, word):
    (bdir / "d.def").write_text(body)
    os.chmod(bdir / "d.def", 0o644)
    out = bdir / "d.sif"
    args = ("build", str(out), str(bdir / "d.def"))
    one_line(hpcrun(*args) if who == 1 else hpcrun2(*args, cwd=str(bdir)), code, word)
    assert not out.exists() and no_work_dirs(bdir)
