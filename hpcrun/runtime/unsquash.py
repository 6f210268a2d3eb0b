"""Fallback when FUSE is unusable: extract the squashfs to a temporary sandbox.

The tree is made, and removed, by a trees.Remover forked before anything is extracted,
so it goes whenever hpcrun ends, SIGKILL included; unsquashfs dies with us
(PR_SET_PDEATHSIG)."""

import os
import shutil
import subprocess
import sys

from hpcrun import errors
from hpcrun.errors import DiskFullError, ImageError, RuntimeSetupError
from hpcrun.runtime.idmap import dies_with_us

PREFIX = "hpcrun-unsquash-"


def start_remover():
    """The private tree to extract into, with the process that removes it (trees.Remover)."""
    parent = os.environ.get("TMPDIR") or "/tmp"
    from hpcrun import trees

    try:
        return trees.Remover(parent, PREFIX)
    except OSError as e:
        raise RuntimeSetupError(
            f"cannot make a directory in {parent} to extract the image: {e.strerror}",
            "set TMPDIR to a writable directory",
        ) from None


def extract(image, top, reason, quiet=False):
    """Extract the image into top/root (top: from start_remover); returns that path."""
    tool = shutil.which("unsquashfs")
    if not tool:
        raise RuntimeSetupError(
            f"cannot run {image.path}: {reason}, and unsquashfs is not installed",
            "install squashfs-tools or squashfuse",
        )
    root = os.path.join(top, "root")
    if not quiet:
        sys.stderr.write(f"{errors.PROG}: {reason}: extracting {image.path} to {top} (removed at exit)\n")
    args = [tool, "-no-xattrs", "-d", root, "-o", str(image.offset), f"/proc/self/fd/{image.fd}"]
    if not sys.stderr.isatty():
        args[1:1] = ["-no-progress"]
    proc = subprocess.run(
        args,
        stdout=subprocess.DEVNULL if not sys.stderr.isatty() else None,
        stderr=subprocess.PIPE,
        pass_fds=(image.fd,),
        text=True,
        preexec_fn=dies_with_us(),
    )
    if proc.returncode != 0 or not os.path.isdir(root):
        full = "No space left on device" in proc.stderr or _full(top)
        needs = _needs_mib(tool, image) if full else None
        remove(top)
        if full:
            raise DiskFullError(
                f"disk full: no space left in {os.path.dirname(top)} to extract "
                f"{image.path}" + (f" (needs ~{needs} MiB)" if needs else ""),
                "set TMPDIR to a directory with more room",
            )
        last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise ImageError(f"{image.path}: unsquashfs failed: {last}", "the image may be corrupt")
    return root


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
        out = subprocess.run(
            [tool, "-lln", "-o", str(image.offset), f"/proc/self/fd/{image.fd}"],
            capture_output=True,
            text=True,
            pass_fds=(image.fd,),
            check=True,
        ).stdout
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
