"""ctypes wrappers for the system calls Python 3.11 lacks. The only place that turns
errno into HpcrunError, with the context the caller gives.

Built on the C module _ctypes: the ctypes package's classes cost every container start
~5 million instructions (a tenth of it); the few types needed here are declared below."""

import _ctypes
import os

from hpcrun.errors import RuntimeSetupError


class _Int(_ctypes._SimpleCData):
    _type_ = "i"


class _Long(_ctypes._SimpleCData):
    _type_ = "l"


class _ULong(_ctypes._SimpleCData):
    _type_ = "L"


class _Func(_ctypes.CFuncPtr):  # as ctypes.CDLL(None, use_errno=True) makes them
    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
    _restype_ = _Int


class _Libc:
    _handle = _ctypes.dlopen(None, os.RTLD_LOCAL)

    def __getattr__(self, name):
        fn = _Func((name, self))
        setattr(self, name, fn)
        return fn


_libc = _Libc()

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME = 16384, 1 << 18, 1 << 21
MNT_DETACH = 2

PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 1, 38, 36

_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217, "riscv64": 41}


def _check(ret, what, hint=None):
    if ret != 0:
        e = _ctypes.get_errno()
        raise RuntimeSetupError(f"{what}: {os.strerror(e)}", hint)


def _b(s):
    return s.encode() if isinstance(s, str) else s


def unshare(flags, hint=None):
    _check(_libc.unshare(_Int(flags)), "cannot create namespaces (unshare)", hint)


def setns(fd, nstype, what):
    _check(_libc.setns(_Int(fd), _Int(nstype)), f"cannot join {what}")


def mount(src, target, fstype, flags, data=None, what=None):
    _check(
        _libc.mount(_b(src), _b(target), _b(fstype), _ULong(flags), _b(data)),
        what or f"cannot mount {fstype or 'bind'} on {target}",
    )


def umount2(target, flags):
    _check(_libc.umount2(_b(target), _Int(flags)), f"cannot unmount {target}")


def pivot_root(new, old):
    nr = _PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        raise RuntimeSetupError(f"pivot_root: unsupported architecture {os.uname().machine}")
    _check(_libc.syscall(_Long(nr), _b(new), _b(old)), f"cannot pivot_root to {new}")


def prctl(option, arg):
    _check(
        _libc.prctl(_Int(option), _ULong(arg), _ULong(0), _ULong(0), _ULong(0)),
        f"prctl({option})",
    )


def set_name(name):
    """The process name (comm) that ps and pkill show; PR_SET_NAME."""
    _libc.prctl(_Int(15), _b(name)[:15], _ULong(0), _ULong(0), _ULong(0))


def sethostname(name):
    raw = _b(name)
    _check(_libc.sethostname(raw, _ULong(len(raw))), f"cannot set host name {name!r}")


# statvfs f_flag bits -> mount flags a bind remount must keep (the kernel locks them
# on mounts inherited from a more privileged namespace).
_LOCKED = (
    (1, MS_RDONLY),
    (2, MS_NOSUID),
    (4, MS_NODEV),
    (8, MS_NOEXEC),
    (1024, MS_NOATIME),
    (2048, MS_NODIRATIME),
    (4096, MS_RELATIME),
)


def current_flags(path):
    f = os.statvfs(path).f_flag
    return sum(ms for st, ms in _LOCKED if f & st)
