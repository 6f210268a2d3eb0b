"""Unpack root file system tarballs and OCI/Docker layers into a build directory, safely.

Nothing may land outside the destination: every write goes through inroot.Root (parents
resolved inside the root, the member's own name never followed), member names with `..`
that escape are refused, hard links join two names inside, device nodes and FIFOs are
skipped (an unprivileged user cannot make them), directory modes are set last on fds of
the directories themselves. Symlinks are kept as they are: an absolute link is
interpreted inside the image when it runs. With owners=True (run as root, or as root of a
user namespace mapping a subuid range) members keep their numeric owners and full modes;
otherwise everything belongs to the caller and stays readable by it. Layers honour OCI whiteouts: `.wh.NAME`
deletes NAME from the layers below, `.wh..wh..opq` empties its directory of them.
"""

import errno
import os
import shutil
import stat
import subprocess
import tarfile

from hpcrun import inroot
from hpcrun.errors import ImageError

WH = ".wh."
OPAQUE = ".wh..wh..opq"


def _clean(name, label):
    """Member name -> path relative to the root, or None for the root itself; raise if it escapes."""
    parts = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if not parts:
                raise ImageError(
                    f"{label}: member {name!r} points outside the image (..)", "the archive is malicious or broken"
                )
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
        if proc.returncode != 0 and "No space left" in proc.stderr:
            raise inroot.disk_full(f"cannot decompress {path} into {workdir}")
        if proc.returncode != 0:
            raise ImageError(f"{path}: cannot decompress zstd archive: {proc.stderr.strip()}")
        path = out
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ImageError(f"{path}: not a readable tar archive ({e})", "the archive is truncated or corrupt") from None


def apply(tar, root, label, skipped, owners=False, lost=None):
    """Apply one layer (or a whole rootfs tarball) onto root (an inroot.Root).
    Appends to skipped the device nodes/FIFOs left out, to lost (if given) the members
    whose owner is not kept (not owners mode, or an id outside the mapped range)."""
    lost = [] if lost is None else lost
    try:
        members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ImageError(f"{label}: truncated or corrupt archive ({e})", "fetch or rebuild it") from None
    # Whiteouts first: they delete what the layers *below* put there.
    for m in members:
        rel = _clean(m.name, label)
        base = rel.rpartition("/")[2] if rel else ""
        if base.startswith(WH):
            _member(label, m, lambda: _whiteout(root, rel, label, m))
    dirs = []
    for m in members:
        rel = _clean(m.name, label)
        if rel is None or rel.rpartition("/")[2].startswith(WH):
            continue
        if m.ischr() or m.isblk() or m.isfifo():
            skipped.append(rel)
            continue
        if m.isdir():
            # writable while we fill it; its own mode, owner and time are set at the end
            _member(label, m, lambda: os.close(root.mkdir(rel, 0o700)))
            dirs.append((rel, m))
        else:
            _member(label, m, lambda: _entry(tar, root, rel, m, label, owners, lost))
    for rel, m in reversed(dirs):
        _member(label, m, lambda: _finish_dir(root, rel, m, owners, lost))


def _member(label, m, fn):
    """One member's work; what the kernel refuses becomes one line naming the member."""
    try:
        fn()
    except (tarfile.TarError, EOFError) as e:
        raise ImageError(f"{label}: truncated or corrupt archive ({e})") from None
    except OSError as e:
        raise inroot.failure(e, f"{label}: cannot unpack {m.name!r}") from None


def _whiteout(root, rel, label, m):
    parent, _, base = rel.rpartition("/")
    if base == OPAQUE:
        root.empty(parent)
        return
    name = base[len(WH) :]
    if name in ("", ".", "..") or name.startswith(WH):
        raise ImageError(f"{label}: invalid whiteout {m.name!r}", "the archive is malicious or broken")
    root.remove(f"{parent}/{name}")


def _entry(tar, root, rel, m, label, owners, lost):
    """A non-directory member: whatever is in its way goes, then it is created without
    following anything at its own name (its parents are resolved inside the root)."""
    if m.issym():
        root.symlink(m.linkname, rel)
    elif m.islnk():
        src = _clean(m.linkname, label)
        if src is None:
            raise ImageError(
                f"{label}: hard link {m.name!r} -> {m.linkname!r} points outside the image",
                "the archive is malicious or broken",
            )
        root.hardlink(src, rel)
        return  # the link shares its source's inode: nothing more to set
    elif m.isfile():
        src = tar.extractfile(m)
        with root.create(rel) as out:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()  # before the mode: a later write would drop setuid and the time
            fd = out.fileno()
            _own(lambda ids: os.fchown(fd, *ids), rel, m, owners, lost)
            # unprivileged: no setuid (it would give nothing) and always readable by us
            os.fchmod(fd, m.mode & 0o7777 if owners else (m.mode & 0o777) | 0o600)
            os.utime(fd, ns=_ns(m.mtime))
        return
    else:
        return  # (tarfile has no other kinds we keep)
    with root.parent(rel) as (dfd, name):
        _own(lambda ids: os.chown(name, *ids, dir_fd=dfd, follow_symlinks=False), rel, m, owners, lost)
        os.utime(name, ns=_ns(m.mtime), dir_fd=dfd, follow_symlinks=False)


def _finish_dir(root, rel, m, owners, lost):
    """A directory's real mode, owner and time, on an fd of the directory itself: a later
    member may have replaced it by a link, which must not redirect this."""
    with root.parent(rel) as (dfd, name):
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return  # removed by a later whiteout or member
        if not stat.S_ISDIR(st.st_mode):
            return
        fd = inroot.open_dir_at(dfd, name)
    try:
        _own(lambda ids: os.fchown(fd, *ids), rel, m, owners, lost)
        os.fchmod(fd, m.mode & 0o7777 if owners else (m.mode & 0o1777) | 0o700)
        os.utime(fd, ns=_ns(m.mtime))
    finally:
        os.close(fd)


def _own(chown, rel, m, owners, lost):
    if not owners:
        if m.uid or m.gid:
            lost.append(rel)
        return
    try:
        chown((m.uid, m.gid))
    except OSError as e:  # EINVAL: the id is not mapped in this user namespace
        if e.errno != errno.EINVAL:
            raise
        lost.append(rel)


def _ns(mtime):
    """A member's mtime (int or pax float, any size) as utime's (atime, mtime) in ns."""
    ns = max(-(1 << 62), min(1 << 62, int(mtime * 10**9)))
    return ns, ns


def fix_perms(root):
    """Owner rw on every regular file, rwx on every directory of root (an inroot.Root),
    as Apptainer's --fix-perms; links are not followed, other kinds are left as they are."""

    def on_file(dfd, name):
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISREG(st.st_mode):
            inroot.set_attrs_at(dfd, name, mode=stat.S_IMODE(st.st_mode) | 0o600)

    def on_leave(dfd, name):
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        inroot.set_attrs_at(dfd, name, mode=stat.S_IMODE(st.st_mode) | 0o700)

    inroot.walk_at(root.fd, ".", on_file, on_leave)
