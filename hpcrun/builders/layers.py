"""Unpack root file system tarballs and OCI/Docker layers into a build directory, safely.

Nothing may land outside the destination: member names with `..` that escape are refused,
a member is never written through a symlink (each parent is resolved and must stay
inside), hard links must point inside, device nodes and FIFOs are skipped (an
unprivileged user cannot make them). Symlinks are kept as they are: an absolute link is
interpreted inside the image when it runs. With owners=True (run as root, or as root of a
user namespace mapping a subuid range) members keep their numeric owners and full modes;
otherwise everything belongs to the caller and stays readable by it. Layers honour OCI whiteouts: `.wh.NAME`
deletes NAME from the layers below, `.wh..wh..opq` empties its directory of them.
"""
import os
import shutil
import subprocess
import tarfile

from hpcrun import trees
from hpcrun.errors import ImageError

WH = ".wh."
OPAQUE = ".wh..wh..opq"


def _inside(dest, path):
    real = os.path.realpath(path)
    return real == dest or real.startswith(dest + os.sep)


def _clean(name):
    """Member name -> path relative to the root, or None for the root itself; raise if it escapes."""
    parts = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if not parts:
                raise ImageError(f"archive member {name!r} points outside the image (..)",
                                 "the archive is malicious or broken")
            parts.pop()
        else:
            parts.append(p)
    return "/".join(parts) or None


def open_tar(path, workdir):
    """tarfile for a .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz or .tar.zst (zstd via the zstd tool)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"\x28\xb5\x2f\xfd":
        out = os.path.join(workdir, "layer.tar")
        with open(out, "wb") as o:
            proc = subprocess.run(["zstd", "-dcq", path], stdout=o, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise ImageError(f"{path}: cannot decompress zstd archive: {proc.stderr.strip()}")
        path = out
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ImageError(f"{path}: not a readable tar archive ({e})", "the archive is truncated or corrupt") from None


def apply(tar, dest, label, skipped, owners=False, lost=None):
    """Apply one layer (or a whole rootfs tarball) onto dest (an absolute realpath).
    Appends to skipped the device nodes/FIFOs left out, to lost (if given) the members
    whose owner is not kept (not owners mode, or an id outside the mapped range)."""
    lost = [] if lost is None else lost

    def own(path, m):
        if not owners:
            if m.uid or m.gid:
                lost.append(os.path.relpath(path, dest))
            return
        try:
            os.chown(path, m.uid, m.gid, follow_symlinks=False)
        except OSError:         # EINVAL: the id is not mapped in this user namespace
            lost.append(os.path.relpath(path, dest))

    try:
        members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ImageError(f"{label}: truncated or corrupt archive ({e})", "fetch or rebuild it") from None
    # Whiteouts first: they delete what the layers *below* put there.
    for m in members:
        rel = _clean(m.name)
        if rel is None:
            continue
        base, parent = os.path.basename(rel), os.path.dirname(rel)
        if not base.startswith(WH):
            continue
        pdir = os.path.join(dest, parent)
        if not _inside(dest, pdir) or not os.path.isdir(pdir):
            continue
        if base == OPAQUE:
            for entry in os.listdir(pdir):
                _remove(os.path.join(pdir, entry))
        else:
            _remove(os.path.join(pdir, base[len(WH):]))
    dirs = []
    for m in members:
        rel = _clean(m.name)
        if rel is None or os.path.basename(rel).startswith(WH):
            continue
        target = os.path.join(dest, rel)
        parent = os.path.dirname(target)
        if not _inside(dest, parent):
            raise ImageError(f"{label}: member {m.name!r} would be written outside the image through a symlink",
                             "the archive is malicious or broken")
        if m.ischr() or m.isblk() or m.isfifo():
            skipped.append(rel)
            continue
        os.makedirs(parent, exist_ok=True)
        if m.isdir():
            if os.path.lexists(target) and not os.path.isdir(target) or os.path.islink(target):
                _remove(target)
            os.makedirs(target, exist_ok=True)
            os.chmod(target, 0o700)         # writable while we fill it; real mode set at the end
            dirs.append((target, m))
            continue
        if os.path.lexists(target):
            _remove(target)
        if m.issym():
            os.symlink(m.linkname, target)
            own(target, m)
        elif m.islnk():
            lrel = _clean(m.linkname)
            src = os.path.join(dest, lrel or "")
            if lrel is None or not _inside(dest, src) or not os.path.isfile(src) or os.path.islink(src):
                raise ImageError(f"{label}: hard link {m.name!r} -> {m.linkname!r} points outside the image",
                                 "the archive is malicious or broken")
            os.link(src, target)
        elif m.isfile():
            src = tar.extractfile(m)
            try:
                with open(target, "xb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            except (tarfile.TarError, EOFError) as e:
                raise ImageError(f"{label}: truncated or corrupt archive ({e})") from None
            own(target, m)
            # unprivileged: no setuid (it would give nothing) and always readable by us
            os.chmod(target, m.mode & 0o7777 if owners else (m.mode & 0o777) | 0o600)
        os.utime(target, (m.mtime, m.mtime), follow_symlinks=False) if not m.issym() else None
    for path, m in reversed(dirs):
        own(path, m)
        os.chmod(path, m.mode & 0o7777 if owners else (m.mode & 0o1777) | 0o700)


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        trees.make_removable(path)
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)
