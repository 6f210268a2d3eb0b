"""`hpcrun build OUT SOURCE`: OUT ending in .sif gets a SIF (squashfs primary partition,
host arch), anything else a plain squashfs. Sources: a sandbox directory, a root file
system tarball (.tar, .tar.gz, .tar.xz, .tar.zst), `docker-archive:FILE`,
`oci:DIR[:tag]`, `oci-archive:FILE[:tag]`, or an Apptainer definition file (recognised
by its `Bootstrap:` header). Work happens in a hidden directory next to OUT, which appears
only when complete; nothing is left on failure."""
import os
import re
import shutil
import subprocess
import sys
import tempfile

from hpcrun.errors import ImageError, UsageError

PREFIXES = ("docker-archive:", "oci-archive:", "oci:", "docker://", "oras://")


COMPRESSORS = ("gzip", "zstd", "lz4", "xz")


def build(out, source, force=False, quiet=False, build_args=(), notest=False, compress="gzip",
          reproducible=False):
    if os.path.exists(out) and not force:
        raise UsageError(f"{out} exists", "use --force to overwrite it")
    if not shutil.which("mksquashfs"):
        raise ImageError("mksquashfs is not installed", "install squashfs-tools")
    if compress not in COMPRESSORS:
        raise UsageError(f"--compress {compress}: unknown", f"use one of {', '.join(COMPRESSORS)}")
    sqopts = {"compress": compress, "reproducible": reproducible}
    say = (lambda msg: None) if quiet or not sys.stderr.isatty() else (
        lambda msg: sys.stderr.write(f"hpcrun: {msg}\n"))
    definition = _definition(source, build_args)
    if definition is None and os.path.isdir(source) and not source.startswith(PREFIXES):
        return squash(source, out, quiet, **sqopts)
    work = tempfile.mkdtemp(prefix=".hpcrun-build-", dir=os.path.dirname(os.path.abspath(out)))
    idmap = None
    try:
        from hpcrun.builders import metadata
        rootfs = os.path.join(work, "rootfs")
        if definition is None:
            os.mkdir(rootfs)
            metadata.write(rootfs, populate(source, rootfs, work, quiet, say))
            return squash(rootfs, out, quiet, **sqopts)
        from hpcrun.builders import deffile
        from hpcrun.runtime.idmap import build_idmap
        defdir = os.path.dirname(os.path.abspath(source))
        src = deffile.source_of(definition, defdir)
        if src is None:
            os.mkdir(rootfs)
        else:
            config = populate(src, rootfs, work, quiet, say)
            metadata.write(rootfs, config)
        metadata.write(rootfs)
        deffile.apply_sections(definition, rootfs, defdir)
        idmap = build_idmap() if os.getuid() != 0 else None
        if idmap and idmap["mode"] == "root" and not quiet:
            sys.stderr.write("hpcrun: note: no /etc/subuid range: %post runs as root mapped to you only; "
                             "chown to other ids will fail\n")
        if definition.sections.get("post"):
            say("running %post")
            deffile.run_in_image("%post", rootfs, definition.sections["post"], writable=True)
        if definition.sections.get("test") and not notest:
            say("running %test")
            deffile.run_in_image("%test", rootfs, definition.sections["test"], writable=False)
        return squash(rootfs, out, quiet, idmap, **sqopts)
    finally:
        _remove(work, idmap)


def populate(source, rootfs, work, quiet, say):
    """Fill rootfs (not existing yet for directories and images) from source; returns the
    OCI image config, if the source had one."""
    from hpcrun.builders import layers as layermod, oci
    if os.path.isdir(source) and not source.startswith(PREFIXES):
        shutil.copytree(source, rootfs, symlinks=True)
        return None
    if not source.startswith(PREFIXES) and os.path.isfile(source) and _is_image(source):
        _unsquash(source, rootfs)
        return None
    os.makedirs(rootfs, exist_ok=True)
    config = None
    if source.startswith(("docker://", "oras://")):
        from hpcrun.builders import registry
        paths, config = registry.pull(source, quiet)
    elif source.startswith("docker-archive:"):
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
                         "give a directory, a tarball, docker-archive:FILE, oci:DIR, oci-archive:FILE "
                         "or a definition file")
    skipped = []
    dest = os.path.realpath(rootfs)
    for i, path in enumerate(paths, 1):
        say(f"unpacking layer {i}/{len(paths)}")
        with layermod.open_tar(path, work) as tar:
            layermod.apply(tar, dest, source if len(paths) == 1 else f"{source} layer {i}", skipped)
    if skipped and not quiet:
        sys.stderr.write(f"hpcrun: note: skipped {len(skipped)} device node(s)/FIFO(s) "
                         f"(an unprivileged build cannot create them), e.g. /{skipped[0]}\n")
    return config


