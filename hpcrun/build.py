"""`hpcrun build OUT SOURCE`: OUT ending in .sif gets a SIF (squashfs primary partition,
host arch), anything else a plain squashfs. Sources: a sandbox directory, a root file
system tarball (.tar, .tar.gz, .tar.xz, .tar.zst), `docker-archive:FILE`,
`oci:DIR[:tag]`, `oci-archive:FILE[:tag]`. Work happens in a hidden directory next to OUT,
which is renamed into place only when complete; nothing is left on failure."""
import os
import shutil
import subprocess
import sys
import tempfile

from hpcrun.errors import ImageError, UsageError

PREFIXES = ("docker-archive:", "oci-archive:", "oci:")


def build(out, source, force=False, quiet=False):
    if os.path.exists(out) and not force:
        raise UsageError(f"{out} exists", "use --force to overwrite it")
    if not shutil.which("mksquashfs"):
        raise ImageError("mksquashfs is not installed", "install squashfs-tools")
    say = (lambda msg: None) if quiet or not sys.stderr.isatty() else (
        lambda msg: sys.stderr.write(f"hpcrun: {msg}\n"))
    if os.path.isdir(source) and not source.startswith(PREFIXES):
        return squash(source, out, quiet)
    work = tempfile.mkdtemp(prefix=".hpcrun-build-", dir=os.path.dirname(os.path.abspath(out)))
    try:
        from hpcrun.builders import layers as layermod, metadata, oci
        rootfs = os.path.join(work, "rootfs")
        os.mkdir(rootfs)
        config = None
        if source.startswith("docker-archive:"):
            paths, config = oci.from_docker_archive(_existing(source[15:]), work)
        elif source.startswith("oci-archive:"):
            path, tag = _split_tag(source[12:])
            paths, config = oci.from_oci_archive(_existing(path), work, tag)
        elif source.startswith("oci:"):
            path, tag = _split_tag(source[4:])
            paths, config = oci.from_layout(_existing(path), tag)
        elif os.path.isfile(source):
            paths = [source]
        else:
            raise UsageError(f"build source {source!r}: no such file or directory",
                             "give a directory, a tarball, docker-archive:FILE, oci:DIR or oci-archive:FILE")
        skipped = []
        dest = os.path.realpath(rootfs)
        for i, path in enumerate(paths, 1):
            say(f"unpacking layer {i}/{len(paths)}")
            with layermod.open_tar(path, work) as tar:
                layermod.apply(tar, dest, source if len(paths) == 1 else f"{source} layer {i}", skipped)
        if skipped and not quiet:
            sys.stderr.write(f"hpcrun: note: skipped {len(skipped)} device node(s)/FIFO(s) "
                             f"(an unprivileged build cannot create them), e.g. /{skipped[0]}\n")
        metadata.write(rootfs, config)
        return squash(rootfs, out, quiet)
    finally:
        from hpcrun.builders.layers import make_removable
        make_removable(work)
        shutil.rmtree(work, ignore_errors=True)


def _existing(path):
    if not os.path.exists(path):
        raise UsageError(f"build source {path}: no such file or directory")
    return path


def _split_tag(ref):
    if os.path.exists(ref) or ":" not in ref:
        return ref, None
    path, _, tag = ref.rpartition(":")
    return path, tag


def squash(rootfs, out, quiet):
    sif = out.endswith(".sif")
    sqfs = out + ".sqfs.tmp" if sif else out + ".tmp"
    args = ["mksquashfs", rootfs, sqfs, "-noappend", "-all-root", "-processors", str(os.cpu_count() or 1)]
    loud = sys.stderr.isatty() and not quiet
    if not loud:
        args += ["-quiet", "-no-progress"]
    try:
        proc = subprocess.run(args, stdout=None if loud else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
