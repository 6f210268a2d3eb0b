"""The one file API for writing image trees: every operation is relative to an fd of the
tree's root and can never act outside it.

Image content is hostile: any path of a layer, archive, base image or definition file may
be, or pass through, a symlink pointing anywhere, a later member may replace a directory by
such a link, and builds run as root. So no path is ever joined to the root as a string.
A path's parent directory is resolved *inside* the root, the way the container will see
it (symlinks followed but clamped at the root, `..` stops there): by `openat2` with
RESOLVE_IN_ROOT where the kernel has it (>= 5.6), else by runtime/safepath's component
walk. The last component is then acted on with *at calls that do not follow it
(O_NOFOLLOW, AT_SYMLINK_NOFOLLOW), or on an fd of the object itself. Modelled on runc's
securejoin/MkdirAllInRoot and umoci's layer unpacker.
"""

import ctypes
import errno
import os
import stat

from hpcrun.errors import DiskFullError, HpcrunError, ImageError

O_PATH = os.O_PATH
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
_SYS_OPENAT2 = 437  # one number on every architecture (added after the tables were unified)
NOFOLLOW = O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_openat2_works = None


def _openat2(dirfd, path, flags, mode=0):
    how = _OpenHow(flags | os.O_CLOEXEC, mode, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    raw = os.fsencode(path)
    for _ in range(32):
        fd = _libc.syscall(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_int(dirfd),
            ctypes.c_char_p(raw),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return fd
        e = ctypes.get_errno()
        if e != errno.EAGAIN:  # EAGAIN: a rename elsewhere raced the walk; the kernel asks to retry
            raise OSError(e, os.strerror(e), path)
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)


def have_openat2():
    """Probed once: ENOSYS on old kernels, EPERM under some seccomp profiles."""
    global _openat2_works
    if _openat2_works is None:
        try:
            os.close(_openat2(os.open("/", O_PATH | os.O_CLOEXEC), ".", O_PATH))
            _openat2_works = True
        except OSError:
            _openat2_works = False
    return _openat2_works


def components(path):
    """The names of a path inside the image, `..` resolved lexically (clamped at the root)."""
    out = []
    for p in os.fsdecode(path).split("/"):
        if p == "..":
            if out:
                out.pop()
        elif p and p != ".":
            out.append(p)
    return out


def failure(e, what):
    """An OSError met while writing a tree -> the one line a user gets."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return disk_full(what)
    return ImageError(f"{what}: {e.strerror or e}")


def disk_full(what):
    return DiskFullError(f"disk full: {what}", "free space there or build elsewhere")


class Root:
    """An image tree being written. Paths are as the image sees them ('/etc/x' or 'etc/x')."""

    def __init__(self, path):
        self.path = path  # for messages only
        self.fd = os.open(path, O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- resolution ---------------------------------------------------------------------

    def resolve(self, path, flags=O_PATH):
        """An fd for path with every component followed inside the root."""
        rel = "/".join(components(path)) or "."
        if have_openat2():
            return _openat2(self.fd, rel, flags)
        from hpcrun.runtime import safepath

        try:
            fd, _names, exists = safepath.walk_at(os.dup(self.fd), rel)
        except HpcrunError:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), rel) from None
        if not exists:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), rel)
        if flags == O_PATH:
            return fd
        try:
            if flags & os.O_DIRECTORY and not stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), rel)
            return os.open(f"/proc/self/fd/{fd}", (flags | os.O_CLOEXEC) & ~os.O_DIRECTORY)  # the same object
        finally:
            os.close(fd)

    def makedirs(self, path, mode=0o755, _links=0):
        """mkdir -p inside the root (through the image's links, clamped; a dangling link's
        target is made too, as securejoin's MkdirAll does); an O_PATH fd of it. Every prefix
        is resolved from the root: a link met on the way restarts there."""
        comps = components(path)
        n = len(comps)
        while True:  # the longest prefix that exists
            try:
                fd = self.resolve("/".join(comps[:n]), O_PATH | os.O_DIRECTORY)
                break
            except FileNotFoundError:
                if n == 0:
                    raise
                n -= 1
        while n < len(comps):
            try:
                os.mkdir(comps[n], mode, dir_fd=fd)
            except FileExistsError:  # a dangling link: make what it points to
                st = os.stat(comps[n], dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode) or _links >= 40:
                    raise
                target = os.readlink(comps[n], dir_fd=fd)
                base = "" if target.startswith("/") else "/".join(comps[:n])
                os.close(self.makedirs(f"{base}/{target}", mode, _links + 1))
            finally:
                os.close(fd)
            n += 1
            fd = self.resolve("/".join(comps[:n]), O_PATH | os.O_DIRECTORY)
        return fd

    def parent(self, path, create=False):
        """(fd of the parent directory, last name): the parent resolved inside the root, the
        name not followed. create: make missing parents as directories."""
        comps = components(path)
        if not comps:
            raise OSError(errno.EISDIR, "the image's root itself", "/")
        parent = "/".join(comps[:-1])
        fd = self.makedirs(parent) if create else self.resolve(parent, O_PATH | os.O_DIRECTORY)
        return _At(fd, comps[-1])

    # -- reading ------------------------------------------------------------------------

    def lstat(self, path):
        try:
            with self.parent(path) as (dfd, name):
                return os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def open_read(self, path):
        """A read fd for a regular file (links followed inside the root); never blocks on a
        FIFO or opens a device."""
        fd = self.resolve(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file", path)
        os.set_blocking(fd, True)
        return fd

    def read(self, path, limit, what):
        """The bytes of a regular file in the tree, or None if missing; refused past limit."""
        try:
            fd = self.open_read(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ImageError(f"{what}: {path} is larger than {limit >> 20} MiB", "the image is broken or hostile")
        return data

    def real_path(self, path):
        """The host path of a regular file in the tree, resolved inside it: for tools that take
        a path (tarfile, zstd). Safe only for trees nobody else can change (our work dir)."""
        fd = self.open_read(path)
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)

    # -- writing ------------------------------------------------------------------------

    def remove(self, path):
        """Delete path (a whole tree if it is a directory); never follows its last component."""
        try:
            with self.parent(path) as (dfd, name):
                remove_at(dfd, name)
        except (FileNotFoundError, NotADirectoryError):
            pass

    def empty(self, path):
        """Delete everything in the directory path (followed inside the root)."""
        try:
            fd = self.resolve(path, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            return
        try:
            for name in os.listdir(fd):
                remove_at(fd, name)
        finally:
            os.close(fd)

    def mkdir(self, path, mode):
        """A directory at path (whatever non-directory was there goes); an O_RDONLY fd of it."""
        with self.parent(path, create=True) as (dfd, name):
            st = _lstat_at(dfd, name)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                remove_at(dfd, name)
                st = None
            if st is None:
                os.mkdir(name, mode, dir_fd=dfd)
            return open_dir_at(dfd, name)

    def create(self, path, mode=0o600):
        """A new regular file at path, whatever was there removed first: a binary writer."""
        with self.parent(path, create=True) as (dfd, name):
            remove_at(dfd, name)
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
        return os.fdopen(fd, "wb")

    def write(self, path, data, mode=0o644):
        """Replace path by a file holding data: written under a temporary name in the same
        directory, then renamed over it, so a link that was there is replaced, not followed."""
        if isinstance(data, str):
            data = data.encode()
        with self.parent(path, create=True) as (dfd, name):
            tmp = f".hpcrun-{os.getpid()}-{os.urandom(4).hex()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    os.fchmod(f.fileno(), mode)
                st = _lstat_at(dfd, name)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    remove_at(dfd, name)
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=dfd)
                except OSError:
                    pass
                raise

    def symlink(self, target, path):
        with self.parent(path, create=True) as (dfd, name):
            remove_at(dfd, name)
            os.symlink(target, name, dir_fd=dfd)

    def hardlink(self, source, path):
        """path becomes another name of source (both inside the root; source's last
        component not followed, and it must not be a directory)."""
        with self.parent(source) as (sfd, sname), self.parent(path, create=True) as (dfd, name):
            st = os.stat(sname, dir_fd=sfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise OSError(errno.EPERM, "hard link to a directory", source)
            remove_at(dfd, name)
            os.link(sname, name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)

    def set_attrs(self, path, mode=None, owner=None, mtime=None):
        """chmod/chown/utime path itself (a link's target is never touched; a link gets
        only its owner and times)."""
        with self.parent(path) as (dfd, name):
            set_attrs_at(dfd, name, mode, owner, mtime)

    def copy_in(self, src, path):
        """Copy the host file or directory src (the caller's own) to path in the tree. A
        directory merges into what is there; links inside it are copied as links."""
        if not os.path.isdir(src):
            self._copy_file(src, path)
            return
        todo = [(src, "/".join(components(path)))]
        while todo:
            hsrc, rel = todo.pop()
            dfd = self.mkdir(rel, 0o755) if rel else self.resolve(".", os.O_RDONLY | os.O_DIRECTORY)
            with os.scandir(hsrc) as it:
                for entry in it:
                    dst = f"{rel}/{entry.name}"
                    if entry.is_symlink():
                        self.symlink(os.readlink(entry.path), dst)
                    elif entry.is_dir():
                        todo.append((entry.path, dst))
                    elif entry.is_file():
                        self._copy_file(entry.path, dst)
            st = os.stat(hsrc)
            try:  # on the directory's own fd: the root itself has no parent here
                os.chmod(f"/proc/self/fd/{dfd}", stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
                os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dfd)

    def copy_from(self, other, src, path):
        """Copy src of the tree `other` (an inroot.Root, e.g. an earlier build stage) to path
        in this one. src is resolved inside other (its links followed there, never out of
        it); inside a directory links are copied as links and special files left out. As
        root (of the mapping) owners are kept."""
        todo = [(src, "/".join(components(path)))]
        while todo:
            s, rel = todo.pop()
            fd = other.resolve(s, O_PATH)
            try:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode):
                    self._copy_file(f"/proc/self/fd/{fd}", rel)
                    self._keep_owner(rel, st)
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    raise OSError(errno.EINVAL, "not a regular file or directory", s)
                todo += self._copy_dir_from(fd, st, s, rel)
            finally:
                os.close(fd)

    def _copy_dir_from(self, fd, st, s, rel):
        """The directory itself and its links and files; its subdirectories to do."""
        sub = []
        dfd = self.mkdir(rel, 0o755) if rel else self.resolve(".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in os.listdir(f"/proc/self/fd/{fd}"):
                est = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISLNK(est.st_mode):
                    self.symlink(os.readlink(name, dir_fd=fd), f"{rel}/{name}")
                    self._keep_owner(f"{rel}/{name}", est)
                elif stat.S_ISDIR(est.st_mode) or stat.S_ISREG(est.st_mode):
                    sub.append((f"{s.rstrip('/')}/{name}", f"{rel}/{name}"))
            if os.geteuid() == 0:  # before chmod: chown clears set-id bits
                os.chown(f"/proc/self/fd/{dfd}", st.st_uid, st.st_gid)
            os.chmod(f"/proc/self/fd/{dfd}", stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
        finally:
            os.close(dfd)
        return sub

    def _keep_owner(self, rel, st):
        if os.geteuid() == 0:  # the mode again after chown, which clears set-id bits
            mode = None if stat.S_ISLNK(st.st_mode) else stat.S_IMODE(st.st_mode)
            self.set_attrs(rel, mode=mode, owner=(st.st_uid, st.st_gid))

    def _copy_file(self, src, path):
        fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)  # never hang on a FIFO
        with os.fdopen(fd, "rb") as s:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file or directory", src)
            os.set_blocking(fd, True)
            with self.create(path) as d:
                while True:
                    chunk = s.read(1 << 20)
                    if not chunk:
                        break
                    d.write(chunk)
                d.flush()
                os.fchmod(d.fileno(), stat.S_IMODE(st.st_mode))
                os.utime(d.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))


class _At:
    """(dirfd, name) that closes dirfd on leaving a with block."""

    def __init__(self, fd, name):
        self.fd, self.name = fd, name

    def __enter__(self):
        return self.fd, self.name

    def __exit__(self, *exc):
        os.close(self.fd)


def _lstat_at(dfd, name):
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def set_attrs_at(dfd, name, mode=None, owner=None, mtime=None):
    """Attributes of the object dfd/name itself: chown and utime with AT_SYMLINK_NOFOLLOW,
    chmod through an O_PATH fd of a non-link (Linux has no lchmod)."""
    if owner is not None:
        os.chown(name, owner[0], owner[1], dir_fd=dfd, follow_symlinks=False)
    if mode is not None:
        fd = os.open(name, NOFOLLOW, dir_fd=dfd)
        try:
            if not stat.S_ISLNK(os.fstat(fd).st_mode):
                os.chmod(f"/proc/self/fd/{fd}", mode)
        finally:
            os.close(fd)
    if mtime is not None:
        os.utime(name, ns=(mtime, mtime), dir_fd=dfd, follow_symlinks=False)


def open_dir_at(dfd, name):
    """O_RDONLY fd of the directory dfd/name (not followed), given u+rwx first if it lacks
    them and is ours: so unprivileged builds can enter and empty 0555 or 0000 directories."""
    fd = os.open(name, NOFOLLOW | os.O_DIRECTORY, dir_fd=dfd)
    try:
        st = os.fstat(fd)
        if st.st_mode & stat.S_IRWXU != stat.S_IRWXU and st.st_uid == os.geteuid():
            os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)


def remove_at(dfd, name):
    """Delete dfd/name, a whole tree if it is a directory (fd-based, never following a link,
    without recursion: image trees can be deeper than Python's stack)."""
    st = _lstat_at(dfd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dfd)
        return
    walk_at(dfd, name, on_file=lambda fd, n: os.unlink(n, dir_fd=fd), on_leave=lambda pfd, n: os.rmdir(n, dir_fd=pfd))


def walk_at(dfd, name, on_file=None, on_leave=None):
    """Depth-first over the directory dfd/name: on_file(dirfd, name) for each non-directory,
    on_leave(parentfd, name) after a directory's entries (bottom-up). Directories are
    entered through open_dir_at (made u+rwx when ours)."""
    _enough_fds()
    top = open_dir_at(dfd, name)
    stack = [(top, iter(os.listdir(top)), name)]
    try:
        while stack:
            fd, names, _ = stack[-1]
            child = next(names, None)
            if child is None:
                os.close(fd)
                _, _, me = stack.pop()
                if on_leave:
                    on_leave(stack[-1][0] if stack else dfd, me)
                continue
            st = os.stat(child, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                sub = open_dir_at(fd, child)
                stack.append((sub, iter(os.listdir(sub)), child))
            elif on_file:
                on_file(fd, child)
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def _enough_fds():
    """One fd per directory level is held while walking: allow a deep tree (paths we create
    stop at PATH_MAX, so about 2048 levels)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