def _definition(source, build_args):
    if source.startswith(PREFIXES) or not os.path.isfile(source):
        return None
    with open(source, "rb") as f:
        head = f.read(8192)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not re.search(r"^\s*bootstrap\s*:", text, re.IGNORECASE | re.MULTILINE):
        return None
    from hpcrun.builders import deffile
    with open(source, encoding="utf-8") as f:
        return deffile.parse(f.read(), source, build_args)


def _is_image(path):
    with open(path, "rb") as f:
        head = f.read(64)
    return head[:4] == b"hsqs" or head[32:42] == b"SIF_MAGIC\0"


def _unsquash(path, rootfs):
    from hpcrun.images.detect import open_image
    image = open_image(path)
    try:
        proc = subprocess.run(["unsquashfs", "-no-xattrs", "-no-progress", "-d", rootfs, "-o", str(image.offset),
                               f"/proc/self/fd/{image.fd}"], pass_fds=(image.fd,), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    finally:
        image.close()
    if proc.returncode != 0:
        raise ImageError(f"{path}: unsquashfs failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")


def _existing(path):
    if not os.path.exists(path):
        raise UsageError(f"build source {path}: no such file or directory")
    return path


def _split_tag(ref):
    if os.path.exists(ref) or ":" not in ref:
        return ref, None
    path, _, tag = ref.rpartition(":")
    return path, tag


def _remove(work, idmap):
    if idmap and idmap["mode"] == "subid" and os.path.exists(work):
        from hpcrun.runtime.idmap import run_mapped   # files owned by subordinate ids
        run_mapped(["rm", "-rf", work], idmap)
    if os.path.exists(work):
        from hpcrun import trees
        trees.remove(work)


def squash(rootfs, out, quiet, idmap=None, compress="gzip", reproducible=False):
    """mksquashfs with all cores. With a subuid map (a %post build) it runs as root of that
    user namespace, so files chowned to other users keep their owners in the image.
    reproducible: fixed times in the squashfs and a zero UUID and times in the SIF, so the
    same inputs give the same bytes."""
    sif = out.endswith(".sif")
    sqfs = out + ".sqfs.tmp" if sif else out + ".tmp"
    mapped = idmap is not None and idmap["mode"] == "subid"
    args = ["mksquashfs", rootfs, sqfs, "-noappend", "-processors", str(os.cpu_count() or 1), "-comp", compress]
    if reproducible:
        args += ["-mkfs-time", "0", "-all-time", "0"]
    args += [] if mapped else ["-all-root"]
    loud = sys.stderr.isatty() and not quiet
    if not loud:
        args += ["-quiet", "-no-progress"]
    try:
        if mapped:
            from hpcrun.runtime.idmap import run_mapped
            if run_mapped(args, idmap) != 0:
                raise ImageError("mksquashfs failed (see above)")
        else:
            proc = subprocess.run(args, stdout=None if loud else subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True)
            if proc.returncode != 0:
                raise ImageError(f"mksquashfs failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        if sif:
            from hpcrun.images.sif import write_sif
            if reproducible:
                write_sif(out, sqfs, now=-62135596800, uuid_bytes=bytes(16))  # Go's zero time
            else:
                write_sif(out, sqfs)
        else:
            os.replace(sqfs, out)
    finally:
        if os.path.exists(sqfs):
            os.unlink(sqfs)
    return 0
