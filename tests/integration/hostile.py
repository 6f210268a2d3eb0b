"""A corpus of hostile build inputs, generated in code (no binary files in the repo), and
the canary helpers test_hostile_build.py uses: a tree of known bytes, modes and owners
outside the build that every escaping link points at, snapshotted before and after."""

import hashlib
import io
import json
import os
import re
import stat
import subprocess
import tarfile

MTIME = 1700000000
# p -> . repeated: more `..` than any build directory is deep, fewer links than the
# kernel follows in one lookup (40)
DEPTH = 16
CONFIG = {
    "architecture": "amd64",
    "os": "linux",
    "config": {
        "Env": ["PATH=/bin:/usr/bin", "HOSTILE=1"],
        "Entrypoint": ["/bin/echo"],
        "Cmd": ["hostile"],
        "Labels": {"org.example.hostile": "yes"},
    },
}


# --- tar members: (name, kind, data or link target, mode) -----------------------------


def F(name, data=b"x\n", mode=0o644):
    return (name, "file", data, mode)


def D(name, mode=0o755):
    return (name, "dir", None, mode)


def L(name, target):
    return (name, "symlink", target, 0o777)


def H(name, target):
    return (name, "hardlink", target, 0o644)


def tar_bytes(entries):
    """An uncompressed tar holding the members exactly in this order, names untouched."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data, mode in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime, ti.mode = MTIME, mode
            if kind == "file":
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
                continue
            ti.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}[kind]
            if kind != "dir":
                ti.linkname = data
            tar.addfile(ti)
    return buf.getvalue()


def write(path, data, mode=0o644):
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return str(path)


def chain(name, target):
    """`p -> .` and a link p/p/.../NAME to target, which may be relative (enough `../`,
    each cancelling a `p/` when the path is only normalised as text) or absolute."""
    return [L("p", "."), L("p/" * DEPTH + name, target)]


def up(abspath):
    """abspath written as `../`*DEPTH + the path: relative, but it climbs to / from any
    directory DEPTH or fewer levels deep."""
    return "../" * DEPTH + abspath.lstrip("/")


def _digest(data):
    return hashlib.sha256(data).hexdigest()


def docker_archive(path, layers, outer=(), config=CONFIG):
    """`docker save` layout: manifest.json, the config (diff_ids right), one tar per
    layer; `outer` members come first in the archive."""
    cfg = dict(config, rootfs={"type": "layers", "diff_ids": ["sha256:" + _digest(b) for b in layers]})
    names = [f"l{i}/layer.tar" for i in range(len(layers))]
    members = list(outer) + [F(n, b) for n, b in zip(names, layers)]
    members += [
        F("config.json", json.dumps(cfg).encode()),
        F(
            "manifest.json",
            json.dumps([{"Config": "config.json", "RepoTags": ["hostile:1"], "Layers": names}]).encode(),
        ),
    ]
    return write(path, tar_bytes(members))


def oci_archive(path, layers, outer=(), config=CONFIG):
    """OCI image layout as one tar (no directory members, so an outer `blobs` link is not
    pre-empted by a real directory); `outer` members come first."""
    blobs = []

    def blob(data, media):
        blobs.append(F("blobs/sha256/" + _digest(data), data))
        return {"mediaType": media, "digest": "sha256:" + _digest(data), "size": len(data)}

    cfg = dict(config, rootfs={"type": "layers", "diff_ids": ["sha256:" + _digest(b) for b in layers]})
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob(json.dumps(cfg).encode(), "application/vnd.oci.image.config.v1+json"),
        "layers": [blob(b, "application/vnd.oci.image.layer.v1.tar") for b in layers],
    }
    mdesc = blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    index = {"schemaVersion": 2, "manifests": [mdesc]}
    members = (
        list(outer)
        + blobs
        + [F("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'), F("index.json", json.dumps(index).encode())]
    )
    return write(path, tar_bytes(members))


# --- the canary: files and directories outside the build ------------------------------

CANARY = {
    "": ("dir", 0o700, None),
    "file": ("file", 0o600, b"canary file\n"),
    "file2": ("file", 0o600, b"second canary file\n"),
    "dir": ("dir", 0o700, None),
    "dir/inner": ("file", 0o600, b"inner canary file\n"),
    "dir/sub": ("dir", 0o750, None),
}


def make_canary(top, uid, gid):
    for rel, (kind, mode, data) in CANARY.items():
        path = os.path.join(top, rel) if rel else top
        if kind == "dir":
            os.mkdir(path)
        else:
            write(path, data)
        os.chown(path, uid, gid)
        os.chmod(path, mode)
    return top


def snapshot(top, skip=()):
    """{relative path: (kind, mode, uid, gid, bytes or link target)} of everything under
    top, links not followed; names in skip (relative) are left out."""
    out = {}

    def visit(path, rel):
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            payload, kind = os.readlink(path), "link"
        elif stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                payload, kind = f.read(), "file"
        elif stat.S_ISDIR(st.st_mode):
            payload, kind = None, "dir"
        else:
            payload, kind = None, "other"
        out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, payload)
        if kind == "dir":
            for name in sorted(os.listdir(path)):
                sub = os.path.join(rel, name) if rel else name
                if sub not in skip:
                    visit(os.path.join(path, name), sub)

    visit(top, "")
    return out


def _show(payload):
    if isinstance(payload, bytes):
        return f"{len(payload)} bytes {payload[:24]!r}"
    return repr(payload)


def diff(top, before, after):
    """What changed, as short readable lines naming the absolute path."""
    lines = []
    for rel in sorted(set(before) | set(after)):
        path = os.path.join(top, rel) if rel else top
        b, a = before.get(rel), after.get(rel)
        if a is None:
            lines.append(f"{path} ({b[0]}) removed")
        elif b is None:
            lines.append(f"{path} new {a[0]} mode {a[1]:04o} {a[2]}:{a[3]}")
        elif a != b:
            if a[0] != b[0]:
                lines.append(f"{path} {b[0]} -> {a[0]}")
            if a[1] != b[1]:
                lines.append(f"{path} mode {b[1]:04o} -> {a[1]:04o}")
            if a[2:4] != b[2:4]:
                lines.append(f"{path} owner {b[2]}:{b[3]} -> {a[2]}:{a[3]}")
            if a[0] == b[0] and a[4] != b[4]:
                lines.append(f"{path} content {_show(b[4])} -> {_show(a[4])}")
    return lines


# --- the image a build made -----------------------------------------------------------

LISTING = re.compile(r"^(\S)\S+\s+\S+\s+\d+\s+\S+\s+\S+\s+squashfs-root(/.*?)?(?: -> (.*))?$")


def image_entries(path):
    """{'/path': (type letter, link target or None)} of a SIF or squashfs image."""
    offset = 0
    if path.endswith(".sif"):
        from hpcrun.images.sif import SifFile

        offset = SifFile(path).primary_partition().offset
    r = subprocess.run(["unsquashfs", "-o", str(offset), "-lln", path], capture_output=True, text=True)
    assert r.returncode == 0, f"unsquashfs -lln {path}: {r.stderr}"
    out = {}
    for line in r.stdout.splitlines():
        m = LISTING.match(line)
        if m:
            out[m.group(2) or "/"] = (m.group(1), m.group(3))
    return out
