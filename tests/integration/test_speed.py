"""Start-up work left out for speed (issue 13) without losing a guarantee: a directory image
that already has every mount point runs without an overlay, as ch-run runs one."""

import json
import os
import shutil
import subprocess

from hpcrun_testlib import hpcrun, user

ROOT_LINE = "awk '$5 == \"/\" {print $9}' /proc/self/mountinfo"


def _tree_with_every_mount_point(images, utmp, home=False):
    """A copy of the sandbox holding every mount point and identity file a run needs; the
    user's home directory itself only with home (its /home is left empty otherwise)."""
    tree = utmp / "full"
    shutil.copytree(images["sandbox"], tree, symlinks=True)
    pw = user()
    plan = json.loads(hpcrun("exec", "--dry-run", str(tree), "true").stdout)
    for m in plan["mounts"]:
        if m["dst"] == pw.pw_dir and not home:
            continue
        path = tree / m["dst"].lstrip("/")
        if m["kind"] == "tmpfs" or os.path.isdir(m["src"]):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    base = (tree / pw.pw_dir.lstrip("/")).parent
    for d in [] if home else list(base.iterdir()):  # an empty /home, as base images have it
        shutil.rmtree(d)
    subprocess.run(["chmod", "-R", "a+rX", tree], check=True)
    return tree


def _snapshot(tree):
    return sorted((str(p.relative_to(tree)), p.is_dir()) for p in tree.rglob("*"))


def test_directory_image_with_every_mount_point_is_bound_without_overlay(images, utmp):
    tree = _tree_with_every_mount_point(images, utmp)
    passwd, before = (tree / "etc/passwd").read_text(), _snapshot(tree)
    pw = user()
    script = (
        f"{ROOT_LINE}; id -un; grep -c '^{pw.pw_name}:' /etc/passwd; echo x > {pw.pw_dir}/.hpcrun-speed && echo home;"
        " touch /new 2>/dev/null || echo ro; (echo >> /etc/passwd) 2>/dev/null || echo passwd-ro"
    )
    r = hpcrun("exec", str(tree), "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    fstype, *rest = r.stdout.splitlines()
    assert fstype != "overlay", r.stdout  # the image directory itself is the root
    assert rest == [pw.pw_name, "1", "home", "ro", "passwd-ro"], r.stdout
    assert (tree / "etc/passwd").read_text() == passwd  # the identity is bound over, not written
    assert _snapshot(tree) == before  # no mount point was made in the image
    os.unlink(os.path.join(pw.pw_dir, ".hpcrun-speed"))


def test_a_missing_mount_point_or_a_home_base_with_content_keeps_the_overlay(images, utmp):
    tree = _tree_with_every_mount_point(images, utmp)
    os.unlink(tree / "etc/hosts")  # a default mount point the overlay must make
    r = hpcrun("exec", str(tree), "sh", "-c", f"{ROOT_LINE}; test -f /etc/hosts && echo hosts")
    assert (r.returncode, r.stdout) == (0, "overlay\nhosts\n"), r.stderr
    assert not (tree / "etc/hosts").exists()
    (tree / "etc/hosts").touch()
    other = tree / "home" / "someone-else"  # the image's /home holds more than our home:
    other.mkdir()  # a tmpfs over it would hide that, so the overlay makes the home instead
    r = hpcrun("exec", str(tree), "sh", "-c", f"{ROOT_LINE}; ls /home")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "overlay" and "someone-else" in r.stdout.splitlines()[1:], r.stdout
