"""Hostile build inputs (archives, tarballs, layers, definition files, planted temporary
names, a full disk), each built by root (as build hosts do) and by the test user. For every
case: the canary tree outside the build, the output directory's siblings and the sources
are unchanged byte for byte, mode for mode and owner for owner; the build fails with one
`hpcrun: error:` line and a documented code, or succeeds with the hostile link kept as a
link inside the image (or, at a name the build writes, replaced by that file inside it);
nothing temporary is left next to OUT (no_leaks: no process)."""

import os
import pwd
import re
import stat
import subprocess

import pytest

import hostile
from hostile import D, F, H, L, chain, docker_archive, oci_archive, tar_bytes, up, write
from hpcrun_testlib import HPCRUN, USER, WORK, as_user, hpcrun, user

CODES = (2, 251, 252, 253, 254)  # documented failures of hpcrun itself (255 is a bug)
BUILDERS = ("root", "user")
LAYER = tar_bytes([D("etc"), F("etc/hostname", b"hostile\n")])


def run_build(builder, *args):
    if builder == "user":
        return hpcrun("build", *args, timeout=120)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "XDG_CACHE_HOME": os.path.join(WORK, "cache", "root"),
    }
    return subprocess.run([HPCRUN, "build", *args], env=env, capture_output=True, text=True, timeout=120, cwd=WORK)


def owner(builder):
    return (0, 0) if builder == "root" else (user().pw_uid, user().pw_gid)


def plant(pw, target, path):
    """ln -s target path, as the user pw (another user who can write OUT's directory)."""
    subprocess.run(
        as_user(["ln", "-s", target, str(path)], pw),
        check=True,
    )


class Arena:
    """The canary (the builder's own files, outside the build), a source directory and
    the output directory with siblings of OUT; snapshot() before, problems() after."""

    def __init__(self, bdir, builder, name, outdir=None):
        self.builder, self.uid, self.gid = builder, *owner(builder)
        self.canary = os.path.join(WORK, f"canary-{name}")
        subprocess.run(["rm", "-rf", self.canary], check=True)
        hostile.make_canary(self.canary, self.uid, self.gid)
        self.file, self.file2, self.dir = (os.path.join(self.canary, n) for n in ("file", "file2", "dir"))
        self.src = bdir / "src"
        self.src.mkdir(mode=0o755)
        self.outdir = outdir or bdir / "out"
        self.outdir.mkdir(mode=0o755, exist_ok=True)
        if outdir is None:
            os.chown(self.outdir, self.uid, self.gid)
        for name, data in (("sibling", b"sibling of OUT\n"), ("sibling-dir/inner", b"inner sibling\n")):
            path = self.outdir / name
            path.parent.mkdir(exist_ok=True)
            write(path, data, 0o600)
            for p in (path, path.parent):
                os.chown(p, self.uid, self.gid)
        os.chmod(self.outdir / "sibling-dir", 0o700)

    def snapshot(self, out):
        """Call once the sources and anything planted are in place."""
        self.out = str(out)
        self.out_before = self._lstat(self.out)
        self.trees = [(t, hostile.snapshot(t)) for t in (self.canary, str(self.src))]
        self.before_out = hostile.snapshot(str(self.outdir), skip={os.path.basename(self.out)})

    @staticmethod
    def _lstat(path):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        return (stat.S_IFMT(st.st_mode), st.st_uid, os.readlink(path) if stat.S_ISLNK(st.st_mode) else None)

    def problems(self, r, links=None, may_vanish=(), must_fail=False, must_succeed=False):
        """Everything wrong with this build, as readable lines (empty: it was safe).
        links: {'/path in image': target} that a successful build must keep as links;
        may_vanish: names next to OUT that were planted and may be removed."""
        bad = []
        for top, before in self.trees:
            bad += hostile.diff(top, before, hostile.snapshot(top))
        after = hostile.snapshot(str(self.outdir), skip={os.path.basename(self.out)})
        before = {k: v for k, v in self.before_out.items() if k in after or k not in may_vanish}
        bad += hostile.diff(str(self.outdir), before, after)
        if r.returncode == 0:
            bad += ["succeeded, but a refusal was expected"] if must_fail else []
            bad += self._good_image(links or {})
        else:
            bad += ["failed, but it should have built"] if must_succeed else []
            lines = r.stderr.strip().splitlines()
            if r.returncode not in CODES:
                bad.append(f"exit code {r.returncode}, not one of {CODES}")
            if len(lines) != 1 or not lines[0].startswith("hpcrun: error:") or "Traceback" in r.stderr:
                bad.append(f"stderr is not one 'hpcrun: error:' line: {r.stderr.strip()[-400:]!r}")
            if self._lstat(self.out) != self.out_before:
                bad.append(f"OUT {self.out} changed on failure: {self.out_before} -> {self._lstat(self.out)}")
        return bad

    def _good_image(self, links):
        st = os.lstat(self.out)
        if not stat.S_ISREG(st.st_mode):
            return [
                f"OUT {self.out} is not a regular file"
                + (f": a symlink -> {os.readlink(self.out)}" if stat.S_ISLNK(st.st_mode) else "")
            ]
        if (st.st_uid, st.st_gid) != (self.uid, self.gid):
            return [f"OUT is owned by {st.st_uid}:{st.st_gid}, not the builder"]
        entries = hostile.image_entries(self.out)
        bad = []
        for path, target in links.items():
            ok = [("l", target)]
            if isinstance(target, Replaceable):  # a file the build writes may take the link's place
                ok.append(("-", None))
            if entries.get(path) not in ok:
                bad.append(
                    f"image {path}: {entries.get(path)}, not a link -> {target}"
                    + (" or a regular file" if len(ok) > 1 else "")
                )
        return bad


