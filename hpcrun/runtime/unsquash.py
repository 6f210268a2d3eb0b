"""Fallback when FUSE is unusable: extract the squashfs to a temporary sandbox.

The tree is removed by a small process forked before we enter the namespaces: it waits
for our end of a pipe to close, so the tree goes even when hpcrun is SIGKILLed."""
import os
import shutil
import subprocess
import sys
import tempfile

from hpcrun.errors import ImageError, RuntimeSetupError


def extract(image, reason, quiet=False):
    tool = shutil.which("unsquashfs")
    if not tool:
        raise RuntimeSetupError(f"cannot run {image.path}: {reason}, and unsquashfs is not installed",
                                "install squashfs-tools or squashfuse")
    top = tempfile.mkdtemp(prefix="hpcrun-unsquash-", dir=os.environ.get("TMPDIR") or "/tmp")
    root = os.path.join(top, "root")
    if not quiet:
        sys.stderr.write(f"hpcrun: {reason}: extracting {image.path} to {top} (removed at exit)\n")
    args = [tool, "-no-xattrs", "-d", root, "-o", str(image.offset), f"/proc/self/fd/{image.fd}"]
    if not sys.stderr.isatty():
        args[1:1] = ["-no-progress"]
    proc = subprocess.run(args, stdout=subprocess.DEVNULL if not sys.stderr.isatty() else None,
                          stderr=subprocess.PIPE, pass_fds=(image.fd,), text=True)
    if proc.returncode != 0 or not os.path.isdir(root):
        remove(top)
        last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise ImageError(f"{image.path}: unsquashfs failed: {last}", "the image may be corrupt")
    return top, root


def remove(top):
    from hpcrun import trees
    trees.remove(top)


def start_remover(top):
    """Fork the process that removes `top` once we are gone; returns (pid, pipe fd)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(r)
        return pid, w
    try:
        os.close(w)
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.read(r, 1)   # EOF: hpcrun exited or closed the pipe
        remove(top)
    finally:
        os._exit(0)
