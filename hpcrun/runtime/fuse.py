"""squashfuse lifecycle: we mount the FUSE file system ourselves (we hold the user
namespace's CAP_SYS_ADMIN, the daemon would not after exec), then hand the open
/dev/fuse to squashfuse as `/dev/fd/N`, as Apptainer does. The daemon dies with us
(PDEATHSIG) and never outlives the container; a shared container's daemon instead
lives exactly as long as the mount (see `detach`)."""

import errno
import os

from hpcrun.errors import ImageError, RuntimeSetupError
from hpcrun.runtime import syscalls as sc

LOST = (errno.ENOTCONN, errno.ECONNABORTED)  # the FUSE connection is gone: its daemon died


def which(names, path=None):
    for name in names:
        for d in (path or os.environ.get("PATH", "/usr/bin:/bin")).split(":"):
            cand = os.path.join(d or ".", name)
            if os.access(cand, os.X_OK) and not os.path.isdir(cand):
                return cand
    for d in ("/usr/bin", "/usr/local/bin", "/bin"):
        for name in names:
            cand = os.path.join(d, name)
            if os.access(cand, os.X_OK):
                return cand
    return None


def open_device(path="/dev/fuse"):
    """An fd for /dev/fuse, or None when FUSE is not usable here."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None


def mount(devfd, image_fd, image_path, offset, mountpoint, daemon, uid, gid, host_root, detach=False):
    """Mount the squashfs at image_fd+offset on mountpoint; return the daemon's pid.

    The daemon runs chrooted to host_root (where the host's / is during setup) so that
    its binary and libraries resolve as on the host. detach: instead of dying with us,
    the daemon serves until the mount itself is gone. It moves to a mount namespace of
    its own without the mount, so when the last process leaves the container's
    namespace the kernel drops the mount, aborts the FUSE connection and the daemon
    exits (a shared container's keeper may exit before the tasks using it)."""
    sc.mount(
        image_path,
        mountpoint,
        "fuse.squashfuse",
        sc.MS_NOSUID | sc.MS_NODEV | sc.MS_RDONLY,
        f"fd={devfd},rootmode=40000,user_id={uid},group_id={gid},allow_other",
        what=f"cannot mount {image_path} with FUSE",
    )
    log = os.memfd_create("squashfuse-log")
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            if detach:
                sc.unshare(sc.CLONE_NEWNS)
                sc.umount2(mountpoint, sc.MNT_DETACH)
            else:
                sc.prctl(sc.PR_SET_PDEATHSIG, 9)
                if os.getppid() != parent:
                    os._exit(1)
            os.setsid()  # the terminal's ^C is for the command, not the file system
            os.chroot(host_root)
            os.chdir("/")
            null = os.open("/dev/null", os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)
            os.dup2(log, 2)
            os.set_inheritable(devfd, True)
            os.set_inheritable(image_fd, True)
            import _signal as signal

            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            os.execv(daemon, [daemon, "-f", "-o", f"offset={offset}", f"/proc/self/fd/{image_fd}", f"/dev/fd/{devfd}"])
        finally:
            os._exit(127)
    os.close(devfd)  # the daemon's copy is the last one: if it dies, the mount fails fast
    try:
        os.listdir(mountpoint)  # blocks until the daemon serves, ENOTCONN if it died
    except OSError as e:
        raise _mount_failed(pid, log, daemon, image_path, e) from None
    os.close(log)
    return pid


def _mount_failed(pid, log, daemon, image_path, e):
    """The error for a mount whose first listing failed with e; reaps the daemon."""
    code = exit_code(pid, 1.0 if e.errno in LOST else 0)
    if code is None:  # still serving: it refuses a broken image
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    os.lseek(log, 0, 0)
    said = os.read(log, 4096).decode(errors="replace").strip().splitlines()
    os.close(log)
    if code is not None and code < 0:  # a signal from outside: nothing says the image is bad
        return died(image_path, code, "while mounting")
    if code == 127 and not said:
        return RuntimeSetupError(f"cannot start {daemon}", "run `hpcrun check`")
    detail = said[-1] if said else e.strerror
    return ImageError(
        f"{image_path}: squashfuse cannot read the image: {detail}", "the image is corrupt: copy or build it again"
    )


def exit_code(pid, wait=0.0):
    """The daemon's exit code once it has exited (then reaped; negative: killed by that
    signal), else None. Waits up to `wait` seconds: a daemon whose connection is gone is
    exiting, but may not be reapable yet."""
    while True:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            return os.waitstatus_to_exitcode(status)
        if wait <= 0:
            return None
        import time

        time.sleep(0.01)
        wait -= 0.01


def died(image_path, code, when):
    how = f"was killed (signal {-code})" if code < 0 else f"exited (status {code})"
    return RuntimeSetupError(
        f"squashfuse {how} {when} {image_path}", "run it again; if it keeps failing, run `hpcrun check`"
    )


def set_up_failed(pid, image_path, exc):
    """Setting the container up failed with exc while the daemon pid served image_path:
    stop the daemon, and return the error to raise instead of exc (None: exc stands).
    A daemon that died first is the cause, whatever exc says (a bind destination 'not
    in the image', an OSError on /etc/passwd)."""
    lost = _lost(exc)
    code = exit_code(pid, 1.0 if lost else 0)
    if code is not None:
        return died(image_path, code, "while the container was set up from")
    try:
        os.kill(pid, 15)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
    if lost:
        return RuntimeSetupError(
            f"the FUSE connection to {image_path} was lost while the container was set up",
            "run it again; if it keeps failing, run `hpcrun check`",
        )
    return None


def _lost(exc):
    """Whether exc (or what it was raised from) is the FUSE connection going away."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in LOST:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