class Replaceable(str):
    """A link target at a name the build writes a file to (runscript, labels.json, a %files
    destination): it may stay a link or be replaced by the file, inside the image; never
    written through (the canary says so)."""


def verdict(r, bad):
    assert not bad, "\n".join([f"exit {r.returncode}; stderr {r.stderr.strip()[-300:]!r}"] + bad)


# --- cases 1-5: the source itself is hostile ------------------------------------------
# Each: (src dir, arena) -> (build arguments after OUT, {image path: link target} kept on success)


def outer(kind, members):
    def make(src, a):
        pack = docker_archive if kind == "docker" else oci_archive
        return [f"{kind}-archive:{pack(src / 'img.tar', [LAYER], members(a))}"], {}

    return make


def rootfs(entries, links):
    def make(src, a):
        return [write(src / "rootfs.tar", tar_bytes(entries(a)))], links(a)

    return make


def layer(entries, links):
    def make(src, a):
        return [f"docker-archive:{docker_archive(src / 'img.tar', [tar_bytes(entries(a))])}"], links(a)

    return make


def whiteout(lower, upper, links=lambda a: {}):
    def make(src, a):
        layers = [tar_bytes(lower(a)), tar_bytes(upper)]
        return [f"oci-archive:{oci_archive(src / 'img.tar', layers)}"], links(a)

    return make


def definition(base, section, body, links):
    def make(src, a):
        write(src / "base.tar", tar_bytes(base(a)))
        write(src / "payload", b"payload from %files\n")
        text = f"Bootstrap: localimage\nFrom: base.tar\n\n%{section}\n    {body}\n"
        return ["--notest", write(src / "app.def", text.encode())], links(a)

    return make


SD = ".singularity.d"
CASES = {
    # 1. outer archive members (docker save / OCI layout tar) forming a symlink chain
    "outer-docker-chain-dir": outer("docker", lambda a: chain("x", up(a.dir)) + [F("x/planted", b"pwned\n")]),
    "outer-docker-chain-file": outer("docker", lambda a: chain("x", up(a.file)) + [F("x", b"pwned\n")]),
    "outer-oci-chain-abs-dir": outer("oci", lambda a: chain("x", a.dir) + [F("x/planted", b"pwned\n")]),
    "outer-oci-abs-link-dir": outer("oci", lambda a: [L("x", a.dir), F("x/planted", b"pwned\n")]),
    "outer-oci-chain-file-member": outer(
        "oci", lambda a: chain("x", up(a.file)) + [F("p/" * hostile.DEPTH + "x", b"pwned\n")]
    ),
    "outer-oci-blobs-dotdot": outer("oci", lambda a: [L("blobs/sha256/..", a.dir)]),
    "outer-docker-chain-hardlink": outer(
        "docker", lambda a: [L("p", "."), H("p/" * hostile.DEPTH + "h", a.file), F("h", b"pwned\n")]
    ),
    "outer-docker-hardlink-abs": outer("docker", lambda a: [H("h", a.file), F("h", b"pwned\n")]),
    # 2. a rootfs tarball directory that a later member replaces by a link out
    **{
        f"rootfs-dir{mode:04o}-then-link-{to}": rootfs(
            lambda a, mode=mode, to=to: [D("d", mode), F("d/f"), L("d", getattr(a, to))],
            lambda a, to=to: {"/d": getattr(a, to)},
        )
        for mode in (0o755, 0o6777)
        for to in ("file", "dir")
    },
    # 3. a layer planting links where the metadata writer writes (config has Env, Cmd, Labels)
    "layer-singularity.d-link": layer(lambda a: [L(SD, a.dir)], lambda a: {f"/{SD}": a.dir}),
    **{
        f"layer-{name.replace('/', '-')}-link": layer(
            lambda a, name=name, to=to: [D(SD), D(f"{SD}/env"), L(f"{SD}/{name}", getattr(a, to))],
            lambda a, name=name, to=to: {f"/{SD}/{name}": Replaceable(getattr(a, to))},
        )
        for name, to in (("runscript", "file"), ("env/10-docker2singularity.sh", "file"), ("labels.json", "file"))
    },
    "layer-env-dir-link": layer(lambda a: [D(SD), L(f"{SD}/env", a.dir)], lambda a: {f"/{SD}/env": a.dir}),
    # mount points the metadata step mkdirs: linked at the canary dir, or at a new name in it
    **{
        f"layer-{d}-link{suffix}": layer(
            lambda a, d=d, new=new: [L(d, a.dir + new)], lambda a, d=d, new=new: {f"/{d}": a.dir + new}
        )
        for d in ("proc", "sys", "dev", "tmp", "home")
        for suffix, new in (("", ""), ("-dangling", f"/new-{d}"))
    },
    # 4. a definition file on a base that planted links
    "def-files-parent-link": definition(
        lambda a: [L("opt", a.dir)], "files", "./payload /opt/x", lambda a: {"/opt": a.dir}
    ),
    "def-files-dest-link": definition(
        lambda a: [D("opt"), L("opt/x", a.file)], "files", "./payload /opt/x", lambda a: {"/opt/x": Replaceable(a.file)}
    ),
    **{
        f"def-{section}": definition(
            lambda a, name=name: [D(SD), D(f"{SD}/env"), L(f"{SD}/{name}", a.file)],
            section,
            body,
            lambda a, name=name: {f"/{SD}/{name}": Replaceable(a.file)},
        )
        for section, name, body in (
            ("runscript", "runscript", "echo run"),
            ("startscript", "startscript", "echo start"),
            ("environment", "env/90-environment.sh", "export HOSTILE=1"),
            ("help", "runscript.help", "Some help."),
            ("test", "test", "true"),
            ("labels", "labels.json", "Author hostile"),
        )
    },
    # 5. OCI whiteouts of . and .., and an opaque whiteout in a directory linked out
    "wh-dot": whiteout(lambda a: [F("keep")], [F(".wh..", b"")]),
    "wh-dotdot": whiteout(lambda a: [F("keep")], [F(".wh...", b"")]),
    "wh-dir-dotdot": whiteout(lambda a: [D("dir"), F("dir/f"), F("keep")], [F("dir/.wh...", b"")]),
    "wh-opaque-in-link": whiteout(
        lambda a: [L("link", a.dir)],
        [F("link/.wh..wh..opq", b""), F("link/.wh.inner", b"")],
        lambda a: {"/link": a.dir},
    ),
}


