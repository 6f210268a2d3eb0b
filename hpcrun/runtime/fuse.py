"""squashfuse lifecycle: we mount the FUSE file system ourselves (we hold the user
namespace's CAP_SYS_ADMIN, the daemon would not after exec), then hand the open
/dev/fuse to squashfuse as `/dev/fd/N`, as Apptainer does. The daemon dies with us
(PDEATHSIG) and never outlives the container; a shared container's daemon instead
lives exactly as long as the mount (see `detach`)."""
import os

from hpcrun.errors import ImageError, RuntimeSetupError
from hpcrun.runtime import syscalls as sc


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
    sc.mount(image_path, mountpoint, "fuse.squashfuse", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_RDONLY,
             f"fd={devfd},rootmode=40000,user_id={uid},group_id={gid},allow_other",
             what=f"cannot mount {image_path} with FUSE")
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
            os.setsid()   # the terminal's ^C is for the command, not the file system
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
            os.execv(daemon, [daemon, "-f", "-o", f"offset={offset}",
                              f"/proc/self/fd/{image_fd}", f"/dev/fd/{devfd}"])
        finally:
            os._exit(127)
    os.close(devfd)  # the daemon's copy is the last one: if it dies, the mount fails fast
    try:
        os.listdir(mountpoint)   # blocks until the daemon serves, ENOTCONN if it died
    except OSError as e:
        try:
            os.kill(pid, 9)        # it may still be serving a broken image
        except ProcessLookupError:
            pass
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        os.lseek(log, 0, 0)
        said = os.read(log, 4096).decode(errors="replace").strip().splitlines()
        os.close(log)
        if status == 127 and not said:
            raise RuntimeSetupError(f"cannot start {daemon}", "run `hpcrun check`") from None
        detail = said[-1] if said else e.strerror
        raise ImageError(f"{image_path}: squashfuse cannot read the image: {detail}",
                         "the image is corrupt: copy or build it again") from None
    os.close(log)
    return pid
