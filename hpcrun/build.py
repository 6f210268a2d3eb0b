"""`hpcrun build OUT SOURCE` for a sandbox directory SOURCE (other sources: later).

OUT ending in .sif gets a SIF (squashfs primary partition, host arch); anything else
a plain squashfs. Written to a temporary name next to OUT and renamed when complete."""
import os
import shutil
import subprocess
import sys

from hpcrun.errors import ImageError, UsageError


def build(out, source, force=False, quiet=False):
    if not os.path.isdir(source):
        raise UsageError(f"build source {source} is not a directory",
                         "this version builds from sandbox directories only")
    if os.path.exists(out) and not force:
        raise UsageError(f"{out} exists", "use --force to overwrite it")
    if not shutil.which("mksquashfs"):
        raise ImageError("mksquashfs is not installed", "install squashfs-tools")
    sif = out.endswith(".sif")
    sqfs = out + ".sqfs.tmp" if sif else out + ".tmp"
    args = ["mksquashfs", source, sqfs, "-noappend", "-all-root", "-processors", str(os.cpu_count() or 1)]
    if quiet or not sys.stderr.isatty():
        args += ["-quiet", "-no-progress"]
    try:
        proc = subprocess.run(args, stdout=None if sys.stderr.isatty() and not quiet else subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise ImageError(f"mksquashfs failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        if sif:
            from hpcrun.images.sif import write_sif
            write_sif(out, sqfs)
        else:
            os.replace(sqfs, out)
    finally:
        if os.path.exists(sqfs):
            os.unlink(sqfs)
    return 0