@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_source(images, bdir, builder, case):
    a = Arena(bdir, builder, f"{case}-{builder}")
    args, links = CASES[case](a.src, a)
    out = a.outdir / "img.sif"
    a.snapshot(out)
    r = run_build(builder, str(out), *args)
    verdict(r, a.problems(r, links))


# --- case 6: predictable names next to OUT, planted by another user --------------------

TEMP_CASES = {  # OUT name, {planted name: canary attribute}, --force, outcome
    "sif-temp-names": ("img.sif", {"img.sif.sqfs.tmp": "file", "img.sif.tmp": "file2"}, False, None),
    "sqfs-temp-name": ("img.sqfs", {"img.sqfs.tmp": "file"}, False, None),
    "out-link-no-force": ("img.sif", {"img.sif": "file"}, False, "fail"),
    "out-link-force": ("img.sif", {"img.sif": "file"}, True, "succeed"),
}


@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize("case", sorted(TEMP_CASES))
def test_planted_temporary_names(images, bdir, builder, case):
    name, planted, force, outcome = TEMP_CASES[case]
    # OUT's directory: the builder's, writable by the attacker's group (a project directory)
    attacker = pwd.getpwnam(USER + "2") if builder == "user" else user()
    shared = bdir / "shared"
    shared.mkdir()
    a = Arena(bdir, builder, f"{case}-{builder}", outdir=shared)
    os.chown(shared, a.uid, attacker.pw_gid)
    os.chmod(shared, 0o770)
    (a.src / "tree").mkdir()
    write(a.src / "tree" / "hello", b"hello\n")
    for link, to in planted.items():
        plant(attacker, getattr(a, to), shared / link)
    out = shared / name
    a.snapshot(out)
    r = run_build(builder, *(["--force"] if force else []), str(out), str(a.src / "tree"))
    may_vanish = {n for n in planted if n != name}
    verdict(r, a.problems(r, may_vanish=may_vanish, must_fail=outcome == "fail", must_succeed=outcome == "succeed"))


# --- case 7: the output directory's file system fills up -------------------------------


@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize("kind", ["tarball", "directory"])
def test_disk_full(images, bdir, builder, kind):
    full = bdir / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(full)], check=True)
    try:
        a = Arena(bdir, builder, f"full-{kind}-{builder}", outdir=full)
        os.chown(full, a.uid, a.gid)
        big = os.urandom(4 << 20)  # incompressible, twice the file system
        if kind == "tarball":
            source = write(a.src / "rootfs.tar", tar_bytes([D("data"), F("data/big", big)]))
        else:
            (a.src / "tree").mkdir()
            write(a.src / "tree" / "big", big)
            source = str(a.src / "tree")
        a.snapshot(full / "img.sif")
        r = run_build(builder, str(full / "img.sif"), source)
        bad = a.problems(r, must_fail=True)  # leftovers in the full directory included
    finally:
        subprocess.run(["umount", str(full)], check=True)
    if not re.search(r"no space left|disk full", r.stderr, re.IGNORECASE):
        bad.append("the message does not say the disk is full")
    verdict(r, bad)
