"""Fallback when FUSE is unusable: extract the squashfs to a temporary sandbox.

The tree is made, and removed, by a small process forked before anything is extracted:
it creates the directory, tells us its name, and waits for our end of a pipe to close,
so the tree goes whenever hpcrun ends, SIGKILL included. unsquashfs dies with us
(PR_SET_PDEATHSIG), and the remover retries until the tree is really gone."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from hpcrun.errors import ImageError, RuntimeSetupError
from hpcrun.runtime import syscalls as sc

PREFIX = "hpcrun-unsquash-"


def start_remover():
    """Fork the remover; returns (pid, pipe fd to close when done, top directory)."""
    parent = os.environ.get("TMPDIR") or "/tmp"
    life_r, life_w = os.pipe()
    name_r, name_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(life_w)
            os.close(name_r)
            _remover(parent, life_r, name_w)
        finally:
            os._exit(0)
    os.close(life_r)
    os.close(name_w)
    answer = b""
    while chunk := os.read(name_r, 4096):
        answer += chunk
    os.close(name_r)
    kind, _, text = answer.decode(errors="surrogateescape").partition(":")
    if kind != "ok":
        os.close(life_w)
        os.waitpid(pid, 0)
        raise RuntimeSetupError(f"cannot make a directory in {parent} to extract the image: "
                                f"{text or 'unknown error'}", "set TMPDIR to a writable directory")
    return pid, life_w, text


def _remover(parent, life, name_w):
    os.setsid()   # not in the terminal's process group: a Ctrl-C must not stop the clean-up
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    try:
        top = tempfile.mkdtemp(prefix=PREFIX, dir=parent)
    except OSError as e:
        os.write(name_w, f"error:{e.strerror}".encode())
        return
    os.write(name_w, b"ok:" + os.fsencode(top))
    os.close(name_w)
    os.read(life, 1)   # EOF: hpcrun exited or closed the pipe
    for _ in range(100):   # unsquashfs, killed with hpcrun, may still write for a moment
        remove(top)
        if not os.path.lexists(top):
            return
        time.sleep(0.1)


def extract(image, top, reason, quiet=False):
    """Extract the image into top/root (top: from start_remover); returns that path."""
    tool = shutil.which("unsquashfs")
    if not tool:
        raise RuntimeSetupError(f"cannot run {image.path}: {reason}, and unsquashfs is not installed",
                                "install squashfs-tools or squashfuse")
    root = os.path.join(top, "root")
    if not quiet:
        sys.stderr.write(f"hpcrun: {reason}: extracting {image.path} to {top} (removed at exit)\n")
    args = [tool, "-no-xattrs", "-d", root, "-o", str(image.offset), f"/proc/self/fd/{image.fd}"]
    if not sys.stderr.isatty():
        args[1:1] = ["-no-progress"]
    proc = subprocess.run(args, stdout=subprocess.DEVNULL if not sys.stderr.isatty() else None,
                          stderr=subprocess.PIPE, pass_fds=(image.fd,), text=True,
                          preexec_fn=_die_with(os.getpid()))
    if proc.returncode != 0 or not os.path.isdir(root):
        full = "No space left on device" in proc.stderr or _full(top)
        needs = _needs_mib(tool, image) if full else None
        remove(top)
        if full:
            raise RuntimeSetupError(f"disk full: no space left in {os.path.dirname(top)} to extract "
                                    f"{image.path}" + (f" (needs ~{needs} MiB)" if needs else ""),
                                    "set TMPDIR to a directory with more room")
        last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise ImageError(f"{image.path}: unsquashfs failed: {last}", "the image may be corrupt")
    return root


def _die_with(parent):
    def preexec():   # in the child, before exec: SIGKILL when hpcrun dies, even if it already has
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)
    return preexec


def _full(path):
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 16 or st.f_favail == 0


def _needs_mib(tool, image):
    """What the extracted tree takes, from the image's listing: sizes plus a page for
    each entry, rounded up; None if the listing fails."""
    try:
        out = subprocess.run([tool, "-lln", "-o", str(image.offset), f"/proc/self/fd/{image.fd}"],
                             capture_output=True, text=True, pass_fds=(image.fd,), check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    total = 0
    for line in out.splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2].isdigit():
            total += int(fields[2]) + 4096
    return -(-total // (1 << 20))


def remove(top):
    from hpcrun import trees
    trees.remove(top)
